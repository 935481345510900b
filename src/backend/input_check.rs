//! [`InputCheck`]: a backend's check of one request's values against the model's limits, run
//! before the request joins a batch, so a bad request is refused on its own and never fails (or
//! shows its data to) the other requests of a batch.

use crate::backend::{BackendError, RequestInput};
use crate::config::IoSpec;

/// Checks one request's inputs against limits only the model knows (vocabulary, positions, token
/// types...). Shared by the model's instances and called on the request path, so it must be cheap
/// and must not touch an instance.
pub trait InputCheck: Send + Sync + std::fmt::Debug {
    /// `inputs` are in configuration order, described by `specs`; each holds one request's rows.
    /// An error names the input, the value and its position within this request only.
    fn check(&self, specs: &[IoSpec], inputs: &[RequestInput]) -> Result<(), BackendError>;
}
