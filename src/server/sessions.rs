//! `neuronworker.v1.Sessions`: list, export and import the sessions of the models whose batching
//! policy keeps sessions.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::error::ServerError;
use super::sessions_page as page;
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
    ListSessionsResponse, SessionChunk, sequence_id,
};

/// The Sessions service over the repository's sequence models.
#[derive(Debug, Clone)]
pub struct SessionsService {
    repo: Arc<Repository>,
    chunk_bytes: usize,
    max_message: usize,
}

impl SessionsService {
    /// A service over `repo`.
    pub fn new(repo: Arc<Repository>) -> SessionsService {
        SessionsService { repo, chunk_bytes: super::sessions_stream::CHUNK_BYTES, max_message: usize::MAX }
    }

    /// Streams exports in chunks that fit messages of `max_message_size` bytes.
    pub fn with_message_limit(mut self, max_message_size: usize) -> SessionsService {
        self.chunk_bytes = super::sessions_stream::chunk_bytes(max_message_size);
        self.max_message = max_message_size;
        self
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
    let id = match id.and_then(|i| i.id) {
        Some(sequence_id::Id::Uint64Id(v)) if v != 0 => SequenceId::Uint(v),
        Some(sequence_id::Id::StringId(s)) if !s.is_empty() => SequenceId::Str(s),
        _ => {
            return Err(ServerError::InvalidRequest(
                "sequence_id must be a non-zero uint64_id or a non-empty string_id".into(),
            ));
        }
    };
    id.check().map_err(ServerError::InvalidRequest)?;
    Ok(id)
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

impl SessionsService {
    /// Takes a session out of its model: the model's handle, the blob and its description.
    async fn export(&self, r: ExportSessionRequest) -> Result<(Batcher, SessionBlob, proto::SessionInfo), Status> {
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
        Ok((handle, blob, info_to_proto(&info)))
    }
}

#[tonic::async_trait]
impl Sessions for SessionsService {
    async fn list_sessions(&self, r: Request<ListSessionsRequest>) -> Result<Response<ListSessionsResponse>, Status> {
        let r = r.into_inner();
        let after = page::decode_token(&r.page_token)?;
        let size = page::size(r.page_size);
        let mut all: Vec<SessionInfo> = Vec::new();
        for (name, entry) in self.repo.entries() {
            if !r.model.is_empty() && name != r.model {
                continue;
            }
            for m in entry.versions.values() {
                all.extend(m.batching.list_sessions().await);
            }
        }
        let (page, next) = page::select(all, after.as_ref(), size);
        let sessions = page.iter().map(info_to_proto).collect();
        Ok(Response::new(ListSessionsResponse { sessions, next_page_token: next }))
    }

    async fn export_session(
        &self,
        r: Request<ExportSessionRequest>,
    ) -> Result<Response<ExportSessionResponse>, Status> {
        let (handle, blob, info) = self.export(r.into_inner()).await?;
        let encoded = blob.encode();
        // The reply must fit a message: otherwise the session stays here, and the caller is told
        // to stream it.
        if encoded.len().saturating_add(4096) > self.max_message {
            let size = encoded.len();
            handle.import_session(blob).await.map_err(ServerError::from)?;
            return Err(Status::resource_exhausted(format!(
                "the session's blob is {size} bytes, over this server's message limit of {} bytes; it stays on \
                 this worker: use ExportSessionStream (or raise --max-message-size)",
                self.max_message
            )));
        }
        Ok(Response::new(ExportSessionResponse { blob: encoded, session: Some(info) }))
    }

    type ExportSessionStreamStream = tokio_stream::wrappers::ReceiverStream<Result<SessionChunk, Status>>;

    async fn export_session_stream(
        &self,
        r: Request<ExportSessionRequest>,
    ) -> Result<Response<Self::ExportSessionStreamStream>, Status> {
        let (handle, blob, info) = self.export(r.into_inner()).await?;
        let rx = super::sessions_stream::send_export(handle, blob, info, self.chunk_bytes);
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn import_session_stream(
        &self,
        r: Request<tonic::Streaming<SessionChunk>>,
    ) -> Result<Response<ImportSessionResponse>, Status> {
        let blob = super::sessions_stream::receive(r.into_inner()).await?;
        let handle = self.handle(&blob.model, &blob.version.to_string())?;
        let info = handle.import_session(blob).await.map_err(ServerError::from)?;
        Ok(Response::new(ImportSessionResponse { session: Some(info_to_proto(&info)) }))
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
