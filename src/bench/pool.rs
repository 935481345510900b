//! A few gRPC connections to the worker, handed out round-robin, that add the bearer token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::error::{BenchError, with_causes};
use crate::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;

/// The largest message the load generator accepts (outputs of big batches).
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// Connections to one worker, shared by every load task.
#[derive(Debug)]
pub struct Pool {
    url: String,
    clients: Vec<GrpcInferenceServiceClient<Channel>>,
    next: AtomicUsize,
    auth: Option<MetadataValue<Ascii>>,
}

impl Pool {
    /// Opens `connections` HTTP/2 connections to `url` (`HOST:PORT`, or a full `http://` URI); each
    /// request gets `timeout` as its deadline.
    pub async fn connect(
        url: &str,
        connections: usize,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Pool, BenchError> {
        let uri = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| BenchError::Arg { flag: "--url", reason: format!("'{url}' is not HOST:PORT ({e})") })?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout);
        let mut clients = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            let channel = endpoint
                .connect()
                .await
                .map_err(|e| BenchError::Connect { url: url.to_string(), reason: with_causes(&e) })?;
            clients.push(
                GrpcInferenceServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            );
        }
        let auth = match token.filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| BenchError::Arg { flag: "--auth-token", reason: "must be printable ASCII".into() })?,
            ),
        };
        Ok(Pool { url: url.to_string(), clients, next: AtomicUsize::new(0), auth })
    }

    /// The worker address as the user gave it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next connection in turn.
    pub fn client(&self) -> GrpcInferenceServiceClient<Channel> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    /// Wraps `msg` in a request carrying the bearer token, if any.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(auth) = &self.auth {
            req.metadata_mut().insert("authorization", auth.clone());
        }
        req
    }
}
