//! Writing sharded safetensors as a stream, in bounded memory.
//!
//! Every shape is known before the first byte is written, so each shard's header (8-byte
//! length, JSON with every tensor's offsets) goes out first and the tensor data follows in
//! whatever chunks the caller produces: no shard is ever held in memory. The layout is
//! Hugging Face's: `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`,
//! shards cut like `save_pretrained` cuts them (a tensor that would push a shard past the
//! limit starts the next one; a tensor larger than the limit gets a shard of its own).

use crate::dtype::DType;
use crate::error::{bail, Error, Result};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name, element type and shape of a tensor to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Size of the tensor's data in bytes.
    pub fn byte_len(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size_in_bytes() as u64
    }
}

/// A file written into the output folder, with the sha256 of its bytes (lowercase hex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What [`ShardedWriter::finish`] reports.
#[derive(Clone, Debug)]
pub struct ShardsWritten {
    /// The shards, then the index.
    pub files: Vec<WrittenFile>,
    /// The sha256 of every tensor's bytes, in writing order, when asked for.
    pub tensor_digests: Option<Vec<String>>,
}

/// The file of the index that maps tensors to shards.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Writes tensors, in the order given to [`ShardedWriter::create`], into shards of a folder.
pub struct ShardedWriter {
    dir: PathBuf,
    tensors: Vec<TensorSpec>,
    /// For each shard, the index of its first tensor; one more entry marks the end.
    shard_starts: Vec<usize>,
    shard: Option<HashedFile>,
    next_shard: usize,
    /// The tensor now being written, and how many of its bytes are still due.
    tensor: usize,
    tensor_left: u64,
    tensor_hasher: Option<Sha256>,
    tensor_digests: Option<Vec<String>>,
    written: Vec<WrittenFile>,
}

/// A file being written whose sha256 is computed on the way (shards, GGUF files).
pub(crate) struct HashedFile {
    name: String,
    path: PathBuf,
    file: File,
    hasher: Sha256,
    bytes: u64,
    /// Bytes handed to the disk's writeback so far (see [`HashedFile::start_writeback`]).
    writeback_started: u64,
}

/// How many written bytes gather before their writeback is started.
const WRITEBACK_WINDOW: u64 = 32 << 20;

impl ShardedWriter {
    /// Plans the shards of `tensors` (at most `max_shard_bytes` of data each, unless one tensor
    /// is larger) in `dir`, which must exist. With `tensor_digests`, the sha256 of every tensor's
    /// bytes is kept too, for a later check of what was written. No file is created yet.
    pub fn create(dir: &Path, tensors: Vec<TensorSpec>, max_shard_bytes: u64, tensor_digests: bool) -> Result<Self> {
        if tensors.is_empty() {
            bail!("nothing to write into {}: no tensors", dir.display());
        }
        if max_shard_bytes == 0 {
            bail!("the shard size must be at least 1 byte");
        }
        let mut shard_starts = vec![0];
        let mut in_shard = 0u64;
        for (i, tensor) in tensors.iter().enumerate() {
            let size = tensor.byte_len();
            if in_shard > 0 && in_shard + size > max_shard_bytes {
                shard_starts.push(i);
                in_shard = 0;
            }
            in_shard += size;
        }
        shard_starts.push(tensors.len());
        let mut writer = ShardedWriter {
            dir: dir.to_path_buf(),
            tensor_digests: tensor_digests.then(|| Vec::with_capacity(tensors.len())),
            tensors,
            shard_starts,
            shard: None,
            next_shard: 0,
            tensor: 0,
            tensor_left: 0,
            tensor_hasher: None,
            written: Vec::new(),
        };
        writer.start_tensor()?;
        Ok(writer)
    }

    /// The tensors, in writing order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Number of shard files.
    pub fn shard_count(&self) -> usize {
        self.shard_starts.len() - 1
    }

    /// Appends the next bytes of tensor data (little-endian, row-major); chunks may be of any
    /// size and may run from one tensor (and shard) into the next.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            if self.tensor == self.tensors.len() {
                bail!("internal error: {} more bytes than the tensors hold were written", bytes.len());
            }
            let take = bytes.len().min(usize::try_from(self.tensor_left).unwrap_or(usize::MAX));
            let (now, rest) = bytes.split_at(take);
            let shard = self.shard.as_mut().expect("a shard is open while tensors are due");
            let tensor = &self.tensors[self.tensor].name;
            shard
                .write(now, self.tensor_hasher.as_mut())
                .map_err(|e| Error::new(format!("{e} (writing tensor {tensor})")))?;
            self.tensor_left -= take as u64;
            bytes = rest;
            if self.tensor_left == 0 {
                self.finish_tensor();
                self.tensor += 1;
                self.start_tensor()?;
            }
        }
        Ok(())
    }

    /// Checks that every byte was written, writes the index, and reports what was written.
    pub fn finish(mut self) -> Result<ShardsWritten> {
        if self.tensor < self.tensors.len() {
            bail!(
                "internal error: the data of tensor {} and {} more are missing from {}",
                self.tensors[self.tensor].name,
                self.tensors.len() - self.tensor - 1,
                self.dir.display()
            );
        }
        let mut weight_map = Map::new();
        for shard in 0..self.shard_count() {
            let name = shard_name(shard, self.shard_count());
            for tensor in &self.tensors[self.shard_starts[shard]..self.shard_starts[shard + 1]] {
                weight_map.insert(tensor.name.clone(), Value::String(name.clone()));
            }
        }
        let total: u64 = self.tensors.iter().map(TensorSpec::byte_len).sum();
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let mut text = serde_json::to_string_pretty(&index).expect("JSON values serialize");
        text.push('\n');
        self.written.push(write_small_file(&self.dir, INDEX_FILE, text.as_bytes())?);
        Ok(ShardsWritten { files: self.written, tensor_digests: self.tensor_digests })
    }

    /// Moves on to tensor `self.tensor`: opens its shard when it is the shard's first, and
    /// closes the previous shard. Zero-size tensors are passed over at once.
    fn start_tensor(&mut self) -> Result<()> {
        loop {
            if self.next_shard < self.shard_count() && self.tensor == self.shard_starts[self.next_shard] {
                self.close_shard()?;
                self.open_shard(self.next_shard)?;
                self.next_shard += 1;
            }
            if self.tensor == self.tensors.len() {
                return self.close_shard();
            }
            self.tensor_left = self.tensors[self.tensor].byte_len();
            if self.tensor_digests.is_some() {
                self.tensor_hasher = Some(Sha256::new());
            }
            if self.tensor_left > 0 {
                return Ok(());
            }
            self.finish_tensor();
            self.tensor += 1;
        }
    }

    fn finish_tensor(&mut self) {
        if let (Some(hasher), Some(digests)) = (self.tensor_hasher.take(), &mut self.tensor_digests) {
            digests.push(hex(&hasher.finalize()));
        }
    }

    fn open_shard(&mut self, shard: usize) -> Result<()> {
        let tensors = &self.tensors[self.shard_starts[shard]..self.shard_starts[shard + 1]];
        let mut open = HashedFile::create(&self.dir, &shard_name(shard, self.shard_count()))?;
        open.write(&header(tensors), None)?;
        self.shard = Some(open);
        Ok(())
    }

    /// Flushes the open shard to the disk and records its checksum.
    fn close_shard(&mut self) -> Result<()> {
        if let Some(shard) = self.shard.take() {
            self.written.push(shard.close()?);
        }
        Ok(())
    }
}

impl HashedFile {
    /// Creates (or truncates) `dir/name`.
    pub(crate) fn create(dir: &Path, name: &str) -> Result<HashedFile> {
        let path = dir.join(name);
        let file = File::create(&path).map_err(|e| Error::new(format!("cannot create {}: {e}", path.display())))?;
        Ok(HashedFile { name: name.to_string(), path, file, hasher: Sha256::new(), bytes: 0, writeback_started: 0 })
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> u64 {
        self.bytes
    }

    /// Syncs the file to the disk (a file renamed into place must not hold pages the kernel has not
    /// written yet) and reports its name, size and checksum.
    pub(crate) fn close(self) -> Result<WrittenFile> {
        self.file.sync_all().map_err(|e| write_error(&self.path, &e))?;
        Ok(WrittenFile { name: self.name, bytes: self.bytes, sha256: hex(&self.hasher.finalize()) })
    }

    /// Writes `bytes` and hashes them into the shard's checksum and `also` (a tensor's). For
    /// large pieces the write runs on a second thread while this one hashes: sha256 and the
    /// kernel's copy into the page cache are a job's two largest costs and need not wait for each
    /// other (on the 1b bench, hashing after writing made apply-delta about a third slower).
    pub(crate) fn write(&mut self, bytes: &[u8], also: Option<&mut Sha256>) -> Result<()> {
        const IN_PARALLEL_FROM: usize = 256 << 10;
        let HashedFile { file, hasher, path, .. } = self;
        let hash = || {
            hasher.update(bytes);
            if let Some(also) = also {
                also.update(bytes);
            }
        };
        let written = if bytes.len() >= IN_PARALLEL_FROM {
            std::thread::scope(|scope| {
                let writing = scope.spawn(|| file.write_all(bytes));
                hash();
                writing.join().unwrap_or_else(|_| Err(std::io::Error::other("the writing thread panicked")))
            })
        } else {
            hash();
            file.write_all(bytes)
        };
        written.map_err(|e| write_error(path, &e))?;
        self.bytes += bytes.len() as u64;
        if self.bytes - self.writeback_started >= WRITEBACK_WINDOW {
            self.start_writeback();
        }
        Ok(())
    }

    /// Asks the kernel to start writing the pages written since the last call to the disk, without
    /// waiting. Left alone, it would keep gigabytes dirty until the final `fsync` and then write
    /// them all while the job waits; started as they come, the disk works while the next chunks
    /// are computed. Only a hint: durability still comes from `sync_all` when the shard closes.
    fn start_writeback(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let (start, len) = (self.writeback_started, self.bytes - self.writeback_started);
            // SAFETY: a plain system call on an open file descriptor; nothing is borrowed.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), start as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        self.writeback_started = self.bytes;
    }
}

/// Hugging Face's shard names: `model-00001-of-00003.safetensors`.
fn shard_name(shard: usize, count: usize) -> String {
    format!("model-{:05}-of-{count:05}.safetensors", shard + 1)
}

/// A shard's header: its length, then JSON naming each tensor's dtype, shape and data offsets
/// (relative to the end of the header), padded with spaces to a multiple of 8 bytes as the
/// safetensors library does, so the data that follows is aligned.
fn header(tensors: &[TensorSpec]) -> Vec<u8> {
    let mut map = Map::new();
    map.insert("__metadata__".to_string(), json!({ "format": "pt" }));
    let mut offset = 0u64;
    for tensor in tensors {
        let end = offset + tensor.byte_len();
        map.insert(
            tensor.name.clone(),
            json!({ "dtype": tensor.dtype.name(), "shape": tensor.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&Value::Object(map)).expect("JSON values serialize").into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out
}

/// Writes a small file in one go, synced to disk, and returns its checksum.
pub(crate) fn write_small_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<WrittenFile> {
    let path = dir.join(name);
    let mut file = File::create(&path).map_err(|e| Error::new(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(|e| write_error(&path, &e))?;
    Ok(WrittenFile { name: name.to_string(), bytes: bytes.len() as u64, sha256: hex(&Sha256::digest(bytes)) })
}

/// The message of a failed write: the file, the reason, and the usual cause's fix.
pub(crate) fn write_error(path: &Path, e: &std::io::Error) -> Error {
    let hint = match e.raw_os_error() {
        Some(28) => "; free some disk space (or write the target to another disk) and run again", // ENOSPC
        Some(27) => "; the file size limit (ulimit -f) is too small for this model",              // EFBIG
        _ => "",
    };
    Error::new(format!("cannot write {}: {e}{hint}", path.display()))
}

/// Lowercase hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
