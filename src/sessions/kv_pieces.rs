//! K/V pieces: a session's K/V cache on a shared store, one piece per K/V block, written behind
//! incrementally (only the blocks with new positions: the last, partial block again and the new
//! ones), so a turn costs store bytes (and, on Neuron, a device read) in proportion to its new
//! tokens, not to the history.
//!
//! A piece carries the token ids of the positions it holds K/V for, so a taker assembles the K/V
//! from consistent pieces only: starting at block 0, each piece's tokens must equal the durable
//! token history at its positions (the tokens are the truth), and every piece but the last must
//! be full. The assembled K/V cover the longest such prefix; the turn recomputes the rest. A piece
//! left over from an older branch of the conversation (rewound with `truncate_to`) holds other
//! tokens and is not used.
//!
//! Layout (little endian): `b"KVP1"`, u32 block size, u32 positions `n`, `n` × u32 token ids,
//! 32-byte weights digest, then one block of K/V bytes.

const MAGIC: &[u8; 4] = b"KVP1";

/// One block's piece.
pub fn encode(block_size: usize, tokens: &[u32], digest: &[u8; 32], kv: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + tokens.len() * 4 + 32 + kv.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(block_size as u32).to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    out.extend_from_slice(digest);
    out.extend_from_slice(kv);
    out
}

/// A decoded piece.
struct Piece<'a> {
    block_size: usize,
    tokens: Vec<u32>,
    digest: &'a [u8],
    kv: &'a [u8],
}

fn decode(bytes: &[u8]) -> Option<Piece<'_>> {
    let word = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    if bytes.get(..4)? != MAGIC {
        return None;
    }
    let (block_size, n) = (word(4)?, word(8)?);
    let tokens_end = 12usize.checked_add(n.checked_mul(4)?)?;
    let tokens =
        bytes.get(12..tokens_end)?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let digest = bytes.get(tokens_end..tokens_end + 32)?;
    let kv = bytes.get(tokens_end + 32..)?;
    Some(Piece { block_size, tokens, digest, kv })
}

/// Assembles the K/V of `tokens` from `pieces` (block index, bytes): the number of positions
/// covered and their K/V bytes (whole blocks of `block_bytes`). Zero positions when block 0 is
/// missing or inconsistent.
pub fn assemble(
    tokens: &[u32],
    pieces: &[(usize, Vec<u8>)],
    digest: &[u8; 32],
    block_size: usize,
    block_bytes: usize,
) -> (usize, Vec<u8>) {
    let mut by_block: Vec<Option<&[u8]>> = Vec::new();
    for (i, bytes) in pieces {
        if *i < tokens.len().div_ceil(block_size.max(1)) {
            if by_block.len() <= *i {
                by_block.resize(*i + 1, None);
            }
            by_block[*i] = Some(bytes);
        }
    }
    let (mut computed, mut kv) = (0usize, Vec::new());
    for (i, bytes) in by_block.iter().enumerate() {
        let Some(p) = bytes.and_then(decode) else { break };
        let start = i * block_size;
        let fits = p.block_size == block_size
            && p.digest == digest
            && p.kv.len() == block_bytes
            && !p.tokens.is_empty()
            && p.tokens.len() <= block_size
            && tokens.get(start..start + p.tokens.len()) == Some(p.tokens.as_slice());
        if !fits {
            break;
        }
        kv.extend_from_slice(p.kv);
        computed = start + p.tokens.len();
        if p.tokens.len() < block_size {
            break; // a partial block ends the K/V
        }
    }
    (computed, kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_assemble_the_longest_consistent_prefix() {
        let d = [7u8; 32];
        let tokens: Vec<u32> = (0..10).collect();
        let p0 = encode(4, &tokens[0..4], &d, &[1; 8]);
        let p1 = encode(4, &tokens[4..8], &d, &[2; 8]);
        let p2 = encode(4, &tokens[8..10], &d, &[3; 8]);
        let all = vec![(2, p2.clone()), (0, p0.clone()), (1, p1.clone())];
        let (n, kv) = assemble(&tokens, &all, &d, 4, 8);
        assert_eq!(n, 10);
        assert_eq!(kv, [[1u8; 8], [2; 8], [3; 8]].concat());
        // A gap ends the K/V; so does a piece of another branch (other tokens) or other weights.
        assert_eq!(assemble(&tokens, &[(0, p0.clone()), (2, p2.clone())], &d, 4, 8).0, 4);
        let other = encode(4, &[0, 1, 2, 3, 9, 9, 9, 9][4..], &d, &[2; 8]);
        assert_eq!(assemble(&tokens, &[(0, p0.clone()), (1, other), (2, p2)], &d, 4, 8).0, 4);
        assert_eq!(assemble(&tokens, &[(0, p0.clone())], &[0; 32], 4, 8).0, 0);
        // A partial piece ends the K/V even when a later one exists.
        let partial = encode(4, &tokens[4..6], &d, &[2; 8]);
        assert_eq!(assemble(&tokens, &[(0, p0.clone()), (1, partial), (2, p1)], &d, 4, 8).0, 6);
        assert_eq!(assemble(&tokens, &[(0, b"junk".to_vec())], &d, 4, 8).0, 0);
        assert_eq!(assemble(&tokens, &[(0, p0[..20].to_vec())], &d, 4, 8).0, 0);
    }
}
