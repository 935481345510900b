//! `neuronworker.v1.Sessions`: list, export and import the sessions of the models whose batching
//! policy keeps sessions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::error::ServerError;
use crate::batching::{Batcher, BatchingError};
use crate::repository::Repository;
use crate::sessions::{SequenceId, SessionBlob, SessionInfo};

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

    fn handle(&self, model: &str, version: &str) -> Result<Batcher, ServerError> {
        let m = self.repo.get(model, version)?;
        if !m.batching.keeps_sessions() {
            return Err(BatchingError::NoSessions { model: model.to_string() }.into());
        }
        Ok(m.batching.clone())
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
                sessions.extend(m.batching.list_sessions().await.iter().map(info_to_proto));
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
        let blob = handle.export_session(id).await.map_err(ServerError::from)?;
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
            .map_err(|reason| ServerError::Batching(BatchingError::BadBlob { reason }))?;
        let handle = self.handle(&blob.model, &blob.version.to_string())?;
        let info = handle.import_session(blob).await.map_err(ServerError::from)?;
        Ok(Response::new(ImportSessionResponse { session: Some(info_to_proto(&info)) }))
    }
}
