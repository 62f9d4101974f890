//! A prefix cache: full KV blocks of sequences computed before, found again by the token ids they hold.
//!
//! A hash chain over full blocks (vLLM's automatic prefix caching): block `i` of a sequence is keyed by the hash of
//! (key of block `i - 1`, the [`BLOCK_TOKENS`] ids of block `i`), so one key stands for the whole prefix up to the
//! end of its block. Each entry keeps its parent's key and its ids, checked on every lookup, so a hash collision can
//! cost a miss, never a wrong block. Only full blocks are cached (the partly filled last block of a sequence is
//! still being written), but a lookup may use the first positions of a cached block whose ids start like the
//! prompt's rest: matches go to the token, as llama.cpp's slot reuse does. A sequence that continues a cached
//! prefix writes its new positions into blocks of its own (copying a block it shares only in part first).
//!
//! Blocks are cached per adapter: the chain of a sequence run with a LoRA adapter starts from that adapter's id (the
//! base model's is 0), so keys and values one adapter computed never serve a sequence of another, or of the base.
//!
//! Cached blocks are shared, read-only, with every sequence that looked them up. Eviction drops least recently used
//! entries that no sequence holds and that no other entry continues (leaves), so the chain stays whole.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use super::cache::{KvBlock, BLOCK_TOKENS};
use super::lora::LoraAdapter;

pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    /// Most blocks kept (`None`: as many as the KV budget allows).
    max_blocks: Option<usize>,
    clock: u64,
    stats: PrefixStats,
}

struct Entry {
    /// The adapter the block was computed with ([`LoraAdapter::id`], 0 for the base model).
    adapter: u64,
    parent: Option<u64>,
    /// The ids of the block's positions: all [`BLOCK_TOKENS`], or fewer for the last block of a finished sequence.
    ids: Vec<u32>,
    block: Arc<KvBlock>,
    /// Entries whose parent this is.
    children: usize,
    last_used: u64,
}

/// What a lookup found: the blocks holding the first `tokens` positions (the last one possibly only in part).
#[derive(Default)]
pub struct CachedPrefix {
    pub blocks: Vec<Arc<KvBlock>>,
    pub tokens: usize,
}

/// Counters since the cache was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub lookups: u64,
    /// Lookups that found at least one block.
    pub hits: u64,
    /// Positions found cached, over all lookups.
    pub hit_tokens: u64,
    pub evictions: u64,
}

/// The key of a block: its adapter, its parent's key and its ids.
fn key(adapter: u64, parent: Option<u64>, ids: &[u32]) -> u64 {
    let mut hasher = DefaultHasher::new();
    adapter.hash(&mut hasher);
    parent.hash(&mut hasher);
    ids.hash(&mut hasher);
    hasher.finish()
}

impl PrefixCache {
    pub fn new(max_blocks: Option<usize>) -> Self {
        PrefixCache { entries: HashMap::new(), max_blocks, clock: 0, stats: PrefixStats::default() }
    }

    /// Blocks cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// Cached blocks no sequence holds: what eviction could free.
    pub fn idle_blocks(&self) -> usize {
        self.entries.values().filter(|e| Arc::strong_count(&e.block) == 1).count()
    }

    /// The longest cached prefix of `ids`, leaving at least one id uncached (a step must compute something to
    /// give logits): whole blocks, then possibly the first positions of one more cached block whose ids start like
    /// the rest (keys and values of a position depend only on the ids up to it, so they hold; the sequence copies
    /// that block before writing into it). Only blocks computed with adapter `lora` (`None`: the base model) count.
    /// Marks the blocks used.
    pub fn lookup(&mut self, lora: Option<&LoraAdapter>, ids: &[u32]) -> CachedPrefix {
        let adapter = adapter_id(lora);
        self.clock += 1;
        self.stats.lookups += 1;
        let usable = &ids[..ids.len().saturating_sub(1)];
        let mut found = CachedPrefix::default();
        let mut parent = None;
        for chunk in usable.chunks_exact(BLOCK_TOKENS) {
            let k = key(adapter, parent, chunk);
            match self.entries.get_mut(&k) {
                Some(e) if e.adapter == adapter && e.parent == parent && e.ids == chunk => {
                    e.last_used = self.clock;
                    found.blocks.push(e.block.clone());
                    parent = Some(k);
                }
                _ => break,
            }
        }
        found.tokens = found.blocks.len() * BLOCK_TOKENS;
        // The cached continuation that shares the most ids with the rest.
        let rest = &usable[found.tokens..];
        let common = |e: &Entry| e.ids.iter().zip(rest).take_while(|(a, b)| a == b).count();
        let best = self
            .entries
            .iter_mut()
            .filter(|(_, e)| e.adapter == adapter && e.parent == parent)
            .map(|(_, e)| (common(e), e))
            .max_by_key(|(n, _)| *n);
        if let Some((n, e)) = best.filter(|(n, _)| *n > 0) {
            e.last_used = self.clock;
            found.blocks.push(e.block.clone());
            found.tokens += n;
        }
        if found.tokens > 0 {
            self.stats.hits += 1;
            self.stats.hit_tokens += found.tokens as u64;
        }
        found
    }

    /// Caches the full blocks of a sequence: `blocks[i]` holds the keys and values of `ids[i * BLOCK_TOKENS ..]`
    /// (only blocks whose ids are all given count), computed with adapter `lora` (`None`: the base model). Blocks
    /// already cached for the same adapter and ids stay as they are.
    pub fn insert(&mut self, lora: Option<&LoraAdapter>, ids: &[u32], blocks: &[Arc<KvBlock>]) {
        self.insert_blocks(adapter_id(lora), ids, blocks, false);
    }

    /// [`PrefixCache::insert`] for a sequence that will write no more: its partly filled last block is cached too
    /// (a lookup can use its first positions).
    pub fn insert_finished(&mut self, lora: Option<&LoraAdapter>, ids: &[u32], blocks: &[Arc<KvBlock>]) {
        self.insert_blocks(adapter_id(lora), ids, blocks, true);
    }

    fn insert_blocks(&mut self, adapter: u64, ids: &[u32], blocks: &[Arc<KvBlock>], with_partial: bool) {
        self.clock += 1;
        let mut parent = None;
        let whole = ids.len() / BLOCK_TOKENS * BLOCK_TOKENS;
        let partial = (with_partial && whole < ids.len()).then_some(&ids[whole..]);
        for (chunk, block) in ids[..whole].chunks_exact(BLOCK_TOKENS).chain(partial).zip(blocks) {
            let k = key(adapter, parent, chunk);
            match self.entries.get_mut(&k) {
                Some(e) if e.adapter == adapter && e.parent == parent && e.ids == chunk => e.last_used = self.clock,
                // A collision with another prefix: leave it, and stop (the chain below would hang off it).
                Some(_) => break,
                None => {
                    let entry = Entry {
                        adapter,
                        parent,
                        ids: chunk.to_vec(),
                        block: block.clone(),
                        children: 0,
                        last_used: self.clock,
                    };
                    self.entries.insert(k, entry);
                    if let Some(p) = parent {
                        self.entries.get_mut(&p).expect("parents are inserted first").children += 1;
                    }
                }
            }
            parent = Some(k);
        }
        if let Some(max) = self.max_blocks {
            while self.entries.len() > max && self.evict_one() {}
        }
    }

    /// Drops the least recently used block that no sequence holds and no other cached block continues; returns
    /// whether there was one.
    pub fn evict_one(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.children == 0 && Arc::strong_count(&e.block) == 1)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(&k, _)| k);
        let Some(k) = victim else { return false };
        let entry = self.entries.remove(&k).expect("found above");
        if let Some(p) = entry.parent {
            if let Some(parent) = self.entries.get_mut(&p) {
                parent.children -= 1;
            }
        }
        self.stats.evictions += 1;
        true
    }

    /// Drops every block no sequence holds (and what only they continued).
    pub fn clear_idle(&mut self) {
        while self.evict_one() {}
    }
}

/// The chain a sequence's blocks are cached under: its adapter's id, 0 for the base model.
fn adapter_id(lora: Option<&LoraAdapter>) -> u64 {
    lora.map_or(0, LoraAdapter::id)
}
