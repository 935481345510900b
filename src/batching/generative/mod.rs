//! Generative batching: iteration-level (continuous) batching of decoder models.
//!
//! Pure parts, each readable alone: [`params`] (the `sampling_parameters` JSON), [`sampler`]
//! (seeded by request seed and absolute position), [`detok`] (text deltas, stop strings; worked out
//! at delivery when nothing the step loop decides depends on it: [`deferred_text`]),
//! [`kv_blocks`] (paged K/V blocks with a prefix cache).

pub mod cut_short;
pub mod deferred_text;
pub mod delivery_thread;
pub mod detok;
pub mod failover;
pub mod handle;
pub mod kv_blocks;
pub mod outbox;
pub mod params;
pub mod request;
pub mod sampler;
pub mod sequence;
pub mod session;
mod session_kv;
pub mod session_lease;
pub mod session_moves;
mod session_through;
pub mod session_tiers;
pub mod softmax_sum;
pub mod stats;
pub mod step;
#[cfg(test)]
mod testing;
pub mod tokens;
