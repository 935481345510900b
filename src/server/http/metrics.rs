//! HTTP request counters by route template, method and status, exported with the worker's other
//! metrics on `--metrics-addr`. Process-wide (one worker per process).

use std::sync::OnceLock;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, Opts};

fn requests() -> Option<&'static IntCounterVec> {
    static C: OnceLock<Option<IntCounterVec>> = OnceLock::new();
    C.get_or_init(|| {
        IntCounterVec::new(
            Opts::new("neuron_worker_http_requests", "HTTP requests answered, by route, method and status"),
            &["route", "method", "status"],
        )
        .ok()
    })
    .as_ref()
}

/// Counts each answered request under its route template (`/v2/models/{model}/infer`), not its path.
pub async fn count(req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_string();
    let method = req.method().to_string();
    let resp = next.run(req).await;
    if let Some(c) = requests() {
        c.with_label_values(&[route.as_str(), method.as_str(), resp.status().as_str()]).inc();
    }
    resp
}

/// The counters' metric families (empty until a request was answered).
pub fn families() -> Vec<MetricFamily> {
    requests().map(|c| c.collect().into_iter().filter(|f| !f.get_metric().is_empty()).collect()).unwrap_or_default()
}
