//! The worker's identity on every response: an `x-worker-id` header (gRPC initial metadata, HTTP
//! response header) that a gateway records to pin a conversation session to the worker holding
//! it. Set with `--worker-id`; by default the host name (a Kubernetes pod's name).

use axum::http::{HeaderName, HeaderValue};
use tower_http::set_header::SetResponseHeaderLayer;

/// The response header naming the worker.
pub const HEADER: &str = "x-worker-id";

/// The default worker id: `$HOSTNAME` (set to the pod name in Kubernetes), else the kernel's host
/// name, else `neuron-worker`.
pub fn default_worker_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "neuron-worker".to_string())
}

/// The header value for `id`, or why it cannot be one.
pub fn header_value(id: &str) -> Result<HeaderValue, String> {
    if id.is_empty() || id.len() > 253 {
        return Err(format!("--worker-id must be 1 to 253 characters; got {}", id.len()));
    }
    HeaderValue::from_str(id).map_err(|_| {
        format!("--worker-id {id:?} is not a valid header value: use visible ASCII (letters, digits, '-', '.', '_')")
    })
}

/// A layer setting `x-worker-id: value` on every response.
pub fn layer(value: HeaderValue) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::overriding(HeaderName::from_static(HEADER), value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(header_value("pod-7.zone-a").is_ok());
        assert!(header_value("").is_err());
        assert!(header_value("bad\nid").unwrap_err().contains("visible ASCII"));
        assert!(!default_worker_id().is_empty());
    }
}
