//! `inference.GRPCInferenceService`: Triton's KServe v2 RPCs over the repository and schedulers.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::decode::{decode_request, encode_response};
use super::error::ServerError;
use super::stats::model_statistics;
use super::stream_route::StreamMessage;
use crate::batching::{BatchingError, InferRequest};
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::inference::*;
use crate::repository::{ModelControlMode, Repository};

/// The inference service: stateless apart from the shared repository.
#[derive(Debug, Clone)]
pub struct InferenceService {
    pub(super) repo: Arc<Repository>,
    /// Shared: the service is cloned for every request.
    server_version: Arc<str>,
    pub(super) draining: tokio_util::sync::CancellationToken,
    /// Largest response sent, bytes (`--max-message-size`): a larger one is refused in its place.
    pub(super) max_message_size: usize,
}

impl InferenceService {
    /// A service over `repo`; `server_version` is reported by ServerMetadata; `draining` is
    /// cancelled when the worker starts shutting down.
    pub fn new(
        repo: Arc<Repository>,
        server_version: String,
        draining: tokio_util::sync::CancellationToken,
    ) -> InferenceService {
        InferenceService { repo, server_version: server_version.into(), draining, max_message_size: usize::MAX }
    }

    /// Refuses responses larger than `bytes` with an error in their place (the transport would
    /// otherwise fail the call, or a whole stream), counting the request as failed.
    pub fn with_max_message_size(mut self, bytes: usize) -> InferenceService {
        self.max_message_size = bytes;
        self
    }

    /// Runs one inference request end to end, for every model whatever its batching policy
    /// (shared by ModelInfer and ModelStreamInfer, and the path any other front takes).
    pub async fn infer(repo: &Repository, mut req: ModelInferRequest) -> Result<ModelInferResponse, ServerError> {
        let arrived = Instant::now();
        let model = repo.get(&req.model_name, &req.model_version)?;
        if let Some(g) = model.batching.generative() {
            return super::generate_stream::generate_unary(&model, g, req).await;
        }
        let decoded = decode_request(&mut req, &model.spec)?;
        let (tx, rx) = oneshot::channel();
        model.batching.submit(InferRequest {
            inputs: decoded.inputs,
            rows: decoded.rows,
            priority: decoded.priority,
            timeout: decoded.timeout,
            sequence: decoded.sequence,
            reply: tx,
            arrived,
        })?;
        let reply = rx.await.map_err(|_| {
            ServerError::Batching(BatchingError::Unavailable {
                model: req.model_name.clone(),
                reason: "the model's batcher stopped before answering".into(),
            })
        })??;
        Ok(encode_response(&req.model_name, model.version, std::mem::take(&mut req.id), reply, &decoded.outputs))
    }
}

type StreamResult = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

const EXTENSIONS: &[&str] = &["model_repository", "model_configuration", "statistics", "schedule_policy", "parameters"];

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(ServerError::Unimplemented(format!("{what} is not supported by this worker; send tensor data in the request"))
        .into())
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = !self.draining.is_cancelled()
            && self.repo.entries().iter().any(|(_, e)| e.versions.values().any(|v| v.batching.is_ready()));
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = r.into_inner();
        let ready = self.repo.get(&r.name, &r.version).map(|m| m.batching.is_ready()).unwrap_or(false);
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "neuron-worker".into(),
            version: self.server_version.to_string(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = r.into_inner();
        let model = self.repo.get(&r.name, &r.version).map_err(ServerError::from)?;
        let versions = self
            .repo
            .entries()
            .into_iter()
            .find(|(n, _)| *n == r.name)
            .map(|(_, e)| e.versions.keys().map(|v| v.to_string()).collect())
            .unwrap_or_default();
        let spec = &model.spec;
        let meta = |io: &crate::config::IoSpec| model_metadata_response::TensorMetadata {
            name: io.name.clone(),
            datatype: io.dtype.as_str().to_string(),
            shape: if spec.batches() {
                std::iter::once(-1).chain(io.dims.iter().copied()).collect()
            } else {
                io.dims.clone()
            },
        };
        Ok(Response::new(ModelMetadataResponse {
            name: spec.name.clone(),
            versions,
            platform: model.backend.to_string(),
            inputs: spec.inputs.iter().map(meta).collect(),
            outputs: spec.outputs.iter().map(meta).collect(),
        }))
    }

    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let session = session_header(r.metadata())?;
        let mut req = r.into_inner();
        if let Some(id) = &session {
            super::session_turn::apply_session_header(&mut req, id);
        }
        let resp = Self::infer(&self.repo, req).await?;
        let resp = super::stream_infer::bound_response(&self.repo, resp, self.max_message_size)?;
        Ok(Response::new(resp))
    }

    type ModelStreamInferStream = StreamResult;

    async fn model_stream_infer(
        &self,
        r: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        // The server routes this RPC through `stream_route` (bad messages answered in-band); this
        // is the same loop for a caller that uses the generated service directly. An
        // `x-session-id` on the stream names the session of every generation request on it.
        let session = session_header(r.metadata())?;
        let incoming = r.into_inner().map(|m| m.map(|r| StreamMessage::Request(Box::new(r))));
        Ok(Response::new(self.serve_stream(Box::pin(incoming), session)))
    }

    async fn model_config(&self, r: Request<ModelConfigRequest>) -> Result<Response<ModelConfigResponse>, Status> {
        let r = r.into_inner();
        let model = self.repo.get(&r.name, &r.version).map_err(ServerError::from)?;
        Ok(Response::new(ModelConfigResponse { config: Some(model.config.clone()) }))
    }

    async fn model_statistics(
        &self,
        r: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let r = r.into_inner();
        let mut out = Vec::new();
        if !r.name.is_empty() && !r.version.is_empty() {
            let m = self.repo.get(&r.name, &r.version).map_err(ServerError::from)?;
            out.push(model_statistics(&r.name, &m));
        } else if !r.name.is_empty() {
            // Every loaded version of the model (Triton: empty version = all versions).
            self.repo.get(&r.name, "").map_err(ServerError::from)?;
            for (name, entry) in self.repo.entries().into_iter().filter(|(n, _)| *n == r.name) {
                for m in entry.versions.values() {
                    out.push(model_statistics(&name, m));
                }
            }
        } else {
            for (name, entry) in self.repo.entries() {
                for m in entry.versions.values() {
                    out.push(model_statistics(&name, m));
                }
            }
        }
        Ok(Response::new(ModelStatisticsResponse { model_stats: out }))
    }

    async fn repository_index(
        &self,
        r: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let only_ready = r.into_inner().ready;
        let mut models = Vec::new();
        for (name, e) in self.repo.entries() {
            if e.versions.is_empty() {
                if !only_ready {
                    models.push(repository_index_response::ModelIndex {
                        name,
                        version: String::new(),
                        state: e.state.into(),
                        reason: e.reason,
                    });
                }
                continue;
            }
            for (v, m) in &e.versions {
                let ready = m.batching.is_ready();
                if only_ready && !ready {
                    continue;
                }
                models.push(repository_index_response::ModelIndex {
                    name: name.clone(),
                    version: v.to_string(),
                    state: if ready { "READY".into() } else { "UNAVAILABLE".into() },
                    reason: if ready { String::new() } else { "no instance in service".into() },
                });
            }
        }
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        r: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.explicit("RepositoryModelLoad")?;
        let r = r.into_inner();
        if !r.parameters.is_empty() {
            return Err(ServerError::InvalidRequest("RepositoryModelLoad parameters (config/file overrides) are not supported; put the model in the repository folder".into()).into());
        }
        self.repo.load(&r.model_name).await.map_err(ServerError::from)?;
        Ok(Response::new(RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        r: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.explicit("RepositoryModelUnload")?;
        let r = r.into_inner();
        self.repo.unload(&r.model_name).await.map_err(ServerError::from)?;
        Ok(Response::new(RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        unimplemented("system shared memory")
    }
    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        unimplemented("system shared memory")
    }
    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        unimplemented("system shared memory")
    }
    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        unimplemented("CUDA shared memory")
    }
    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        unimplemented("CUDA shared memory")
    }
    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        unimplemented("CUDA shared memory")
    }
    async fn trace_setting(&self, _: Request<TraceSettingRequest>) -> Result<Response<TraceSettingResponse>, Status> {
        Err(ServerError::Unimplemented(
            "trace settings are not supported by this worker; use --log-format json and the Prometheus metrics".into(),
        )
        .into())
    }
    async fn log_settings(&self, _: Request<LogSettingsRequest>) -> Result<Response<LogSettingsResponse>, Status> {
        Err(ServerError::Unimplemented(
            "log settings cannot be changed at run time; set RUST_LOG and --log-format at start-up".into(),
        )
        .into())
    }
}

impl InferenceService {
    fn explicit(&self, rpc: &str) -> Result<(), Status> {
        if self.repo.control_mode() != ModelControlMode::Explicit {
            return Err(ServerError::Repository(crate::repository::RepositoryError::NotAllowed(format!(
                "{rpc} needs --model-control-mode explicit (this worker runs with 'none')"
            )))
            .into());
        }
        Ok(())
    }
}

/// The `x-session-id` metadata of a call, if any (refused when it is not valid UTF-8).
pub(super) fn session_header(meta: &tonic::metadata::MetadataMap) -> Result<Option<String>, Status> {
    let Some(v) = meta.get(super::session_turn::SESSION_HEADER) else { return Ok(None) };
    v.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| Status::invalid_argument("the x-session-id header must be visible ASCII"))
}
