//! Prometheus metrics (`GET /metrics`) and a capacity summary for schedulers (`GET /capacity`, JSON)
//! on `--metrics-addr`. Values are read from the schedulers' counters at scrape time and encoded by
//! the `prometheus` crate; Triton's metric semantics under the `neuron_worker_` prefix.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::core::Collector;
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, TextEncoder};
use tokio_util::sync::CancellationToken;

use crate::repository::Repository;

const PREFIX: &str = "neuron_worker_";

fn counter(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(format!("{PREFIX}{name}"), help), labels)
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    IntGaugeVec::new(Opts::new(format!("{PREFIX}{name}"), help), labels)
}

/// Renders every metric in the Prometheus text format.
pub fn render(repo: &Repository) -> Result<String, prometheus::Error> {
    let mv = &["model", "version"];
    let success = counter("inference_request_success", "Successful inference requests", mv)?;
    let failure =
        counter("inference_request_failure", "Failed inference requests by reason", &["model", "version", "reason"])?;
    let count = counter("inference_count", "Inferences performed (rows; a batch of N counts N)", mv)?;
    let exec = counter("inference_exec_count", "Model executions (batches)", mv)?;
    let pending = gauge("inference_pending_request_count", "Requests queued, waiting for an instance", mv)?;
    let queue_us = counter("inference_queue_duration_us", "Cumulative time requests spent queued, us", mv)?;
    let input_us = counter("inference_compute_input_duration_us", "Cumulative input assembly time, us", mv)?;
    let infer_us = counter("inference_compute_infer_duration_us", "Cumulative backend execution time, us", mv)?;
    let output_us = counter("inference_compute_output_duration_us", "Cumulative output split time, us", mv)?;
    let batch = counter(
        "batch_executions",
        "Executions by executed batch size (rows, before padding)",
        &["model", "version", "batch_size"],
    )?;
    let inst_exec = counter("instance_executions", "Executions per instance", &["model", "version", "instance"])?;
    let inst_err = counter("instance_errors", "Failed executions per instance", &["model", "version", "instance"])?;
    let inst_up =
        gauge("instance_in_service", "1 while the instance is in service", &["model", "version", "instance"])?;
    let nrt = counter(
        "nrt_status",
        "Neuron runtime statuses returned by failed executions",
        &["model", "version", "status"],
    )?;
    let state = gauge("model_ready", "1 when the model version is loaded and ready", mv)?;
    let in_service = gauge("instances_in_service", "Instances in service (capacity)", mv)?;
    let depth = gauge("queue_depth", "Requests queued (capacity)", mv)?;
    let max_queue = gauge("queue_capacity", "Queue bound (max_queue_size)", mv)?;
    let wait = GaugeVec::new(
        Opts::new(format!("{PREFIX}estimated_queue_wait_us"), "Estimated queue wait for a new request, us"),
        mv,
    )?;
    let sess_live = gauge("sessions_live", "Live sequences holding a batch slot", mv)?;
    let sess_capacity = gauge("sessions_capacity", "Batch slots for live sequences (slots x instances)", mv)?;
    let sess_stored = gauge("sessions_spilled_current", "Sessions in the session store now", mv)?;
    let sess_spilled = counter("sessions_spilled", "Sessions spilled to the session store (incl. at drain)", mv)?;
    let sess_restored = counter("sessions_restored", "Sessions restored from the session store", mv)?;
    let sess_expired = counter("sessions_expired", "Sequences freed after max_sequence_idle_microseconds", mv)?;
    let sess_ended = counter("sessions_ended", "Sequences ended by their END request", mv)?;
    let sess_corrupt = counter("sessions_corrupt", "Session store entries found corrupt or foreign and skipped", mv)?;
    for (name, entry) in repo.entries() {
        if entry.versions.is_empty() {
            state.with_label_values(&[name.as_str(), ""]).set(0);
        }
        for (v, m) in &entry.versions {
            let v = v.to_string();
            let l = [name.as_str(), v.as_str()];
            let s = m.batching.stats();
            success.with_label_values(&l).inc_by(s.success.get().0);
            for (reason, n) in s.failures() {
                failure.with_label_values(&[l[0], l[1], reason.as_str()]).inc_by(n);
            }
            count.with_label_values(&l).inc_by(s.inference_count.load(Relaxed));
            exec.with_label_values(&l).inc_by(s.execution_count.load(Relaxed));
            pending.with_label_values(&l).set(m.batching.queue_depth() as i64);
            queue_us.with_label_values(&l).inc_by(s.queue.get().1 / 1000);
            input_us.with_label_values(&l).inc_by(s.compute_input.get().1 / 1000);
            infer_us.with_label_values(&l).inc_by(s.compute_infer.get().1 / 1000);
            output_us.with_label_values(&l).inc_by(s.compute_output.get().1 / 1000);
            for (size, b) in s.batch_stats() {
                batch.with_label_values(&[l[0], l[1], &size.to_string()]).inc_by(b.count);
            }
            for (i, st) in s.instances.iter().enumerate() {
                let il = [l[0], l[1], &i.to_string()];
                inst_exec.with_label_values(&il).inc_by(st.executions.load(Relaxed));
                inst_err.with_label_values(&il).inc_by(st.errors.load(Relaxed));
                inst_up.with_label_values(&il).set(st.in_service.load(Relaxed) as i64);
            }
            for (code, n) in s.nrt_statuses() {
                let label = neuron_sys::status_name(code).map(str::to_string).unwrap_or_else(|| code.to_string());
                nrt.with_label_values(&[l[0], l[1], &label]).inc_by(n);
            }
            state.with_label_values(&l).set(i64::from(m.batching.is_ready()));
            in_service.with_label_values(&l).set(m.batching.instances_in_service() as i64);
            depth.with_label_values(&l).set(m.batching.queue_depth() as i64);
            max_queue.with_label_values(&l).set(m.spec.dynamic.max_queue_size as i64);
            wait.with_label_values(&l).set(m.batching.estimated_queue_wait().as_micros() as f64);
            if let (Some(c), Some(capacity)) = (m.batching.session_counters(), m.batching.session_capacity()) {
                sess_live.with_label_values(&l).set(c.live.load(Relaxed) as i64);
                sess_capacity.with_label_values(&l).set(capacity as i64);
                sess_stored.with_label_values(&l).set(c.spilled_now.load(Relaxed) as i64);
                sess_spilled.with_label_values(&l).inc_by(c.spilled.load(Relaxed));
                sess_restored.with_label_values(&l).inc_by(c.restored.load(Relaxed));
                sess_expired.with_label_values(&l).inc_by(c.expired.load(Relaxed));
                sess_ended.with_label_values(&l).inc_by(c.ended.load(Relaxed));
                sess_corrupt.with_label_values(&l).inc_by(c.corrupt.load(Relaxed));
            }
        }
    }
    let mut families = Vec::new();
    let collectors: [&dyn Collector; 27] = [
        &success,
        &failure,
        &count,
        &exec,
        &pending,
        &queue_us,
        &input_us,
        &infer_us,
        &output_us,
        &batch,
        &inst_exec,
        &inst_err,
        &inst_up,
        &nrt,
        &state,
        &in_service,
        &depth,
        &max_queue,
        &wait,
        &sess_live,
        &sess_capacity,
        &sess_stored,
        &sess_spilled,
        &sess_restored,
        &sess_expired,
        &sess_ended,
        &sess_corrupt,
    ];
    for c in collectors {
        families.extend(c.collect().into_iter().filter(|f| !f.get_metric().is_empty()));
    }
    families.extend(super::http::metrics::families());
    let mut buf = Vec::new();
    TextEncoder::new().encode(&families, &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// The capacity summary: per model version, readiness, instances in service, queue depth and bound,
/// and the estimated queue wait.
pub fn capacity(repo: &Repository) -> serde_json::Value {
    let mut models = Vec::new();
    for (name, entry) in repo.entries() {
        for (v, m) in &entry.versions {
            models.push(serde_json::json!({
                "model": name,
                "version": v.to_string(),
                "ready": m.batching.is_ready(),
                "backend": m.backend,
                "instances_in_service": m.batching.instances_in_service(),
                "queue_depth": m.batching.queue_depth(),
                "queue_capacity": m.spec.dynamic.max_queue_size,
                "max_batch_size": m.spec.max_batch_size,
                "estimated_queue_wait_us": m.batching.estimated_queue_wait().as_micros() as u64,
            }));
        }
        if entry.versions.is_empty() {
            models
                .push(serde_json::json!({"model": name, "ready": false, "state": entry.state, "reason": entry.reason}));
        }
    }
    serde_json::json!({ "models": models })
}

fn respond(repo: &Repository, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let build = |code: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    match req.uri().path() {
        "/metrics" => match render(repo) {
            Ok(text) => build(StatusCode::OK, "text/plain; version=0.0.4", text),
            Err(e) => build(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("cannot render metrics: {e}\n")),
        },
        "/capacity" => build(StatusCode::OK, "application/json", capacity(repo).to_string()),
        _ => build(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics or /capacity\n".into()),
    }
}

/// Serves `/metrics` and `/capacity` on `listener` until `stop` is cancelled.
pub async fn serve_metrics(listener: tokio::net::TcpListener, repo: Arc<Repository>, stop: CancellationToken) {
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
        let repo = repo.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(&repo, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
        });
    }
}
