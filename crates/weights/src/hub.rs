//! Hugging Face Hub ids where a model folder is taken: `ORG/NAME[@REV]`, or `ORG/NAME/FILE[@REV]` for one file
//! of a repo (a `.gguf`, a `tokenizer.model`).
//!
//! An id resolves to a folder (or file) in the cache `huggingface_hub` keeps, laid out as it lays it out, so the
//! two share downloads:
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
//! └── models--ORG--NAME
//!     ├── blobs/<etag>                      the bytes (an LFS file's etag is its sha256)
//!     ├── refs/<branch>                     the commit the branch pointed at (40 hex digits, no newline)
//!     └── snapshots/<commit>/<file>         -> ../../blobs/<etag>
//! ```
//!
//! The cache comes first: a snapshot that already holds what the loaders need is used without the network
//! (`@BRANCH` means the commit the cache last saw for it; give `@COMMIT` to pin another). Otherwise the
//! repo's file list comes from the Hub API (`/api/models/ORG/NAME/revision/REV`), and each missing file is
//! downloaded from `/ORG/NAME/resolve/COMMIT/FILE` into `blobs/<etag>.incomplete` (resumed with a `Range` request
//! after an interruption, within the run and by the next one), checked (an LFS file's sha256 against its etag,
//! every file's size against the Hub's), renamed into place and linked into the snapshot. A file whose bytes do
//! not check out is deleted: nothing of it stays in the cache.
//!
//! Environment, as `huggingface_hub` reads it: `HF_HUB_CACHE` / `HF_HOME` (the cache), `HF_ENDPOINT` (the Hub,
//! default `https://huggingface.co`), `HF_TOKEN` (else the token file `huggingface-cli login` writes) sent as
//! `Authorization: Bearer` to the endpoint only, `HF_HUB_OFFLINE=1` (the cache only, never the network).
//!
//! Which files a model id fetches: every top-level `.json` file (config, generation config, tokenizer and adapter
//! settings), `tokenizer.model`, and the weights the loaders read, in their order: `model.safetensors`, else
//! `model.safetensors.index.json` and the shards it names, else `pytorch_model.bin`, else
//! `pytorch_model.bin.index.json` and its shards; a LoRA adapter's `adapter_model.safetensors` (else `.bin`).
//! A repo without `config.json` or `adapter_config.json` that holds one `.gguf` file resolves to that file; with
//! several, name one (`ORG/NAME/FILE.gguf`). Other files (other precisions, `.pth` originals, training state)
//! are left on the Hub.
//!
//! The client is a small one over `ureq` rather than the `hf-hub` crate: hf-hub 0.5 does not read
//! `HF_HUB_CACHE`, `HF_TOKEN` or `HF_HUB_OFFLINE`, does not check the sha256 of what it downloads, and keeps
//! partial downloads under its own `.part` name, which `huggingface_hub` would not resume.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::delta::TOKENIZER_FILES;
use crate::error::{bail, Error, Result};
use crate::output::Progress;
use crate::safetensors_writer::hex;

/// The Hub `huggingface_hub` talks to when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Weight layouts in the loaders' order (see `checkpoint::detect`): single files before indexes,
/// safetensors before pickles. `true` for an index.
const WEIGHT_LAYOUTS: [(&str, bool); 4] = [
    ("model.safetensors", false),
    ("model.safetensors.index.json", true),
    ("pytorch_model.bin", false),
    ("pytorch_model.bin.index.json", true),
];

/// A LoRA adapter's weights (PEFT's names), when the repo holds no model weights.
const ADAPTER_WEIGHTS: [&str; 2] = ["adapter_model.safetensors", "adapter_model.bin"];

/// Tries per file when the connection breaks mid-download; each try after the first resumes with `Range`.
const TRIES: usize = 5;

/// What the caller will load from a resolved id, which decides the files fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HubKind {
    /// A model, delta or LoRA adapter folder (or a GGUF file): config, tokenizer files and weights.
    Model,
    /// Only the tokenizer files (`tokenizer.model` / `tokenizer.json` and their settings).
    Tokenizer,
}

/// `ORG/NAME[/FILE][@REV]`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// One file of the repo (a path inside it), when named.
    pub file: Option<String>,
    /// Branch, tag or commit; `main` when not given.
    pub revision: String,
}

impl HubId {
    /// The id `text` spells, or `None` when it is not one (an absolute or `./` path, a single name, characters
    /// the Hub does not allow in repo names). Repo names follow `huggingface_hub`'s rule: letters, digits, `-`,
    /// `_`, `.`, no `--` or `..`, at most 96 characters.
    pub fn parse(text: &str) -> Option<HubId> {
        if text.is_empty()
            || text.starts_with(['/', '.', '~'])
            || text.ends_with('/')
            || text.contains(['\\', ':', ' ', '\t', '\n', '\r'])
            || text.contains("//")
        {
            return None;
        }
        let (path, revision) = match text.split_once('@') {
            Some((path, revision)) => (path, revision),
            None => (text, "main"),
        };
        if revision.is_empty() || revision.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return None;
        }
        let mut parts = path.splitn(3, '/');
        let (org, name) = (parts.next()?, parts.next()?);
        let file = parts.next();
        let valid_name = |part: &str| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.'])
                && !part.contains("--")
                && !part.contains("..")
        };
        if !valid_name(org) || !valid_name(name) || org.len() + 1 + name.len() > 96 {
            return None;
        }
        if let Some(file) = file {
            if !valid_repo_path(file) {
                return None;
            }
        }
        Some(HubId { repo: format!("{org}/{name}"), file: file.map(str::to_string), revision: revision.to_string() })
    }

    fn at(&self) -> String {
        format!("{}@{}", self.repo, self.revision)
    }
}

/// A path inside a repo that is safe to put under a snapshot folder: relative, no `.`/`..`/empty components.
fn valid_repo_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains(['\\', '\0'])
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Where downloads go and come from, read from the environment as `huggingface_hub` reads it.
#[derive(Clone, Debug)]
pub struct Hub {
    /// The hub cache folder (holding `models--ORG--NAME`).
    pub cache: PathBuf,
    /// The Hub's base URL, without a trailing `/`.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` to the endpoint.
    pub token: Option<String>,
    /// The cache only: never the network.
    pub offline: bool,
}

impl Hub {
    /// From the process environment.
    pub fn from_env() -> Hub {
        Hub::from_vars(|name| std::env::var(name).ok())
    }

    /// From the variables `var` returns (the environment, or a test's own): `HF_HUB_CACHE`,
    /// `HUGGINGFACE_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`, `HOME`, `HF_ENDPOINT`, `HF_TOKEN`,
    /// `HUGGING_FACE_HUB_TOKEN`, `HF_TOKEN_PATH`, `HF_HUB_OFFLINE`. Empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Hub {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let home_dir = var("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        let expand = |value: String| match value.strip_prefix("~/") {
            Some(rest) => home_dir.join(rest),
            None if value == "~" => home_dir.clone(),
            None => PathBuf::from(value),
        };
        let hf_home = var("HF_HOME").map(expand).unwrap_or_else(|| {
            var("XDG_CACHE_HOME").map(expand).unwrap_or_else(|| home_dir.join(".cache")).join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint =
            var("HF_ENDPOINT").map_or_else(|| DEFAULT_ENDPOINT.to_string(), |e| e.trim_end_matches('/').into());
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = var("HF_TOKEN_PATH").map(expand).unwrap_or_else(|| hf_home.join("token"));
            fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"));
        Hub { cache, endpoint, token: token.map(|t| t.trim().to_string()), offline }
    }

    /// `models--ORG--NAME` in the cache.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The local folder (or file) for `id`: from the cache when it holds what `kind` needs, else downloaded
    /// into it (unless offline). Errors are one line naming the id and what to do.
    pub fn resolve(&self, id: &HubId, kind: HubKind, progress: &mut dyn Progress) -> Result<PathBuf> {
        let repo_dir = self.repo_dir(&id.repo);
        if let Some(commit) = cached_commit(&repo_dir, &id.revision) {
            let snapshot = repo_dir.join("snapshots").join(&commit);
            if let Some(path) = complete(&snapshot, id, kind)? {
                return Ok(path);
            }
            if self.offline {
                bail!(
                    "{} is in the Hugging Face cache ({}) but incomplete (no {}); unset HF_HUB_OFFLINE to download \
                     the rest",
                    id.at(),
                    snapshot.display(),
                    needed(id, kind)
                );
            }
        } else if self.offline {
            bail!(
                "{} is not in the Hugging Face cache {} and HF_HUB_OFFLINE is set, so nothing is downloaded; unset \
                 it, or set HF_HUB_CACHE / HF_HOME to the cache that holds it",
                id.at(),
                self.cache.display()
            );
        }
        self.download(id, kind, &repo_dir, progress)
    }

    fn download(&self, id: &HubId, kind: HubKind, repo_dir: &Path, progress: &mut dyn Progress) -> Result<PathBuf> {
        let client = Client::new(self);
        let (commit, siblings) = client.repo_info(id)?;
        let snapshot = repo_dir.join("snapshots").join(&commit);
        let store = Store { hub: self, client: &client, id, repo_dir, commit: &commit };
        let (mut files, index, result) = select(id, kind, &siblings, &snapshot)?;
        if let Some(index) = index {
            // The shards are named in the index: fetch it first (it is small), then them.
            store.fetch(std::slice::from_ref(&index), progress)?;
            for shard in index_shards(&snapshot.join(&index), &id.at())? {
                if !siblings.contains(&shard) {
                    bail!("{}: {index} names the shard {shard}, which the repo does not hold", id.at());
                }
                if !files.contains(&shard) {
                    files.push(shard);
                }
            }
        }
        store.fetch(&files, progress)?;
        if id.revision != commit {
            write_ref(repo_dir, &id.revision, &commit)?;
        }
        Ok(result)
    }
}

/// Resolves a command-line model argument: a path that exists is returned as it is (a local path always wins);
/// else a Hugging Face id is resolved with [`Hub::from_env`] (cache, then download); else `arg` is returned as it
/// is, for the caller's own "no such folder" check to report.
pub fn resolve_model(arg: &Path, kind: HubKind, progress: &mut dyn Progress) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let Some(id) = arg.to_str().and_then(HubId::parse) else { return Ok(arg.to_path_buf()) };
    Hub::from_env()
        .resolve(&id, kind, progress)
        .map_err(|e| Error::new(format!("not a local path, and as a Hugging Face Hub id: {e}")))
}

/// The commit `revision` names in the cache: itself when it is a full commit hash with a snapshot, else what
/// `refs/<revision>` holds.
fn cached_commit(repo_dir: &Path, revision: &str) -> Option<String> {
    if is_commit(revision) {
        return repo_dir.join("snapshots").join(revision).is_dir().then(|| revision.to_string());
    }
    let commit = fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let commit = commit.trim();
    is_commit(commit).then(|| commit.to_string())
}

fn is_commit(text: &str) -> bool {
    text.len() == 40 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What `kind` needs, for messages.
fn needed(id: &HubId, kind: HubKind) -> String {
    match (&id.file, kind) {
        (Some(file), _) => file.clone(),
        (None, HubKind::Tokenizer) => "tokenizer.model or tokenizer.json".into(),
        (None, HubKind::Model) => "config.json with its weights, or a single .gguf file".into(),
    }
}

/// The path to hand the loaders when `snapshot` holds everything `kind` needs, else `None`.
fn complete(snapshot: &Path, id: &HubId, kind: HubKind) -> Result<Option<PathBuf>> {
    if !snapshot.is_dir() {
        return Ok(None);
    }
    if let Some(file) = &id.file {
        let path = snapshot.join(file);
        return Ok(path.is_file().then_some(path));
    }
    if kind == HubKind::Tokenizer {
        let has = ["tokenizer.model", "tokenizer.json"].iter().any(|name| snapshot.join(name).is_file());
        return Ok(has.then(|| snapshot.to_path_buf()));
    }
    if snapshot.join("config.json").is_file() || snapshot.join("adapter_config.json").is_file() {
        // An adapter's weights come with its config, also where the repo holds model weights too.
        let adapter = ADAPTER_WEIGHTS.iter().any(|name| snapshot.join(name).is_file());
        if snapshot.join("adapter_config.json").is_file() && !adapter {
            return Ok(None);
        }
        for (name, is_index) in WEIGHT_LAYOUTS {
            let path = snapshot.join(name);
            if !path.is_file() {
                continue;
            }
            if !is_index {
                return Ok(Some(snapshot.to_path_buf()));
            }
            let shards = index_shards(&path, &id.at())?;
            let all = shards.iter().all(|shard| snapshot.join(shard).is_file());
            return Ok(all.then(|| snapshot.to_path_buf()));
        }
        return Ok(adapter.then(|| snapshot.to_path_buf()));
    }
    let ggufs = top_level_ggufs(fs::read_dir(snapshot).into_iter().flatten().filter_map(|entry| {
        let entry = entry.ok()?;
        entry.path().is_file().then(|| entry.file_name().to_string_lossy().into_owned())
    }));
    Ok(match ggufs.as_slice() {
        [one] => Some(snapshot.join(one)),
        _ => None,
    })
}

fn top_level_ggufs(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut ggufs: Vec<String> = names.into_iter().filter(|n| !n.contains('/') && n.ends_with(".gguf")).collect();
    ggufs.sort();
    ggufs
}

/// The files to fetch for `id` from the repo's `siblings`, the weight index whose shards are to be added (when
/// the weights are sharded), and the path the caller gets.
fn select(
    id: &HubId,
    kind: HubKind,
    siblings: &[String],
    snapshot: &Path,
) -> Result<(Vec<String>, Option<String>, PathBuf)> {
    let has = |name: &str| siblings.iter().any(|s| s == name);
    if let Some(file) = &id.file {
        if !has(file) {
            bail!("{} has no file {file}", id.at());
        }
        return Ok((vec![file.clone()], None, snapshot.join(file)));
    }
    if kind == HubKind::Tokenizer {
        let files: Vec<String> = TOKENIZER_FILES.iter().filter(|n| has(n)).map(|n| n.to_string()).collect();
        if !has("tokenizer.model") && !has("tokenizer.json") {
            bail!("{} holds no tokenizer.model or tokenizer.json", id.at());
        }
        return Ok((files, None, snapshot.to_path_buf()));
    }
    if has("config.json") || has("adapter_config.json") {
        let layout = WEIGHT_LAYOUTS.iter().find(|(name, _)| has(name));
        let mut files: Vec<String> = siblings
            .iter()
            .filter(|s| !s.contains('/') && s.ends_with(".json"))
            .filter(|s| !WEIGHT_LAYOUTS.iter().any(|(name, is_index)| *is_index && name == s))
            .cloned()
            .collect();
        if has("tokenizer.model") {
            files.push("tokenizer.model".into());
        }
        // An adapter's weights: where the repo holds no model weights, and beside them too when it has an
        // adapter config (`--lora` and `load_lora_adapter` read these).
        let adapter = ADAPTER_WEIGHTS.iter().find(|name| has(name));
        if let Some(name) = adapter.filter(|_| layout.is_none() || has("adapter_config.json")) {
            files.push(name.to_string());
        }
        let index = match layout {
            Some((name, true)) => Some(name.to_string()),
            Some((name, false)) => {
                files.push(name.to_string());
                None
            }
            None if adapter.is_some() => None,
            None => bail!(
                "{} has a config but no weights vicuna reads (model.safetensors, model.safetensors.index.json, \
                 pytorch_model.bin, pytorch_model.bin.index.json, adapter_model.safetensors)",
                id.at()
            ),
        };
        return Ok((files, index, snapshot.to_path_buf()));
    }
    let ggufs = top_level_ggufs(siblings.iter().cloned());
    match ggufs.as_slice() {
        [one] => Ok((vec![one.clone()], None, snapshot.join(one))),
        [] => bail!("{} holds no config.json, adapter_config.json or .gguf file: not a model vicuna loads", id.at()),
        several => bail!(
            "{} holds {} GGUF files ({}): name one, e.g. {}/{}",
            id.at(),
            several.len(),
            several.join(", "),
            id.repo,
            several[0]
        ),
    }
}

/// The shard files a `*.index.json` names (its `weight_map` values), each a safe path inside the repo.
fn index_shards(path: &Path, what: &str) -> Result<Vec<String>> {
    let text =
        fs::read_to_string(path).map_err(|e| Error::new(format!("{what}: cannot read {}: {e}", path.display())))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| Error::new(format!("{what}: {} is not JSON: {e}", path.display())))?;
    let Some(map) = value.get("weight_map").and_then(Value::as_object) else {
        bail!("{what}: {} has no weight_map object", path.display());
    };
    let mut shards: Vec<String> = Vec::new();
    for shard in map.values() {
        let Some(shard) = shard.as_str().filter(|s| valid_repo_path(s)) else {
            bail!("{what}: {} names a shard that is not a file of the repo: {shard}", path.display());
        };
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
    }
    Ok(shards)
}

/// `refs/<revision>` = `commit`, written whole (temporary file, then rename).
fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<()> {
    let path = repo_dir.join("refs").join(revision);
    if fs::read_to_string(&path).is_ok_and(|old| old.trim() == commit) {
        return Ok(());
    }
    let parent = path.parent().expect("a ref has a parent folder");
    let tmp =
        parent.join(format!(".{}.{}.tmp", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let written =
        fs::create_dir_all(parent).and_then(|()| fs::write(&tmp, commit)).and_then(|()| fs::rename(&tmp, &path));
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::new(format!("cannot write {}: {e}", path.display()))
    })
}

/// What a HEAD of `resolve/COMMIT/FILE` says about a file.
struct FileMeta {
    name: String,
    etag: String,
    size: u64,
    /// Where the bytes are: the resolve URL, or the CDN address it redirects to.
    url: String,
}

/// The HTTP side: the agent and the endpoint's address and token.
struct Client<'a> {
    hub: &'a Hub,
    agent: ureq::Agent,
}

impl<'a> Client<'a> {
    fn new(hub: &'a Hub) -> Client<'a> {
        // HTTPS_PROXY / HTTP_PROXY / NO_PROXY are honoured (ureq reads them), except for a Hub on this machine.
        let host = origin(&hub.endpoint).split("://").nth(1).unwrap_or_default();
        let loopback = ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|name| host == *name || host.strip_prefix(name).is_some_and(|port| port.starts_with(':')));
        let mut config = ureq::Agent::config_builder();
        if loopback {
            config = config.proxy(None);
        }
        let agent = config
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("vicuna/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client { hub, agent }
    }

    /// A request, with the token when it goes to the endpoint's origin (never to the CDN a download redirects to).
    fn request(
        &self,
        method: &str,
        url: &str,
        range_from: u64,
    ) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let own = origin(url) == origin(&self.hub.endpoint);
        let token = self.hub.token.as_deref().filter(|_| own);
        macro_rules! send {
            ($builder:expr) => {{
                let mut builder = $builder.header("Accept-Encoding", "identity");
                if let Some(token) = token {
                    builder = builder.header("Authorization", &format!("Bearer {token}"));
                }
                if range_from > 0 {
                    builder = builder.header("Range", &format!("bytes={range_from}-"));
                }
                builder.call()
            }};
        }
        match method {
            "HEAD" => send!(self.agent.head(url)),
            _ => send!(self.agent.get(url)),
        }
    }

    fn unreachable(&self, what: &str, e: &ureq::Error) -> Error {
        Error::new(format!(
            "cannot reach the Hugging Face Hub at {} for {what} ({e}); check the network or HF_ENDPOINT, or set \
             HF_HUB_OFFLINE=1 to use only the cache",
            self.hub.endpoint
        ))
    }

    /// The one-line error for an unsuccessful answer about `id` (and `file`).
    fn status_error(&self, response: &ureq::http::Response<ureq::Body>, id: &HubId, file: Option<&str>) -> Error {
        let status = response.status().as_u16();
        let code = header(response, "x-error-code").unwrap_or_default();
        let endpoint = &self.hub.endpoint;
        let repo = &id.repo;
        Error::new(match (status, code.as_str()) {
            (401, _) if self.hub.token.is_some() => format!(
                "the Hub ({endpoint}) refused the token in HF_TOKEN for {repo} (401 Unauthorized): it is invalid or \
                 expired, or {repo} does not exist; set HF_TOKEN to a valid token"
            ),
            (401, _) => format!(
                "the Hub ({endpoint}) answered 401 Unauthorized for {repo}: it is private or gated, or does not \
                 exist; set HF_TOKEN to a token that can read it"
            ),
            (403, _) => format!(
                "the Hub ({endpoint}) answered 403 Forbidden for {repo}: it is gated and the token has no access; \
                 accept its terms on its page, then set HF_TOKEN to a token of that account"
            ),
            (404, "RevisionNotFound") => format!("{repo} has no revision {} on the Hub ({endpoint})", id.revision),
            (404, "EntryNotFound") => format!("{} has no file {}", id.at(), file.unwrap_or("?")),
            (404, _) if file.is_some() => format!("{} has no file {} (404)", id.at(), file.unwrap_or("?")),
            (404, _) => format!("the Hub ({endpoint}) has no model {repo} (404); check the name"),
            (status, _) => format!(
                "the Hub ({endpoint}) answered {status} for {}{}; try again later",
                id.at(),
                file.map(|f| format!(" {f}")).unwrap_or_default()
            ),
        })
    }

    /// `/api/models/ORG/NAME/revision/REV`: the commit `REV` is at and the repo's file names.
    fn repo_info(&self, id: &HubId) -> Result<(String, Vec<String>)> {
        let mut url = format!("{}/api/models/{}/revision/{}", self.hub.endpoint, id.repo, quote(&id.revision, false));
        let mut response = self.request("GET", &url, 0).map_err(|e| self.unreachable(&id.at(), &e))?;
        // A renamed repo answers with a redirect to its new name on the same Hub.
        for _ in 0..5 {
            let Some(location) = header(&response, "location").filter(|_| response.status().is_redirection()) else {
                break;
            };
            url =
                if location.starts_with('/') { format!("{}{location}", origin(&self.hub.endpoint)) } else { location };
            if origin(&url) != origin(&self.hub.endpoint) {
                bail!("the Hub's answer for {} redirects to another site ({url}); not followed", id.at());
            }
            response = self.request("GET", &url, 0).map_err(|e| self.unreachable(&id.at(), &e))?;
        }
        if !response.status().is_success() {
            return Err(self.status_error(&response, id, None));
        }
        let text = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| self.unreachable(&id.at(), &e))?;
        let info: Value = serde_json::from_str(&text)
            .map_err(|e| Error::new(format!("the Hub's answer for {} ({url}) is not JSON: {e}", id.at())))?;
        let Some(commit) = info.get("sha").and_then(Value::as_str).filter(|c| is_commit(c)) else {
            bail!("the Hub's answer for {} ({url}) has no commit hash (\"sha\")", id.at());
        };
        let siblings = info
            .get("siblings")
            .and_then(Value::as_array)
            .map(|files| {
                files
                    .iter()
                    .filter_map(|f| f.get("rfilename").and_then(Value::as_str))
                    .filter(|name| valid_repo_path(name))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        Ok((commit.to_string(), siblings))
    }

    /// HEAD `resolve/COMMIT/FILE`: its etag, size and where to GET it. Relative redirects (a renamed repo) are
    /// followed; an absolute one (the CDN) is where the bytes are.
    fn file_meta(&self, id: &HubId, commit: &str, file: &str) -> Result<FileMeta> {
        let mut url = format!("{}/{}/resolve/{commit}/{}", self.hub.endpoint, id.repo, quote(file, true));
        let what = format!("{} {file}", id.at());
        for _ in 0..5 {
            let response = self.request("HEAD", &url, 0).map_err(|e| self.unreachable(&what, &e))?;
            let status = response.status().as_u16();
            if !(200..400).contains(&status) {
                return Err(self.status_error(&response, id, Some(file)));
            }
            let location = header(&response, "location");
            if let Some(relative) = location.as_deref().filter(|l| l.starts_with('/')) {
                if header(&response, "x-linked-etag").is_none() {
                    url = format!("{}{relative}", origin(&self.hub.endpoint));
                    continue;
                }
            }
            let etag = header(&response, "x-linked-etag")
                .or_else(|| header(&response, "etag"))
                .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string());
            let Some(etag) = etag.filter(|e| {
                !e.is_empty()
                    && e.len() <= 128
                    && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }) else {
                bail!("the Hub sent no usable ETag for {what} ({url}); cannot check or store it");
            };
            let size = header(&response, "x-linked-size")
                .or_else(|| header(&response, "content-length"))
                .and_then(|s| s.trim().parse::<u64>().ok());
            let Some(size) = size else { bail!("the Hub sent no size for {what} ({url})") };
            let url = match location {
                Some(l) if l.starts_with('/') => format!("{}{l}", origin(&self.hub.endpoint)),
                Some(l) if (300..400).contains(&status) => l,
                _ => url,
            };
            return Ok(FileMeta { name: file.to_string(), etag, size, url });
        }
        bail!("too many redirects for {what} ({url})")
    }
}

fn header(response: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// `scheme://host[:port]` of `url`.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// Percent-encodes `text` for a URL path (keeping `/` when `keep_slash`), as `huggingface_hub` quotes revisions
/// (`refs/pr/1` → `refs%2Fpr%2F1`) and file names.
fn quote(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Fetching files of one commit of one repo into the cache.
struct Store<'a> {
    hub: &'a Hub,
    client: &'a Client<'a>,
    id: &'a HubId,
    repo_dir: &'a Path,
    commit: &'a str,
}

impl Store<'_> {
    /// Makes `snapshots/COMMIT/FILE` for every file in `files` that is not there yet.
    fn fetch(&self, files: &[String], progress: &mut dyn Progress) -> Result<()> {
        let snapshot = self.repo_dir.join("snapshots").join(self.commit);
        let mut missing = Vec::new();
        for file in files {
            if !snapshot.join(file).is_file() {
                missing.push(self.client.file_meta(self.id, self.commit, file)?);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let blobs = self.repo_dir.join("blobs");
        fs::create_dir_all(&blobs).map_err(|e| Error::new(format!("cannot create {}: {e}", blobs.display())))?;
        let total: u64 = missing.iter().filter(|m| !blobs.join(&m.etag).is_file()).map(|m| m.size).sum();
        if total > 0 {
            progress.phase(&format!("download {}", self.id.repo), total);
        }
        for meta in &missing {
            self.fetch_blob(meta, &blobs, progress)?;
            link(&snapshot, &meta.name, &meta.etag)?;
        }
        Ok(())
    }

    /// Makes `blobs/ETAG`: downloaded into `ETAG.incomplete` (resumed from what is there), checked, renamed.
    /// Holds `.locks/models--ORG--NAME/ETAG.lock` meanwhile, the lock `huggingface_hub` takes for the same blob.
    fn fetch_blob(&self, meta: &FileMeta, blobs: &Path, progress: &mut dyn Progress) -> Result<()> {
        let blob = blobs.join(&meta.etag);
        let what = format!("{} {}", self.id.at(), meta.name);
        let lock_dir = self.hub.cache.join(".locks").join(self.repo_dir.file_name().unwrap_or_default());
        let lock_path = lock_dir.join(format!("{}.lock", meta.etag));
        let lock = fs::create_dir_all(&lock_dir)
            .and_then(|()| OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path))
            .and_then(|file| file.lock().map(|()| file))
            .map_err(|e| Error::new(format!("cannot lock {}: {e}", lock_path.display())))?;
        if fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == meta.size) {
            return Ok(()); // Another process (or revision) brought it meanwhile.
        }
        let incomplete = blobs.join(format!("{}.incomplete", meta.etag));
        let io_error = |e: std::io::Error| Error::new(format!("{what}: cannot write {}: {e}", incomplete.display()));
        let sha256 = meta.etag.len() == 64 && meta.etag.bytes().all(|b| b.is_ascii_hexdigit());
        let mut fresh_retry = true;
        let mut tries = 0;
        loop {
            tries += 1;
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .append(true)
                .open(&incomplete)
                .map_err(io_error)?;
            let mut have = file.metadata().map_err(io_error)?.len();
            if have > meta.size {
                file.set_len(0).map_err(io_error)?;
                have = 0;
            }
            let resumed_from = have;
            let mut hasher = Sha256::new();
            if sha256 && have > 0 {
                hash_prefix(&incomplete, have, &mut hasher).map_err(io_error)?;
            }
            if have < meta.size {
                match self.receive(meta, &mut file, have, &mut hasher, progress, &what)? {
                    Received::Bytes(n) => have = n,
                    Received::Restart => {
                        file.set_len(0).map_err(io_error)?;
                        if tries >= TRIES {
                            bail!("{what}: the server refuses to send the file from the start or from a range");
                        }
                        continue;
                    }
                    Received::Broken(n, e) => {
                        if tries < TRIES {
                            std::thread::sleep(Duration::from_millis(200 * tries as u64));
                            continue;
                        }
                        bail!(
                            "{what}: the download broke off after {n} of {} bytes ({e}); run again to resume it",
                            meta.size
                        );
                    }
                }
            }
            if have != meta.size {
                let _ = fs::remove_file(&incomplete);
                bail!(
                    "{what}: the Hub sent {have} bytes where it announced {}; nothing was kept, run again",
                    meta.size
                );
            }
            if sha256 {
                let got = hex(&hasher.finalize());
                if !got.eq_ignore_ascii_case(&meta.etag) {
                    let _ = fs::remove_file(&incomplete);
                    if resumed_from > 0 && fresh_retry {
                        // The part kept from an earlier run may be what is wrong: once more from the start.
                        fresh_retry = false;
                        continue;
                    }
                    bail!(
                        "{what}: the downloaded bytes have sha256 {got} but the Hub says {}; they were deleted and \
                         nothing was kept",
                        meta.etag
                    );
                }
            }
            file.sync_all().map_err(io_error)?;
            drop(file);
            fs::rename(&incomplete, &blob)
                .map_err(|e| Error::new(format!("{what}: cannot rename into {}: {e}", blob.display())))?;
            drop(lock);
            return Ok(());
        }
    }

    /// GETs the bytes from `have` on and appends them to `file`.
    fn receive(
        &self,
        meta: &FileMeta,
        file: &mut File,
        have: u64,
        hasher: &mut Sha256,
        progress: &mut dyn Progress,
        what: &str,
    ) -> Result<Received> {
        let mut response = match self.client.request("GET", &meta.url, have) {
            Ok(response) => response,
            Err(e) => return Ok(Received::Broken(have, e.to_string())),
        };
        let status = response.status().as_u16();
        let mut have = have;
        match status {
            206 => {
                let range = header(&response, "content-range").unwrap_or_default();
                if !range.trim_start_matches("bytes ").starts_with(&format!("{have}-")) {
                    bail!("{what}: asked for bytes from {have} on, the server sent the range {range:?}");
                }
            }
            200 if have > 0 => return Ok(Received::Restart), // The server ignored Range: start over.
            200 => {}
            416 => return Ok(Received::Restart),
            _ => return Err(self.client.status_error(&response, self.id, Some(&meta.name))),
        }
        let mut reader = response.body_mut().as_reader();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => {
                    return Ok(if have < meta.size {
                        Received::Broken(have, "connection closed early".into())
                    } else {
                        Received::Bytes(have)
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Ok(Received::Broken(have, e.to_string())),
            };
            if have + n as u64 > meta.size {
                let _ = file.set_len(0);
                bail!(
                    "{what}: the Hub sent more than the {} bytes it announced; nothing was kept, run again",
                    meta.size
                );
            }
            file.write_all(&buffer[..n]).map_err(|e| Error::new(format!("{what}: cannot write the download: {e}")))?;
            hasher.update(&buffer[..n]);
            have += n as u64;
            progress.advance(n as u64);
        }
    }
}

/// How one GET went.
enum Received {
    /// Everything up to this offset is in the file.
    Bytes(u64),
    /// The server cannot continue from the offset: empty the file and start over.
    Restart,
    /// The connection broke after this offset (what is in the file is kept, to resume).
    Broken(u64, String),
}

fn hash_prefix(path: &Path, len: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut file = File::open(path)?.take(len);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buffer[..n]);
    }
}

/// `snapshots/COMMIT/FILE` -> `../../blobs/ETAG` (one more `..` per folder in FILE), replacing a stale link.
fn link(snapshot: &Path, file: &str, etag: &str) -> Result<()> {
    let pointer = snapshot.join(file);
    let parent = pointer.parent().expect("a snapshot file has a folder");
    let depth = file.split('/').count() + 1;
    let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
    let made = fs::create_dir_all(parent).and_then(|()| {
        if fs::symlink_metadata(&pointer).is_ok() {
            fs::remove_file(&pointer)?;
        }
        #[cfg(unix)]
        return std::os::unix::fs::symlink(&target, &pointer);
        #[cfg(not(unix))]
        return fs::copy(parent.join(&target), &pointer).map(|_| ());
    });
    made.map_err(|e| Error::new(format!("cannot link {} to {}: {e}", pointer.display(), target.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_as_the_hub_spells_them() {
        let id = HubId::parse("CarperAI/stable-vicuna-13b-delta").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.file, id.revision.as_str()),
            ("CarperAI/stable-vicuna-13b-delta", None, "main")
        );
        let id = HubId::parse("TheBloke/x-GGUF/sub/x.Q4_K_M.gguf@refs/pr/1").unwrap();
        assert_eq!(id.repo, "TheBloke/x-GGUF");
        assert_eq!(id.file.as_deref(), Some("sub/x.Q4_K_M.gguf"));
        assert_eq!(id.revision, "refs/pr/1");
        for not_an_id in [
            "",
            "gpt2",
            "/abs/path",
            "./rel/path",
            "../up/x",
            "~/models/x",
            "a/b/",
            "a//b",
            "a--b/c",
            "a/b..c",
            "-a/b",
            "a/b@",
            "a/b@x/../y",
            "a/b/../c",
            "C:\\models\\x",
            "org/na me",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id:?}");
        }
    }

    #[test]
    fn the_environment_is_read_as_huggingface_hub_reads_it() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let hub = Hub::from_vars(vars(&[("HOME", "/home/u")]));
        assert_eq!(hub.cache, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(hub.endpoint, DEFAULT_ENDPOINT);
        assert!(!hub.offline);
        let hub = Hub::from_vars(vars(&[("HOME", "/home/u"), ("HF_HOME", "~/hf"), ("HF_HUB_OFFLINE", "true")]));
        assert_eq!(hub.cache, PathBuf::from("/home/u/hf/hub"));
        assert!(hub.offline);
        let hub = Hub::from_vars(vars(&[
            ("HF_HOME", "/x"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_TOKEN", "hf_abc"),
            ("HF_HUB_OFFLINE", "0"),
        ]));
        assert_eq!(hub.cache, PathBuf::from("/c"));
        assert_eq!(hub.endpoint, "http://127.0.0.1:9");
        assert_eq!(hub.token.as_deref(), Some("hf_abc"));
        assert!(!hub.offline);
    }

    #[test]
    fn urls_are_quoted_as_huggingface_hub_quotes_them() {
        assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(quote("sub dir/a+b.json", true), "sub%20dir/a%2Bb.json");
        assert_eq!(origin("http://127.0.0.1:8080/x/y"), "http://127.0.0.1:8080");
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
    }
}
