//! What the commands that write a model folder share: their flags, the progress display, the
//! Ctrl-C handling, and the manifest printed at the end.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use vicuna_weights::{JobControl, Manifest, Progress};

use crate::Result;

/// Flags of every command that writes a model folder.
#[derive(Args)]
pub struct WriteArgs {
    /// Replace the output folder if it exists (it is replaced only once the new one is complete).
    #[arg(long)]
    pub force: bool,
    /// Largest shard: bytes, or with a unit (KB, MB, GB = powers of 1000 as Hugging Face counts;
    /// KiB, MiB, GiB = powers of 1024).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub shard_size: u64,
    /// No progress display.
    #[arg(long)]
    pub quiet: bool,
}

/// Parses "5GB", "500MB", "1.5GiB", "1000000".
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} in {text:?}; use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 5GB or 500MB"))?;
    let bytes = (value * multiplier as f64).round();
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("{text:?} is not a usable size; give at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// Set by SIGINT / SIGTERM while a folder is being written; the job stops at its next chunk
/// and removes its temporary folder.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // A second Ctrl-C: the user does not want to wait for the clean-up. The temporary folder
        // stays and the next run for this target removes it. (_exit is async-signal-safe.)
        unsafe { libc::_exit(130) };
    }
}

/// Routes SIGINT and SIGTERM to the cancel flag and returns it. SIGXFSZ (a write past the file
/// size limit, `ulimit -f`) is ignored, so that such a write fails like one to a full disk and
/// the job cleans up, instead of the process being killed.
pub fn install_interrupt_handler() -> &'static AtomicBool {
    // SAFETY: setting a signal to SIG_IGN has no handler code to be unsafe in.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe;
        // the sigaction struct is fully initialized (zeroed, then the fields that matter).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    &INTERRUPTED
}

/// Runs a job with the progress display and Ctrl-C handling, then prints the manifest
/// (`sha256  file` lines, on stdout) and a summary (stderr). An interrupted job exits with 130
/// after its temporary folder is gone.
pub fn run_job(quiet: bool, job: impl FnOnce(&mut JobControl) -> vicuna_weights::Result<Manifest>) -> Result<()> {
    let cancel = install_interrupt_handler();
    let mut progress = Display::new(quiet);
    let start = Instant::now();
    let result = job(&mut JobControl { cancel, progress: &mut progress });
    progress.done();
    let manifest = match result {
        Ok(manifest) => manifest,
        Err(e) if cancel.load(Ordering::SeqCst) => {
            eprintln!("error: {e}");
            std::process::exit(130);
        }
        Err(e) => return Err(e.into()),
    };
    print!("{}", manifest.sha256sum_lines());
    if !quiet {
        summary(&manifest, start.elapsed());
    }
    Ok(())
}

fn summary(manifest: &Manifest, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let written: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    let mut line = format!(
        "wrote {}: {} tensors, {} in {} files, {:.1}s",
        manifest.target.display(),
        manifest.tensors,
        human(written),
        manifest.files.len(),
        seconds
    );
    if manifest.bytes_read > 0 {
        line += &format!(
            ", read {} at {}/s",
            human(manifest.bytes_read),
            human((manifest.bytes_read as f64 / seconds) as u64)
        );
    }
    if manifest.verified {
        line += ", verified";
    }
    eprintln!("{line}");
}

/// Bytes for people: "1.23 GB".
fn human(bytes: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", units[unit])
    }
}

/// A bar on a terminal, a line every few seconds otherwise, nothing with --quiet.
pub(crate) enum Display {
    Quiet,
    Bar(Option<ProgressBar>),
    Lines { phase: String, total: u64, done: u64, started: Instant, last: Instant },
}

impl Display {
    pub(crate) fn new(quiet: bool) -> Display {
        if quiet {
            Display::Quiet
        } else if std::io::stderr().is_terminal() {
            Display::Bar(None)
        } else {
            let now = Instant::now();
            Display::Lines { phase: String::new(), total: 0, done: 0, started: now, last: now }
        }
    }

    pub(crate) fn done(&mut self) {
        match self {
            Display::Bar(Some(bar)) => bar.finish_and_clear(),
            Display::Lines { phase, total, done, started, .. } if !phase.is_empty() && *done > 0 => {
                eprintln!("{}", plain_line(phase, *done, *total, started.elapsed()));
            }
            _ => {}
        }
    }
}

impl Progress for Display {
    fn phase(&mut self, what: &str, total_bytes: u64) {
        self.done();
        match self {
            Display::Quiet => {}
            Display::Bar(bar) => {
                let style = ProgressStyle::with_template(
                    "{msg:>11} [{bar:40}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec}, ETA {eta}",
                )
                .expect("the template is valid")
                .progress_chars("=> ");
                let new = ProgressBar::new(total_bytes).with_style(style).with_message(what.to_string());
                *bar = Some(new);
            }
            Display::Lines { phase, total, done, started, last } => {
                *phase = what.to_string();
                *total = total_bytes;
                *done = 0;
                *started = Instant::now();
                *last = *started;
            }
        }
    }

    fn advance(&mut self, bytes: u64) {
        match self {
            Display::Quiet => {}
            Display::Bar(bar) => {
                if let Some(bar) = bar {
                    bar.inc(bytes);
                }
            }
            Display::Lines { phase, total, done, started, last } => {
                *done += bytes;
                if last.elapsed() >= Duration::from_secs(5) && *done < *total {
                    *last = Instant::now();
                    eprintln!("{}", plain_line(phase, *done, *total, started.elapsed()));
                }
            }
        }
    }
}

/// "apply-delta: 1.20 GB of 4.40 GB (27%), 350.00 MB/s, ETA 9s"
fn plain_line(phase: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let percent = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
    let eta = if rate > 0.0 { (total.saturating_sub(done)) as f64 / rate } else { 0.0 };
    format!("{phase}: {} of {} ({percent:.0}%), {}/s, ETA {:.0}s", human(done), human(total), human(rate as u64), eta)
}

/// Says that `path` is given where a folder is expected, for the commands' checks.
pub fn require_dir(flag: &str, path: &Path) -> Result<()> {
    if !path.is_dir() {
        return Err(format!("{flag} {}: no such folder; give a Hugging Face model folder", path.display()).into());
    }
    Ok(())
}
