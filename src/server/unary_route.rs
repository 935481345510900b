//! `ModelInfer` without tonic's codec machinery: the request body is read as it arrives, its one
//! gRPC message decoded straight from the received bytes, the service called, and the reply
//! written as one DATA frame and the `grpc-status` trailers. This is the RPC that perf_analyzer
//! and tritonclient call once per inference; on a small model tonic's streaming decoder,
//! encoder body and boxed layers cost more CPU than the model does.
//!
//! What a client sees is what tonic's unary handler answers, status codes and messages
//! included: a compressed-flag without `grpc-encoding` (INTERNAL), a message over
//! `--max-message-size` (OUT_OF_RANGE, refused from its length prefix before the body is read
//! whole), a body that ends inside a message (INTERNAL, "Unexpected EOF decoding stream."), no
//! message at all (INTERNAL, "Missing request message."), bytes that are not a
//! `ModelInferRequest` (INTERNAL, prost's reason). Requests with a `grpc-encoding` other than
//! `identity` go to the generated server, which decompresses them.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use prost::Message;
use tonic::codegen::{Body, StdError, http};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::inference::InferenceService;
use crate::proto::inference::ModelInferRequest;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;

/// The path of the unary inference RPC.
pub(crate) const UNARY_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// Bytes of a gRPC message's prefix: the compressed-flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// Whether this route serves `req`: `ModelInfer` with an uncompressed body.
pub(crate) fn serves<B>(req: &http::Request<B>) -> bool {
    req.uri().path() == UNARY_PATH && req.headers().get("grpc-encoding").is_none_or(|v| v.as_bytes() == b"identity")
}

/// Answers one `ModelInfer` call (see the module doc).
pub(crate) async fn answer<B>(
    core: InferenceService,
    req: http::Request<B>,
    max: usize,
) -> http::Response<tonic::body::Body>
where
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Into<StdError> + Send + 'static,
{
    let (mut parts, body) = req.into_parts();
    let message = match read_message(body, max).await {
        Ok((message, trailers)) => {
            // The request's trailers (rare) join its metadata, as tonic merges them.
            if let Some(t) = trailers {
                parts.headers.extend(t);
            }
            message
        }
        Err(status) => return status.into_http(),
    };
    let metadata = MetadataMap::from_headers(parts.headers);
    let request = match ModelInferRequest::decode(message) {
        Ok(r) => r,
        Err(e) => return Status::internal(e.to_string()).into_http(),
    };
    let reply = core.model_infer(tonic::Request::from_parts(metadata, parts.extensions, request)).await;
    let (metadata, reply, extensions) = match reply {
        Ok(r) => r.into_parts(),
        Err(status) => return status.into_http(),
    };
    let len = reply.encoded_len();
    if len > max {
        return Status::out_of_range(format!(
            "Error, encoded message length too large: found {len} bytes, the limit is: {max} bytes"
        ))
        .into_http();
    }
    let mut data = BytesMut::with_capacity(PREFIX + len);
    data.put_u8(0);
    data.put_u32(len as u32);
    // Cannot fail: the buffer holds `len` bytes more, what `encoded_len` said the message takes.
    if let Err(e) = reply.encode(&mut data) {
        return Status::internal(format!("encoding the reply: {e}")).into_http();
    }
    let mut response = http::Response::new(tonic::body::Body::new(UnaryBody {
        data: Some(data.freeze()),
        trailers: Some(ok_trailers()),
    }));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    *response.extensions_mut() = extensions;
    response
}

/// Reads the body's one message (without its prefix) and the request's trailers, if any.
async fn read_message<B>(body: B, max: usize) -> Result<(Bytes, Option<http::HeaderMap>), Status>
where
    B: Body + Send + 'static,
    B::Data: Buf,
    B::Error: Into<StdError> + Send + 'static,
{
    let mut body = std::pin::pin!(body);
    // The first chunk as received (usually the whole message); later ones appended to a copy.
    let mut received = Received::Nothing;
    let mut need: Option<usize> = None;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            // A client that cancels its call: tonic reads that as the end of the body.
            Err(e) => match Status::from_error(e.into()) {
                s if s.code() == Code::Cancelled => break,
                s => return Err(s),
            },
        };
        let data = match frame.into_data() {
            Ok(mut d) => d.copy_to_bytes(d.remaining()),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        received.push(data);
        if need.is_none() && received.len() >= PREFIX {
            need = Some(PREFIX + prefix_length(received.first(PREFIX), max)?);
        }
        // The rest of the body (past the one message a unary call reads) is read and dropped
        // unkept, as tonic does, so the stream ends cleanly.
        if let Some(n) = need {
            received.keep_at_most(n);
        }
    }
    match need {
        None if received.len() == 0 => Err(Status::internal("Missing request message.")),
        Some(n) if received.len() >= n => {
            let mut message = received.into_bytes();
            message.advance(PREFIX);
            message.truncate(n - PREFIX);
            Ok((message, trailers))
        }
        _ => Err(Status::internal("Unexpected EOF decoding stream.")),
    }
}

/// The message length from a prefix, checked as tonic's decoder checks it.
fn prefix_length(prefix: &[u8], max: usize) -> Result<usize, Status> {
    match prefix[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ));
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
            )));
        }
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    Ok(len)
}

/// The body's bytes so far: none, one chunk kept as received, or several copied together.
enum Received {
    Nothing,
    One(Bytes),
    Many(BytesMut),
}

impl Received {
    fn len(&self) -> usize {
        match self {
            Received::Nothing => 0,
            Received::One(b) => b.len(),
            Received::Many(b) => b.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        *self = match std::mem::replace(self, Received::Nothing) {
            Received::Nothing => Received::One(data),
            Received::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + data.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                Received::Many(joined)
            }
            Received::Many(mut joined) => {
                joined.extend_from_slice(&data);
                Received::Many(joined)
            }
        };
    }

    /// The first `n` bytes (`n` ≤ `len`).
    fn first(&self, n: usize) -> &[u8] {
        match self {
            Received::Nothing => &[],
            Received::One(b) => &b[..n],
            Received::Many(b) => &b[..n],
        }
    }

    /// Drops what lies past the first `n` bytes.
    fn keep_at_most(&mut self, n: usize) {
        match self {
            Received::Nothing => {}
            Received::One(b) => b.truncate(n),
            Received::Many(b) => b.truncate(n),
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Received::Nothing => Bytes::new(),
            Received::One(b) => b,
            Received::Many(b) => b.freeze(),
        }
    }
}

/// The trailers of a successful call.
fn ok_trailers() -> http::HeaderMap {
    let mut t = http::HeaderMap::with_capacity(1);
    t.insert("grpc-status", http::HeaderValue::from_static("0"));
    t
}

/// A unary reply's body: one DATA frame, then the trailers.
struct UnaryBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Body for UnaryBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(hyper::body::Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Frames = futures::stream::Iter<std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, Status>>>;

    fn frames(chunks: Vec<&'static [u8]>) -> http_body_util::StreamBody<Frames> {
        let v: Vec<_> = chunks.into_iter().map(|c| Ok(hyper::body::Frame::data(Bytes::from_static(c)))).collect();
        http_body_util::StreamBody::new(futures::stream::iter(v))
    }

    fn read(chunks: Vec<&'static [u8]>, max: usize) -> Result<Bytes, Status> {
        let rt = tokio::runtime::Builder::new_current_thread().build().map_err(|e| Status::internal(e.to_string()))?;
        rt.block_on(read_message(frames(chunks), max)).map(|(m, _)| m)
    }

    #[test]
    fn a_message_is_read_from_one_chunk_or_many() {
        let whole: &'static [u8] = &[0, 0, 0, 0, 3, 7, 8, 9];
        assert_eq!(read(vec![whole], 10).unwrap().as_ref(), &[7, 8, 9]);
        assert_eq!(read(vec![&[0, 0], &[0, 0, 3, 7], &[8], &[9]], 10).unwrap().as_ref(), &[7, 8, 9]);
        // Bytes past the one message are dropped.
        assert_eq!(read(vec![&[0, 0, 0, 0, 1, 5, 0, 0, 0, 0, 1, 6]], 10).unwrap().as_ref(), &[5]);
        assert_eq!(read(vec![&[0, 0, 0, 0, 0]], 10).unwrap().as_ref(), &[] as &[u8]);
    }

    #[test]
    fn bad_bodies_get_tonic_s_statuses() {
        let e = read(vec![], 10).unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::Internal, "Missing request message."));
        let e = read(vec![&[0, 0, 0, 0, 4, 1, 2]], 10).unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::Internal, "Unexpected EOF decoding stream."));
        let e = read(vec![&[0, 0, 0]], 10).unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::Internal, "Unexpected EOF decoding stream."));
        let e = read(vec![&[1, 0, 0, 0, 1, 9]], 10).unwrap_err();
        assert_eq!(e.code(), Code::Internal);
        assert!(e.message().contains("compressed-flag but no grpc-encoding"), "{}", e.message());
        let e = read(vec![&[0, 0, 0, 0, 11]], 10).unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange);
        assert_eq!(e.message(), "Error, decoded message length too large: found 11 bytes, the limit is: 10 bytes");
    }
}
