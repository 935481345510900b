//! `ModelInfer` over gRPC as tonic's own unary handler answers it, now that the worker reads and
//! writes that RPC itself: compressed requests, size limits, bodies split over many frames, bad
//! bodies (raw HTTP/2, status codes and messages), response headers and trailers, and the
//! bearer token.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use http_body_util::BodyExt;
use hyper::body::Frame;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::*;
use neuron_worker::repository::ModelControlMode;
use prost::Message;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// One gRPC message: its prefix (compressed-flag, big-endian length) and `body`.
fn framed(flag: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(flag);
    b.put_u32(body.len() as u32);
    b.extend_from_slice(body);
    b.freeze()
}

/// What a raw HTTP/2 `ModelInfer` call got back.
struct RawAnswer {
    headers: hyper::HeaderMap,
    body: Bytes,
    /// The status in the trailers, or in the headers of a trailers-only answer.
    status: tonic::Status,
}

/// Sends `chunks` as the DATA frames of one `ModelInfer` call, with `extra` request headers.
async fn raw_call(addr: std::net::SocketAddr, chunks: Vec<Bytes>, extra: &[(&'static str, &'static str)]) -> RawAnswer {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
        chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
    let mut req = hyper::Request::post(format!("http://{addr}/inference.GRPCInferenceService/ModelInfer"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = send.send_request(req.body(body).expect("request")).await.expect("response");
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_else(|| headers.clone());
    let status = tonic::Status::from_header_map(&trailers).expect("a grpc-status");
    RawAnswer { headers, body: collected.to_bytes(), status }
}

fn linear_request(rows: usize) -> (ModelInferRequest, Vec<f32>) {
    let x = tagged_rows(7, rows);
    let mut r = fp32_request("linear", "INPUT0", vec![rows as i64, 64], &x);
    r.id = format!("rows-{rows}");
    (r, x)
}

fn assert_linear(resp: &ModelInferResponse, x: &[f32]) {
    assert_linear_output(&resp.raw_output_contents[0], x);
}

#[tokio::test]
async fn compressed_and_plain_requests_get_the_same_answer() {
    let w = start().await;
    let channel =
        Channel::from_shared(format!("http://{}", w.server.grpc_addr)).expect("url").connect().await.expect("c");
    let (req, x) = linear_request(3);
    let plain = GrpcInferenceServiceClient::new(channel.clone()).model_infer(req.clone()).await.expect("plain");
    assert_linear(plain.get_ref(), &x);
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut c = GrpcInferenceServiceClient::new(channel.clone()).send_compressed(encoding);
        let compressed = c.model_infer(req.clone()).await.expect("compressed request");
        assert_eq!(compressed.get_ref(), plain.get_ref(), "{encoding:?}");
    }
    // An encoding the worker does not accept is refused with the list of those it does.
    let r = raw_call(w.server.grpc_addr, vec![framed(1, b"\x00")], &[("grpc-encoding", "br")]).await;
    assert_eq!(r.status.code(), Code::Unimplemented, "{}", r.status.message());
    assert!(r.status.message().contains("br"), "{}", r.status.message());
}

#[tokio::test]
async fn size_limits_are_those_of_the_generated_server() {
    let mut opts = options();
    opts.max_message_size = 8 << 10;
    let w = start_with(None, ModelControlMode::None, opts).await;
    let channel =
        Channel::from_shared(format!("http://{}", w.server.grpc_addr)).expect("url").connect().await.expect("c");
    let (big, _) = linear_request(64); // 64 × 64 floats: 16 KiB
    let len = big.encoded_len();
    let want = format!("Error, decoded message length too large: found {len} bytes, the limit is: 8192 bytes");
    let e = GrpcInferenceServiceClient::new(channel.clone())
        .max_encoding_message_size(1 << 20)
        .model_infer(big.clone())
        .await
        .expect_err("over the limit");
    assert_eq!((e.code(), e.message()), (Code::OutOfRange, want.as_str()));
    // The same request compressed goes through the generated server's decoder: it is refused
    // once decompressed, over the same limit.
    let e = GrpcInferenceServiceClient::new(channel.clone())
        .send_compressed(CompressionEncoding::Gzip)
        .model_infer(big)
        .await
        .expect_err("over the limit, compressed");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("size limit, of 8192 bytes, exceeded while decompressing"), "{}", e.message());
    // Just under the limit is served.
    let (ok, x) = linear_request(24);
    assert!(ok.encoded_len() < 8 << 10);
    let resp = GrpcInferenceServiceClient::new(channel).model_infer(ok).await.expect("under the limit");
    assert_linear(resp.get_ref(), &x);
}

#[tokio::test]
async fn a_message_split_over_many_frames_is_read_whole() {
    let w = start().await;
    let (req, x) = linear_request(64);
    let whole = framed(0, &req.encode_to_vec());
    let chunks: Vec<Bytes> = whole.chunks(499).map(Bytes::copy_from_slice).collect();
    assert!(chunks.len() > 20);
    let r = raw_call(w.server.grpc_addr, chunks, &[]).await;
    assert_eq!(r.status.code(), Code::Ok, "{}", r.status.message());
    assert_eq!(r.headers.get("content-type").map(|v| v.as_bytes()), Some(&b"application/grpc"[..]));
    assert_eq!(r.headers.get("x-worker-id").map(|v| v.as_bytes()), Some(&b"test-worker"[..]));
    assert_eq!(r.body[0], 0, "not compressed");
    let len = u32::from_be_bytes([r.body[1], r.body[2], r.body[3], r.body[4]]) as usize;
    assert_eq!(r.body.len(), 5 + len, "exactly one message");
    let resp = ModelInferResponse::decode(&r.body[5..]).expect("a ModelInferResponse");
    assert_eq!(resp.id, "rows-64");
    assert_linear(&resp, &x);
}

#[tokio::test]
async fn bad_bodies_get_tonic_s_statuses() {
    let w = start().await;
    let addr = w.server.grpc_addr;
    let (req, _) = linear_request(1);
    let body = req.encode_to_vec();
    let cases: Vec<(Vec<Bytes>, Code, &str)> = vec![
        (vec![], Code::Internal, "Missing request message."),
        (vec![Bytes::from_static(&[0, 0, 0])], Code::Internal, "Unexpected EOF decoding stream."),
        (vec![framed(0, &body).slice(..body.len())], Code::Internal, "Unexpected EOF decoding stream."),
        (
            vec![framed(1, &body)],
            Code::Internal,
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ),
        (vec![framed(0, &[0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01])], Code::Internal, "failed to decode Protobuf message"),
    ];
    for (chunks, status, message) in cases {
        let r = raw_call(addr, chunks, &[]).await;
        assert_eq!(r.status.code(), status, "{message}: {}", r.status.message());
        assert!(r.status.message().contains(message), "want {message:?}, got {:?}", r.status.message());
        assert!(r.body.is_empty(), "an error answer has no message");
    }
    // The worker still serves after all of them.
    let (req, x) = linear_request(2);
    let resp = w.client().await.model_infer(req).await.expect("served");
    assert_linear(resp.get_ref(), &x);
}

#[tokio::test]
async fn model_infer_needs_the_bearer_token() {
    let mut opts = options();
    opts.auth_token = Some("s3cret".into());
    let w = start_with(None, ModelControlMode::None, opts).await;
    let channel =
        Channel::from_shared(format!("http://{}", w.server.grpc_addr)).expect("url").connect().await.expect("c");
    let (req, x) = linear_request(1);
    let e = GrpcInferenceServiceClient::new(channel.clone()).model_infer(req.clone()).await.expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("authorization: Bearer"), "{}", e.message());
    let right: MetadataValue<_> = "Bearer s3cret".parse().expect("header");
    let mut good = GrpcInferenceServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", right.clone());
        Ok(r)
    });
    let resp = good.model_infer(req).await.expect("with the token");
    assert_linear(resp.get_ref(), &x);
}
