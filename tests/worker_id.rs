//! Every response names its worker (`x-worker-id`): gRPC unary and streaming replies, errors,
//! HTTP replies and the metrics endpoint; `/capacity` lists it. A gateway pins a conversation
//! session to the worker that answered its first turn.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use neuron_worker::proto::inference::{ModelMetadataRequest, ServerLiveRequest};
use neuron_worker::repository::ModelControlMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_names_the_worker() {
    let opts = neuron_worker::server::ServeOptions { worker_id: "pod-a-7".into(), ..common::options() };
    let w = common::start_with(None, ModelControlMode::None, opts).await;
    let mut c = w.client().await;
    let live = c.server_live(ServerLiveRequest {}).await.expect("live");
    assert_eq!(live.metadata().get("x-worker-id").and_then(|v| v.to_str().ok()), Some("pod-a-7"));
    // An error reply names the worker too.
    let e = c
        .model_metadata(ModelMetadataRequest { name: "no-such-model".into(), version: String::new() })
        .await
        .expect_err("unknown model");
    assert_eq!(e.metadata().get("x-worker-id").and_then(|v| v.to_str().ok()), Some("pod-a-7"), "{e}");
    // HTTP front, and the metrics endpoint with /capacity.
    let r = common::http::get(w.http(), "/v2/health/live").await;
    assert_eq!(r.header("x-worker-id"), Some("pod-a-7"));
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let raw = common::http_get(&metrics, "/capacity").await;
    assert!(raw.to_ascii_lowercase().contains("x-worker-id: pod-a-7"), "{raw}");
    assert_eq!(common::capacity(&metrics).await["worker_id"], "pod-a-7");
}

#[tokio::test]
async fn an_id_that_cannot_be_a_header_is_refused_at_start() {
    let opts = neuron_worker::server::ServeOptions { worker_id: "bad\nid".into(), ..common::options() };
    let repo = std::sync::Arc::new(neuron_worker::repository::Repository::new(
        None,
        neuron_worker::repository::BackendSelection::Cpu,
        ModelControlMode::None,
    ));
    let e = neuron_worker::server::start(opts, repo).await.expect_err("refused");
    assert!(e.to_string().contains("--worker-id"), "{e}");
}
