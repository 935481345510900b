//! Bucket choice for one step: which prefill program runs which piece of a prompt, and which decode
//! program runs which rows. Pure functions over bucket sizes, so the policy is tested without a
//! device.
//!
//! - A prefill chunk of `n` tokens runs as pieces: the largest bucket while more than it remains,
//!   then the smallest bucket that holds the rest (so padding stays below one bucket).
//! - Decode rows (one token each) are grouped from the highest position down: a group runs in the
//!   decode program with the smallest context above its highest position, and among those the
//!   smallest batch that holds the rows left (or the largest, then again with the rows left, whose
//!   positions are lower). Every execution reads the whole weights once, so the rows of a step run
//!   in as few executions as the batch buckets allow; the context read is the smallest compiled one
//!   that holds the longest row of the execution, never `max_len` by default (the waste of decoding
//!   every step at the model's full length).

/// One prefill execution: tokens `offset..offset + len` of a chunk, in prefill bucket `bucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillPiece {
    /// Index into the prefill buckets (sorted by length).
    pub bucket: usize,
    /// First token of the chunk this piece runs.
    pub offset: usize,
    /// Tokens run (at most the bucket's length).
    pub len: usize,
}

/// Splits a chunk of `n` tokens over prefill buckets of lengths `lengths` (ascending, non-empty).
pub fn prefill_pieces(lengths: &[usize], n: usize) -> Vec<PrefillPiece> {
    let mut pieces = Vec::new();
    let Some(&largest) = lengths.last() else { return pieces };
    let mut offset = 0;
    while offset < n {
        let left = n - offset;
        let bucket = lengths.iter().position(|&l| l >= left).unwrap_or(lengths.len() - 1);
        let len = left.min(lengths[bucket]).min(largest);
        pieces.push(PrefillPiece { bucket, offset, len });
        offset += len;
    }
    pieces
}

/// One decode execution: rows (indices into the caller's row list) in decode bucket `bucket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeGroup {
    /// Index into the decode buckets.
    pub bucket: usize,
    /// The caller's rows run by this execution (at most the bucket's batch).
    pub rows: Vec<usize>,
}

/// Groups decode rows at `positions` over decode buckets `(batch, context)`. Returns `Err(row)` for
/// a row whose position no bucket's context holds.
pub fn decode_groups(buckets: &[(usize, usize)], positions: &[usize]) -> Result<Vec<DecodeGroup>, usize> {
    let mut order: Vec<usize> = (0..positions.len()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(positions[r]));
    let mut groups = Vec::new();
    let mut next = 0;
    while next < order.len() {
        let top = positions[order[next]];
        let left = order.len() - next;
        let Some(context) = buckets.iter().map(|&(_, c)| c).filter(|&c| c > top).min() else {
            return Err(order[next]);
        };
        let at = |b: &&(usize, usize)| b.1 == context;
        let fitting = buckets.iter().filter(at).filter(|b| b.0 >= left).min_by_key(|b| b.0);
        let chosen = fitting.or_else(|| buckets.iter().filter(at).max_by_key(|b| b.0));
        let Some(&(batch, _)) = chosen else { return Err(order[next]) };
        let bucket = buckets.iter().position(|&b| b == (batch, context)).unwrap_or(0);
        let take = batch.min(left);
        groups.push(DecodeGroup { bucket, rows: order[next..next + take].to_vec() });
        next += take;
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_uses_the_largest_bucket_then_the_smallest_that_fits() {
        let lengths = [16, 64];
        let p = prefill_pieces(&lengths, 70);
        assert_eq!(
            p,
            vec![PrefillPiece { bucket: 1, offset: 0, len: 64 }, PrefillPiece { bucket: 0, offset: 64, len: 6 }]
        );
        assert_eq!(prefill_pieces(&lengths, 5), vec![PrefillPiece { bucket: 0, offset: 0, len: 5 }]);
        assert_eq!(prefill_pieces(&lengths, 17), vec![PrefillPiece { bucket: 1, offset: 0, len: 17 }]);
        assert_eq!(prefill_pieces(&lengths, 0), vec![]);
        let total: usize = prefill_pieces(&lengths, 1000).iter().map(|p| p.len).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn decode_rows_run_in_the_smallest_context_that_holds_them() {
        // (batch, context)
        let buckets = [(1, 64), (4, 64), (1, 256), (4, 256)];
        // All rows short: one execution at context 64.
        let groups = decode_groups(&buckets, &[10, 50, 20, 30]).unwrap();
        assert_eq!(groups, vec![DecodeGroup { bucket: 1, rows: vec![1, 3, 2, 0] }]);
        // One long row: the execution reads the context that holds it (weights are read once per
        // execution, so the rows are not split into two programs).
        let groups = decode_groups(&buckets, &[10, 200, 20, 30]).unwrap();
        assert_eq!(groups, vec![DecodeGroup { bucket: 3, rows: vec![1, 3, 2, 0] }]);
        // Position 63 fits context 64 (positions 0..=63 are read); 64 does not.
        assert_eq!(decode_groups(&buckets, &[63]).unwrap()[0].bucket, 0);
        assert_eq!(decode_groups(&buckets, &[64]).unwrap()[0].bucket, 2);
        assert_eq!(decode_groups(&buckets, &[256]), Err(0));
    }

    #[test]
    fn more_rows_than_the_largest_batch_run_in_several_executions() {
        let buckets = [(2, 64), (4, 64), (4, 256)];
        let groups = decode_groups(&buckets, &[1, 2, 3, 4, 5, 100]).unwrap();
        assert_eq!(groups.len(), 2);
        // The longest four at 256, the two left (positions 1 and 2) at 64 in the batch-2 program.
        assert_eq!((groups[0].bucket, groups[0].rows.len()), (2, 4));
        assert_eq!(groups[1], DecodeGroup { bucket: 0, rows: vec![1, 0] });
        let mut all: Vec<usize> = groups.iter().flat_map(|g| g.rows.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5]);
    }
}
