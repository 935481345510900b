//! The decoder's paged K/V storage: `num_blocks` blocks of `block_size` positions, f32 or f16
//! ([`KvDtype`]), per layer laid out `[block][kv_head][slot][head_dim]` for values and
//! `[block][kv_head][head_dim][slot]` for keys (transposed within a block: attention reads one
//! dimension of many positions at once), and the byte format blocks are spilled and restored in
//! (`[kv_head][slot][head_dim]` for both, little-endian elements of the pool's type).

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::LoadError;
use crate::backend::BackendError;
use crate::backend::generative::{KvDtype, kv_bytes_per_position};

/// An element type the pool stores.
trait Elem: Copy + Default + Send + Sync + 'static {
    /// Stores `src` (f32) as `dst` (same length), rounding to nearest even where narrower.
    fn store(src: &[f32], dst: &mut [Self]);
    /// Appends the little-endian bytes.
    fn put(self, out: &mut Vec<u8>);
    /// Reads one element from its little-endian bytes (`Self` size).
    fn get(bytes: &[u8]) -> Self;
}

impl Elem for f32 {
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Elem for f16 {
    fn store(src: &[f32], dst: &mut [f16]) {
        // F16C where the CPU has it (runtime check in `half`), the same rounding otherwise.
        dst.convert_from_f32_slice(src);
    }
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> f16 {
        f16::from_le_bytes([b[0], b[1]])
    }
}

/// K and V planes of every layer in one element type.
#[derive(Debug, Clone)]
struct Planes<T> {
    /// Per layer: `num_blocks * kv_heads * head_dim * block_size` keys, transposed per block.
    k: Vec<Vec<T>>,
    /// Per layer: the values, same layout.
    v: Vec<Vec<T>>,
}

#[derive(Debug, Clone)]
enum Store {
    F32(Planes<f32>),
    F16(Planes<f16>),
}

/// One layer's keys (transposed per block) and values, in the pool's element type.
#[derive(Debug, Clone, Copy)]
pub enum KvLayer<'a> {
    /// f32 keys and values.
    F32 {
        /// Keys.
        k: &'a [f32],
        /// Values.
        v: &'a [f32],
    },
    /// f16 keys and values (attention widens each partition's blocks to f32 before use).
    F16 {
        /// Keys.
        k: &'a [f16],
        /// Values.
        v: &'a [f16],
    },
}

/// K and V of every layer for a pool of fixed-size blocks.
#[derive(Debug, Clone)]
pub struct KvPool {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
    store: Store,
}

/// Applies `$body` to the pool's planes whatever their element type (`$p` bound to them).
macro_rules! with_planes {
    ($store:expr, $p:ident => $body:expr) => {
        match $store {
            Store::F32($p) => $body,
            Store::F16($p) => $body,
        }
    };
}

impl KvPool {
    /// A zeroed pool of `dtype` elements.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        dtype: KvDtype,
    ) -> Result<Self, LoadError> {
        if block_size == 0 {
            return Err(LoadError::KvPool { reason: "block_size must be at least 1".to_string() });
        }
        let per_layer = num_blocks
            .checked_mul(kv_heads * block_size * head_dim)
            .filter(|n| n.checked_mul(dtype.bytes() * 2 * layers).is_some())
            .ok_or_else(|| LoadError::KvPool { reason: format!("{num_blocks} blocks overflow the address space") })?;
        fn planes<T: Elem>(layers: usize, per_layer: usize) -> Planes<T> {
            Planes {
                k: (0..layers).map(|_| vec![T::default(); per_layer]).collect(),
                v: (0..layers).map(|_| vec![T::default(); per_layer]).collect(),
            }
        }
        let store = match dtype {
            KvDtype::F32 => Store::F32(planes(layers, per_layer)),
            KvDtype::F16 => Store::F16(planes(layers, per_layer)),
        };
        Ok(KvPool { layers, kv_heads, head_dim, block_size, num_blocks, store })
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        match self.store {
            Store::F32(_) => KvDtype::F32,
            Store::F16(_) => KvDtype::F16,
        }
    }

    /// Bytes one block takes (K and V of every layer).
    pub fn block_bytes(&self) -> usize {
        kv_bytes_per_position(self.layers, self.kv_heads, self.head_dim, self.dtype()) * self.block_size
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
        let (heads, hd, bs) = (self.kv_heads, self.head_dim, self.block_size);
        let first = self.offset(block, 0, 0);
        with_planes!(&mut self.store, p => write_position(p, layer, first, (heads, hd, bs), slot, k, v))
    }

    /// Keys (transposed per block) and values of `layer`.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.store {
            Store::F32(p) => KvLayer::F32 { k: &p.k[layer], v: &p.v[layer] },
            Store::F16(p) => KvLayer::F16 { k: &p.k[layer], v: &p.v[layer] },
        }
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
        with_planes!(&mut self.store, p => {
            for store in p.k.iter_mut().chain(p.v.iter_mut()) {
                store.copy_within(s * len..(s + 1) * len, d * len);
            }
        });
        Ok(())
    }

    /// The blocks' K/V as bytes: for each block in order, for each layer, K then V of the block
    /// (`[kv_head][slot][head_dim]` little-endian elements of [`KvPool::dtype`]).
    /// [`KvPool::block_bytes`] bytes per block.
    pub fn read_blocks(&self, blocks: &[u32]) -> Result<Vec<u8>, BackendError> {
        let mut out = Vec::with_capacity(blocks.len() * self.block_bytes());
        for &block in blocks {
            let b = self.check(block)?;
            with_planes!(&self.store, p => self.read_block(p, b, &mut out));
        }
        Ok(out)
    }

    fn read_block<T: Elem>(&self, p: &Planes<T>, b: usize, out: &mut Vec<u8>) {
        let len = self.block_len();
        for layer in 0..self.layers {
            for h in 0..self.kv_heads {
                let base = self.offset(b, h, 0);
                for slot in 0..self.block_size {
                    for d in 0..self.head_dim {
                        p.k[layer][base + d * self.block_size + slot].put(out);
                    }
                }
            }
            for &x in &p.v[layer][b * len..(b + 1) * len] {
                x.put(out);
            }
        }
    }

    /// Writes bytes produced by [`KvPool::read_blocks`] (of a pool of the same element type)
    /// back into `blocks`.
    pub fn write_blocks(&mut self, blocks: &[u32], bytes: &[u8]) -> Result<(), BackendError> {
        if bytes.len() != blocks.len() * self.block_bytes() {
            return Err(BackendError::InvalidInput {
                name: "blocks".to_string(),
                reason: format!(
                    "{} bytes for {} blocks; each block takes {} bytes ({} K/V)",
                    bytes.len(),
                    blocks.len(),
                    self.block_bytes(),
                    self.dtype().name()
                ),
            });
        }
        for &block in blocks {
            self.check(block)?;
        }
        let (len, layers, heads, bs, hd) =
            (self.block_len(), self.layers, self.kv_heads, self.block_size, self.head_dim);
        fn fill<T: Elem>(p: &mut Planes<T>, blocks: &[u32], bytes: &[u8], shape: (usize, usize, usize, usize, usize)) {
            let (len, layers, heads, bs, hd) = shape;
            let mut items = bytes.chunks_exact(size_of::<T>()).map(T::get);
            for &block in blocks {
                let b = block as usize;
                for layer in 0..layers {
                    for h in 0..heads {
                        let base = b * len + h * bs * hd;
                        for slot in 0..bs {
                            for d in 0..hd {
                                p.k[layer][base + d * bs + slot] = items.next().unwrap_or_default();
                            }
                        }
                    }
                    for (dst, src) in p.v[layer][b * len..(b + 1) * len].iter_mut().zip(&mut items) {
                        *dst = src;
                    }
                }
            }
        }
        with_planes!(&mut self.store, p => fill(p, blocks, bytes, (len, layers, heads, bs, hd)));
        Ok(())
    }
}

/// Stores one position (`slot` of the block whose storage starts at `first`) of `layer`: values
/// as a row, keys into the block's transposed layout, each converted to `T` one head row at a time.
fn write_position<T: Elem>(
    p: &mut Planes<T>,
    layer: usize,
    first: usize,
    (heads, hd, bs): (usize, usize, usize),
    slot: usize,
    k: &[f32],
    v: &[f32],
) {
    const ROW: usize = 256;
    let mut key = [T::default(); ROW];
    for h in 0..heads {
        let head = first + h * bs * hd;
        T::store(&v[h * hd..(h + 1) * hd], &mut p.v[layer][head + slot * hd..][..hd]);
        for (c, ks) in k[h * hd..(h + 1) * hd].chunks(ROW).enumerate() {
            let key = &mut key[..ks.len()];
            T::store(ks, key);
            for (d, &x) in key.iter().enumerate() {
                p.k[layer][head + (c * ROW + d) * bs + slot] = x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(dtype: KvDtype) -> KvPool {
        let mut pool = KvPool::new(2, 2, 8, 4, 6, dtype).unwrap();
        for layer in 0..2 {
            for pos in 0..12 {
                let k: Vec<f32> = (0..16).map(|i| (layer * 1000 + pos * 16 + i) as f32 * 0.37 - 3.1).collect();
                let v: Vec<f32> = k.iter().map(|x| x * -0.5 + 0.001).collect();
                pool.write(layer, pos / 4, pos % 4, &k, &v);
            }
        }
        pool
    }

    #[test]
    fn blocks_travel_as_bytes_of_the_pool_type() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let pool = filled(dtype);
            assert_eq!(pool.block_bytes(), 2 * 2 * 2 * 8 * 4 * dtype.bytes());
            let bytes = pool.read_blocks(&[0, 1, 2]).unwrap();
            assert_eq!(bytes.len(), 3 * pool.block_bytes());
            // Restored into other blocks of another pool: the same bytes come back.
            let mut other = KvPool::new(2, 2, 8, 4, 6, dtype).unwrap();
            other.write_blocks(&[5, 3, 4], &bytes).unwrap();
            assert_eq!(other.read_blocks(&[5, 3, 4]).unwrap(), bytes, "{dtype:?}");
            let mut copy = pool.clone();
            copy.copy_block(1, 5).unwrap();
            assert_eq!(copy.read_blocks(&[5]).unwrap(), pool.read_blocks(&[1]).unwrap());
            // Bytes of the other element type are refused, naming the sizes.
            let e = other.write_blocks(&[5], &bytes[..pool.block_bytes() / 2]).unwrap_err().to_string();
            assert!(e.contains(dtype.name()), "{e}");
        }
        // The f16 pool holds each value rounded to nearest: K of layer 1, position 5, head 1, d 3.
        let (f32s, f16s) =
            (filled(KvDtype::F32).read_blocks(&[1]).unwrap(), filled(KvDtype::F16).read_blocks(&[1]).unwrap());
        // Block bytes: layer 0 (K, V) then layer 1; K is [head][slot][d].
        let per = 2 * 4 * 8; // one plane of a block: heads * slots * head_dim
        let at = 2 * per + (4 + 1) * 8 + 3; // layer 1's K, head 1, slot 1 (position 5), d 3
        let x = f32::from_le_bytes(f32s[at * 4..at * 4 + 4].try_into().unwrap());
        let h = f16::from_le_bytes(f16s[at * 2..at * 2 + 2].try_into().unwrap());
        assert_eq!(x, (1000 + 5 * 16 + 8 + 3) as f32 * 0.37 - 3.1);
        assert_eq!(h, f16::from_f32(x));
    }
}
