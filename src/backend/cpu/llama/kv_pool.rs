//! The decoder's paged K/V storage: `num_blocks` blocks of `block_size` positions, f32, per layer laid
//! out `[block][kv_head][slot][head_dim]` for values and `[block][kv_head][head_dim][slot]` for keys
//! (transposed within a block: attention reads one dimension of many positions at once), and the
//! byte format blocks are spilled and restored in (`[kv_head][slot][head_dim]` for both).

use super::LoadError;
use crate::backend::BackendError;

/// K and V of every layer for a pool of fixed-size blocks.
#[derive(Debug, Clone)]
pub struct KvPool {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
    /// Per layer: `num_blocks * kv_heads * head_dim * block_size` keys, transposed per block.
    k: Vec<Vec<f32>>,
    /// Per layer: the values, same layout.
    v: Vec<Vec<f32>>,
}

impl KvPool {
    /// A zeroed pool.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self, LoadError> {
        if block_size == 0 {
            return Err(LoadError::KvPool { reason: "block_size must be at least 1".to_string() });
        }
        let per_layer = num_blocks
            .checked_mul(kv_heads * block_size * head_dim)
            .filter(|n| n.checked_mul(4 * 2 * layers).is_some())
            .ok_or_else(|| LoadError::KvPool { reason: format!("{num_blocks} blocks overflow the address space") })?;
        Ok(KvPool {
            layers,
            kv_heads,
            head_dim,
            block_size,
            num_blocks,
            k: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
        })
    }

    /// Bytes one block takes (K and V of every layer).
    pub fn block_bytes(&self) -> usize {
        2 * self.layers * self.block_len() * 4
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn block_len(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Where head `head`'s value vector for `slot` of `block` starts in a layer's storage; with
    /// `slot` 0, where the head's transposed keys of the block start (dimension `d` of `slot` at
    /// `+ d * block_size + slot`).
    #[inline]
    pub fn offset(&self, block: usize, head: usize, slot: usize) -> usize {
        ((block * self.kv_heads + head) * self.block_size + slot) * self.head_dim
    }

    /// Stores one position's keys and values (`kv_heads * head_dim` each) in `layer`.
    pub fn write(&mut self, layer: usize, block: usize, slot: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let bs = self.block_size;
        for h in 0..self.kv_heads {
            let o = self.offset(block, h, slot);
            self.v[layer][o..o + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
            let base = self.offset(block, h, 0) + slot;
            for (d, &x) in k[h * hd..(h + 1) * hd].iter().enumerate() {
                self.k[layer][base + d * bs] = x;
            }
        }
    }

    /// Keys (transposed per block) and values of `layer`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }

    fn check(&self, block: u32) -> Result<usize, BackendError> {
        let b = block as usize;
        if b >= self.num_blocks {
            return Err(BackendError::InvalidInput {
                name: "blocks".to_string(),
                reason: format!("block {block} is outside the pool of {} blocks", self.num_blocks),
            });
        }
        Ok(b)
    }

    /// Copies block `src` to `dst` in every layer.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        let (s, d) = (self.check(src)?, self.check(dst)?);
        let len = self.block_len();
        for store in self.k.iter_mut().chain(self.v.iter_mut()) {
            store.copy_within(s * len..(s + 1) * len, d * len);
        }
        Ok(())
    }

    /// The blocks' K/V as bytes: for each block in order, for each layer, K then V of the block
    /// (`[kv_head][slot][head_dim]` little-endian f32). [`KvPool::block_bytes`] bytes per block.
    pub fn read_blocks(&self, blocks: &[u32]) -> Result<Vec<u8>, BackendError> {
        let len = self.block_len();
        let mut out = Vec::with_capacity(blocks.len() * self.block_bytes());
        for &block in blocks {
            let b = self.check(block)?;
            for layer in 0..self.layers {
                for h in 0..self.kv_heads {
                    let base = self.offset(b, h, 0);
                    for slot in 0..self.block_size {
                        for d in 0..self.head_dim {
                            out.extend_from_slice(&self.k[layer][base + d * self.block_size + slot].to_le_bytes());
                        }
                    }
                }
                for x in &self.v[layer][b * len..(b + 1) * len] {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Writes bytes produced by [`KvPool::read_blocks`] back into `blocks`.
    pub fn write_blocks(&mut self, blocks: &[u32], bytes: &[u8]) -> Result<(), BackendError> {
        if bytes.len() != blocks.len() * self.block_bytes() {
            return Err(BackendError::InvalidInput {
                name: "blocks".to_string(),
                reason: format!(
                    "{} bytes for {} blocks; each block takes {} bytes",
                    bytes.len(),
                    blocks.len(),
                    self.block_bytes()
                ),
            });
        }
        for &block in blocks {
            self.check(block)?;
        }
        let len = self.block_len();
        let mut chunks = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        for &block in blocks {
            let b = block as usize;
            for layer in 0..self.layers {
                for h in 0..self.kv_heads {
                    let base = b * len + h * self.block_size * self.head_dim;
                    for slot in 0..self.block_size {
                        for d in 0..self.head_dim {
                            self.k[layer][base + d * self.block_size + slot] = chunks.next().unwrap_or(0.0);
                        }
                    }
                }
                for (dst, src) in self.v[layer][b * len..(b + 1) * len].iter_mut().zip(&mut chunks) {
                    *dst = src;
                }
            }
        }
        Ok(())
    }
}
