//! The HTTP front's per-connection service: the router, with each request counted as running on
//! its connection until its response body is finished or dropped (an SSE stream or a long
//! generation is not an idle connection).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::service::TowerToHyperService;

use crate::server::connections::InFlight;

/// A response body that keeps its request counted while it is being sent.
struct Counted {
    body: Body,
    _running: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The service of one connection whose running requests `running` counts.
pub fn service(
    router: Router,
    running: Arc<AtomicUsize>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<Body>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<hyper::Response<Body>, std::convert::Infallible>> + Send + 'static,
> + Clone {
    let inner = TowerToHyperService::new(router);
    hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = InFlight::enter(&running);
        let fut = hyper::service::Service::call(&inner, req);
        async move {
            let resp = fut.await?;
            Ok(resp.map(|body| Body::new(Counted { body, _running: guard })))
        }
    })
}
