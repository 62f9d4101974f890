//! The native model's key/value cache, paged: positions live in fixed-size blocks of [`BLOCK_TOKENS`] positions
//! (every layer's keys and values of those positions in one allocation), and a sequence's cache is a table of
//! blocks. Blocks come from a [`KvPool`] with a budget, through a [`Reservation`] that gives back what it did not
//! use when dropped; a block gives its place in the budget back when its last holder drops it.
//!
//! Blocks are reference-counted (`Arc`), so several sequences (and a [`PrefixCache`](super::PrefixCache)) can hold
//! the same block of a shared prefix. Writing needs the only reference (`Arc::get_mut`): a shared block can never
//! be written; a sequence about to write into a shared, partly filled last block first copies it into a block of
//! its own (copy on write).

use std::sync::{Arc, Mutex};

use half::f16;
use vicuna_kernels::{f32_to_f16, KvSlice};

use super::lora::LoraAdapter;
use crate::{Error, Result};

/// Token positions per KV-cache block: the unit of the memory budget and of prefix sharing.
pub const BLOCK_TOKENS: usize = 16;

/// The element type of a cache: f16 halves its memory (llama.cpp's default); f32 stores keys and values exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F16,
    F32,
}

impl KvType {
    pub fn bytes(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }
}

/// What a block holds: `layers` × (keys, values) × [`BLOCK_TOKENS`] positions × `kv_dim` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockShape {
    pub layers: usize,
    pub kv_dim: usize,
    pub kv_type: KvType,
}

impl BlockShape {
    /// Values of one layer's keys (or values) in a block.
    fn plane(&self) -> usize {
        BLOCK_TOKENS * self.kv_dim
    }

    pub fn bytes(&self) -> usize {
        2 * self.layers * self.plane() * self.kv_type.bytes()
    }
}

/// Where blocks come from: a budget of blocks (or none) and the count of what is taken.
///
/// `allocated + reserved ≤ capacity` at all times: `allocated` blocks exist (held by caches or a prefix cache),
/// `reserved` more are promised to reservations. Cloning the handle shares the pool.
#[derive(Clone)]
pub struct KvPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    shape: BlockShape,
    /// Most blocks at once; `None`: no limit (one-off commands).
    capacity: Option<usize>,
    counts: Mutex<Counts>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Blocks that exist.
    pub allocated: usize,
    /// Blocks promised to reservations and not yet taken.
    pub reserved: usize,
    /// The most blocks that ever existed at once.
    pub peak_allocated: usize,
}

impl KvPool {
    pub fn new(shape: BlockShape, capacity: Option<usize>) -> Self {
        KvPool { inner: Arc::new(PoolInner { shape, capacity, counts: Mutex::new(Counts::default()) }) }
    }

    pub fn counts(&self) -> Counts {
        *self.lock()
    }

    /// Blocks of the budget neither allocated nor reserved (`None`: no budget).
    pub fn available(&self) -> Option<usize> {
        let counts = self.lock();
        self.inner.capacity.map(|capacity| capacity - counts.allocated - counts.reserved)
    }

    /// Promises `blocks` blocks, or `None` when the budget does not have them.
    pub fn reserve(&self, blocks: usize) -> Option<Reservation> {
        let mut counts = self.lock();
        if let Some(capacity) = self.inner.capacity {
            if capacity - counts.allocated - counts.reserved < blocks {
                return None;
            }
        }
        counts.reserved += blocks;
        drop(counts);
        Some(Reservation { pool: self.clone(), remaining: blocks })
    }

    /// A reservation that takes blocks as needed, for a pool without a budget.
    fn unlimited(&self) -> Reservation {
        debug_assert!(self.inner.capacity.is_none());
        Reservation { pool: self.clone(), remaining: 0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Blocks promised to one sequence. A cache takes its blocks from its reservation; whatever was not taken goes back
/// to the pool when the reservation is dropped (with the cache that holds it).
pub struct Reservation {
    pool: KvPool,
    remaining: usize,
}

impl Reservation {
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Gives `blocks` of the promised blocks back to the pool now (at most what remains).
    pub fn release(&mut self, blocks: usize) {
        let blocks = blocks.min(self.remaining);
        self.remaining -= blocks;
        self.pool.lock().reserved -= blocks;
    }

    /// Moves `blocks` of the promise to a reservation of their own (for a sequence forked from this one's); `None`
    /// when fewer remain. From a pool without a budget, always a reservation that takes blocks as needed.
    pub fn split(&mut self, blocks: usize) -> Option<Reservation> {
        if self.pool.inner.capacity.is_none() {
            return Some(self.pool.unlimited());
        }
        if self.remaining < blocks {
            return None;
        }
        self.remaining -= blocks;
        Some(Reservation { pool: self.pool.clone(), remaining: blocks })
    }

    /// A new, zeroed block out of the reservation (from a budget-less pool: always).
    fn take(&mut self) -> Result<KvBlock> {
        let mut counts = self.pool.lock();
        if self.remaining > 0 {
            self.remaining -= 1;
            counts.reserved -= 1;
        } else if self.pool.inner.capacity.is_some() {
            return Err(Error::msg(
                "the sequence needs more KV-cache blocks than were reserved for it (prompt + max new tokens)",
            ));
        }
        counts.allocated += 1;
        counts.peak_allocated = counts.peak_allocated.max(counts.allocated);
        drop(counts);
        let shape = self.pool.inner.shape;
        let values = 2 * shape.layers * shape.plane();
        let data = match shape.kv_type {
            KvType::F16 => BlockData::F16(vec![f16::ZERO; values]),
            KvType::F32 => BlockData::F32(vec![0.0; values]),
        };
        Ok(KvBlock { data, pool: self.pool.clone() })
    }

    /// Takes back the place of a block this cache held alone and no longer needs, so that the sequence can take a
    /// block again later.
    fn give_back(&mut self, block: Arc<KvBlock>) {
        if let Ok(block) = Arc::try_unwrap(block) {
            // The block's drop counts it out of `allocated`; it stays promised to this reservation.
            self.pool.lock().reserved += 1;
            self.remaining += 1;
            drop(block);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.lock().reserved -= self.remaining;
    }
}

/// [`BLOCK_TOKENS`] positions of every layer's keys and values. Counted in its pool while it exists.
pub struct KvBlock {
    data: BlockData,
    pool: KvPool,
}

enum BlockData {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Drop for KvBlock {
    fn drop(&mut self) {
        self.pool.lock().allocated -= 1;
    }
}

impl KvBlock {
    /// Keys and values of `layer`, `BLOCK_TOKENS × kv_dim` each.
    fn layer(&self, layer: usize) -> (KvSlice<'_>, KvSlice<'_>) {
        let plane = self.pool.inner.shape.plane();
        let (k, v) = (2 * layer * plane, (2 * layer + 1) * plane);
        match &self.data {
            BlockData::F16(d) => (KvSlice::F16(&d[k..k + plane]), KvSlice::F16(&d[v..v + plane])),
            BlockData::F32(d) => (KvSlice::F32(&d[k..k + plane]), KvSlice::F32(&d[v..v + plane])),
        }
    }

    /// Writes `keys` and `values` (`rows × kv_dim` f32 each) of `layer` from position `row` of the block on.
    fn write(&mut self, layer: usize, row: usize, keys: &[f32], values: &[f32]) {
        let shape = self.pool.inner.shape;
        let plane = shape.plane();
        for (plane_index, src) in [(2 * layer, keys), (2 * layer + 1, values)] {
            let at = plane_index * plane + row * shape.kv_dim;
            match &mut self.data {
                BlockData::F16(d) => f32_to_f16(src, &mut d[at..at + src.len()]).expect("same length"),
                BlockData::F32(d) => d[at..at + src.len()].copy_from_slice(src),
            }
        }
    }

    /// Copies the first `rows` positions of every layer from `other`.
    fn copy_rows(&mut self, other: &KvBlock, rows: usize) {
        let shape = self.pool.inner.shape;
        let (plane, n) = (shape.plane(), rows * shape.kv_dim);
        for p in 0..2 * shape.layers {
            let range = p * plane..p * plane + n;
            match (&mut self.data, &other.data) {
                (BlockData::F16(d), BlockData::F16(s)) => d[range.clone()].copy_from_slice(&s[range]),
                (BlockData::F32(d), BlockData::F32(s)) => d[range.clone()].copy_from_slice(&s[range]),
                _ => unreachable!("blocks of one pool share a type"),
            }
        }
    }

    /// Whether the two handles are the same block (not merely equal contents).
    pub fn same(a: &Arc<KvBlock>, b: &Arc<KvBlock>) -> bool {
        Arc::ptr_eq(a, b)
    }

    /// Every key and value of the block as f32 (tests: comparing what blocks hold).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            BlockData::F16(d) => d.iter().map(|v| v.to_f32()).collect(),
            BlockData::F32(d) => d.clone(),
        }
    }
}

/// Keys and values of every position of one sequence so far: a table of blocks, position `p` in block
/// `p / BLOCK_TOKENS`. Blocks come from the sequence's reservation; dropping the cache drops its holds.
pub struct QuantCache {
    blocks: Vec<Arc<KvBlock>>,
    /// Positions committed by completed steps; the last block may briefly hold more while a step runs.
    len: usize,
    reservation: Reservation,
    /// The LoRA adapter its positions were computed with (`None`: the base model); the forward pass applies it to
    /// the sequence's rows.
    lora: Option<Arc<LoraAdapter>>,
}

impl QuantCache {
    /// An empty cache taking blocks from `reservation`.
    pub fn new(reservation: Reservation) -> Self {
        QuantCache { blocks: Vec::new(), len: 0, reservation, lora: None }
    }

    /// An empty cache in a pool of its own without a budget (one-off commands, tests).
    pub(crate) fn unbounded(shape: BlockShape) -> Self {
        QuantCache::new(KvPool::new(shape, None).unlimited())
    }

    /// A cache that starts with the first `tokens` positions of `prefix`, blocks computed before (shared,
    /// read-only: new positions go to blocks of the cache's own, a last block held in part is copied first).
    pub fn with_prefix(reservation: Reservation, prefix: Vec<Arc<KvBlock>>, tokens: usize) -> Result<Self> {
        let mut cache = QuantCache::new(reservation);
        cache.restart_from(prefix, tokens)?;
        Ok(cache)
    }

    /// Starts over from `prefix`, as [`QuantCache::with_prefix`] does (the blocks held so far are dropped).
    pub fn restart_from(&mut self, prefix: Vec<Arc<KvBlock>>, tokens: usize) -> Result<()> {
        if prefix.iter().any(|b| !Arc::ptr_eq(&b.pool.inner, &self.reservation.pool.inner)) {
            return Err(Error::msg("the cached prefix comes from another KV pool than the cache"));
        }
        if tokens.div_ceil(BLOCK_TOKENS) != prefix.len() {
            return Err(Error::msg(format!("{} blocks cannot hold exactly {tokens} positions", prefix.len())));
        }
        self.truncate(0);
        self.len = tokens;
        self.blocks = prefix;
        Ok(())
    }

    /// A second cache holding the same positions: every block shared, read-only, until one of the two writes (a
    /// partly filled last block is copied then). The fork takes its new blocks from `reservation`.
    pub fn fork(&self, reservation: Reservation) -> Result<QuantCache> {
        Ok(QuantCache::with_prefix(reservation, self.blocks().to_vec(), self.len)?.with_lora(self.lora.clone()))
    }

    /// The cache of a sequence run with adapter `lora` (`None`: the base model). Any prefix it starts with must have
    /// been computed with the same adapter (the prefix cache keys its blocks by adapter for this).
    pub fn with_lora(mut self, lora: Option<Arc<LoraAdapter>>) -> Self {
        self.lora = lora;
        self
    }

    /// The adapter the sequence runs with.
    pub fn lora(&self) -> Option<&Arc<LoraAdapter>> {
        self.lora.as_ref()
    }

    pub fn kv_type(&self) -> KvType {
        self.shape().kv_type
    }

    fn shape(&self) -> BlockShape {
        self.reservation.pool.inner.shape
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blocks holding the positions, in order (the last one possibly partly filled).
    pub fn blocks(&self) -> &[Arc<KvBlock>] {
        &self.blocks[..self.len.div_ceil(BLOCK_TOKENS)]
    }

    /// The reservation new blocks come from.
    pub fn reservation_mut(&mut self) -> &mut Reservation {
        &mut self.reservation
    }

    /// Forgets every position.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps the first `len` positions (no-op when it holds fewer), dropping the blocks past them.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        self.rollback();
    }

    /// Bytes of the blocks this cache holds (some may be shared with others).
    pub fn capacity_bytes(&self) -> usize {
        self.blocks.len() * self.shape().bytes()
    }

    /// Whether this cache was made for a model with this many layers, values per position and element type.
    pub(crate) fn fits(&self, shape: BlockShape) -> bool {
        self.shape() == shape
    }

    /// Drops the blocks an unfinished step left past the committed positions.
    pub(crate) fn rollback(&mut self) {
        let keep = self.len.div_ceil(BLOCK_TOKENS);
        while self.blocks.len() > keep {
            let block = self.blocks.pop().expect("more than keep");
            self.reservation.give_back(block);
        }
    }

    /// Makes room for `rows` new positions: blocks of the cache's own for every position from `len` on, copying a
    /// shared, partly filled last block first. Call before a step's [`QuantCache::write`]s.
    pub(crate) fn prepare(&mut self, rows: usize) -> Result<()> {
        let used = self.len % BLOCK_TOKENS;
        if used > 0 {
            let last = self.blocks.last_mut().expect("a partly filled block exists");
            if Arc::get_mut(last).is_none() {
                let mut own = self.reservation.take()?;
                own.copy_rows(last, used);
                *last = Arc::new(own);
            }
        }
        while self.blocks.len() < (self.len + rows).div_ceil(BLOCK_TOKENS) {
            let block = self.reservation.take()?;
            self.blocks.push(Arc::new(block));
        }
        Ok(())
    }

    /// Writes a step's keys and values of `layer` (`rows × kv_dim` f32 each) at positions `len ..` (after
    /// [`QuantCache::prepare`] for those rows).
    pub(crate) fn write(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let kv_dim = self.shape().kv_dim;
        let rows = keys.len() / kv_dim;
        let mut row = 0;
        while row < rows {
            let pos = self.len + row;
            let (block, at) = (pos / BLOCK_TOKENS, pos % BLOCK_TOKENS);
            let n = (BLOCK_TOKENS - at).min(rows - row);
            let block = Arc::get_mut(&mut self.blocks[block]).expect("prepare gives the cache its own blocks to write");
            let cols = row * kv_dim..(row + n) * kv_dim;
            block.write(layer, at, &keys[cols.clone()], &values[cols]);
            row += n;
        }
    }

    /// Pages of keys and of values of `layer`, one per block (the attention kernel's `KvView::Paged`).
    pub(crate) fn pages(&self, layer: usize) -> (Vec<KvSlice<'_>>, Vec<KvSlice<'_>>) {
        self.blocks.iter().map(|b| b.layer(layer)).unzip()
    }

    /// Makes this step's `rows` new positions part of the cache (after every layer has written them).
    pub(crate) fn commit(&mut self, rows: usize) {
        self.len += rows;
    }
}
