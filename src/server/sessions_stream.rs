//! Streaming ExportSession / ImportSession: the session blob in chunks of at most 1 MiB, each
//! with its CRC-32, so a session larger than a gRPC message (a generative session's K/V) moves.
//! The receiver checks every chunk (order, size, checksum) and the blob's own checksum at the
//! end; nothing is imported unless all of it arrived intact. An export whose stream breaks before
//! its last chunk is handed to the transport puts the session back on this worker; chunks the
//! transport has already taken (up to the client's HTTP/2 flow-control window) count as sent, so
//! a client that dies with less than a window left to read loses the export — retry-safe moves
//! need the store (see docs/sessions.md).

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;

use super::error::ServerError;
use super::sessions::proto::{SessionChunk, SessionInfo as ProtoInfo};
use crate::batching::{Batcher, BatchingError};
use crate::sessions::SessionBlob;

/// Largest chunk sent (smaller when the server's message limit is: half of it).
pub const CHUNK_BYTES: usize = 1 << 20;

/// The chunk size for a server whose messages are limited to `max_message_size` bytes.
pub fn chunk_bytes(max_message_size: usize) -> usize {
    CHUNK_BYTES.min(max_message_size / 2).max(1024)
}

/// Largest blob accepted by a streaming import (a 2k-token session of a 1B-parameter model is
/// ~0.5 GB of f32 K/V).
pub const MAX_IMPORT_BYTES: u64 = 16 << 30;

/// The chunks of `blob`, the first carrying `info`.
pub fn chunks(blob: &[u8], size: usize, info: ProtoInfo) -> impl Iterator<Item = SessionChunk> + '_ {
    let total = blob.len() as u64;
    let size = size.max(1);
    // An empty blob is one empty chunk; otherwise one chunk per `size` bytes, made as it is sent
    // (the blob is not copied into all its chunks at once).
    let starts = (0..blob.len().max(1)).step_by(size);
    starts.map(move |offset| {
        let data = blob.get(offset..(offset + size).min(blob.len())).unwrap_or_default().to_vec();
        SessionChunk {
            offset: offset as u64,
            crc32: crc32fast::hash(&data),
            data,
            total_size: total,
            session: if offset == 0 { Some(info.clone()) } else { None },
        }
    })
}

/// Sends the chunks of an exported session on a channel; if the receiver goes away before the
/// last chunk is handed over, the session is imported back into `handle`.
pub fn send_export(
    handle: Batcher,
    blob: SessionBlob,
    info: ProtoInfo,
    size: usize,
) -> mpsc::Receiver<Result<SessionChunk, Status>> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let encoded = blob.encode();
        for chunk in chunks(&encoded, size, info) {
            if tx.send(Ok(chunk)).await.is_err() {
                let id = blob.id.clone();
                match handle.import_session(blob).await {
                    Ok(_) => tracing::warn!(id = %id, "a streamed export broke off; the session stays on this worker"),
                    Err(e) => {
                        tracing::error!(id = %id, error = %e, "a streamed export broke off and the session could not be put back: lost")
                    }
                }
                return;
            }
        }
    });
    rx
}

fn bad(reason: String) -> Status {
    ServerError::Batching(BatchingError::BadBlob { reason }).into()
}

/// Receives a blob from `chunks`, checking each, and decodes it.
pub async fn receive<S>(mut chunks: S) -> Result<SessionBlob, Status>
where
    S: tokio_stream::Stream<Item = Result<SessionChunk, Status>> + Unpin,
{
    let mut blob: Vec<u8> = Vec::new();
    let mut total: Option<u64> = None;
    while let Some(chunk) = chunks.next().await {
        let c = chunk?;
        let expected = *total.get_or_insert(c.total_size);
        if c.total_size != expected {
            return Err(bad(format!(
                "chunk at offset {} says the blob has {} bytes, the first said {expected}",
                c.offset, c.total_size
            )));
        }
        if expected > MAX_IMPORT_BYTES {
            return Err(bad(format!("the blob has {expected} bytes; this worker imports at most {MAX_IMPORT_BYTES}")));
        }
        if c.offset != blob.len() as u64 {
            return Err(bad(format!(
                "chunk at offset {} arrived after {} bytes; send the chunks in order, without gaps",
                c.offset,
                blob.len()
            )));
        }
        if crc32fast::hash(&c.data) != c.crc32 {
            return Err(bad(format!(
                "chunk at offset {} fails its CRC-32: the transfer was damaged; export again",
                c.offset
            )));
        }
        if blob.len() as u64 + c.data.len() as u64 > expected {
            return Err(bad(format!("the chunks hold more than the {expected} bytes announced")));
        }
        if blob.is_empty() {
            blob.reserve(expected.min(CHUNK_BYTES as u64 * 64) as usize);
        }
        blob.extend_from_slice(&c.data);
    }
    let Some(expected) = total else { return Err(bad("the stream held no chunk".into())) };
    if blob.len() as u64 != expected {
        return Err(bad(format!("the stream ended after {} of {expected} bytes; export again", blob.len())));
    }
    SessionBlob::decode(&blob).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ProtoInfo {
        ProtoInfo { model: "m".into(), version: 1, ..Default::default() }
    }

    #[test]
    fn chunks_cover_the_blob_in_order_with_checksums() {
        let blob: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| (i % 251) as u8).collect();
        let c: Vec<SessionChunk> = chunks(&blob, CHUNK_BYTES, info()).collect();
        assert_eq!(c.len(), 3);
        assert_eq!(c.iter().map(|c| c.offset).collect::<Vec<_>>(), vec![0, CHUNK_BYTES as u64, 2 * CHUNK_BYTES as u64]);
        assert!(c[0].session.is_some() && c[1].session.is_none());
        assert!(c.iter().all(|c| c.total_size == blob.len() as u64 && crc32fast::hash(&c.data) == c.crc32));
        let joined: Vec<u8> = c.iter().flat_map(|c| c.data.iter().copied()).collect();
        assert_eq!(joined, blob);
        assert_eq!(chunks(&[], CHUNK_BYTES, info()).count(), 1, "an empty blob is one empty chunk");
    }

    fn blob() -> SessionBlob {
        SessionBlob {
            model: "m".into(),
            version: 1,
            id: crate::sessions::SequenceId::Uint(3),
            steps: 2,
            state: vec![crate::tensor::Tensor {
                dtype: crate::tensor::DataType::Uint8,
                shape: vec![3 * CHUNK_BYTES / 2],
                data: vec![7u8; 3 * CHUNK_BYTES / 2],
            }],
        }
    }

    async fn receive_all(c: Vec<SessionChunk>) -> Result<SessionBlob, Status> {
        receive(tokio_stream::iter(c.into_iter().map(Ok))).await
    }

    #[tokio::test]
    async fn intact_chunks_give_back_the_blob_and_damage_is_refused() {
        let b = blob();
        let encoded = b.encode();
        let c: Vec<SessionChunk> = chunks(&encoded, CHUNK_BYTES, info()).collect();
        assert_eq!(receive_all(c.clone()).await.ok(), Some(b));
        let mut flipped = c.clone();
        flipped[1].data[10] ^= 1;
        let e = receive_all(flipped).await.expect_err("damaged");
        assert!(e.message().contains("CRC-32"), "{e}");
        let e = receive_all(vec![c[1].clone(), c[0].clone()]).await.expect_err("out of order");
        assert!(e.message().contains("in order"), "{e}");
        let e = receive_all(c[..1].to_vec()).await.expect_err("truncated");
        assert!(e.message().contains("ended after"), "{e}");
        let e = receive_all(Vec::new()).await.expect_err("empty");
        assert!(e.message().contains("no chunk"), "{e}");
    }
}
