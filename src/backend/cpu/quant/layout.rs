//! The kernels' weight layout: block formats kept quantized, but interleaved by groups of
//! [`GROUP`] weight rows so that one SIMD register holds the same 4 bytes of 16 (AVX-512) or 8
//! (AVX2) rows, and the scales of a group's block load as one vector.
//!
//! For group `g` (rows `16g..16g + 16`, the last one padded with zero rows), block `b`, row `i` of
//! the group and byte `j` of the block's quantized values (16 bytes for Q4_x, 32 for Q8_0):
//! - `qs[((g·nb + b)·16·qs_bytes) + (j / 4)·64 + 4i + j % 4]`;
//! - `d[(g·nb + b)·16 + i]` (and `mins` likewise, Q4_1), f16 bits.
//!
//! A register of 4-byte lanes loaded at `(g, b, j / 4)` thus holds bytes `j..j + 4` of 16 rows,
//! which `vpdpbusd` multiplies with one broadcast 4-byte piece of an activation block. F16 weights
//! are not interleaved (row-major halves).

/// Weight rows per interleaved group.
pub(crate) const GROUP: usize = 16;

/// Byte offset in the interleaved `qs` of byte `j` of block `b` of row `r`.
#[inline(always)]
pub(crate) fn qs_at(nb: usize, qs_bytes: usize, r: usize, b: usize, j: usize) -> usize {
    ((r / GROUP * nb + b) * GROUP * qs_bytes) + (j / 4) * (4 * GROUP) + 4 * (r % GROUP) + j % 4
}

/// Index in the interleaved `d`/`mins` of block `b` of row `r`.
#[inline(always)]
pub(crate) fn scale_at(nb: usize, r: usize, b: usize) -> usize {
    (r / GROUP * nb + b) * GROUP + r % GROUP
}

/// Row-major block fields, as in the GGUF file but split by field.
#[derive(Debug, Default)]
pub(crate) struct RowMajor {
    /// `[n][nb][qs_bytes]`.
    pub qs: Vec<u8>,
    /// `[n][nb]` f16 bits.
    pub d: Vec<u16>,
    /// `[n][nb]` f16 bits (Q4_1 only, else empty).
    pub mins: Vec<u16>,
}

/// The interleaved fields of `n` rows of `nb` blocks (`qs_bytes` each) given row-major.
pub(crate) fn interleave(n: usize, nb: usize, qs_bytes: usize, rm: &RowMajor) -> RowMajor {
    let np = n.div_ceil(GROUP) * GROUP;
    let mut out = RowMajor {
        qs: vec![0; np * nb * qs_bytes],
        d: vec![0; np * nb],
        mins: if rm.mins.is_empty() { Vec::new() } else { vec![0; np * nb] },
    };
    for r in 0..n {
        for b in 0..nb {
            let src = &rm.qs[(r * nb + b) * qs_bytes..(r * nb + b + 1) * qs_bytes];
            for (j4, four) in src.chunks_exact(4).enumerate() {
                let at = qs_at(nb, qs_bytes, r, b, 4 * j4);
                out.qs[at..at + 4].copy_from_slice(four);
            }
            out.d[scale_at(nb, r, b)] = rm.d[r * nb + b];
            if !rm.mins.is_empty() {
                out.mins[scale_at(nb, r, b)] = rm.mins[r * nb + b];
            }
        }
    }
    out
}

/// Appends row `r` of interleaved fields to row-major ones.
pub(crate) fn push_row(nb: usize, qs_bytes: usize, il: (&[u8], &[u16], &[u16]), r: usize, out: &mut RowMajor) {
    let (qs, d, mins) = il;
    for b in 0..nb {
        for j4 in 0..qs_bytes / 4 {
            let at = qs_at(nb, qs_bytes, r, b, 4 * j4);
            out.qs.extend_from_slice(&qs[at..at + 4]);
        }
        out.d.push(d[scale_at(nb, r, b)]);
        if !mins.is_empty() {
            out.mins.push(mins[scale_at(nb, r, b)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_round_trips_and_places_bytes_as_documented() {
        let (n, nb, qsb) = (19, 3, 16);
        let rm = RowMajor {
            qs: (0..n * nb * qsb).map(|i| (i * 7 % 251) as u8).collect(),
            d: (0..n * nb).map(|i| i as u16).collect(),
            mins: (0..n * nb).map(|i| 1000 + i as u16).collect(),
        };
        let il = interleave(n, nb, qsb, &rm);
        assert_eq!(il.qs.len(), 32 * nb * qsb);
        // Row 17 (group 1, row 1), block 2, byte 5: second 4-byte piece, lane 1.
        assert_eq!(il.qs[(nb + 2) * 16 * qsb + 64 + 4 + 1], rm.qs[(17 * nb + 2) * qsb + 5]);
        let mut back = RowMajor::default();
        for r in 0..n {
            push_row(nb, qsb, (&il.qs, &il.d, &il.mins), r, &mut back);
        }
        assert_eq!((back.qs, back.d, back.mins), (rm.qs, rm.d, rm.mins));
    }
}
