//! Shared helpers for integration tests: an in-process worker on 127.0.0.1 and a tonic client.

#![allow(dead_code)]

pub mod backends;
pub mod bert_fixture;
pub mod fleet;
pub mod gen_sessions;
pub mod generative;
pub mod http;
pub mod redis;
pub mod sequences;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::proto::inference::{InferParameter, ModelInferRequest, infer_parameter::ParameterChoice};
use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use neuron_worker::server::{RunningServer, ServeOptions};
use tonic::transport::Channel;

/// A worker running in this test process.
pub struct TestWorker {
    pub server: RunningServer,
    pub repo: Arc<Repository>,
}

/// Default options on ephemeral loopback ports.
pub fn options() -> ServeOptions {
    ServeOptions {
        http_addr: Some("127.0.0.1:0".parse().expect("static address")),
        metrics_addr: Some("127.0.0.1:0".parse().expect("static address")),
        exit_timeout: Duration::from_secs(10),
        worker_id: "test-worker".into(),
        ..ServeOptions::loopback("test")
    }
}

/// Starts a worker over `root` (built-in models when `None`).
pub async fn start_with(root: Option<PathBuf>, control: ModelControlMode, opts: ServeOptions) -> TestWorker {
    let repo = Arc::new(Repository::new(root, BackendSelection::Cpu, control));
    repo.load_all().await.expect("repository loads");
    let server = neuron_worker::server::start(opts, repo.clone()).await.expect("server starts");
    TestWorker { server, repo }
}

/// Starts a worker with the built-in models.
pub async fn start() -> TestWorker {
    start_with(None, ModelControlMode::None, options()).await
}

impl TestWorker {
    pub async fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        let url = format!("http://{}", self.server.grpc_addr);
        GrpcInferenceServiceClient::connect(url).await.expect("client connects")
    }
}

/// The closed-form `linear` model: y = x·W + b.
pub fn linear_reference(x: &[f32]) -> Vec<f32> {
    let rows = x.len() / 64;
    let mut y = vec![0f32; rows * 16];
    for r in 0..rows {
        for j in 0..16 {
            let mut acc = (((j % 5) as f32) - 2.0) / 4.0;
            for i in 0..64 {
                let w = ((((7 * i + 3 * j) % 17) as f32) - 8.0) / 16.0;
                acc += x[r * 64 + i] * w;
            }
            y[r * 16 + j] = acc;
        }
    }
    y
}

/// Asserts that `raw` (little-endian f32) is `linear`'s output for the rows `x`, within 1e-4.
pub fn assert_linear_output(raw: &[u8], x: &[f32]) {
    let got = bytes_f32(raw);
    let want = linear_reference(x);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-4, "{g} vs {w}");
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A raw FP32 request for `model` with one input.
pub fn fp32_request(model: &str, input: &str, shape: Vec<i64>, data: &[f32]) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor { name: input.into(), datatype: "FP32".into(), shape, ..Default::default() }],
        raw_input_contents: vec![f32_bytes(data).into()],
        ..Default::default()
    }
}

pub fn int_param(v: i64) -> InferParameter {
    InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(v)) }
}

/// Distinct rows: row r, column c = (tag * 64 + r * 7 + c) mod 13 / 8 - 0.75.
pub fn tagged_rows(tag: usize, rows: usize) -> Vec<f32> {
    (0..rows * 64).map(|i| (((tag * 64 + (i / 64) * 7 + i % 64) % 13) as f32) / 8.0 - 0.75).collect()
}

/// A `neuron-worker serve` child process, killed when dropped.
pub struct SpawnedWorker {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT` of its gRPC endpoint.
    pub grpc: String,
    /// `127.0.0.1:PORT` of its metrics endpoint.
    pub metrics: String,
    /// `127.0.0.1:PORT` of its HTTP front.
    pub http: String,
    /// A folder (e.g. its model repository) kept as long as the worker.
    pub dir: Option<tempfile::TempDir>,
}

impl Drop for SpawnedWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The stand-in libnrt built by `cargo test` (dev-dependency `nrt-standin`).
pub fn standin() -> PathBuf {
    nrt_standin::standin_library_path()
        .expect("the stand-in libnrt is built by cargo test (dev-dependency nrt-standin)")
}

/// Starts the worker binary (`serve` plus `args`, on fresh loopback ports, with `env`) and connects
/// once it is ready. A worker that exits before it is ready (a port taken between picking and
/// binding it) is started again on other ports, up to three times.
pub async fn spawn_worker(
    args: &[&std::ffi::OsStr],
    env: &[(&str, &std::ffi::OsStr)],
) -> (SpawnedWorker, GrpcInferenceServiceClient<Channel>) {
    use neuron_worker::proto::inference::ServerReadyRequest;
    use std::time::Instant;
    for _attempt in 0..3 {
        let (g, m, h) = (free_port(), free_port(), free_port());
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_neuron-worker"));
        cmd.arg("serve")
            .args(["--grpc-addr", &format!("127.0.0.1:{g}"), "--metrics-addr", &format!("127.0.0.1:{m}")])
            .args(["--http-addr", &format!("127.0.0.1:{h}")])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("worker starts");
        let grpc = format!("http://127.0.0.1:{g}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            if let Ok(mut c) = GrpcInferenceServiceClient::connect(grpc.clone()).await
                && c.server_ready(ServerReadyRequest {}).await.map(|r| r.into_inner().ready).unwrap_or(false)
            {
                let (metrics, http) = (format!("127.0.0.1:{m}"), format!("127.0.0.1:{h}"));
                return (SpawnedWorker { child, grpc, metrics, http, dir: None }, c);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("the worker did not become ready in three attempts");
}

/// The raw HTTP/1.1 response (head and body) to `GET path` on the metrics endpoint at `addr`.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The `/capacity` document of the metrics endpoint at `addr`.
pub async fn capacity(addr: &str) -> serde_json::Value {
    let out = http_get(addr, "/capacity").await;
    serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or_default()).expect("capacity is JSON")
}

impl TestWorker {
    /// The bound address of the HTTP front.
    pub fn http(&self) -> std::net::SocketAddr {
        self.server.http_addr.expect("the test worker serves HTTP")
    }
}

/// Starts a worker over the repository folder `root` with the session store `store`.
pub async fn start_with_store(root: &std::path::Path, store: Arc<neuron_worker::sessions::SessionStore>) -> TestWorker {
    let repo = Repository::new(Some(root.to_path_buf()), BackendSelection::Cpu, ModelControlMode::None)
        .with_session_store(Some(store));
    let repo = Arc::new(repo);
    repo.load_all().await.expect("repository loads");
    let server = neuron_worker::server::start(options(), repo.clone()).await.expect("server starts");
    TestWorker { server, repo }
}
