//! Connection bounds of both fronts (reliability defect: silent or preface-only connections were
//! never closed, and enough of them starved fresh clients of file descriptors): a connection idle
//! past `--connection-idle-timeout` is closed, a connection beyond `--max-connections` is closed on
//! arrival while the ones already open keep working, and both show in the metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::repository::ModelControlMode;
use neuron_worker::server::connections::ConnectionLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn worker(max_connections: usize, idle: Duration) -> TestWorker {
    let mut opts = options();
    opts.connections = ConnectionLimits { max_connections, idle_timeout: Some(idle) };
    start_with(None, ModelControlMode::None, opts).await
}

/// Reads until the server closes `s` (EOF or reset); how long that took, or `None` within `bound`.
async fn closed_within(s: &mut TcpStream, bound: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = bound.checked_sub(t0.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
            Ok(Ok(_)) => {} // the server's HTTP/2 settings or pings
        }
    }
}

async fn metric(w: &TestWorker, name: &str, front: &str) -> u64 {
    let addr = w.server.metrics_addr.expect("metrics").to_string();
    let text = http_get(&addr, "/metrics").await;
    let key = format!("{name}{{front=\"{front}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// One test (the metrics are process-wide, so the two parts must not run side by side).
#[tokio::test]
async fn idle_and_excess_connections_are_closed() {
    connections_beyond_the_limit_are_refused_and_the_others_keep_working().await;
    silent_and_preface_only_connections_are_closed_when_idle().await;
}

async fn silent_and_preface_only_connections_are_closed_when_idle() {
    let w = worker(64, Duration::from_millis(800)).await;
    let grpc: SocketAddr = w.server.grpc_addr;
    let grpc_before = metric(&w, "neuron_worker_connections_idle_closed_total", "grpc").await;
    let http_before = metric(&w, "neuron_worker_connections_idle_closed_total", "http").await;
    let mut silent_grpc = TcpStream::connect(grpc).await.unwrap();
    let mut preface = TcpStream::connect(grpc).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let mut silent_http = TcpStream::connect(w.http()).await.unwrap();
    for (what, s) in
        [("silent gRPC", &mut silent_grpc), ("preface only", &mut preface), ("silent HTTP", &mut silent_http)]
    {
        let took = closed_within(s, Duration::from_secs(10)).await;
        assert!(took.is_some(), "{what}: the connection is still open 10 s after an 800 ms idle timeout");
    }
    assert!(metric(&w, "neuron_worker_connections_idle_closed_total", "grpc").await >= grpc_before + 2);
    assert!(metric(&w, "neuron_worker_connections_idle_closed_total", "http").await > http_before);
    // A real client still gets answers (a new connection, and requests on it are traffic).
    let mut c = w.client().await;
    let ready = c.server_ready(neuron_worker::proto::inference::ServerReadyRequest {}).await.unwrap();
    assert!(ready.into_inner().ready);
}

async fn connections_beyond_the_limit_are_refused_and_the_others_keep_working() {
    let w = worker(3, Duration::from_secs(60)).await;
    for (front, addr) in [("http", w.http()), ("grpc", w.server.grpc_addr)] {
        let refused = metric(&w, "neuron_worker_connections_refused_total", front).await;
        let open = metric(&w, "neuron_worker_connections_open", front).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The fourth is closed on arrival, long before the idle timeout.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let took = closed_within(&mut extra, Duration::from_secs(10)).await;
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(10)),
            "{front}: the connection over the limit stayed open"
        );
        assert_eq!(metric(&w, "neuron_worker_connections_refused_total", front).await, refused + 1, "{front}");
        assert_eq!(metric(&w, "neuron_worker_connections_open", front).await, open + 3, "{front}");
        // Closing one frees its slot: a fresh client is served (bounded retries while the server
        // notices the close).
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let served = match front {
                "http" => {
                    let probe = async {
                        let mut s = TcpStream::connect(addr).await.ok()?;
                        s.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                            .await
                            .ok()?;
                        let mut out = String::new();
                        s.read_to_string(&mut out).await.ok()?;
                        Some(out.starts_with("HTTP/1.1 200"))
                    };
                    tokio::time::timeout(Duration::from_secs(2), probe).await.ok().flatten() == Some(true)
                }
                _ => {
                    let probe = async {
                        let url = format!("http://{addr}");
                        let mut c = GrpcInferenceServiceClient::connect(url).await.ok()?;
                        c.server_live(neuron_worker::proto::inference::ServerLiveRequest {}).await.ok()
                    };
                    tokio::time::timeout(Duration::from_secs(2), probe).await.ok().flatten().is_some()
                }
            };
            if served {
                break;
            }
            assert!(Instant::now() < deadline, "{front}: no fresh client was served after a slot freed");
            tokio::task::yield_now().await;
        }
        drop(held);
    }
}
