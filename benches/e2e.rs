//! End-to-end benchmark: ModelInfer round trips over gRPC against an in-process worker serving the
//! built-in models. `cargo bench --bench e2e`.
//!
//! - `round_trip/{linear,mlp}`: one request at a time, batch 1 (latency of a lone request).
//! - `in_flight_16/{linear,mlp}`: 16 requests kept in flight; the time shown is per request, so
//!   1 / time is the throughput.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use neuron_worker::proto::inference::ModelInferRequest;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use neuron_worker::server::{self, RunningServer, ServeOptions};
use tonic::transport::Channel;

const IN_FLIGHT: u64 = 16;

/// Starts the worker with the built-in models on an ephemeral port.
async fn start_worker() -> Result<RunningServer, String> {
    let repo = Arc::new(Repository::new(None, BackendSelection::Cpu, ModelControlMode::None));
    repo.load_all().await.map_err(|e| e.to_string())?;
    let opts = ServeOptions::loopback("bench");
    server::start(opts, repo).await.map_err(|e| e.to_string())
}

/// A batch-1 FP32 request of `width` values for `model`.
fn request(model: &str, width: usize) -> ModelInferRequest {
    let raw: Vec<u8> = (0..width).flat_map(|i| (i as f32 / width as f32).to_le_bytes()).collect();
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "FP32".into(),
            shape: vec![1, width as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(raw)],
        ..Default::default()
    }
}

async fn infer(client: &mut GrpcInferenceServiceClient<Channel>, req: &ModelInferRequest) {
    if let Err(s) = client.model_infer(req.clone()).await {
        panic!("ModelInfer {} failed: {s}", req.model_name);
    }
}

fn benches(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let (worker, client) = match rt.block_on(async {
        let worker = start_worker().await?;
        let client = GrpcInferenceServiceClient::connect(format!("http://{}", worker.grpc_addr))
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((worker, client))
    }) {
        Ok(v) => v,
        Err(e) => panic!("starting the in-process worker: {e}"),
    };
    let models = [("linear", 64usize), ("mlp", 256usize)];

    let mut group = c.benchmark_group("round_trip");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    for (model, width) in models {
        let req = request(model, width);
        let mut client = client.clone();
        group.bench_function(model, |b| b.iter(|| rt.block_on(infer(&mut client, &req))));
    }
    group.finish();

    let mut group = c.benchmark_group("in_flight_16");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    for (model, width) in models {
        let req = Arc::new(request(model, width));
        group.bench_function(model, |b| b.iter_custom(|iters| rt.block_on(run_in_flight(&client, &req, iters))));
    }
    group.finish();

    worker.shutdown.cancel();
    let _ = rt.block_on(worker.wait());
}

/// Sends `iters` requests with 16 in flight; returns the elapsed time (criterion divides by iters).
async fn run_in_flight(
    client: &GrpcInferenceServiceClient<Channel>,
    req: &Arc<ModelInferRequest>,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|t| {
            let (mut client, req) = (client.clone(), req.clone());
            let n = iters / IN_FLIGHT + u64::from(t < iters % IN_FLIGHT);
            tokio::spawn(async move {
                for _ in 0..n {
                    infer(&mut client, &req).await;
                }
            })
        })
        .collect();
    for t in tasks {
        if let Err(e) = t.await {
            panic!("load task: {e}");
        }
    }
    start.elapsed()
}

criterion_group!(e2e, benches);
criterion_main!(e2e);
