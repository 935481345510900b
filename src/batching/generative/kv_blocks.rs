//! Paged K/V memory: a pool of fixed-size blocks, per-sequence block tables that give their blocks
//! back when dropped, reference counts for shared blocks, and a prefix cache (vLLM-style): every
//! full block is known by a hash of its tokens and of all tokens before it, so a new sequence that
//! starts with the same tokens reuses the blocks instead of recomputing them.
//!
//! Blocks with no owner but a known hash stay in the cache (least recently released first out) until
//! a fresh block is needed. A block shared by several tables is copied before one of them writes
//! into it (copy-on-write of a partial last block after a fork).
//!
//! The pool belongs to one instance thread (`Rc`, not `Send`): tables never cross threads.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::rc::Rc;

/// No block is free and none can be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("K/V cache full: {needed} more blocks needed, {available} available")]
pub struct OutOfBlocks {
    /// Blocks the operation needed.
    pub needed: usize,
    /// Blocks that were free or evictable.
    pub available: usize,
}

/// Counters of the prefix cache, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Full prompt blocks looked up.
    pub queried_blocks: u64,
    /// Of those, blocks found in the cache (their K/V not recomputed).
    pub hit_blocks: u64,
    /// Cached blocks evicted to make room.
    pub evicted_blocks: u64,
}

impl PrefixCacheStats {
    /// Hits over queries (0 when nothing was queried).
    pub fn hit_rate(&self) -> f64 {
        if self.queried_blocks == 0 { 0.0 } else { self.hit_blocks as f64 / self.queried_blocks as f64 }
    }
}

/// Hash of a full block: its tokens and the hash of the block before it (so equal hashes mean
/// equal prefixes up to this block). 128 bits from two keyed SipHash passes.
fn block_hash(parent: u128, tokens: &[u32]) -> u128 {
    let half = |salt: u64| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    };
    (u128::from(half(0x6b76_5f62_6c6f_636b)) << 64) | u128::from(half(0x7072_6566_6978_2121))
}

#[derive(Debug)]
struct Pool {
    block_size: usize,
    /// Owners of each block (tables holding it).
    refs: Vec<u32>,
    /// The prefix-cache hash a block is registered under, if any.
    hash_of: Vec<Option<u128>>,
    /// The tokens of a registered block (checked on every hit).
    tokens_of: Vec<Box<[u32]>>,
    /// Registered full blocks by hash.
    cached: HashMap<u128, u32>,
    /// Unowned, unregistered blocks.
    free: Vec<u32>,
    /// Unowned registered blocks by release time (evicted oldest first).
    evictable: BTreeMap<u64, u32>,
    /// Release time of each evictable block.
    released_at: Vec<u64>,
    clock: u64,
    stats: PrefixCacheStats,
}

impl Pool {
    fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    fn allocate(&mut self) -> Option<u32> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[id as usize].take() {
                    self.cached.remove(&h);
                }
                self.tokens_of[id as usize] = Box::default();
                self.stats.evicted_blocks += 1;
                id
            }
        };
        self.refs[id as usize] = 1;
        Some(id)
    }

    fn acquire(&mut self, id: u32) {
        let i = id as usize;
        if self.refs[i] == 0 {
            self.evictable.remove(&self.released_at[i]);
        }
        self.refs[i] += 1;
    }

    fn release(&mut self, id: u32) {
        let i = id as usize;
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            if self.hash_of[i].is_some() {
                self.clock += 1;
                self.released_at[i] = self.clock;
                self.evictable.insert(self.clock, id);
            } else {
                self.free.push(id);
            }
        }
    }
}

/// The K/V block pool of one decoder instance (a cheap handle; clones share the pool).
#[derive(Debug, Clone)]
pub struct BlockPool {
    inner: Rc<RefCell<Pool>>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let pool = Pool {
            block_size: block_size.max(1),
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            tokens_of: vec![Box::default(); num_blocks],
            cached: HashMap::new(),
            free: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
            stats: PrefixCacheStats::default(),
        };
        Self { inner: Rc::new(RefCell::new(pool)) }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.inner.borrow().block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.inner.borrow().refs.len()
    }

    /// Blocks that can be handed out now (free, or cached without an owner).
    pub fn available(&self) -> usize {
        self.inner.borrow().available()
    }

    /// Fraction of blocks owned by sequences (0–1): the `kv_cache_usage` gauge.
    pub fn usage(&self) -> f64 {
        let p = self.inner.borrow();
        if p.refs.is_empty() { 0.0 } else { (p.refs.len() - p.available()) as f64 / p.refs.len() as f64 }
    }

    /// Prefix-cache counters since the pool was made.
    pub fn prefix_stats(&self) -> PrefixCacheStats {
        self.inner.borrow().stats
    }

    /// An empty block table.
    pub fn table(&self) -> BlockTable {
        BlockTable { pool: self.clone(), ids: Vec::new(), hashes: Vec::new(), len: 0 }
    }

    /// A table holding the cached blocks that start `tokens` (whole blocks, and never all of the
    /// tokens: at least one is left to compute, for its logits). Its `len()` is the number of
    /// tokens whose K/V need not be recomputed.
    pub fn lookup_prefix(&self, tokens: &[u32]) -> BlockTable {
        let mut table = self.table();
        let mut p = self.inner.borrow_mut();
        let bs = p.block_size;
        let full = tokens.len().saturating_sub(1) / bs;
        let mut parent = 0u128;
        p.stats.queried_blocks += full as u64;
        for i in 0..full {
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let h = block_hash(parent, chunk);
            let Some(&id) = p.cached.get(&h) else { break };
            if *p.tokens_of[id as usize] != *chunk {
                break;
            }
            p.acquire(id);
            p.stats.hit_blocks += 1;
            table.ids.push(id);
            table.hashes.push(h);
            parent = h;
        }
        table.len = table.ids.len() * bs;
        table
    }
}

/// The blocks of one sequence: block `i` holds positions `i*block_size .. (i+1)*block_size`.
/// Dropping the table gives its blocks back (to the cache if they are registered full blocks).
#[derive(Debug)]
pub struct BlockTable {
    pool: BlockPool,
    ids: Vec<u32>,
    /// Chain hashes of the leading full blocks already registered (or found) in the cache.
    hashes: Vec<u128>,
    /// Positions covered (K/V written or about to be written by the current step).
    len: usize,
}

impl BlockTable {
    /// Block ids, in position order (what [`crate::backend::generative::SeqChunk::blocks`] takes).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Positions covered by the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the table covers no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks more this table needs to cover `positions` positions (copy-on-write included).
    pub fn blocks_needed(&self, positions: usize) -> usize {
        let bs = self.pool.block_size();
        let more = positions.div_ceil(bs).saturating_sub(self.ids.len());
        more + usize::from(self.needs_copy(positions))
    }

    fn needs_copy(&self, positions: usize) -> bool {
        let bs = self.pool.block_size();
        positions > self.len
            && !self.len.is_multiple_of(bs)
            && self.ids.last().is_some_and(|&id| self.pool.inner.borrow().refs[id as usize] > 1)
    }

    /// Extends the table to cover `positions` positions, all or nothing. Returns the block copies
    /// (source, destination) the decoder must make first: the shared partial last block is copied
    /// before this sequence writes into it.
    pub fn grow(&mut self, positions: usize) -> Result<Option<(u32, u32)>, OutOfBlocks> {
        if positions <= self.len {
            return Ok(None);
        }
        let needed = self.blocks_needed(positions);
        let copy = self.needs_copy(positions);
        let bs = self.pool.block_size();
        let mut p = self.pool.inner.borrow_mut();
        if p.available() < needed {
            return Err(OutOfBlocks { needed, available: p.available() });
        }
        let mut copied = None;
        if copy {
            let last = self.ids.len() - 1;
            let src = self.ids[last];
            let dst = p.allocate().ok_or(OutOfBlocks { needed, available: 0 })?;
            p.release(src);
            self.ids[last] = dst;
            copied = Some((src, dst));
        }
        while self.ids.len() < positions.div_ceil(bs) {
            let id = p.allocate().ok_or(OutOfBlocks { needed, available: 0 })?;
            self.ids.push(id);
        }
        self.len = positions;
        Ok(copied)
    }

    /// Registers the full blocks among the first `computed` positions of `tokens` in the prefix
    /// cache, so later sequences that start with the same tokens can share them.
    pub fn register_full_blocks(&mut self, tokens: &[u32], computed: usize) {
        let bs = self.pool.block_size();
        let full = computed.min(tokens.len()).min(self.len) / bs;
        let mut p = self.pool.inner.borrow_mut();
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let parent = self.hashes.last().copied().unwrap_or(0);
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let h = block_hash(parent, chunk);
            let id = self.ids[i];
            if !p.cached.contains_key(&h) && p.hash_of[id as usize].is_none() {
                p.cached.insert(h, id);
                p.hash_of[id as usize] = Some(h);
                p.tokens_of[id as usize] = chunk.into();
            }
            self.hashes.push(h);
        }
    }

    /// A second table sharing this one's blocks for positions `0..len` (a fork: the first tokens
    /// are shared; a partial last block is copied when either side writes into it).
    pub fn fork(&self, len: usize) -> BlockTable {
        let len = len.min(self.len);
        let bs = self.pool.block_size();
        let ids: Vec<u32> = self.ids[..len.div_ceil(bs)].to_vec();
        let mut p = self.pool.inner.borrow_mut();
        for &id in &ids {
            p.acquire(id);
        }
        BlockTable {
            pool: self.pool.clone(),
            ids,
            hashes: self.hashes[..self.hashes.len().min(len / bs)].to_vec(),
            len,
        }
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.inner.try_borrow_mut() {
            for &id in &self.ids {
                p.release(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_take_blocks_and_give_them_back_on_drop() {
        let pool = BlockPool::new(4, 4);
        let mut a = pool.table();
        assert_eq!(a.grow(5), Ok(None));
        assert_eq!(a.ids().len(), 2);
        assert_eq!(pool.available(), 2);
        assert_eq!(pool.usage(), 0.5);
        let mut b = pool.table();
        assert_eq!(b.grow(9), Err(OutOfBlocks { needed: 3, available: 2 }));
        assert!(b.ids().is_empty(), "a failed grow takes nothing");
        drop(a);
        assert_eq!(pool.available(), 4);
        assert_eq!(b.grow(9), Ok(None));
        assert_eq!(pool.usage(), 0.75);
    }

    #[test]
    fn full_blocks_are_shared_through_the_prefix_cache() {
        let pool = BlockPool::new(8, 4);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = pool.table();
        a.grow(10).unwrap();
        a.register_full_blocks(&tokens, 10);
        let a_ids = a.ids().to_vec();

        // Same first 9 tokens: the two full blocks are found, the rest is computed.
        let mut other: Vec<u32> = (0..9).collect();
        other.push(99);
        let b = pool.lookup_prefix(&other);
        assert_eq!(b.len(), 8);
        assert_eq!(b.ids(), &a_ids[..2]);
        assert_eq!(pool.prefix_stats(), PrefixCacheStats { queried_blocks: 2, hit_blocks: 2, evicted_blocks: 0 });

        // A different second block: only the first is shared.
        let mut diverging: Vec<u32> = (0..10).collect();
        diverging[5] = 77;
        let c = pool.lookup_prefix(&diverging);
        assert_eq!(c.ids(), &a_ids[..1]);

        // At least one token is left to compute even when every full block matches.
        let d = pool.lookup_prefix(&tokens[..8]);
        assert_eq!(d.len(), 4);
        assert_eq!(pool.prefix_stats().hit_rate(), 4.0 / 5.0);
    }

    #[test]
    fn released_cached_blocks_are_reused_until_evicted() {
        let pool = BlockPool::new(3, 2);
        let tokens = [1u32, 2, 3, 4, 5];
        let mut a = pool.table();
        a.grow(5).unwrap();
        a.register_full_blocks(&tokens, 5);
        drop(a);
        assert_eq!(pool.usage(), 0.0);
        let b = pool.lookup_prefix(&tokens);
        assert_eq!(b.len(), 4, "both full blocks survive their owner");
        drop(b);
        // Taking every block evicts the cached ones (oldest release first).
        let mut big = pool.table();
        big.grow(6).unwrap();
        assert_eq!(pool.prefix_stats().evicted_blocks, 2);
        drop(big);
        assert_eq!(pool.lookup_prefix(&tokens).len(), 0);
    }

    #[test]
    fn a_fork_copies_the_shared_partial_block_before_writing() {
        let pool = BlockPool::new(6, 4);
        let mut a = pool.table();
        a.grow(6).unwrap();
        let mut b = a.fork(6);
        assert_eq!(b.ids(), a.ids());
        assert_eq!(pool.available(), 4);
        assert_eq!(b.blocks_needed(7), 1);
        let copy = b.grow(7).unwrap();
        let (src, dst) = copy.expect("partial shared block is copied");
        assert_eq!(src, a.ids()[1]);
        assert_eq!(b.ids(), &[a.ids()[0], dst]);
        assert_eq!(pool.available(), 3);
        // Now a owns its partial block alone: no copy when it grows.
        assert_eq!(a.grow(8), Ok(None));
        // A fork at a block boundary needs no copy either.
        let mut c = a.fork(4);
        assert_eq!(c.grow(5), Ok(None));
        assert_ne!(c.ids()[1], a.ids()[1]);
        drop((a, b, c));
        assert_eq!(pool.available(), 6);
    }
}
