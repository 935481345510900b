//! Sessions: the state a stateful model keeps for one client conversation between requests —
//! its id, its steps, its state tensors — and the places it moves to: the versioned, checksummed
//! [`SessionBlob`] (export/import, and the value the store keeps) and the [`SessionStore`].
//! Batching policies own a session while it is resident on an instance and hand it here to move it.

pub mod blob;
pub mod kv_pieces;
pub mod lease;
mod lease_behind;
pub mod lease_through;
pub mod store;
#[cfg(test)]
mod store_damage_tests;
mod store_db;
#[cfg(any(test, feature = "testing"))]
mod store_fault;
mod store_records;
mod store_redis;
pub mod store_stats;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use blob::SessionBlob;
pub use store::{SessionStore, StoreError, StoreLocation, StoredSession, parse_location};
pub use store_db::StoreHealth;
#[cfg(any(test, feature = "testing"))]
pub use store_fault::WriteFault;

/// The longest string sequence id accepted, in bytes. Ids live in memory (ended ones are
/// remembered for a while), in the store and in messages, so longer ones are refused.
pub const MAX_SEQUENCE_ID_BYTES: usize = 256;

/// How much of a string id messages show.
const SHOWN_ID_CHARS: usize = 64;

/// A sequence (correlation) id, as Triton's requests carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SequenceId {
    /// An unsigned integer id (0 is not a valid id).
    Uint(u64),
    /// A string id (empty is not a valid id).
    Str(String),
}

impl SequenceId {
    /// Whether the id can name a session: a non-zero integer, or a non-empty string of at most
    /// [`MAX_SEQUENCE_ID_BYTES`] bytes. The error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        match self {
            SequenceId::Uint(0) => Err("sequence id 0 is not a valid id; use a non-zero integer".into()),
            SequenceId::Str(s) if s.is_empty() => Err("an empty sequence id is not a valid id".into()),
            SequenceId::Str(s) if s.len() > MAX_SEQUENCE_ID_BYTES => Err(format!(
                "a string sequence id of {} bytes is longer than the {MAX_SEQUENCE_ID_BYTES} bytes allowed",
                s.len()
            )),
            _ => Ok(()),
        }
    }
}

/// Integers as they are; strings quoted, cut to their first 64 characters (with the length) so a
/// message never grows with a client's id.
impl std::fmt::Display for SequenceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SequenceId::Uint(v) => write!(f, "{v}"),
            SequenceId::Str(s) => match s.char_indices().nth(SHOWN_ID_CHARS) {
                Some((cut, _)) => write!(f, "\"{}…\" ({} bytes)", &s[..cut], s.len()),
                None => write!(f, "\"{s}\""),
            },
        }
    }
}

/// One session as ListSessions reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: i64,
    /// The sequence id.
    pub id: SequenceId,
    /// Steps executed since START.
    pub steps: u64,
    /// True when it holds a slot, false when it is spilled to the store.
    pub live: bool,
    /// Time since its last request (zero for spilled sessions loaded at start-up).
    pub idle: Duration,
}

/// Session counters of one model version (for metrics).
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// Sequences holding a slot now.
    pub live: AtomicU64,
    /// Sessions in the store now.
    pub spilled_now: AtomicU64,
    /// Sessions spilled to the store, total.
    pub spilled: AtomicU64,
    /// Sessions restored from the store, total.
    pub restored: AtomicU64,
    /// Sequences freed after being idle, total.
    pub expired: AtomicU64,
    /// Sequences ended by an END request, total.
    pub ended: AtomicU64,
    /// Store entries found corrupt or foreign and skipped, total.
    pub corrupt: AtomicU64,
    /// Session moves that failed because the store could not be read or written, total.
    pub store_failures: AtomicU64,
    /// Sessions lost: not saved at drain, or gone with a damaged store file, total.
    pub lost: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_long_ones_shown_cut() {
        assert!(SequenceId::Uint(1).check().is_ok());
        assert!(SequenceId::Uint(0).check().is_err());
        assert!(SequenceId::Str(String::new()).check().is_err());
        assert!(SequenceId::Str("a".repeat(MAX_SEQUENCE_ID_BYTES)).check().is_ok());
        assert!(SequenceId::Str("a".repeat(MAX_SEQUENCE_ID_BYTES + 1)).check().is_err());
        assert_eq!(SequenceId::Str("s-1".into()).to_string(), "\"s-1\"");
        let long = SequenceId::Str("é".repeat(5000)).to_string();
        assert_eq!(long, format!("\"{}…\" (10000 bytes)", "é".repeat(64)));
    }
}
