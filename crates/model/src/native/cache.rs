//! The native model's key/value cache: one pair of growing buffers per layer, in f16 or f32.

use half::f16;
use vicuna_kernels::{f32_to_f16, KvSlice};

/// The element type of a cache: f16 halves its memory (llama.cpp's default); f32 stores keys and values exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
}

/// Keys and values of every position seen so far, per layer: `positions × kv_dim` (all key/value heads of a
/// position side by side, the layout the attention kernel reads). Buffers grow by doubling, so memory stays
/// proportional to the positions used and appending a decoding step copies nothing.
pub struct QuantCache {
    layers: Vec<LayerKv>,
    kv_dim: usize,
    kv_type: KvType,
    /// Positions committed by completed steps; the buffers may briefly hold more while a step runs.
    len: usize,
}

struct LayerKv {
    keys: KvBuffer,
    values: KvBuffer,
}

enum KvBuffer {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl KvBuffer {
    fn new(ty: KvType) -> Self {
        match ty {
            KvType::F16 => KvBuffer::F16(Vec::new()),
            KvType::F32 => KvBuffer::F32(Vec::new()),
        }
    }

    fn capacity_bytes(&self) -> usize {
        match self {
            KvBuffer::F16(v) => v.capacity() * 2,
            KvBuffer::F32(v) => v.capacity() * 4,
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            KvBuffer::F16(v) => v.truncate(len),
            KvBuffer::F32(v) => v.truncate(len),
        }
    }

    /// Appends `new`, growing to at least twice the capacity (and `min_capacity`) when full.
    fn append(&mut self, new: &[f32], min_capacity: usize) {
        fn grow<T>(buf: &mut Vec<T>, extra: usize, min_capacity: usize) {
            let needed = buf.len() + extra;
            if needed > buf.capacity() {
                let target = needed.max(2 * buf.capacity()).max(min_capacity);
                buf.reserve_exact(target - buf.len());
            }
        }
        match self {
            KvBuffer::F16(buf) => {
                grow(buf, new.len(), min_capacity);
                let start = buf.len();
                buf.resize(start + new.len(), f16::ZERO);
                f32_to_f16(new, &mut buf[start..]).expect("resized to fit");
            }
            KvBuffer::F32(buf) => {
                grow(buf, new.len(), min_capacity);
                buf.extend_from_slice(new);
            }
        }
    }

    fn as_slice(&self) -> KvSlice<'_> {
        match self {
            KvBuffer::F16(v) => KvSlice::F16(v),
            KvBuffer::F32(v) => KvSlice::F32(v),
        }
    }
}

impl QuantCache {
    pub(crate) fn new(layers: usize, kv_dim: usize, kv_type: KvType) -> Self {
        let layers =
            (0..layers).map(|_| LayerKv { keys: KvBuffer::new(kv_type), values: KvBuffer::new(kv_type) }).collect();
        QuantCache { layers, kv_dim, kv_type, len: 0 }
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position; keeps the buffers for reuse.
    pub fn clear(&mut self) {
        self.len = 0;
        self.rollback();
    }

    /// Bytes held by the buffers.
    pub fn capacity_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.keys.capacity_bytes() + l.values.capacity_bytes()).sum()
    }

    /// Whether this cache was made for a model with this many layers, values per position and element type.
    pub(crate) fn fits(&self, layers: usize, kv_dim: usize, kv_type: KvType) -> bool {
        self.layers.len() == layers && self.kv_dim == kv_dim && self.kv_type == kv_type
    }

    /// Drops whatever an unfinished step left past the committed positions.
    pub(crate) fn rollback(&mut self) {
        let len = self.len * self.kv_dim;
        self.layers.iter_mut().for_each(|l| {
            l.keys.truncate(len);
            l.values.truncate(len);
        });
    }

    /// Appends rows of keys and values (`rows × kv_dim` f32 each) to `layer`, growing its buffers by doubling.
    pub(crate) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let l = &mut self.layers[layer];
        l.keys.append(keys, 16 * self.kv_dim);
        l.values.append(values, 16 * self.kv_dim);
    }

    /// Keys and values of every position of `layer` written so far (committed and this step's).
    pub(crate) fn layer(&self, layer: usize) -> (KvSlice<'_>, KvSlice<'_>) {
        (self.layers[layer].keys.as_slice(), self.layers[layer].values.as_slice())
    }

    /// Makes this step's `rows` new positions part of the cache (after every layer has appended them).
    pub(crate) fn commit(&mut self, rows: usize) {
        self.len += rows;
    }
}
