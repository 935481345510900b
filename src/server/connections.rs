//! Bounds on the connections of the gRPC and HTTP fronts: at most `--max-connections` open per
//! front (a connection beyond it is closed at once, with a log line and a metric), and a
//! connection that moves no byte for `--connection-idle-timeout` while no request is running on it
//! is closed (silent sockets, clients that sent only the HTTP/2 preface, forgotten keep-alives).
//! HTTP/2 clients that are alive answer the fronts' keep-alive pings (sent at half the idle
//! timeout), so an idle but healthy channel stays open.

use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The connection bounds of one front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most open connections.
    pub max_connections: usize,
    /// Close a connection idle this long (`None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { max_connections: default_max_connections(), idle_timeout: Some(Duration::from_secs(120)) }
    }
}

impl ConnectionLimits {
    /// The HTTP/2 keep-alive ping interval that keeps live clients from looking idle.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        self.idle_timeout.map(|t| (t / 2).max(Duration::from_millis(500)))
    }
}

/// Default `--max-connections`: a quarter of the process's open-file limit (each front gets it,
/// leaving room for model files, the metrics endpoint and the other front), between 16 and 16384.
pub fn default_max_connections() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a valid pointer to a local.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let files = if ok { usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX) } else { 1024 };
    (files / 4).clamp(16, 16384)
}

struct Metrics {
    open: IntGaugeVec,
    refused: IntCounterVec,
    idle_closed: IntCounterVec,
}

fn metrics() -> Option<&'static Metrics> {
    static M: OnceLock<Option<Metrics>> = OnceLock::new();
    M.get_or_init(|| {
        Some(Metrics {
            open: IntGaugeVec::new(
                Opts::new("neuron_worker_connections_open", "Open client connections, by front"),
                &["front"],
            )
            .ok()?,
            refused: IntCounterVec::new(
                Opts::new(
                    "neuron_worker_connections_refused_total",
                    "Connections closed on arrival because the front had --max-connections open",
                ),
                &["front"],
            )
            .ok()?,
            idle_closed: IntCounterVec::new(
                Opts::new(
                    "neuron_worker_connections_idle_closed_total",
                    "Connections closed after --connection-idle-timeout without traffic or a running request",
                ),
                &["front"],
            )
            .ok()?,
        })
    })
    .as_ref()
}

/// The connection metric families.
pub fn families() -> Vec<MetricFamily> {
    let Some(m) = metrics() else { return Vec::new() };
    let mut out = m.open.collect();
    out.extend(m.refused.collect());
    out.extend(m.idle_closed.collect());
    out.into_iter().filter(|f| !f.get_metric().is_empty()).collect()
}

/// Logs at most one line per 10 s for each kind of event (a flood must not flood the log).
fn log_limited(last: &std::sync::atomic::AtomicU64, msg: impl FnOnce()) {
    static START: OnceLock<Instant> = OnceLock::new();
    let now = START.get_or_init(Instant::now).elapsed().as_secs() + 10;
    let prev = last.load(Relaxed);
    if now >= prev + 10 && last.compare_exchange(prev, now, Relaxed, Relaxed).is_ok() {
        msg();
    }
}

/// Admission of one front's connections.
#[derive(Debug, Clone)]
pub struct Gate {
    front: &'static str,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
}

impl Gate {
    /// A gate for `front` (`grpc`, `http`).
    pub fn new(front: &'static str, limits: ConnectionLimits) -> Gate {
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        Gate { front, limits, slots }
    }

    /// The bounds.
    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Wraps an accepted connection, or `None` (it is dropped: closed) when the front is full.
    pub fn admit<T>(&self, io: T, peer: Option<std::net::SocketAddr>) -> Option<Tracked<T>> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            if let Some(m) = metrics() {
                m.refused.with_label_values(&[self.front]).inc();
            }
            let (front, max) = (self.front, self.limits.max_connections);
            log_limited(&LAST, || {
                tracing::warn!(
                    front,
                    max_connections = max,
                    ?peer,
                    "connection refused: the front has --max-connections open (idle ones close after \
                     --connection-idle-timeout); raise the limit or find the client holding connections"
                );
            });
            return None;
        };
        if let Some(m) = metrics() {
            m.open.with_label_values(&[self.front]).inc();
        }
        Some(Tracked {
            io,
            front: self.front,
            _permit: permit,
            idle_timeout: self.limits.idle_timeout,
            last: Instant::now(),
            timer: self.limits.idle_timeout.map(|t| Box::pin(tokio::time::sleep(t))),
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// An admitted connection: holds its slot, notes when bytes last moved, and fails its reads once
/// idle past the timeout with no request running (the server then closes it).
#[derive(Debug)]
pub struct Tracked<T> {
    io: T,
    front: &'static str,
    _permit: OwnedSemaphorePermit,
    idle_timeout: Option<Duration>,
    last: Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    in_flight: Arc<AtomicUsize>,
}

impl<T> Tracked<T> {
    /// The connection's running-request count (a front that knows its requests keeps it, so a
    /// long request that moves no byte does not make its connection idle).
    pub fn in_flight(&self) -> Arc<AtomicUsize> {
        self.in_flight.clone()
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Whether the connection has now been idle past its timeout (re-arms the timer otherwise).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let (Some(timeout), Some(timer)) = (self.idle_timeout, self.timer.as_mut()) else { return false };
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = self.last + timeout;
            if self.in_flight.load(Relaxed) > 0 {
                timer.as_mut().reset(tokio::time::Instant::now() + timeout);
            } else if due > Instant::now() {
                timer.as_mut().reset(due.into());
            } else {
                return true;
            }
        }
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        if let Some(m) = metrics() {
            m.open.with_label_values(&[self.front]).dec();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if !self.idle_expired(cx) {
                    return Poll::Pending;
                }
                static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                if let Some(m) = metrics() {
                    m.idle_closed.with_label_values(&[self.front]).inc();
                }
                let (front, timeout) = (self.front, self.idle_timeout);
                log_limited(&LAST, || {
                    tracing::info!(front, ?timeout, "closing connections idle past --connection-idle-timeout");
                });
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle past its timeout")))
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last = Instant::now();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last = Instant::now();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Tracked<tokio::net::TcpStream> {
    type ConnectInfo = <tokio::net::TcpStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Counts one running request on a connection until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Enters a request.
    pub fn enter(counter: &Arc<AtomicUsize>) -> InFlight {
        counter.fetch_add(1, Relaxed);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// An accept loop's stream of admitted connections (for tonic's `serve_with_incoming`).
pub fn incoming(
    listener: tokio::net::TcpListener,
    gate: Gate,
) -> impl futures::Stream<Item = io::Result<Tracked<tokio::net::TcpStream>>> + Send + 'static {
    futures::stream::unfold((listener, gate), |(listener, gate)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(t) = gate.admit(stream, Some(peer)) {
                        return Some((Ok(t), (listener, gate)));
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: say so and keep accepting.
                    tracing::warn!(error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}
