//! A Hugging Face Hub on 127.0.0.1 for the download tests (crates/weights/tests/hub.rs, and the CLI's through
//! `#[path]`): the routes `huggingface_hub` and vicuna use, answered as huggingface.co answers them.
//!
//! - `GET /api/models/ORG/NAME/revision/REV`: `{"id", "sha", "siblings": [{"rfilename"}]}`.
//! - `HEAD`/`GET /ORG/NAME/resolve/REV/FILE`: a small (git) file is answered directly with its `ETag` (a 40-hex
//!   id, as git blob ids are); an LFS file with `302` to `/cdn/SHA256` on a second port (another origin, as the
//!   Hub's CDN is) carrying `X-Linked-Etag` (its sha256),
//!   `X-Linked-Size` and `X-Repo-Commit`, as the Hub redirects to its CDN.
//! - `GET /cdn/SHA256`: the bytes, with `Range: bytes=N-` answered `206`.
//!
//! Errors carry `X-Error-Code` as the Hub's do (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`); with a token
//! required, a request without `Authorization: Bearer TOKEN` gets 401. Every request is logged.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

pub struct MockFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Stored in LFS: redirected to the CDN, etag = sha256.
    pub lfs: bool,
    /// The bytes actually sent, when they should not match what the Hub announces.
    pub served: Option<Vec<u8>>,
}

impl MockFile {
    pub fn new(name: &str, bytes: Vec<u8>) -> MockFile {
        let lfs = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".gguf")
            || name.ends_with(".model");
        MockFile { name: name.to_string(), bytes, lfs, served: None }
    }

    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.bytes))
    }

    /// What the Hub's ETag for the file is: the sha256 for LFS, a 40-hex id (standing for the git blob id) else.
    pub fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            self.sha256()[..40].to_string()
        }
    }
}

pub struct MockRepo {
    pub id: String,
    pub commit: String,
    /// Branch (or tag) names that point at `commit`.
    pub branches: Vec<String>,
    pub files: Vec<MockFile>,
}

impl MockRepo {
    /// A repo with the files of a local folder (top level), at commit `commit` on `main`.
    pub fn from_dir(id: &str, commit: &str, dir: &std::path::Path) -> MockRepo {
        let mut files: Vec<MockFile> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| MockFile::new(&p.file_name().unwrap().to_string_lossy(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        MockRepo { id: id.to_string(), commit: commit.to_string(), branches: vec!["main".into()], files }
    }
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Logged {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    repos: Vec<MockRepo>,
    log: Vec<Logged>,
    token: Option<String>,
    /// Files whose next CDN GET stops halfway (the connection is dropped).
    break_next_get: Vec<String>,
    /// (old id, new id) of renamed repos: requests for the old name are redirected (307, relative).
    renamed: Vec<(String, String)>,
}

pub struct MockHub {
    /// `http://127.0.0.1:PORT`, for HF_ENDPOINT.
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl MockHub {
    pub fn start(repos: Vec<MockRepo>) -> MockHub {
        // The Hub and its CDN on two ports: two origins, as huggingface.co and its CDN are.
        let (hub, cdn) = (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("127.0.0.1:0").unwrap());
        let url = format!("http://{}", hub.local_addr().unwrap());
        let cdn_url = format!("http://{}", cdn.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { repos, ..State::default() }));
        for listener in [hub, cdn] {
            let (shared, base) = (state.clone(), cdn_url.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let (state, base) = (shared.clone(), base.clone());
                    std::thread::spawn(move || serve(stream, &state, &base));
                }
            });
        }
        MockHub { url, state }
    }

    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().token = Some(token.to_string());
    }

    /// The next GET of `file`'s bytes sends half of them, then drops the connection.
    pub fn break_next_get(&self, file: &str) {
        self.state.lock().unwrap().break_next_get.push(file.to_string());
    }

    /// `old` (ORG/NAME) is the former name of the repo `new`: the Hub redirects its API and resolve URLs.
    pub fn rename(&self, old: &str, new: &str) {
        self.state.lock().unwrap().renamed.push((old.to_string(), new.to_string()));
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unquote(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then drop the connection.
    cut_at: Option<usize>,
}

fn answer(status: u16, headers: Vec<(&str, String)>, body: Vec<u8>) -> Answer {
    Answer { status, headers: headers.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), body, cut_at: None }
}

fn error(status: u16, code: &str) -> Answer {
    answer(
        status,
        vec![("X-Error-Code", code.to_string()), ("Content-Type", "application/json".into())],
        format!("{{\"error\":\"{code}\"}}").into_bytes(),
    )
}

fn serve(stream: TcpStream, state: &Mutex<State>, base: &str) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let request = Logged { method: method.clone(), path: path.clone(), headers };
    let answer = {
        let mut state = state.lock().unwrap();
        state.log.push(request.clone());
        route(&mut state, &request, base)
    };
    let mut stream = stream;
    let reason = match answer.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\nConnection: close\r\n", answer.status);
    let has_length = answer.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in &answer.headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !has_length {
        head += &format!("Content-Length: {}\r\n", answer.body.len());
    }
    head += "\r\n";
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let body = &answer.body[..answer.cut_at.unwrap_or(answer.body.len())];
        let _ = stream.write_all(body);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

/// The repo `ORG/NAME` with revision `rev` (a branch or its commit), or the Hub's 404.
fn find<'s>(state: &'s State, org: &str, name: &str, rev: &str) -> Result<&'s MockRepo, Answer> {
    let Some(repo) = state.repos.iter().find(|r| r.id == format!("{org}/{name}")) else {
        return Err(error(404, "RepoNotFound"));
    };
    let rev = unquote(rev);
    if rev != repo.commit && !repo.branches.contains(&rev) {
        return Err(error(404, "RevisionNotFound"));
    }
    Ok(repo)
}

fn route(state: &mut State, request: &Logged, base: &str) -> Answer {
    let path = request.path.split('?').next().unwrap_or("");
    if let Some(sha) = path.strip_prefix("/cdn/") {
        return cdn(state, sha, request);
    }
    if let Some(token) = &state.token {
        if request.header("authorization") != Some(&format!("Bearer {token}")) {
            return error(401, "RepoNotFound");
        }
    }
    for (old, new) in &state.renamed {
        for prefix in [format!("/api/models/{old}/"), format!("/{old}/resolve/")] {
            if let Some(rest) = path.strip_prefix(&prefix) {
                let moved = format!("{}{rest}", prefix.replace(old.as_str(), new));
                return answer(307, vec![("Location", moved)], Vec::new());
            }
        }
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let mut parts = rest.splitn(4, '/');
        let (org, name, word, rev) = (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(org), Some(name), Some("revision" | "tree"), Some(rev)) = (org, name, word, rev) else {
            return error(404, "RepoNotFound");
        };
        let repo = match find(state, org, name, rev) {
            Ok(repo) => repo,
            Err(answer) => return answer,
        };
        if word == Some("tree") {
            return tree(repo);
        }
        let siblings: Vec<String> = repo.files.iter().map(|f| format!("{{\"rfilename\":\"{}\"}}", f.name)).collect();
        let body =
            format!("{{\"id\":\"{}\",\"sha\":\"{}\",\"siblings\":[{}]}}", repo.id, repo.commit, siblings.join(","));
        return answer(200, vec![("Content-Type", "application/json".into())], body.into_bytes());
    }
    let mut parts = path.trim_start_matches('/').splitn(5, '/');
    let (org, name, word, rev, file) = (parts.next(), parts.next(), parts.next(), parts.next(), parts.next());
    let (Some(org), Some(name), Some("resolve"), Some(rev), Some(file)) = (org, name, word, rev, file) else {
        return error(404, "RepoNotFound");
    };
    let repo = match find(state, org, name, rev) {
        Ok(repo) => repo,
        Err(answer) => return answer,
    };
    let file = unquote(file);
    let Some(f) = repo.files.iter().find(|f| f.name == file) else { return error(404, "EntryNotFound") };
    let commit = ("X-Repo-Commit", repo.commit.clone());
    if f.lfs {
        return answer(
            302,
            vec![
                ("Location", format!("{base}/cdn/{}", f.sha256())),
                ("X-Linked-Etag", format!("\"{}\"", f.etag())),
                ("X-Linked-Size", f.bytes.len().to_string()),
                ("ETag", format!("\"{}\"", &hex(&Sha256::digest(f.name.as_bytes()))[..40])),
                commit,
                ("Content-Length", "0".into()),
            ],
            Vec::new(),
        );
    }
    let mut a = answer(
        200,
        vec![("ETag", format!("\"{}\"", f.etag())), commit],
        f.served.clone().unwrap_or_else(|| f.bytes.clone()),
    );
    if request.method == "HEAD" {
        a.headers.push(("Content-Length".into(), f.bytes.len().to_string()));
    }
    a
}

/// `/api/models/ORG/NAME/tree/REV?recursive=true` (what huggingface_hub 1.x+ lists a snapshot with): one page.
fn tree(repo: &MockRepo) -> Answer {
    let entries: Vec<String> = repo
        .files
        .iter()
        .map(|f| {
            let lfs = if f.lfs {
                format!(",\"lfs\":{{\"oid\":\"{}\",\"size\":{},\"pointerSize\":134}}", f.sha256(), f.bytes.len())
            } else {
                String::new()
            };
            format!(
                "{{\"type\":\"file\",\"oid\":\"{}\",\"size\":{},\"path\":\"{}\"{lfs}}}",
                &f.sha256()[..40],
                f.bytes.len(),
                f.name
            )
        })
        .collect();
    answer(200, vec![("Content-Type", "application/json".into())], format!("[{}]", entries.join(",")).into_bytes())
}

fn cdn(state: &mut State, sha: &str, request: &Logged) -> Answer {
    let found = state.repos.iter().flat_map(|r| r.files.iter()).find(|f| f.lfs && f.sha256() == sha);
    let Some(f) = found else { return error(404, "EntryNotFound") };
    let bytes = f.served.clone().unwrap_or_else(|| f.bytes.clone());
    let name = f.name.clone();
    let len = bytes.len();
    let start = match request.header("range").and_then(|r| r.strip_prefix("bytes=")) {
        Some(range) => match range.split('-').next().and_then(|s| s.parse::<usize>().ok()) {
            Some(start) if start < len => Some(start),
            _ => return answer(416, vec![("Content-Range", format!("bytes */{len}"))], Vec::new()),
        },
        None => None,
    };
    let mut a = match start {
        Some(start) => answer(
            206,
            vec![
                ("Content-Range", format!("bytes {start}-{}/{len}", len - 1)),
                ("Content-Length", (len - start).to_string()),
            ],
            bytes[start..].to_vec(),
        ),
        None => answer(200, vec![("Content-Length", len.to_string())], bytes),
    };
    if let Some(i) = state.break_next_get.iter().position(|n| *n == name) {
        if request.method == "GET" {
            state.break_next_get.remove(i);
            a.cut_at = Some(a.body.len() / 2);
        }
    }
    a
}
