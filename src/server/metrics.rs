//! Prometheus metrics (`GET /metrics`) and a capacity summary for schedulers (`GET /capacity`, JSON)
//! on `--metrics-addr`. Values are read from the schedulers' counters at scrape time and encoded by
//! the `prometheus` crate; Triton's metric semantics under the `neuron_worker_` prefix.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use super::metric_families::MetricFamilies;
use crate::repository::Repository;

/// The metric families, built once per process; scrapes take turns (each resets and refills them).
static FAMILIES: OnceLock<Result<Mutex<MetricFamilies>, String>> = OnceLock::new();

/// Renders every metric in the Prometheus text format.
pub fn render(repo: &Repository) -> Result<String, prometheus::Error> {
    let families = FAMILIES.get_or_init(|| MetricFamilies::new().map(Mutex::new).map_err(|e| e.to_string()));
    let families = families.as_ref().map_err(|e| prometheus::Error::Msg(e.clone()))?;
    let families = families.lock().map_err(|_| prometheus::Error::Msg("metrics lock poisoned".into()))?;
    let mut text = families.render(repo)?;
    text.push_str(&super::metrics_generative::render(repo));
    if let Some(store) = repo.session_store() {
        text.push_str(&super::metrics_store::render(store));
    }
    Ok(text)
}

/// The capacity summary: per model version, readiness, instances in service, queue depth and bound,
/// and the estimated queue wait.
pub fn capacity(repo: &Repository, worker_id: &str) -> serde_json::Value {
    let mut models = Vec::new();
    for (name, entry) in repo.entries() {
        for (v, m) in &entry.versions {
            let mut entry = serde_json::json!({
                "model": name,
                "version": v.to_string(),
                "ready": m.batching.is_ready(),
                "backend": m.backend,
                "instances_in_service": m.batching.instances_in_service(),
                "queue_depth": m.batching.queue_depth(),
                "queue_capacity": m.spec.dynamic.max_queue_size,
                "max_batch_size": m.spec.max_batch_size,
                "estimated_queue_wait_us": m.batching.estimated_queue_wait().as_micros() as u64,
            });
            if let Some(g) = m.batching.generative() {
                entry["generative"] = super::metrics_generative::capacity(g.stats());
            }
            models.push(entry);
        }
        if entry.versions.is_empty() {
            models
                .push(serde_json::json!({"model": name, "ready": false, "state": entry.state, "reason": entry.reason}));
        }
    }
    let mut doc = serde_json::json!({ "worker_id": worker_id, "models": models });
    if let Some(leases) = repo.session_store().and_then(|s| s.leases()) {
        doc["session_leases"] = super::metrics_lease::health(leases);
    }
    if let Some(rt) = crate::backend::neuron::Runtime::current() {
        let cores: Vec<serde_json::Value> = (0..rt.visible_cores())
            .filter_map(|core| {
                let (used, limit) = rt.memory_stats(core)?;
                Some(serde_json::json!({ "core": core, "bytes_used": used, "bytes_limit": limit }))
            })
            .collect();
        doc["neuron_device_memory"] = serde_json::Value::Array(cores);
    }
    doc
}

fn respond(repo: &Repository, worker_id: &str, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let build = |code: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        if let Ok(v) = super::worker_id::header_value(worker_id) {
            r.headers_mut().insert(super::worker_id::HEADER, v);
        }
        r
    };
    match req.uri().path() {
        "/metrics" => match render(repo) {
            Ok(text) => build(StatusCode::OK, "text/plain; version=0.0.4", text),
            Err(e) => build(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("cannot render metrics: {e}\n")),
        },
        "/capacity" => build(StatusCode::OK, "application/json", capacity(repo, worker_id).to_string()),
        _ => build(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics or /capacity\n".into()),
    }
}

/// Serves `/metrics` and `/capacity` on `listener` until `stop` is cancelled.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    repo: Arc<Repository>,
    stop: CancellationToken,
    worker_id: String,
) {
    let worker_id: Arc<str> = Arc::from(worker_id);
    loop {
        let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let (repo, worker_id) = (repo.clone(), worker_id.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(&repo, &worker_id, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}
