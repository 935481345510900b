//! `ModelStreamInfer` under clients that do not behave: one that never reads its responses is
//! held back (the worker stops reading its requests past a bound, and answers all of them once
//! it reads), and bad messages — undecodable, oversized, or whose response is too large — get an
//! in-band error for themselves only while the stream stays open.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use common::bert_fixture::{generate, write_checkpoint};
use common::*;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::proto::inference::{ModelInferRequest, ModelStatisticsRequest, ModelStreamInferResponse};
use neuron_worker::repository::ModelControlMode;
use neuron_worker::server::{STREAM_MAX_IN_FLIGHT, STREAM_UNSENT_RESPONSES};
use prost::Message;
use safetensors::Dtype;
use tokio_stream::StreamExt;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::transport::Endpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_reads_is_held_back_and_then_fully_answered() {
    let w = start().await;
    // A client with a small receive window, so what the worker holds is what the bound allows.
    let channel = Endpoint::from_shared(format!("http://{}", w.server.grpc_addr))
        .expect("endpoint")
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .expect("connect");
    let mut c = GrpcInferenceServiceClient::new(channel);
    const N: usize = 300;
    let pulled = Arc::new(AtomicUsize::new(0));
    let p = pulled.clone();
    let requests = tokio_stream::iter(0..N).map(move |i| {
        p.fetch_add(1, Ordering::SeqCst);
        let mut r = fp32_request("mlp", "INPUT0", vec![8, 256], &vec![0.25; 8 * 256]);
        r.id = i.to_string();
        r
    });
    let mut responses = c.model_stream_infer(requests).await.expect("stream opens").into_inner();
    let stats = w.repo.get("mlp", "").expect("mlp").batching.stats().clone();
    // The client reads nothing: wait until the worker stops executing (or has run everything).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (usize::MAX, Instant::now());
    loop {
        let done = stats.success.get().0 as usize;
        if done >= N || (done == last && since.elapsed() > Duration::from_secs(1)) {
            break;
        }
        if done != last {
            (last, since) = (done, Instant::now());
        }
        assert!(Instant::now() < deadline, "the worker neither finished nor stopped ({done} executed)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let executed = stats.success.get().0 as usize;
    // In flight + handed over + what the transport's buffers hold (64 KiB window, 400 KiB send buffer).
    let bound = STREAM_MAX_IN_FLIGHT + STREAM_UNSENT_RESPONSES + 64 + 64;
    assert!(executed <= bound, "{executed} requests executed for a client that reads nothing (bound {bound})");
    assert!(pulled.load(Ordering::SeqCst) < N, "the worker kept reading requests");
    // Once the client reads, every request is answered.
    let mut ok = 0;
    while let Some(r) = responses.next().await {
        let r = r.expect("stream message");
        assert!(r.error_message.is_empty(), "{}", r.error_message);
        ok += 1;
        if ok == N {
            break;
        }
    }
    assert_eq!(ok, N);
}

// ---- bad messages, sent as raw frames ----

/// Sends raw message bytes, decodes responses.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ModelStreamInferResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<ModelStreamInferResponse>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        Default::default()
    }
}

fn bert_request(id: &str, rows: usize, seq: usize) -> Bytes {
    let ids: Vec<u8> = (0..rows * seq).flat_map(|i| (2 + (i % 90) as i64).to_le_bytes()).collect();
    let mask: Vec<u8> = (0..rows * seq).flat_map(|_| 1i64.to_le_bytes()).collect();
    let t = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT64".into(),
        shape: vec![rows as i64, seq as i64],
        ..Default::default()
    };
    let r = ModelInferRequest {
        model_name: "bert".into(),
        id: id.into(),
        inputs: vec![t("input_ids"), t("attention_mask")],
        raw_input_contents: vec![ids.into(), mask.into()],
        ..Default::default()
    };
    r.encode_to_vec().into()
}

#[tokio::test]
async fn bad_messages_get_in_band_errors_and_the_stream_stays_open() {
    let repo = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(repo.path().join("bert/1")).expect("mkdir");
    write_checkpoint(&repo.path().join("bert/1"), &generate(5), Dtype::F32, "", true);
    let mut opts = options();
    opts.max_message_size = 32 << 10;
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, opts).await;
    let channel =
        Endpoint::from_shared(format!("http://{}", w.server.grpc_addr)).expect("e").connect().await.expect("c");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/inference.GRPCInferenceService/ModelStreamInfer");
    let call = grpc.streaming(tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)), path, RawCodec);
    tx.send(bert_request("a", 1, 8)).await.expect("send");
    let mut responses = call.await.expect("stream opens").into_inner();
    let first = responses.next().await.expect("a response").expect("ok");
    assert!(first.error_message.is_empty(), "{}", first.error_message);
    assert_eq!(first.infer_response.expect("response").id, "a");
    // Not protobuf: a length-delimited field 1 whose length runs past the message.
    tx.send(Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01])).await.expect("send");
    let r = responses.next().await.expect("an in-band answer to the undecodable message").expect("ok");
    assert!(r.error_message.contains("is not a ModelInferRequest"), "{}", r.error_message);
    // Over the 32 KiB limit.
    tx.send(Bytes::from(vec![0u8; 40 << 10])).await.expect("send");
    let r = responses.next().await.expect("an in-band answer to the oversized message").expect("ok");
    assert!(r.error_message.contains("exceeds the limit of 32768 bytes"), "{}", r.error_message);
    // A request whose response (32 × 16 × 32 floats) is over the limit.
    tx.send(bert_request("big", 32, 16)).await.expect("send");
    let r = responses.next().await.expect("an in-band answer to the request with a large response").expect("ok");
    assert!(r.error_message.contains("--max-message-size"), "{}", r.error_message);
    assert_eq!(r.infer_response.expect("response").id, "big");
    // The stream is still open and serving.
    tx.send(bert_request("e", 2, 4)).await.expect("send");
    let r = responses.next().await.expect("a response after the bad ones").expect("ok");
    assert!(r.error_message.is_empty(), "{}", r.error_message);
    assert_eq!(r.infer_response.expect("response").id, "e");
    drop(tx);
    assert!(responses.next().await.is_none(), "the stream ends cleanly when the client closes it");
    // The refused response is a failure, not a success.
    let mut c = w.client().await;
    let st = c
        .model_statistics(ModelStatisticsRequest { name: "bert".into(), version: String::new() })
        .await
        .expect("stats")
        .into_inner();
    let s = st.model_stats[0].inference_stats.expect("inference stats");
    assert_eq!(s.success.expect("success").count, 2);
    assert_eq!(s.fail.expect("fail").count, 1);
}
