//! The gRPC front's HTTP/2 server: an accept loop over hyper's HTTP/2 connection driver and a
//! dispatch by service name, in place of tonic's `transport::Server`. Each request then goes
//! through one match on its path and two boxed futures instead of tonic's stack of layers (its
//! path router, connect-info extension, boxed clone services, timeout and error-recovery
//! wrappers), and responses carry no `date` header (gRPC clients do not read it). It keeps what
//! those layers did that a client can see: a `grpc-timeout` header bounds the call (answered
//! CANCELLED, "Timeout expired", as tonic does), an unknown service is answered UNIMPLEMENTED,
//! and every response carries `x-worker-id`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Service, StdError, http};

use super::connections::Tracked;

/// A response future, boxed once per request.
type ResponseFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

/// One gRPC service behind the front: called with a request, answers it.
pub(crate) trait Route: Send + Sync + 'static {
    /// Starts answering `req`.
    fn route(&self, req: http::Request<Body>) -> ResponseFuture;
}

impl<S, B> Route for S
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<StdError>,
{
    fn route(&self, req: http::Request<Body>) -> ResponseFuture {
        // The generated servers (and our routes) are always ready: their `poll_ready` returns
        // Ready without looking at the context, so it is not called here.
        let mut svc = self.clone();
        let answer = svc.call(req);
        Box::pin(async move { Ok(answer.await?.map(Body::new)) })
    }
}

/// The services by their full gRPC name (`package.Service`), and the header every response gets.
#[derive(Clone)]
pub(crate) struct Dispatch {
    routes: Arc<Vec<(&'static str, Box<dyn Route>)>>,
    worker: HeaderValue,
}

impl Dispatch {
    /// A dispatch to `routes` (full service name, service); responses carry `x-worker-id: worker`.
    pub(crate) fn new(routes: Vec<(&'static str, Box<dyn Route>)>, worker: HeaderValue) -> Dispatch {
        Dispatch { routes: Arc::new(routes), worker }
    }

    fn answer(&self, req: http::Request<Incoming>) -> ResponseFuture {
        let req = req.map(Body::new);
        let service = req.uri().path().strip_prefix('/').and_then(|p| p.split_once('/')).map(|(s, _)| s);
        let route = service.and_then(|s| self.routes.iter().find(|(name, _)| *name == s)).map(|(_, r)| r);
        let deadline = grpc_timeout(req.headers());
        let answer = match route {
            Some(r) => r.route(req),
            None => Box::pin(std::future::ready(Ok(Status::unimplemented("").into_http()))),
        };
        let worker = self.worker.clone();
        Box::pin(async move {
            let mut res = match deadline {
                None => answer.await?,
                Some(limit) => match tokio::time::timeout(limit, answer).await {
                    Ok(r) => r?,
                    Err(_) => Status::cancelled("Timeout expired").into_http(),
                },
            };
            res.headers_mut().insert(HeaderName::from_static(super::worker_id::HEADER), worker);
            Ok(res)
        })
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Dispatch {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        self.answer(req)
    }
}

/// The client's deadline from `grpc-timeout` (at most 8 digits and a unit: H M S m u n); a
/// malformed header is ignored, as tonic's server does.
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let s = headers.get("grpc-timeout")?.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// HTTP/2 settings of the front.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Most concurrent streams per connection.
    pub(crate) max_concurrent_streams: u32,
    /// Keep-alive ping interval (`None`: no pings).
    pub(crate) keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered.
    pub(crate) keepalive_timeout: Duration,
}

/// Accepts connections from `incoming` and serves them until `stop` resolves, then stops
/// accepting, asks every connection to finish (HTTP/2 GOAWAY: running calls complete, new ones
/// are refused) and returns once all have closed.
pub(crate) async fn serve(
    incoming: impl futures::Stream<Item = std::io::Result<Tracked<tokio::net::TcpStream>>>,
    dispatch: Dispatch,
    settings: Settings,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl Future<Output = ()>,
) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .auto_date_header(false);
    let graceful = GracefulShutdown::new();
    {
        let mut incoming = std::pin::pin!(incoming);
        let mut stop = std::pin::pin!(stop);
        loop {
            let io = tokio::select! {
                _ = &mut stop => break,
                io = futures::StreamExt::next(&mut incoming) => match io {
                    Some(Ok(io)) => io,
                    Some(Err(_)) => continue,
                    None => break,
                },
            };
            let (builder, dispatch, watcher, tls) =
                (builder.clone(), dispatch.clone(), graceful.watcher(), tls.clone());
            tokio::spawn(async move {
                let result = match tls {
                    None => watcher.watch(builder.serve_connection(TokioIo::new(io), dispatch)).await,
                    Some(acceptor) => {
                        let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(io)).await;
                        let Ok(Ok(tls_stream)) = handshake else {
                            tracing::debug!("gRPC TLS handshake failed or timed out");
                            return;
                        };
                        watcher.watch(builder.serve_connection(TokioIo::new(tls_stream), dispatch)).await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "gRPC connection ended with an error");
                }
            });
        }
    }
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
        assert_eq!(h("250m"), Some(Duration::from_millis(250)));
        assert_eq!(h("3S"), Some(Duration::from_secs(3)));
        assert_eq!(h("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(h("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(h("123456789S"), None);
        assert_eq!(h("5x"), None);
        assert_eq!(h("m"), None);
    }
}
