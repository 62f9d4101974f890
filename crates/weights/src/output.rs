//! Writing a model folder so that it is either complete or absent.
//!
//! Everything goes into a temporary folder beside the target (same file system, so the final
//! `rename` is atomic), which is renamed into place only once every file is written and synced.
//! An error, an interruption or a full disk drops the temporary folder; a process killed outright
//! (SIGKILL, power loss) leaves it behind, and the next run for the same target removes it: a
//! lock file, held for the life of the run and released by the kernel when the process dies,
//! tells a stale temporary folder from one that another running process is still writing.

use crate::checkpoint::Checkpoint;
use crate::error::{bail, Error, Result};
use crate::safetensors_writer::{
    hex, write_error, write_small_file, ShardedWriter, ShardsWritten, TensorSpec, WrittenFile,
};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

/// Reports how far a long job is; the CLI draws a bar or prints lines, tests ignore it.
pub trait Progress {
    /// A new phase begins ("apply-delta", "verify", ...) that will process `total_bytes`.
    fn phase(&mut self, what: &str, total_bytes: u64);
    /// `bytes` more of the current phase are done.
    fn advance(&mut self, bytes: u64);
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
}

/// How the caller steers a long job: a flag that stops it (set from a signal handler, say)
/// and where its progress goes.
pub struct JobControl<'a> {
    pub cancel: &'a AtomicBool,
    pub progress: &'a mut dyn Progress,
}

impl JobControl<'_> {
    /// An error once the cancel flag is set.
    pub(crate) fn check_cancel(&self, target: &Path) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            bail!("interrupted; {} was not written and its temporary folder was removed", target.display());
        }
        Ok(())
    }
}

/// What a finished job wrote: every file of the target folder with its sha256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub target: PathBuf,
    pub files: Vec<WrittenFile>,
    pub tensors: usize,
    /// Tensor bytes read from the inputs (0 for a job that reads nothing).
    pub bytes_read: u64,
    /// Whether every tensor was read back from the target and matched what was computed.
    pub verified: bool,
}

impl Manifest {
    /// The files in `sha256sum` format ("<hex>  <name>" lines), so `sha256sum -c` can check a copy.
    pub fn sha256sum_lines(&self) -> String {
        self.files.iter().map(|f| format!("{}  {}\n", f.sha256, f.name)).collect()
    }
}

/// The temporary folder a target is written into; see the module documentation.
pub struct StagedDir {
    target: PathBuf,
    temp: PathBuf,
    lock_path: PathBuf,
    /// Held (locked) until the folder is committed or dropped.
    _lock: File,
    committed: bool,
}

/// What a staged target is: a folder, or one file (written inside the temporary folder and moved out
/// of it when complete).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Staged {
    Folder,
    File,
}

/// One output file (a GGUF model) written so that it is either complete or absent: it is written into
/// a [`StagedDir`]'s temporary folder beside the target, so it gets the same locking and clean-up of
/// killed runs, and renamed onto the target (atomically replacing an old file) once complete.
pub struct StagedFile {
    dir: StagedDir,
    name: String,
}

impl StagedFile {
    /// Prepares to write the file `target`; see [`StagedDir::create`].
    pub fn create(target: &Path, force: bool) -> Result<StagedFile> {
        let dir = StagedDir::create_for(target, force, Staged::File)?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).expect("create_for checked the name");
        Ok(StagedFile { dir, name })
    }

    /// The temporary folder the file is written into, and its name there.
    pub fn dir_and_name(&self) -> (&Path, &str) {
        (self.dir.path(), &self.name)
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        self.dir.target()
    }

    /// Moves the finished file onto the target.
    pub fn commit(mut self) -> Result<()> {
        let t = self.dir.target.display().to_string();
        let temp = self.dir.temp.join(&self.name);
        std::fs::rename(&temp, &self.dir.target)
            .map_err(|e| Error::new(format!("cannot rename {} to {t}: {e}", temp.display())))?;
        self.dir.committed = true;
        let _ = std::fs::remove_dir_all(&self.dir.temp);
        if let Some(parent) = self.dir.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

/// Infix of the temporary folders: `.NAME.vicuna-partial-PID` beside target NAME.
const PARTIAL: &str = "vicuna-partial-";

impl StagedDir {
    /// Prepares to write `target`: refuses an existing target unless `force`, removes stale
    /// temporary folders of earlier killed runs, and creates a fresh, locked temporary folder.
    pub fn create(target: &Path, force: bool) -> Result<StagedDir> {
        StagedDir::create_for(target, force, Staged::Folder)
    }

    fn create_for(target: &Path, force: bool, kind: Staged) -> Result<StagedDir> {
        let t = target.display();
        let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            bail!("{t} is not a usable folder name for the output; give a path such as models/stable-vicuna-13b");
        };
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            bail!("cannot write {t}: its parent folder {} does not exist; create it first", parent.display());
        }
        if let Ok(meta) = std::fs::symlink_metadata(target) {
            match kind {
                Staged::Folder if !meta.is_dir() => {
                    bail!("{t} exists and is not a folder; remove it or choose another output path")
                }
                Staged::File if !meta.is_file() => {
                    bail!("{t} exists and is not a file; remove it or choose another output path")
                }
                _ => {}
            }
            if !force {
                bail!("{t} already exists; pass --force to replace it, or choose another output path");
            }
        }
        remove_stale(&parent, &name)?;
        let base = format!(".{name}.{PARTIAL}{}", std::process::id());
        let temp = parent.join(&base);
        let lock_path = parent.join(format!("{base}.lock"));
        let lock = File::create(&lock_path)
            .map_err(|e| Error::new(format!("cannot create {} in {}: {e}", lock_path.display(), parent.display())))?;
        lock.try_lock().map_err(|e| Error::new(format!("cannot lock {}: {e}", lock_path.display())))?;
        if let Err(e) = std::fs::create_dir(&temp) {
            let _ = std::fs::remove_file(&lock_path);
            bail!("cannot create the temporary folder {}: {e}", temp.display());
        }
        Ok(StagedDir { target: target.to_path_buf(), temp, lock_path, _lock: lock, committed: false })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The final folder.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished folder into place. A target that exists now (the caller had `force`)
    /// is first moved aside, then deleted once the new folder is in place.
    pub fn commit(mut self) -> Result<()> {
        let t = self.target.display();
        sync_dir(&self.temp)?;
        let old = self.target.exists().then(|| {
            let name = self.target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.target.with_file_name(format!(".{name}.vicuna-old-{}", std::process::id()))
        });
        if let Some(old) = &old {
            std::fs::rename(&self.target, old)
                .map_err(|e| Error::new(format!("cannot move the old {t} aside to {}: {e}", old.display())))?;
        }
        if let Err(e) = std::fs::rename(&self.temp, &self.target) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, &self.target);
            }
            bail!("cannot rename {} to {t}: {e}", self.temp.display());
        }
        self.committed = true;
        if let Some(old) = &old {
            std::fs::remove_dir_all(old).map_err(|e| {
                Error::new(format!("{t} was written, but the old folder {} could not be removed: {e}", old.display()))
            })?;
        }
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Removes the temporary folders (and lock files) that killed runs for target `name` left in
/// `parent`; refuses to go on while another live process holds one.
fn remove_stale(parent: &Path, name: &str) -> Result<()> {
    let prefix = format!(".{name}.{PARTIAL}");
    let entries =
        std::fs::read_dir(parent).map_err(|e| Error::new(format!("cannot list {}: {e}", parent.display())))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else { continue };
        if rest.ends_with(".lock") {
            continue; // handled with its folder below, or removed when lockable
        }
        let dir = entry.path();
        let lock_path = parent.join(format!("{file_name}.lock"));
        if let Ok(lock) = File::options().write(true).open(&lock_path) {
            match lock.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => bail!(
                    "another vicuna process is writing {} (its temporary folder {} is in use); wait for it to finish",
                    parent.join(name).display(),
                    dir.display()
                ),
                Err(TryLockError::Error(e)) => bail!("cannot check the lock {}: {e}", lock_path.display()),
            }
        }
        std::fs::remove_dir_all(&dir).map_err(|e| {
            Error::new(format!("cannot remove {}, left by an interrupted run: {e}; remove it by hand", dir.display()))
        })?;
        let _ = std::fs::remove_file(&lock_path);
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| write_error(dir, &e))
}

/// The producer's end of [`write_in_background`]: hands chunks to the writer thread and gets
/// their buffers back once written, so a long job allocates (and page-faults) a handful of
/// buffers, not one per chunk.
pub(crate) struct ChunkSink {
    chunks: mpsc::SyncSender<Message>,
    returned: mpsc::Receiver<Vec<u8>>,
}

enum Message {
    Data(Vec<u8>),
    Finish,
}

impl ChunkSink {
    /// A buffer of `len` bytes (contents unspecified: the caller overwrites all of it).
    pub(crate) fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buffer = self.returned.try_recv().unwrap_or_default();
        buffer.resize(len, 0);
        buffer
    }

    /// Queues the next chunk of tensor data for writing.
    pub(crate) fn send(&mut self, bytes: Vec<u8>) -> Result<()> {
        // A closed queue means the writer failed; its error is collected when it is joined.
        self.chunks.send(Message::Data(bytes)).map_err(|_| Error::new("the writer stopped"))
    }
}

/// A writer that takes a stream of bytes and reports what it wrote when finished: the sharded
/// safetensors writer and the GGUF writer.
pub(crate) trait StreamWriter: Send {
    type Written: Send;
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    fn finish(self) -> Result<Self::Written>;
}

impl StreamWriter for ShardedWriter {
    type Written = ShardsWritten;
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        ShardedWriter::write(self, bytes)
    }
    fn finish(self) -> Result<ShardsWritten> {
        ShardedWriter::finish(self)
    }
}

/// Runs `writer` on a thread of its own, fed with chunks by `produce` through a short queue, so
/// the next chunk is computed while the previous one is written. At most `QUEUE` chunks wait,
/// which bounds the memory in flight.
pub(crate) fn write_in_background<W, F>(writer: W, produce: F) -> Result<W::Written>
where
    W: StreamWriter,
    F: FnOnce(&mut ChunkSink) -> Result<()>,
{
    const QUEUE: usize = 2;
    let (tx, rx) = mpsc::sync_channel::<Message>(QUEUE);
    let (give_back, returned) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || -> Result<Option<W::Written>> {
            let mut writer = writer;
            for message in rx {
                match message {
                    Message::Data(bytes) => {
                        writer.write(&bytes)?;
                        let _ = give_back.send(bytes);
                    }
                    Message::Finish => return writer.finish().map(Some),
                }
            }
            Ok(None) // the producer gave up; its error is the one to report
        });
        let mut sink = ChunkSink { chunks: tx, returned };
        let produced = produce(&mut sink);
        if produced.is_ok() {
            let _ = sink.chunks.send(Message::Finish);
        }
        drop(sink);
        let written = handle.join().unwrap_or_else(|_| Err(Error::new("internal error: the writer thread panicked")));
        match (produced, written) {
            (Ok(()), Ok(Some(done))) => Ok(done),
            (_, Err(e)) => Err(e),
            (Err(e), _) => Err(e),
            (Ok(()), Ok(None)) => Err(Error::new("internal error: the writer ended early")),
        }
    })
}

/// Re-reads every tensor of the folder just written (through the same checks as any model
/// folder) and compares its sha256 with the one computed while writing.
pub(crate) fn verify_written(
    dir: &Path,
    shown_as: &Path,
    tensors: &[TensorSpec],
    digests: &[String],
    control: &mut JobControl,
) -> Result<()> {
    const WINDOW: usize = 8 << 20;
    let checkpoint = Checkpoint::open(dir)?;
    let total = tensors.iter().map(TensorSpec::byte_len).sum();
    control.progress.phase("verify", total);
    let mut problems = Vec::new();
    let mut buffer = vec![0u8; WINDOW];
    for (spec, want) in tensors.iter().zip(digests) {
        control.check_cancel(shown_as)?;
        let Some(info) = checkpoint.info(&spec.name) else {
            problems.push(format!("{} is missing", spec.name));
            continue;
        };
        if info.dtype != spec.dtype || info.shape != spec.shape {
            problems.push(format!(
                "{} is {} {:?}, expected {} {:?}",
                spec.name, info.dtype, info.shape, spec.dtype, spec.shape
            ));
            continue;
        }
        let mut hasher = Sha256::new();
        let len = spec.byte_len() as usize;
        let mut at = 0;
        while at < len {
            let n = WINDOW.min(len - at);
            checkpoint.read_bytes_at(&spec.name, at, &mut buffer[..n])?;
            hasher.update(&buffer[..n]);
            control.progress.advance(n as u64);
            at += n;
        }
        if hex(&hasher.finalize()) != *want {
            problems.push(format!("{} in {} differs from what was computed", spec.name, info.file.display()));
        }
    }
    if !problems.is_empty() {
        bail!(
            "verification of {} failed ({}); the disk or memory corrupted data — nothing was put in place, run again",
            shown_as.display(),
            problems.join("; ")
        );
    }
    Ok(())
}

/// `config.json` bytes, as transformers writes them (indented, with a final newline).
pub(crate) fn json_file_bytes(value: &Value) -> Vec<u8> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    text.into_bytes()
}

/// A `generation_config.json` for a model config: its BOS, EOS and (if set) padding ids, as
/// transformers derives one from the model config.
pub(crate) fn generation_config(config: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    out.insert("_from_model_config".to_string(), json!(true));
    for (key, default) in [("bos_token_id", json!(1)), ("eos_token_id", json!(2))] {
        out.insert(key.to_string(), config.get(key).filter(|v| !v.is_null()).cloned().unwrap_or(default));
    }
    if let Some(pad) = config.get("pad_token_id").filter(|v| !v.is_null()) {
        out.insert("pad_token_id".to_string(), pad.clone());
    }
    Value::Object(out)
}

/// Copies a small side file (tokenizer files) into the output folder.
pub(crate) fn copy_small_file(from: &Path, dir: &Path, name: &str) -> Result<WrittenFile> {
    let bytes = std::fs::read(from).map_err(|e| Error::new(format!("cannot read {}: {e}", from.display())))?;
    write_small_file(dir, name, &bytes)
}
