//! The one core both fronts call: the HTTP front hands the core the same protobuf requests the gRPC
//! front decodes (through the same service), so validation, scheduling and error kinds are shared.

use std::sync::Arc;

use futures::StreamExt;
use tonic::Request;

use super::error::HttpError;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::inference::*;
use crate::repository::Repository;
use crate::server::InferenceService;

/// The responses of one request.
pub type ResponseStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<ModelInferResponse, HttpError>> + Send>>;

/// Copies an `x-session-id` header into `req`, as the gRPC front copies the metadata: the turn is
/// then read by the one decode path (`session_turn`), for either front.
pub fn apply_session_header(headers: &axum::http::HeaderMap, req: &mut ModelInferRequest) -> Result<(), HttpError> {
    let Some(v) = headers.get(crate::server::session_turn::SESSION_HEADER) else { return Ok(()) };
    let id = v.to_str().map_err(|_| HttpError::bad_request("the x-session-id header must be visible ASCII"))?;
    crate::server::session_turn::apply_session_header(req, id);
    Ok(())
}

/// A handle on the core: the KServe v2 service and the repository it serves.
#[derive(Debug, Clone)]
pub struct Core {
    /// The service the gRPC front exposes.
    pub service: InferenceService,
    /// The models.
    pub repo: Arc<Repository>,
}

impl Core {
    /// One inference, through the same path as gRPC ModelInfer.
    pub async fn infer(&self, req: ModelInferRequest) -> Result<ModelInferResponse, HttpError> {
        Ok(self.service.model_infer(Request::new(req)).await?.into_inner())
    }

    /// The responses to one request, in order: one for most models; a decoupled (streaming) model
    /// may send several.
    /// Generative models go through the same streaming path as gRPC ModelStreamInfer.
    pub fn infer_stream(&self, req: ModelInferRequest) -> ResponseStream {
        let generative = self.repo.get(&req.model_name, &req.model_version).ok().and_then(|m| {
            let g = m.batching.generative().cloned()?;
            Some((m, g))
        });
        let Some((model, g)) = generative else {
            let core = self.clone();
            return Box::pin(futures::stream::once(async move { core.infer(req).await }));
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // Dropping the stream (client gone) closes the channel and ends the generation.
        tokio::spawn(async move {
            tokio::select! {
                _ = crate::server::generate_stream::generate_stream(&model, &g, req, &tx) => {}
                _ = tx.closed() => {}
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(|m| match m {
            Ok(ModelStreamInferResponse { error_message, infer_response }) if !error_message.is_empty() => {
                Err(HttpError::in_band(error_message, infer_response.as_ref()))
            }
            Ok(m) => Ok(m.infer_response.unwrap_or_default()),
            Err(status) => Err(HttpError::from(status)),
        }))
    }

    /// Server liveness.
    pub async fn live(&self) -> Result<bool, HttpError> {
        Ok(self.service.server_live(Request::new(ServerLiveRequest {})).await?.into_inner().live)
    }

    /// Server readiness (false while draining).
    pub async fn ready(&self) -> Result<bool, HttpError> {
        Ok(self.service.server_ready(Request::new(ServerReadyRequest {})).await?.into_inner().ready)
    }

    /// Whether `name`/`version` is loaded and ready.
    pub async fn model_ready(&self, name: &str, version: &str) -> Result<bool, HttpError> {
        let r = ModelReadyRequest { name: name.into(), version: version.into() };
        Ok(self.service.model_ready(Request::new(r)).await?.into_inner().ready)
    }

    /// Server metadata.
    pub async fn server_metadata(&self) -> Result<ServerMetadataResponse, HttpError> {
        Ok(self.service.server_metadata(Request::new(ServerMetadataRequest {})).await?.into_inner())
    }

    /// Model metadata.
    pub async fn model_metadata(&self, name: &str, version: &str) -> Result<ModelMetadataResponse, HttpError> {
        let r = ModelMetadataRequest { name: name.into(), version: version.into() };
        Ok(self.service.model_metadata(Request::new(r)).await?.into_inner())
    }

    /// Model configuration.
    pub async fn model_config(&self, name: &str, version: &str) -> Result<ModelConfig, HttpError> {
        let r = ModelConfigRequest { name: name.into(), version: version.into() };
        Ok(self.service.model_config(Request::new(r)).await?.into_inner().config.unwrap_or_default())
    }

    /// Statistics (all models when `name` is empty).
    pub async fn statistics(&self, name: &str, version: &str) -> Result<ModelStatisticsResponse, HttpError> {
        let r = ModelStatisticsRequest { name: name.into(), version: version.into() };
        Ok(self.service.model_statistics(Request::new(r)).await?.into_inner())
    }

    /// The repository index.
    pub async fn index(&self, ready: bool) -> Result<RepositoryIndexResponse, HttpError> {
        let r = RepositoryIndexRequest { repository_name: String::new(), ready };
        Ok(self.service.repository_index(Request::new(r)).await?.into_inner())
    }

    /// Loads a model (explicit control mode).
    pub async fn load(
        &self,
        name: &str,
        parameters: std::collections::HashMap<String, ModelRepositoryParameter>,
    ) -> Result<(), HttpError> {
        let r = RepositoryModelLoadRequest { repository_name: String::new(), model_name: name.into(), parameters };
        self.service.repository_model_load(Request::new(r)).await?;
        Ok(())
    }

    /// Unloads a model (explicit control mode).
    pub async fn unload(&self, name: &str) -> Result<(), HttpError> {
        let r = RepositoryModelUnloadRequest {
            repository_name: String::new(),
            model_name: name.into(),
            parameters: Default::default(),
        };
        self.service.repository_model_unload(Request::new(r)).await?;
        Ok(())
    }
}
