//! Sessions: the state a stateful model keeps for one client conversation between requests —
//! its id, its steps, its state tensors — and the places it moves to: the versioned, checksummed
//! [`SessionBlob`] (export/import, and the value the store keeps) and the [`SessionStore`].
//! Batching policies own a session while it is resident on an instance and hand it here to move it.

pub mod blob;
pub mod store;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use blob::SessionBlob;
pub use store::{SessionStore, StoreError, StoredSession};

/// A sequence (correlation) id, as Triton's requests carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SequenceId {
    /// An unsigned integer id (0 is not a valid id).
    Uint(u64),
    /// A string id (empty is not a valid id).
    Str(String),
}

impl std::fmt::Display for SequenceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SequenceId::Uint(v) => write!(f, "{v}"),
            SequenceId::Str(s) => write!(f, "\"{s}\""),
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
}
