//! `neuronworker.v1.Sessions` (list, export, import of stateful sessions) and the inference path
//! of sequence models: a request's sequence parameters checked and handed to the model's
//! sequence batcher.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::decode::{decode_request_for, encode_response};
use super::error::ServerError;
use crate::proto::inference::{ModelInferRequest, ModelInferResponse};
use crate::repository::{LoadedModel, Repository};
use crate::sequence::{SequenceError, SequenceHandle, SequenceId, SequenceRequest, SessionBlob, SessionInfo};

/// Generated types and service of `proto/neuronworker/v1/sessions.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("neuronworker.v1");
}

use proto::sessions_server::Sessions;
use proto::{
    ExportSessionRequest, ExportSessionResponse, ImportSessionRequest, ImportSessionResponse, ListSessionsRequest,
    ListSessionsResponse, sequence_id,
};

/// Runs one request of a sequence model through its sequence batcher.
pub(super) async fn infer_sequence(
    handle: &SequenceHandle,
    model: &LoadedModel,
    mut req: ModelInferRequest,
    arrived: Instant,
) -> Result<ModelInferResponse, ServerError> {
    let spec = &model.spec;
    let decoded = decode_request_for(&mut req, spec, true)?;
    let invalid =
        |reason: String| ServerError::Sequence(SequenceError::InvalidRequest { model: spec.name.clone(), reason });
    let Some(id) = decoded.sequence.id else {
        return Err(invalid(
            "this is a stateful (sequence-batched) model: every request needs a non-zero sequence_id, and the first request of a sequence sequence_start".into(),
        ));
    };
    if decoded.rows != 1 {
        return Err(invalid(format!(
            "a request of sequence {id} must carry exactly one batch row, got {}",
            decoded.rows
        )));
    }
    let (tx, rx) = oneshot::channel();
    handle.submit(SequenceRequest {
        id,
        start: decoded.sequence.start,
        end: decoded.sequence.end,
        inputs: decoded.inputs,
        reply: tx,
        arrived,
    })?;
    let reply = rx.await.map_err(|_| {
        ServerError::Sequence(SequenceError::Unavailable {
            model: spec.name.clone(),
            reason: "the sequence batcher stopped before answering".into(),
        })
    })??;
    Ok(encode_response(&req.model_name, model.version, std::mem::take(&mut req.id), reply, &decoded.outputs))
}

/// The Sessions service over the repository's sequence models.
#[derive(Debug, Clone)]
pub struct SessionsService {
    repo: Arc<Repository>,
}

impl SessionsService {
    /// A service over `repo`.
    pub fn new(repo: Arc<Repository>) -> SessionsService {
        SessionsService { repo }
    }

    fn handle(&self, model: &str, version: &str) -> Result<SequenceHandle, ServerError> {
        let m = self.repo.get(model, version)?;
        m.sequence.clone().ok_or_else(|| {
            ServerError::InvalidRequest(format!(
                "model '{model}' is not a stateful (sequence-batched) model; it has no sessions"
            ))
        })
    }
}

fn id_to_proto(id: &SequenceId) -> proto::SequenceId {
    proto::SequenceId {
        id: Some(match id {
            SequenceId::Uint(v) => sequence_id::Id::Uint64Id(*v),
            SequenceId::Str(s) => sequence_id::Id::StringId(s.clone()),
        }),
    }
}

fn id_from_proto(id: Option<proto::SequenceId>) -> Result<SequenceId, ServerError> {
    match id.and_then(|i| i.id) {
        Some(sequence_id::Id::Uint64Id(v)) if v != 0 => Ok(SequenceId::Uint(v)),
        Some(sequence_id::Id::StringId(s)) if !s.is_empty() => Ok(SequenceId::Str(s)),
        _ => {
            Err(ServerError::InvalidRequest("sequence_id must be a non-zero uint64_id or a non-empty string_id".into()))
        }
    }
}

fn info_to_proto(s: &SessionInfo) -> proto::SessionInfo {
    proto::SessionInfo {
        model: s.model.clone(),
        version: s.version,
        sequence_id: Some(id_to_proto(&s.id)),
        steps: s.steps,
        location: if s.live { "LIVE".into() } else { "SPILLED".into() },
        idle_microseconds: s.idle.as_micros() as u64,
    }
}

#[tonic::async_trait]
impl Sessions for SessionsService {
    async fn list_sessions(&self, r: Request<ListSessionsRequest>) -> Result<Response<ListSessionsResponse>, Status> {
        let only = r.into_inner().model;
        let mut sessions = Vec::new();
        for (name, entry) in self.repo.entries() {
            if !only.is_empty() && name != only {
                continue;
            }
            for m in entry.versions.values() {
                if let Some(h) = &m.sequence {
                    sessions.extend(h.list().await.iter().map(info_to_proto));
                }
            }
        }
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    async fn export_session(
        &self,
        r: Request<ExportSessionRequest>,
    ) -> Result<Response<ExportSessionResponse>, Status> {
        let r = r.into_inner();
        let id = id_from_proto(r.sequence_id)?;
        let handle = self.handle(&r.model, &r.version)?;
        let blob = handle.export(id).await.map_err(ServerError::from)?;
        let info = SessionInfo {
            model: blob.model.clone(),
            version: blob.version,
            id: blob.id.clone(),
            steps: blob.steps,
            live: false,
            idle: Default::default(),
        };
        Ok(Response::new(ExportSessionResponse { blob: blob.encode(), session: Some(info_to_proto(&info)) }))
    }

    async fn import_session(
        &self,
        r: Request<ImportSessionRequest>,
    ) -> Result<Response<ImportSessionResponse>, Status> {
        let blob = SessionBlob::decode(&r.into_inner().blob)
            .map_err(|reason| ServerError::Sequence(SequenceError::BadBlob { reason }))?;
        let handle = self.handle(&blob.model, &blob.version.to_string())?;
        let info = handle.import(blob).await.map_err(ServerError::from)?;
        Ok(Response::new(ImportSessionResponse { session: Some(info_to_proto(&info)) }))
    }
}
