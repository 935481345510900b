//! The gRPC server: Triton's inference service, `grpc.health.v1`, server reflection, bearer-token
//! auth, TLS, message limits, the metrics endpoint, and graceful drain.

mod bearer;
pub mod chat_turn;
pub mod connections;
mod decode;
pub(crate) mod error;
pub mod generate;
mod generate_stream;
mod grpc_front;
pub mod http;
mod inference;
mod metric_families;
pub mod metrics;
mod metrics_generative;
mod metrics_lease;
mod metrics_store;
pub mod session_turn;
pub mod sessions;
mod sessions_page;
mod sessions_stream;
mod stats;
mod stream_infer;
mod stream_route;
mod unary_route;
pub mod worker_id;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

pub use decode::{DecodedRequest, decode_request};
pub use error::ServerError;
pub use inference::InferenceService;
pub use stream_infer::{STREAM_MAX_IN_FLIGHT, STREAM_UNSENT_RESPONSES};

use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::repository::Repository;

/// How long a client may take to answer an HTTP/2 keep-alive ping before its connection is closed.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Everything `serve` needs besides the repository.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP (KServe v2 REST, OpenAI-compatible) listen address (`None` = no HTTP front).
    pub http_addr: Option<SocketAddr>,
    /// Metrics listen address (`None` = no metrics endpoint).
    pub metrics_addr: Option<SocketAddr>,
    /// Largest message accepted or sent, bytes.
    pub max_message_size: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Bearer token required on every RPC except health.
    pub auth_token: Option<String>,
    /// TLS certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Longest wait for in-flight work at shutdown.
    pub exit_timeout: Duration,
    /// Version string for ServerMetadata (says which backend runs).
    pub server_version: String,
    /// Open-connection limit and idle timeout, per front.
    pub connections: connections::ConnectionLimits,
    /// This worker's id, sent as `x-worker-id` on every response (gateways pin sessions on it).
    pub worker_id: String,
}

impl ServeOptions {
    /// gRPC only, on an ephemeral 127.0.0.1 port, with the defaults of the command line (64 MiB
    /// messages, 1,024 streams per connection, no auth, no TLS, default connection limits) and a
    /// 5 s exit timeout: the worker that tests, benches and embedders start in-process. Set the
    /// fields that differ with struct update syntax.
    pub fn loopback(server_version: &str) -> ServeOptions {
        ServeOptions {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: None,
            metrics_addr: None,
            max_message_size: 64 << 20,
            max_concurrent_streams: 1024,
            auth_token: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            exit_timeout: Duration::from_secs(5),
            server_version: server_version.to_string(),
            connections: Default::default(),
            worker_id: "local".into(),
        }
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listen address could not be bound.
    #[error(
        "cannot listen on {addr}: {source}; is another process using the port? pick another with --grpc-addr / --http-addr / --metrics-addr"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// `--auth-token` (or its variable) set to an empty value, which would accept anyone.
    #[error(
        "--auth-token / NEURON_WORKER_AUTH_TOKEN is empty, which would turn authentication off; set a token, or leave both unset to run without one"
    )]
    EmptyToken,
    /// TLS files missing or unreadable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The worker id cannot be sent as a header.
    #[error("{0}")]
    WorkerId(String),
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// In-flight work did not finish within `--exit-timeout`.
    #[error("in-flight requests did not finish within the exit timeout ({0:?}); some were cut off")]
    ExitTimeout(Duration),
    /// Reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
}

fn auth_check(token: Option<Arc<str>>) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let Some(expected) = &token else { return Ok(req) };
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match bearer::refusal(header, expected, "authorization") {
            None => Ok(req),
            Some(why) => Err(Status::unauthenticated(why)),
        }
    }
}

/// A running server: its bound addresses and a handle to stop it.
#[derive(Debug)]
pub struct RunningServer {
    /// The gRPC address actually bound (useful with port 0).
    pub grpc_addr: SocketAddr,
    /// The HTTP address actually bound.
    pub http_addr: Option<SocketAddr>,
    /// The metrics address actually bound.
    pub metrics_addr: Option<SocketAddr>,
    /// Cancel to start a graceful drain.
    pub shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl RunningServer {
    /// Waits for the server to finish (after `shutdown` is cancelled and the drain completes).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task.await.unwrap_or_else(|e| Err(ServeError::Reflection(format!("server task failed: {e}"))))
    }
}

/// Binds the listeners and starts serving `repo` in the background.
pub async fn start(opts: ServeOptions, repo: Arc<Repository>) -> Result<RunningServer, ServeError> {
    let listener = tokio::net::TcpListener::bind(opts.grpc_addr)
        .await
        .map_err(|source| ServeError::Bind { addr: opts.grpc_addr, source })?;
    let grpc_addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: opts.grpc_addr, source })?;
    let shutdown = CancellationToken::new();
    // The metrics endpoint outlives the drain, so the final counters can be scraped: it stops when
    // the server task ends.
    let metrics_stop = CancellationToken::new();
    let mut metrics_addr = None;
    if let Some(addr) = opts.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
        metrics_addr = l.local_addr().ok();
        tokio::spawn(metrics::serve_metrics(l, repo.clone(), metrics_stop.clone(), opts.worker_id.clone()));
    }
    // Cancels the endpoint when dropped: at the end of the server task, or here on a start-up error.
    let metrics_guard = metrics_stop.drop_guard();

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let worker = worker_id::header_value(&opts.worker_id).map_err(ServeError::WorkerId)?;
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Some(http::tls::acceptor(cert, key, opts.tls_client_ca.as_deref())?),
        (None, None) if opts.tls_client_ca.is_none() => None,
        _ => {
            return Err(ServeError::Tls(
                "--tls-cert and --tls-key must be given together (--tls-client-ca needs both)".into(),
            ));
        }
    };

    if opts.auth_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(ServeError::EmptyToken);
    }
    let token: Option<Arc<str>> = opts.auth_token.as_deref().map(Arc::from);
    let check = auth_check(token);
    let core = InferenceService::new(repo.clone(), opts.server_version.clone(), shutdown.clone())
        .with_max_message_size(opts.max_message_size);
    let (http_addr, http_task) = match opts.http_addr {
        Some(addr) => {
            let (bound, task) = http::start(addr, &opts, repo.clone(), core.clone(), shutdown.clone()).await?;
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    let generated = GrpcInferenceServiceServer::new(core.clone())
        .max_decoding_message_size(opts.max_message_size)
        .max_encoding_message_size(opts.max_message_size)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
    let inference = stream_route::InferenceRoutes::new(core, generated, opts.max_message_size);
    let sessions = sessions::proto::sessions_server::SessionsServer::new(
        sessions::SessionsService::new(repo.clone()).with_message_limit(opts.max_message_size),
    )
    .max_decoding_message_size(opts.max_message_size)
    .max_encoding_message_size(opts.max_message_size);
    let dispatch = {
        use tonic::server::NamedService;
        use tonic::service::interceptor::InterceptedService;
        fn named<S: NamedService + grpc_front::Route>(s: S) -> (&'static str, Box<dyn grpc_front::Route>) {
            (S::NAME, Box::new(s))
        }
        grpc_front::Dispatch::new(
            vec![
                named(InterceptedService::new(inference, check.clone())),
                named(health_service),
                named(InterceptedService::new(sessions, check.clone())),
                named(InterceptedService::new(reflection_v1, check.clone())),
                named(InterceptedService::new(reflection_v1alpha, check)),
            ],
            worker,
        )
    };

    // Health: "" and one entry per model, kept in step with model readiness: recomputed whenever the
    // repository changes or a model's readiness does (watch channels, no polling).
    let health_task = {
        let (repo, reporter, stop) = (repo.clone(), health_reporter.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                // Subscribe before reading, so a change made while the statuses are written is seen.
                let mut repo_changes = repo.changes();
                let entries = repo.entries();
                let mut readiness: Vec<_> =
                    entries.iter().flat_map(|(_, e)| e.versions.values().map(|v| v.batching.readiness())).collect();
                let draining = stop.is_cancelled();
                let mut any = false;
                for (name, entry) in &entries {
                    let ready = !draining && entry.versions.values().any(|v| v.batching.is_ready());
                    any |= ready;
                    let st = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
                    reporter.set_service_status(name, st).await;
                }
                let overall = if any && !draining { ServingStatus::Serving } else { ServingStatus::NotServing };
                reporter.set_service_status("", overall).await;
                if draining {
                    break;
                }
                let model_changed = async {
                    if readiness.is_empty() {
                        return std::future::pending().await;
                    }
                    let waits = readiness.iter_mut().map(|r| Box::pin(r.changed()));
                    let _ = futures::future::select_all(waits).await;
                };
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = repo_changes.changed() => {}
                    _ = model_changed => {}
                }
            }
        })
    };

    let stop = shutdown.clone();
    let exit_timeout = opts.exit_timeout;
    let incoming = connections::incoming(listener, connections::Gate::new("grpc", opts.connections));
    let settings = grpc_front::Settings {
        max_concurrent_streams: opts.max_concurrent_streams,
        keepalive_interval: opts.connections.keepalive_interval(),
        keepalive_timeout: KEEPALIVE_TIMEOUT,
    };
    let task = tokio::spawn(async move {
        let _metrics_until_exit = metrics_guard;
        let drained = stop.clone();
        let signal = async move {
            drained.cancelled().await;
            tracing::info!("draining: health NOT_SERVING, no new connections, finishing accepted requests");
        };
        let serve = async move {
            grpc_front::serve(incoming, dispatch, settings, tls, signal).await;
            Ok::<(), ServeError>(())
        };
        tokio::pin!(serve);
        // The gRPC server also ends right after the stop signal when it has nothing in flight:
        // that is a drain too (HTTP streams and generations may still run), so it takes the
        // bounded drain path below, with its cut-short deadline, like a signal seen first.
        let early = tokio::select! {
            biased;
            _ = stop.cancelled() => None,
            r = &mut serve => Some(r),
        };
        let early = match early {
            Some(r) if !stop.is_cancelled() => {
                // The gRPC server ended on its own, without a stop signal.
                let _ = health_task.await;
                r?;
                if let Some(t) = http_task {
                    let _ = t.await;
                }
                repo.drain_all().await;
                return Ok(());
            }
            other => other,
        };
        let _ = health_task.await;
        // Generations still running near the deadline end with a last response (finish reason
        // `abort`) instead of being lost; the rest of the time lets them reach their clients and
        // the sessions reach the store.
        let cut = {
            let (repo, at) = (repo.clone(), cut_short_at(exit_timeout));
            tokio::spawn(async move {
                tokio::time::sleep(at).await;
                // Turns cut short are written through before they are answered: retried until
                // half the time left, so the answer (or "not kept") still reaches the client.
                if let Some(leases) = repo.session_store().and_then(|s| s.leases()) {
                    leases.exit_by(std::time::Instant::now() + exit_timeout.saturating_sub(at) / 2);
                }
                repo.cut_short_all();
            })
        };
        let _cut_guard = AbortOnDrop(cut);
        match tokio::time::timeout(exit_timeout, async {
            // Sessions are saved as they go idle from now on, not only once the RPCs are done.
            repo.begin_drain_all().await;
            let r = match early {
                Some(r) => r,
                None => serve.await,
            };
            if let Some(t) = http_task {
                let _ = t.await;
            }
            repo.drain_all().await;
            r
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ServeError::ExitTimeout(exit_timeout)),
        }
    });
    Ok(RunningServer { grpc_addr, http_addr, metrics_addr, shutdown, task })
}

/// When, after the drain starts, running generations are cut short: the last fifth of the exit
/// timeout (at most 3 s) is left for their last responses and the session store.
fn cut_short_at(exit_timeout: Duration) -> Duration {
    exit_timeout.saturating_sub((exit_timeout / 5).min(Duration::from_secs(3)))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
