//! Test helpers: fixture paths, temp folders, and tiny independent writers for the
//! formats the crate reads (zip, safetensors, torch pickles), so tests can build
//! malformed and hostile files on the fly.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(rel)
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vicuna-weights-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    /// A copy of a fixture folder.
    pub fn copy_of(rel: &str) -> TempDir {
        let dir = TempDir::new(&rel.replace('/', "_"));
        for entry in std::fs::read_dir(fixture(rel)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        dir
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error of `result`, checked to be one line and to contain every part.
pub fn expect_err<T>(result: Result<T, vicuna_weights::Error>, parts: &[&str]) -> String {
    let message = match result {
        Ok(_) => panic!("expected an error containing {parts:?}, got Ok"),
        Err(e) => e.to_string(),
    };
    assert!(!message.contains('\n') && !message.contains('\r'), "multi-line error: {message}");
    for part in parts {
        assert!(message.contains(part), "error lacks {part:?}: {message}");
    }
    message
}

// ---------------------------------------------------------------- zip

/// Entries of a zip archive, read from its central directory (no zip64: test files are small).
pub fn read_zip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let eocd = bytes.len() - 22;
    assert_eq!(u32_at(eocd), 0x0605_4b50, "test reader expects no zip comment");
    let (count, mut at) = (u16_at(eocd + 10), u32_at(eocd + 16));
    let mut out = Vec::new();
    for _ in 0..count {
        let size = u32_at(at + 24);
        let (name_len, extra_len, comment_len) = (u16_at(at + 28), u16_at(at + 30), u16_at(at + 32));
        let name = String::from_utf8(bytes[at + 46..at + 46 + name_len].to_vec()).unwrap();
        let local = u32_at(at + 42);
        let start = local + 30 + u16_at(local + 26) + u16_at(local + 28);
        out.push((name, bytes[start..start + size].to_vec()));
        at += 46 + name_len + extra_len + comment_len;
    }
    out
}

#[derive(Clone, Copy, Default)]
pub struct ZipOptions {
    /// Write zip64 records and extra fields even though the data is small.
    pub zip64: bool,
    /// Claim this compression method in the headers (data stays as given).
    pub method: u16,
}

/// A zip writer in the style of torch.save: stored entries, data aligned to 64 bytes with
/// padding in the local extra field, sizes in the central directory.
pub fn write_zip(path: &Path, entries: &[(String, Vec<u8>)], opts: ZipOptions) {
    let mut out: Vec<u8> = Vec::new();
    let mut central: Vec<u8> = Vec::new();
    let put16 = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let put32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    let put64 = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_le_bytes());
    for (name, data) in entries {
        let offset = out.len();
        let crc = crc32(data);
        // Local header.
        let mut extra = Vec::new();
        if opts.zip64 {
            put16(&mut extra, 1);
            put16(&mut extra, 16);
            put64(&mut extra, data.len() as u64);
            put64(&mut extra, data.len() as u64);
        }
        let unpadded = offset + 30 + name.len() + extra.len() + 4;
        let pad = (64 - unpadded % 64) % 64;
        put16(&mut extra, 0x4246); // "FB", as torch writes
        put16(&mut extra, pad as u16);
        extra.extend(std::iter::repeat_n(b'Z', pad));
        let small = |x: usize| if opts.zip64 { 0xFFFF_FFFF } else { x as u32 };
        put32(&mut out, 0x0403_4b50);
        put16(&mut out, 45);
        put16(&mut out, 0);
        put16(&mut out, opts.method);
        put32(&mut out, 0);
        put32(&mut out, crc);
        put32(&mut out, small(data.len()));
        put32(&mut out, small(data.len()));
        put16(&mut out, name.len() as u16);
        put16(&mut out, extra.len() as u16);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(data);
        // Central directory record.
        let mut cextra = Vec::new();
        if opts.zip64 {
            put16(&mut cextra, 1);
            put16(&mut cextra, 24);
            put64(&mut cextra, data.len() as u64);
            put64(&mut cextra, data.len() as u64);
            put64(&mut cextra, offset as u64);
        }
        put32(&mut central, 0x0201_4b50);
        put16(&mut central, 45);
        put16(&mut central, 45);
        put16(&mut central, 0);
        put16(&mut central, opts.method);
        put32(&mut central, 0);
        put32(&mut central, crc);
        put32(&mut central, small(data.len()));
        put32(&mut central, small(data.len()));
        put16(&mut central, name.len() as u16);
        put16(&mut central, cextra.len() as u16);
        put16(&mut central, 0);
        put16(&mut central, 0);
        put16(&mut central, 0);
        put32(&mut central, 0);
        put32(&mut central, small(offset));
        central.extend_from_slice(name.as_bytes());
        central.extend_from_slice(&cextra);
    }
    let cd_offset = out.len();
    out.extend_from_slice(&central);
    if opts.zip64 {
        let record = out.len();
        put32(&mut out, 0x0606_4b50);
        put64(&mut out, 44);
        put16(&mut out, 45);
        put16(&mut out, 45);
        put32(&mut out, 0);
        put32(&mut out, 0);
        put64(&mut out, entries.len() as u64);
        put64(&mut out, entries.len() as u64);
        put64(&mut out, central.len() as u64);
        put64(&mut out, cd_offset as u64);
        put32(&mut out, 0x0706_4b50);
        put32(&mut out, 0);
        put64(&mut out, record as u64);
        put32(&mut out, 1);
    }
    let (count, size, off) = if opts.zip64 {
        (0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)
    } else {
        (entries.len() as u16, central.len() as u32, cd_offset as u32)
    };
    put32(&mut out, 0x0605_4b50);
    put16(&mut out, 0);
    put16(&mut out, 0);
    put16(&mut out, count);
    put16(&mut out, count);
    put32(&mut out, size);
    put32(&mut out, off);
    put16(&mut out, 0);
    std::fs::write(path, out).unwrap();
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A torch-style archive: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>`.
pub fn write_torch_zip(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)], byteorder: &str, opts: ZipOptions) {
    let mut entries = vec![
        ("archive/data.pkl".to_string(), pickle.to_vec()),
        ("archive/byteorder".to_string(), byteorder.as_bytes().to_vec()),
    ];
    for (key, bytes) in storages {
        entries.push((format!("archive/data/{key}"), bytes.clone()));
    }
    write_zip(path, &entries, opts);
}

// ---------------------------------------------------------------- pickle

/// Builds pickle bytes opcode by opcode.
#[derive(Default)]
pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn new() -> Pickle {
        Pickle(vec![0x80, 2]) // PROTO 2, as torch.save writes
    }
    pub fn op(mut self, op: u8) -> Self {
        self.0.push(op);
        self
    }
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn global(self, module: &str, name: &str) -> Self {
        self.op(b'c').raw(format!("{module}\n{name}\n").as_bytes())
    }
    pub fn str(self, s: &str) -> Self {
        self.op(b'X').raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes())
    }
    pub fn short_str(self, s: &str) -> Self {
        self.op(0x8c).raw(&[s.len() as u8]).raw(s.as_bytes())
    }
    pub fn int(self, v: i32) -> Self {
        self.op(b'J').raw(&v.to_le_bytes())
    }
    pub fn mark(self) -> Self {
        self.op(b'(')
    }
    pub fn tuple(self) -> Self {
        self.op(b't')
    }
    pub fn int_tuple(self, v: &[usize]) -> Self {
        v.iter().fold(self.mark(), |p, &x| p.int(x as i32)).tuple()
    }
    pub fn put(self, i: u8) -> Self {
        self.op(b'q').raw(&[i])
    }
    pub fn get(self, i: u8) -> Self {
        self.op(b'h').raw(&[i])
    }
    pub fn reduce(self) -> Self {
        self.op(b'R')
    }
    pub fn stop(self) -> Vec<u8> {
        self.op(b'.').0
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`, like torch.save.
    pub fn tensor(
        self,
        storage_class: &str,
        key: &str,
        numel: usize,
        offset: usize,
        shape: &[usize],
        stride: &[usize],
    ) -> Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .mark()
            .str("storage")
            .global("torch", storage_class)
            .str(key)
            .str("cpu")
            .int(numel as i32)
            .tuple()
            .op(b'Q') // BINPERSID
            .int(offset as i32)
            .int_tuple(shape)
            .int_tuple(stride)
            .op(0x89) // NEWFALSE
            .global("collections", "OrderedDict")
            .op(b')')
            .reduce()
            .tuple()
            .reduce()
    }
}

/// One tensor of a hand-made state dict.
pub struct Spec<'a> {
    pub name: &'a str,
    pub class: &'a str,
    pub key: &'a str,
    pub numel: usize,
    pub offset: usize,
    pub shape: &'a [usize],
    pub stride: &'a [usize],
}

/// A `{name: tensor}` dict pickle in torch.save's shape (EMPTY_DICT, MARK, ..., SETITEMS).
pub fn state_dict_pickle(specs: &[Spec]) -> Vec<u8> {
    let mut p = Pickle::new().op(b'}').mark();
    for s in specs {
        p = p.str(s.name).tensor(s.class, s.key, s.numel, s.offset, s.shape, s.stride);
    }
    p.op(b'u').stop()
}

pub fn row_major(shape: &[usize]) -> Vec<usize> {
    let mut stride = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    stride
}

// ---------------------------------------------------------------- safetensors

/// A safetensors file from a raw header text and data.
pub fn write_safetensors_raw(path: &Path, header: &str, data: &[u8]) {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// A well-formed safetensors file: (name, dtype, shape, bytes) in order.
pub fn write_safetensors(path: &Path, tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let begin = data.len();
        data.extend_from_slice(bytes);
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{begin},{}]}}",
            data.len()
        ));
    }
    header.push('}');
    write_safetensors_raw(path, &header, &data);
}

/// A 64-bit little-endian f32 blob.
pub fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// A deterministic pseudo-random stream (xorshift64*), so fuzz failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}
