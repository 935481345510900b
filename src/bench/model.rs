//! What the load generator learns about the model before sending load: that it exists and is
//! ready (RepositoryIndex), its inputs (ModelMetadata) and whether it batches (ModelConfig).

use super::error::BenchError;
use super::pool::Pool;
use crate::proto::inference::{ModelConfigRequest, ModelMetadataRequest, RepositoryIndexRequest};

/// One model input, without the batch dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputMeta {
    /// Tensor name.
    pub name: String,
    /// Protocol datatype, e.g. `FP32`.
    pub datatype: String,
    /// Dimensions without the batch dimension; -1 = variable.
    pub dims: Vec<i64>,
}

/// The model as the load generator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Model name.
    pub name: String,
    /// Version asked for (empty = latest).
    pub version: String,
    /// Largest batch per request; 0 = the model does not batch (no batch dimension).
    pub max_batch_size: u32,
    /// Inputs in metadata order.
    pub inputs: Vec<InputMeta>,
    /// A decoupled model (`model_transaction_policy { decoupled: true }`, e.g. a generative one):
    /// loaded over streamed generation requests instead of ModelInfer.
    pub decoupled: bool,
}

/// Checks `name` is served and ready, then reads its metadata and configuration.
pub async fn describe(pool: &Pool, name: &str, version: &str) -> Result<ModelInfo, BenchError> {
    let url = pool.url();
    // The index gives the actionable "here is what it serves" message; servers without it skip this.
    match pool
        .client()
        .repository_index(pool.request(RepositoryIndexRequest { repository_name: String::new(), ready: false }))
        .await
    {
        Ok(index) => {
            let models = index.into_inner().models;
            let mine: Vec<_> = models.iter().filter(|m| m.name == name).collect();
            if mine.is_empty() {
                let mut available: Vec<String> = models.iter().map(|m| format!("{} ({})", m.name, m.state)).collect();
                available.dedup();
                let available = if available.is_empty() { "no models".to_string() } else { available.join(", ") };
                return Err(BenchError::UnknownModel { url: url.into(), model: name.into(), available });
            }
            if !mine.iter().any(|m| m.state == "READY") {
                let m = mine[0];
                let reason = if m.reason.is_empty() { String::new() } else { format!(": {}", m.reason) };
                return Err(BenchError::NotReady {
                    url: url.into(),
                    model: name.into(),
                    state: m.state.clone(),
                    reason,
                });
            }
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => {}
        Err(s) => return Err(BenchError::rpc("RepositoryIndex", url, &s)),
    }
    let meta = pool
        .client()
        .model_metadata(pool.request(ModelMetadataRequest { name: name.into(), version: version.into() }))
        .await
        .map_err(|s| BenchError::rpc("ModelMetadata", url, &s))?
        .into_inner();
    let (max_batch_size, decoupled) = match pool
        .client()
        .model_config(pool.request(ModelConfigRequest { name: name.into(), version: version.into() }))
        .await
    {
        Ok(r) => r.into_inner().config.map_or((0, false), |c| {
            (c.max_batch_size.max(0) as u32, c.model_transaction_policy.is_some_and(|p| p.decoupled))
        }),
        Err(s) if s.code() == tonic::Code::Unimplemented => (0, false),
        Err(s) => return Err(BenchError::rpc("ModelConfig", url, &s)),
    };
    let inputs = meta
        .inputs
        .into_iter()
        .map(|t| {
            let dims = if max_batch_size > 0 && !t.shape.is_empty() { t.shape[1..].to_vec() } else { t.shape };
            InputMeta { name: t.name, datatype: t.datatype, dims }
        })
        .collect();
    Ok(ModelInfo { name: name.into(), version: version.into(), max_batch_size, inputs, decoupled })
}
