//! Hugging Face Hub ids (`vicuna_weights::hub`): a cache laid out as `huggingface_hub` lays it out resolves
//! offline (by branch and by commit); downloads from a mock Hub on 127.0.0.1 fill that cache, resume after a
//! dropped connection (within the run and from an earlier run's `.incomplete`), refuse bytes whose sha256 is not
//! the Hub's (nothing kept), send HF_TOKEN as a bearer token and say "set HF_TOKEN" on 401. With
//! VICUNA_REQUIRE_REAL_CLIENTS=1 (CI), Python's `huggingface_hub` is the independent reference: it reads the
//! cache vicuna writes, and vicuna reads the cache it writes.

mod common;
mod mock_hub;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{expect_err, fixture, TempDir};
use mock_hub::{MockFile, MockHub, MockRepo};
use vicuna_weights::hub::{Hub, HubId, HubKind};
use vicuna_weights::{Checkpoint, NoProgress};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const OTHER_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
const SHARD: &str = "model-00001-of-00002.safetensors";

fn hub(cache: &Path, endpoint: &str) -> Hub {
    Hub { cache: cache.to_path_buf(), endpoint: endpoint.to_string(), token: None, offline: false }
}

fn resolve(hub: &Hub, id: &str) -> vicuna_weights::Result<PathBuf> {
    hub.resolve(&HubId::parse(id).expect("a valid id"), HubKind::Model, &mut NoProgress)
}

/// The delta fixture as a Hub repo.
fn delta_repo(id: &str) -> MockRepo {
    MockRepo::from_dir(id, COMMIT, &fixture("delta/delta"))
}

/// Every file of `dir`, recursively (following links), as (relative path, bytes).
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            out.extend(files(&path).into_iter().map(|(n, b)| (format!("{name}/{n}"), b)));
        } else {
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

/// Lays out `models--ORG--NAME` as huggingface_hub does: blobs named by etag, snapshot links, refs.
fn write_cache(cache: &Path, repo: &MockRepo, refs: &[(&str, &str)]) -> PathBuf {
    let dir = cache.join(format!("models--{}", repo.id.replace('/', "--")));
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    let snapshot = dir.join("snapshots").join(&repo.commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for file in &repo.files {
        std::fs::write(dir.join("blobs").join(file.etag()), &file.bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{}", file.etag()), snapshot.join(&file.name)).unwrap();
    }
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    for (name, commit) in refs {
        std::fs::write(dir.join("refs").join(name), commit).unwrap();
    }
    snapshot
}

fn fixture_files() -> Vec<(String, Vec<u8>)> {
    files(&fixture("delta/delta"))
}

#[test]
fn a_huggingface_hub_cache_resolves_offline_by_branch_and_by_commit() {
    let cache = TempDir::new("hub-offline");
    let repo = delta_repo("CarperAI/tiny-delta");
    let snapshot = write_cache(cache.path(), &repo, &[("main", COMMIT)]);
    let mut older = delta_repo("CarperAI/tiny-delta");
    older.commit = OTHER_COMMIT.into();
    older.files.retain(|f| f.name != "generation_config.json");
    let older_snapshot = write_cache(cache.path(), &older, &[("v0", OTHER_COMMIT)]);
    // An endpoint nothing listens on: any network use would fail.
    let mut hub = hub(cache.path(), "http://127.0.0.1:9");
    hub.offline = true;
    for id in ["CarperAI/tiny-delta", "CarperAI/tiny-delta@main", &format!("CarperAI/tiny-delta@{COMMIT}")] {
        assert_eq!(resolve(&hub, id).unwrap(), snapshot, "{id}");
    }
    assert_eq!(resolve(&hub, "CarperAI/tiny-delta@v0").unwrap(), older_snapshot);
    assert_eq!(resolve(&hub, &format!("CarperAI/tiny-delta@{OTHER_COMMIT}")).unwrap(), older_snapshot);
    let folder = resolve(&hub, "CarperAI/tiny-delta").unwrap();
    assert_eq!(files(&folder), fixture_files());
    Checkpoint::open(&folder).expect("the loaders read the snapshot");
    let one = hub.resolve(&HubId::parse("CarperAI/tiny-delta/config.json").unwrap(), HubKind::Model, &mut NoProgress);
    assert_eq!(one.unwrap(), snapshot.join("config.json"));

    expect_err(
        resolve(&hub, "CarperAI/other"),
        &["CarperAI/other@main", "not in the Hugging Face cache", "HF_HUB_OFFLINE"],
    );
    expect_err(resolve(&hub, "CarperAI/tiny-delta@v9"), &["CarperAI/tiny-delta@v9", "HF_HUB_OFFLINE"]);
    // A snapshot that lacks a shard is not taken for complete.
    std::fs::remove_file(snapshot.join(SHARD)).unwrap();
    expect_err(resolve(&hub, "CarperAI/tiny-delta"), &["incomplete", "unset HF_HUB_OFFLINE"]);
}

#[test]
fn a_complete_cached_snapshot_needs_no_network() {
    let cache = TempDir::new("hub-cache-first");
    let snapshot = write_cache(cache.path(), &delta_repo("CarperAI/tiny-delta"), &[("main", COMMIT)]);
    let hub = hub(cache.path(), "http://127.0.0.1:9");
    assert_eq!(resolve(&hub, "CarperAI/tiny-delta").unwrap(), snapshot);
    // Not cached: the network is tried, and its absence named.
    expect_err(resolve(&hub, "CarperAI/other"), &["cannot reach", "127.0.0.1:9", "HF_HUB_OFFLINE=1"]);
}

#[test]
fn a_download_fills_the_cache_as_huggingface_hub_lays_it_out() {
    let repo = delta_repo("CarperAI/tiny-delta");
    let etags: Vec<(String, String, bool)> = repo.files.iter().map(|f| (f.name.clone(), f.etag(), f.lfs)).collect();
    let server = MockHub::start(vec![repo]);
    let cache = TempDir::new("hub-download");
    let hub = hub(cache.path(), &server.url);
    let folder = resolve(&hub, "CarperAI/tiny-delta").unwrap();
    let repo_dir = cache.join("models--CarperAI--tiny-delta");
    assert_eq!(folder, repo_dir.join("snapshots").join(COMMIT));
    assert_eq!(files(&folder), fixture_files());
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    for (name, etag, lfs) in &etags {
        let link = std::fs::read_link(folder.join(name)).unwrap();
        assert_eq!(link, PathBuf::from(format!("../../blobs/{etag}")), "{name}");
        if *lfs {
            assert_eq!(etag.len(), 64, "an LFS blob is named by its sha256");
        }
    }
    let blobs: Vec<String> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert_eq!(blobs.len(), etags.len(), "one blob per file, nothing else: {blobs:?}");
    Checkpoint::open(&folder).expect("the loaders read the download");

    // Again: the cache answers, the Hub is not asked.
    server.clear_log();
    assert_eq!(resolve(&hub, "CarperAI/tiny-delta").unwrap(), folder);
    assert!(server.log().is_empty(), "{:?}", server.log());

    // A branch by name: the API is asked for it, and the ref is written.
    assert_eq!(resolve(&hub, &format!("CarperAI/tiny-delta@{COMMIT}")).unwrap(), folder);
    let mut tagged = delta_repo("CarperAI/tagged");
    tagged.branches.push("v1.0".into());
    let server = MockHub::start(vec![tagged]);
    let hub2 = Hub { endpoint: server.url.clone(), ..hub.clone() };
    assert_eq!(
        resolve(&hub2, "CarperAI/tagged@v1.0").unwrap(),
        cache.join("models--CarperAI--tagged/snapshots").join(COMMIT)
    );
    assert!(server.log().iter().any(|r| r.path == "/api/models/CarperAI/tagged/revision/v1.0"));
    assert_eq!(std::fs::read_to_string(cache.join("models--CarperAI--tagged/refs/v1.0")).unwrap(), COMMIT);
}

/// A mock Hub with the delta fixture, and the sha256 and bytes of its first shard.
fn serve_delta_shard() -> (MockHub, String, Vec<u8>) {
    let repo = delta_repo("CarperAI/tiny-delta");
    let shard = repo.files.iter().find(|f| f.name == SHARD).unwrap();
    let (sha, bytes) = (shard.sha256(), shard.bytes.clone());
    (MockHub::start(vec![repo]), sha, bytes)
}

/// The `Range` header of each GET of the CDN's `sha`.
fn cdn_ranges(server: &MockHub, sha: &str) -> Vec<Option<String>> {
    let path = format!("/cdn/{sha}");
    server
        .log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .map(|r| r.header("range").map(str::to_string))
        .collect()
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let (server, sha, bytes) = serve_delta_shard();
    server.break_next_get(SHARD);
    let cache = TempDir::new("hub-resume");
    let folder = resolve(&hub(cache.path(), &server.url), "CarperAI/tiny-delta").unwrap();
    assert_eq!(std::fs::read(folder.join(SHARD)).unwrap(), bytes);
    assert_eq!(cdn_ranges(&server, &sha), [None, Some(format!("bytes={}-", bytes.len() / 2))]);
}

#[test]
fn an_earlier_runs_incomplete_file_is_resumed_and_a_bad_one_started_over() {
    let (server, sha, bytes) = serve_delta_shard();
    let cache = TempDir::new("hub-resume-run");
    let blobs = cache.join("models--CarperAI--tiny-delta/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let incomplete = blobs.join(format!("{sha}.incomplete"));
    let third = bytes.len() / 3;
    std::fs::write(&incomplete, &bytes[..third]).unwrap();
    let hub = hub(cache.path(), &server.url);
    let folder = resolve(&hub, "CarperAI/tiny-delta").unwrap();
    assert_eq!(std::fs::read(folder.join(SHARD)).unwrap(), bytes);
    assert!(!incomplete.exists());
    assert_eq!(cdn_ranges(&server, &sha), [Some(format!("bytes={third}-"))]);

    // A corrupt part from an earlier run: the resumed bytes do not hash right, and the file is fetched whole.
    let cache = TempDir::new("hub-resume-bad");
    let blobs = cache.join("models--CarperAI--tiny-delta/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{sha}.incomplete")), vec![0xAB; third]).unwrap();
    server.clear_log();
    let folder = resolve(&Hub { cache: cache.path().to_path_buf(), ..hub.clone() }, "CarperAI/tiny-delta").unwrap();
    assert_eq!(std::fs::read(folder.join(SHARD)).unwrap(), bytes);
    assert_eq!(cdn_ranges(&server, &sha), [Some(format!("bytes={third}-")), None]);
}

#[test]
fn bytes_that_do_not_match_the_hubs_sha256_are_refused_and_not_kept() {
    let mut repo = delta_repo("CarperAI/tiny-delta");
    let shard = repo.files.iter_mut().find(|f| f.name == SHARD).unwrap();
    let mut tampered = shard.bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    shard.served = Some(tampered);
    let sha = shard.sha256();
    let server = MockHub::start(vec![repo]);
    let cache = TempDir::new("hub-mismatch");
    expect_err(
        resolve(&hub(cache.path(), &server.url), "CarperAI/tiny-delta"),
        &[SHARD, "sha256", &sha, "nothing was kept"],
    );
    let repo_dir = cache.join("models--CarperAI--tiny-delta");
    let blobs: Vec<String> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert!(!blobs.iter().any(|b| b.starts_with(&sha)), "no blob, no .incomplete of the bad file: {blobs:?}");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    assert!(std::fs::symlink_metadata(snapshot.join(SHARD)).is_err(), "no snapshot link for the bad file");
    assert!(!repo_dir.join("refs/main").exists(), "no ref to an incomplete snapshot");
    // Offline, the incomplete snapshot is not taken for the model.
    let offline = Hub { offline: true, ..hub(cache.path(), &server.url) };
    expect_err(resolve(&offline, "CarperAI/tiny-delta"), &["not in the Hugging Face cache"]);
}

#[test]
fn the_token_is_sent_as_a_bearer_and_401_says_set_hf_token() {
    let server = MockHub::start(vec![delta_repo("CarperAI/private")]);
    server.require_token("hf_secret");
    let cache = TempDir::new("hub-token");
    let anonymous = hub(cache.path(), &server.url);
    expect_err(resolve(&anonymous, "CarperAI/private"), &["401", "set HF_TOKEN", "CarperAI/private"]);
    let wrong = Hub { token: Some("hf_wrong".into()), ..anonymous.clone() };
    expect_err(resolve(&wrong, "CarperAI/private"), &["401", "HF_TOKEN", "refused"]);
    server.clear_log();
    let right = Hub { token: Some("hf_secret".into()), ..anonymous };
    let folder = resolve(&right, "CarperAI/private").unwrap();
    assert_eq!(files(&folder), fixture_files());
    let (cdn_requests, hub_requests): (Vec<_>, Vec<_>) =
        server.log().into_iter().partition(|r| r.path.starts_with("/cdn/"));
    assert!(!cdn_requests.is_empty());
    for request in cdn_requests {
        assert_eq!(request.header("authorization"), None, "the token goes to the Hub only: {}", request.path);
    }
    assert!(hub_requests.len() > 5, "{hub_requests:?}");
    for request in hub_requests {
        assert_eq!(request.header("authorization"), Some("Bearer hf_secret"), "{} {}", request.method, request.path);
    }
}

#[test]
fn a_renamed_repo_is_followed_to_its_new_name() {
    let server = MockHub::start(vec![delta_repo("CarperAI/new-name")]);
    server.rename("CarperAI/old-name", "CarperAI/new-name");
    let cache = TempDir::new("hub-renamed");
    let folder = resolve(&hub(cache.path(), &server.url), "CarperAI/old-name").unwrap();
    assert_eq!(folder, cache.join("models--CarperAI--old-name/snapshots").join(COMMIT), "cached under the name given");
    assert_eq!(files(&folder), fixture_files());
    let log = server.log();
    assert!(log.iter().any(|r| r.path == "/api/models/CarperAI/new-name/revision/main"), "{log:?}");
    assert!(log.iter().any(|r| r.method == "HEAD" && r.path.starts_with("/CarperAI/new-name/resolve/")));
}

#[test]
fn a_bad_id_a_missing_revision_or_file_is_one_line_saying_which() {
    let mut gguf_one =
        MockRepo { id: "org/one-gguf".into(), commit: COMMIT.into(), branches: vec!["main".into()], files: vec![] };
    gguf_one.files.push(MockFile::new("README.md", b"# a model".to_vec()));
    gguf_one.files.push(MockFile::new("tiny.Q8_0.gguf", b"GGUF not really".to_vec()));
    let mut gguf_two =
        MockRepo { id: "org/two-gguf".into(), commit: COMMIT.into(), branches: vec!["main".into()], files: vec![] };
    gguf_two.files.push(MockFile::new("a.Q4_0.gguf", b"a".to_vec()));
    gguf_two.files.push(MockFile::new("b.Q8_0.gguf", b"b".to_vec()));
    let server = MockHub::start(vec![delta_repo("CarperAI/tiny-delta"), gguf_one, gguf_two]);
    let cache = TempDir::new("hub-errors");
    let hub = hub(cache.path(), &server.url);
    expect_err(resolve(&hub, "CarperAI/nope"), &["has no model CarperAI/nope", "404"]);
    expect_err(resolve(&hub, "CarperAI/tiny-delta@v9"), &["CarperAI/tiny-delta has no revision v9"]);
    expect_err(resolve(&hub, "CarperAI/tiny-delta/nope.gguf"), &["CarperAI/tiny-delta@main has no file nope.gguf"]);
    let file = resolve(&hub, "org/one-gguf").unwrap();
    assert_eq!(file, cache.join("models--org--one-gguf/snapshots").join(COMMIT).join("tiny.Q8_0.gguf"));
    assert_eq!(std::fs::read(&file).unwrap(), b"GGUF not really");
    assert!(!file.with_file_name("README.md").exists(), "only the model's files are fetched");
    expect_err(
        resolve(&hub, "org/two-gguf"),
        &["2 GGUF files", "a.Q4_0.gguf, b.Q8_0.gguf", "org/two-gguf/a.Q4_0.gguf"],
    );
    assert!(resolve(&hub, "org/two-gguf/b.Q8_0.gguf").unwrap().ends_with("b.Q8_0.gguf"));
    // The tokenizer alone.
    let mut with_tokenizer = delta_repo("org/tok");
    with_tokenizer
        .files
        .push(MockFile::new("tokenizer.model", std::fs::read(fixture("tokenizer/tokenizer.model")).unwrap()));
    let server = MockHub::start(vec![with_tokenizer]);
    let hub = Hub { endpoint: server.url.clone(), ..hub };
    let folder = hub.resolve(&HubId::parse("org/tok").unwrap(), HubKind::Tokenizer, &mut NoProgress).unwrap();
    let mut names: Vec<String> = files(&folder).into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, ["added_tokens.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]);
}

// ------------------------------------------------------------ huggingface_hub as the reference

/// A Python with `huggingface_hub`, or `None` (the test is skipped) unless VICUNA_REQUIRE_REAL_CLIENTS=1.
fn python_with_huggingface_hub() -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python).args(["-c", "import huggingface_hub"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    if std::env::var("VICUNA_REQUIRE_REAL_CLIENTS").is_ok_and(|v| v == "1") {
        panic!("VICUNA_REQUIRE_REAL_CLIENTS=1 but {python} cannot import huggingface_hub");
    }
    eprintln!("skipped: {python} has no huggingface_hub (pip install huggingface_hub)");
    None
}

fn python(python: &str, cache: &Path, endpoint: &str, offline: bool, script: &str) -> String {
    let output = Command::new(python)
        .args(["-c", script])
        .env("HF_HUB_CACHE", cache)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_OFFLINE", if offline { "1" } else { "0" })
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_XET", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "huggingface_hub failed: {stderr}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn huggingface_hub_reads_vicunas_cache_and_vicuna_reads_huggingface_hubs() {
    let Some(py) = python_with_huggingface_hub() else { return };
    let server = MockHub::start(vec![delta_repo("CarperAI/tiny-delta"), delta_repo("CarperAI/by-python")]);

    // vicuna downloads; huggingface_hub, offline, finds every file in that cache.
    let cache = TempDir::new("hub-py-reads");
    let folder = resolve(&hub(cache.path(), &server.url), "CarperAI/tiny-delta").unwrap();
    let script = "from huggingface_hub import snapshot_download, hf_hub_download\n\
                  p = snapshot_download('CarperAI/tiny-delta')\n\
                  q = hf_hub_download('CarperAI/tiny-delta', 'model-00002-of-00002.safetensors')\n\
                  print(p)\nprint(q)";
    server.clear_log();
    let out = python(&py, cache.path(), &server.url, true, script);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(PathBuf::from(lines[0]), folder);
    assert_eq!(
        std::fs::read(lines[1]).unwrap(),
        std::fs::read(folder.join("model-00002-of-00002.safetensors")).unwrap()
    );
    assert!(server.log().is_empty());

    // huggingface_hub downloads from the same mock Hub; vicuna, offline, resolves its cache.
    let cache = TempDir::new("hub-py-writes");
    let out = python(
        &py,
        cache.path(),
        &server.url,
        false,
        "from huggingface_hub import snapshot_download\nprint(snapshot_download('CarperAI/by-python'))",
    );
    let offline = Hub { offline: true, ..hub(cache.path(), "http://127.0.0.1:9") };
    let folder = resolve(&offline, "CarperAI/by-python").unwrap();
    assert_eq!(folder, PathBuf::from(out));
    assert_eq!(files(&folder), fixture_files());
    assert_eq!(resolve(&offline, &format!("CarperAI/by-python@{COMMIT}")).unwrap(), folder);
}
