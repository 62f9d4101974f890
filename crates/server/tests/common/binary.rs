//! The `vicuna` binary as a child process: `vicuna serve` started on a free port, signalled and
//! waited for, for the tests that need the real process (its exit, its signals, its memory).
//!
//! The binary is the workspace's `target/<profile>/vicuna`, which `cargo test --workspace` builds
//! (or set VICUNA_BIN). A missing or out-of-date binary fails the test with instructions rather
//! than testing old code.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use super::{model_dir, repo_root, tokenizer_file};

fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let modified = if path.is_dir() { newest_source(&path) } else { entry.metadata().unwrap().modified().unwrap() };
        newest = newest.max(modified);
    }
    newest
}

pub fn vicuna_binary() -> PathBuf {
    let binary = std::env::var_os("VICUNA_BIN").map(PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/deps/process-HASH → target/<profile>/vicuna
        let exe = std::env::current_exe().unwrap();
        exe.parent().and_then(Path::parent).unwrap().join("vicuna")
    });
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!(
            "no vicuna binary at {}: run `cargo build -p vicuna` first (`cargo test --workspace` does)",
            binary.display()
        )
    });
    let root = repo_root();
    for dir in ["crates/server/src", "crates/cli/src"] {
        assert!(
            newest_source(&root.join(dir)) <= built,
            "{} is older than {dir}: run `cargo build -p vicuna` first (`cargo test --workspace` does)",
            binary.display()
        );
    }
    binary
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Waits (bounded) for a child to exit.
pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vicuna serve --port 0 ...`: the child and the address it printed.
pub fn start_server(extra: &[&str]) -> (Child, std::net::SocketAddr) {
    let mut child = Command::new(vicuna_binary())
        .args(["serve", "--model", path(&model_dir()), "--tokenizer", path(&tokenizer_file()), "--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vicuna serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (child, addr)
}

pub fn sigterm(child: &Child) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
}
