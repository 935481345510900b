//! K/V of fleet sessions written incrementally (see [`crate::sessions::kv_pieces`]): after each
//! turn only the K/V blocks holding positions the store does not have yet are read from the
//! decoder (on Neuron: a device read of those blocks only) and written behind; a taker assembles
//! the K/V from the pieces that agree with the durable tokens and recomputes the rest.

use super::session_moves::{Parts, check_blob};
use super::step::Engine;
use crate::sessions::{SequenceId, SessionBlob, kv_pieces};

impl Engine {
    /// Bytes of one K/V block.
    fn kv_block_bytes(&self) -> usize {
        self.decoder.shape().kv_block_bytes(self.pool.block_size())
    }

    /// The K/V pieces of session `id` the store does not hold yet: (first block, pieces), noted
    /// as sent. `None` when there is nothing new (or the K/V are over the byte bound, or cannot be
    /// read).
    pub(super) fn new_kv_pieces(&mut self, id: &SequenceId, key: &str) -> Option<(usize, Vec<Vec<u8>>)> {
        let block_bytes = self.kv_block_bytes();
        let f = self.fleet.as_mut()?;
        let bs = self.pool.block_size();
        let s = self.sessions.get(id)?;
        let table = s.table.as_ref()?;
        let computed = s.computed.min(s.tokens.len());
        if computed == 0
            || (computed as u64).saturating_mul(self.kv_bytes_per_position)
                > crate::sessions::lease::KV_BEHIND_BYTES as u64
        {
            return None;
        }
        let sent = match f.leases.take_kv_failed(key) {
            true => 0,
            false => {
                f.kv_sent.get(id).map_or(0, |t| t.iter().zip(&s.tokens[..computed]).take_while(|(a, b)| a == b).count())
            }
        };
        if sent >= computed {
            return None;
        }
        let (from, to) = (sent / bs, computed.div_ceil(bs).min(table.ids().len()));
        if from >= to {
            return None;
        }
        let kv = self.decoder.read_blocks(&table.ids()[from..to]).ok()?;
        if kv.len() != (to - from) * block_bytes {
            return None;
        }
        let digest = self.decoder.weights_digest();
        let pieces = kv
            .chunks_exact(block_bytes)
            .enumerate()
            .map(|(i, chunk)| {
                let b = from + i;
                kv_pieces::encode(bs, &s.tokens[b * bs..((b + 1) * bs).min(computed)], &digest, chunk)
            })
            .collect();
        f.kv_sent.insert(id.clone(), s.tokens[..computed].to_vec());
        Some((from, pieces))
    }

    /// Writes now what the store lacks of the K/V of session `id` (lease `token`), with what is
    /// still queued for it (hand-off, pool pressure, drain). True when the store has them all.
    pub(super) fn flush_kv(&mut self, id: &SequenceId, key: &str, token: u64) -> bool {
        let fresh = self.new_kv_pieces(id, key);
        let Some(f) = self.fleet.as_ref() else { return false };
        let (from, pieces) = fresh.unwrap_or((usize::MAX, Vec::new()));
        f.leases.write_kv_now(key, token, from, pieces)
    }

    /// The K/V of `tokens` from what the store holds (pieces, or an earlier version's whole blob,
    /// whichever covers more positions that agree with the tokens): positions and bytes.
    pub(super) fn stored_kv(
        &self,
        tokens: &[u32],
        whole: Option<&[u8]>,
        pieces: &[(usize, Vec<u8>)],
    ) -> (usize, Vec<u8>) {
        let bs = self.pool.block_size();
        let digest = self.decoder.weights_digest();
        let (computed, kv) = kv_pieces::assemble(tokens, pieces, &digest, bs, self.kv_block_bytes());
        let blob = whole.and_then(|b| SessionBlob::decode(b).ok());
        if let Some(b) = &blob
            && let Ok(Parts { tokens: t, computed: c, kv: k }) = check_blob(self.decoder.as_ref(), bs, b)
            && c > computed
            && t.get(..c) == tokens.get(..c)
        {
            return (c, k.to_vec());
        }
        (computed, kv)
    }
}
