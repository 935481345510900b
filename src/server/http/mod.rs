//! The HTTP front (axum on the same tokio/hyper stack as gRPC): KServe v2 / Triton REST with the
//! binary tensor data and generate extensions, and an OpenAI-compatible `/v1`. It converts HTTP
//! bodies into the core's protobuf requests and answers back; the bearer token, TLS files, size
//! limit and drain are the gRPC front's.

mod auth;
mod body;
pub(crate) mod core;
mod counted;
mod error;
mod generate;
mod infer;
mod kserve;
pub mod metrics;
mod openai;
mod params;
mod proto_json;
pub(crate) mod tensor_json;
pub(crate) mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio_util::sync::CancellationToken;

pub use error::HttpError;

use self::core::Core;
use super::{InferenceService, ServeError, ServeOptions};
use crate::repository::Repository;

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct App {
    /// The core both fronts call.
    core: Core,
    /// Largest request body, bytes (after decompression).
    body_limit: usize,
    /// Stored `/v1/responses`.
    responses: Arc<openai::response_persist::Responses>,
}

/// Most responses `/v1/responses` keeps (oldest dropped first).
const STORED_RESPONSES: usize = 10_000;

/// The routes.
fn router(app: App, token: Option<Arc<str>>) -> Router {
    let m = "/v2/models/{model}";
    let mv = "/v2/models/{model}/versions/{version}";
    let mut r = Router::new()
        .route("/v2/health/live", get(kserve::live))
        .route("/v2/health/ready", get(kserve::ready))
        .route("/v2", get(kserve::server_metadata))
        .route("/v2/models/stats", get(kserve::all_statistics))
        .route("/v2/repository/index", post(kserve::repository_index))
        .route("/v2/repository/models/{model}/load", post(kserve::load))
        .route("/v2/repository/models/{model}/unload", post(kserve::unload))
        .route("/v1/models", get(openai::models::list))
        .route("/v1/models/{model}", get(openai::models::get))
        .route("/v1/embeddings", post(openai::embeddings::embeddings))
        .route("/v1/chat/completions", post(openai::completions::chat))
        .route("/v1/completions", post(openai::completions::text))
        .route("/v1/responses", post(openai::responses::create))
        .route("/v1/responses/{id}", get(openai::responses::get).delete(openai::responses::delete));
    for base in [m, mv] {
        r = r
            .route(base, get(kserve::model_metadata))
            .route(&format!("{base}/ready"), get(kserve::model_ready))
            .route(&format!("{base}/config"), get(kserve::model_config))
            .route(&format!("{base}/stats"), get(kserve::statistics))
            .route(&format!("{base}/infer"), post(infer::infer))
            .route(&format!("{base}/generate"), post(generate::generate))
            .route(&format!("{base}/generate_stream"), post(generate::generate_stream));
    }
    r.fallback(kserve::no_route)
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(token, auth::check))
        .layer(axum::middleware::from_fn(metrics::count))
}

/// Binds `addr` and serves the HTTP front until `stop` is cancelled; the returned task ends once
/// every accepted request (and stream) has been answered, or `exit_timeout` ran out.
pub async fn start(
    addr: SocketAddr,
    opts: &ServeOptions,
    repo: Arc<Repository>,
    service: InferenceService,
    stop: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServeError> {
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key, opts.tls_client_ca.as_deref())?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
    let token: Option<Arc<str>> = opts.auth_token.as_deref().filter(|t| !t.is_empty()).map(Arc::from);
    let store = repo.session_store().cloned();
    let responses = Arc::new(openai::response_persist::Responses::new(STORED_RESPONSES, store));
    let app = App { core: Core { service, repo }, body_limit: opts.max_message_size, responses };
    let worker = super::worker_id::header_value(&opts.worker_id).map_err(ServeError::WorkerId)?;
    let router = router(app, token).layer(super::worker_id::layer(worker));
    let exit_timeout = opts.exit_timeout;
    let gate = crate::server::connections::Gate::new("http", opts.connections);
    let task = tokio::spawn(serve(listener, router, tls, gate, stop, exit_timeout));
    Ok((bound, task))
}

async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    gate: crate::server::connections::Gate,
    stop: CancellationToken,
    exit_timeout: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(gate.limits().keepalive_interval())
        .keep_alive_timeout(crate::server::KEEPALIVE_TIMEOUT);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Some(stream) = gate.admit(stream, Some(peer)) else { continue };
        let svc = counted::service(router.clone(), stream.in_flight());
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned()).await
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await;
                    let Ok(Ok(tls_stream)) = handshake else {
                        tracing::debug!(%peer, "TLS handshake failed or timed out");
                        return;
                    };
                    watcher
                        .watch(builder.serve_connection_with_upgrades(TokioIo::new(tls_stream), svc).into_owned())
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("HTTP front draining: no new connections, finishing accepted requests and streams");
    if tokio::time::timeout(exit_timeout, graceful.shutdown()).await.is_err() {
        tracing::warn!(?exit_timeout, "HTTP requests still open after the exit timeout were cut off");
    }
}
