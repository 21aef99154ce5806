//! The accept loop behind [`serve`](crate::serve): HTTP/1.1 connections served by hyper with a
//! header read timeout, connection caps (global and per client IP) answered with 503, an accept
//! loop that backs off on errors such as `EMFILE` instead of spinning, and a shutdown that ends
//! within its cap whatever clients do.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long the accept loop waits after an accept error that is not about one connection
/// (`EMFILE`, `ENFILE`, `ENOBUFS`): long enough not to spin, short enough to recover quickly.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The settings [`serve`] reads from [`Dcrf`](crate::Dcrf).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServeLimits {
    pub(crate) handshake_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: usize,
}

/// See [`crate::serve`]. `stop` is the application's shutdown switch (cancelled here when
/// `signal` fires); `websockets` tracks the upgraded connections, waited for at shutdown.
pub(crate) async fn serve<F>(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    stop: CancellationToken,
    websockets: TaskTracker,
    signal: F,
) -> Result<(), crate::Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    let hard_stop = CancellationToken::new();
    let http = TaskTracker::new();
    let counts = Arc::new(Counts::default());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout);
    let builder = Arc::new(builder);
    tokio::pin!(signal);
    // Logged once per run of failures, not every 50 ms.
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = &mut signal => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("accepting connections again");
                }
                accepted
            }
            // The peer gave up before we took the connection: nothing to wait for.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "accept failed; retrying every 50 ms");
                }
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    _ = stop.cancelled() => break,
                    _ = &mut signal => break,
                }
            }
        };
        // Replies are small and latency-bound: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        match counts.admit(peer.ip(), &limits) {
            Some(slot) => http.spawn(serve_connection(
                builder.clone(),
                Counted { tcp, _slot: slot },
                peer,
                router.clone(),
                stop.clone(),
                hard_stop.clone(),
            )),
            None => {
                tracing::warn!(%peer, "connection refused: too many connections");
                http.spawn(refuse_connection(builder.clone(), tcp, hard_stop.clone()))
            }
        };
    }
    stop.cancel();
    drop(listener);
    http.close();
    websockets.close();
    let everything = async {
        http.wait().await;
        websockets.wait().await;
    };
    if tokio::time::timeout(limits.shutdown_timeout, everything)
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?limits.shutdown_timeout,
            "connections still open at the shutdown timeout; returning anyway"
        );
        hard_stop.cancel();
    }
    Ok(())
}

/// Serves one admitted connection until it ends, or until shutdown: a connection with no
/// request in progress (reading a request head, or idle between requests) is dropped at once;
/// one with a request in progress finishes it, then closes (bounded by the shutdown cap).
async fn serve_connection(
    builder: Arc<http1::Builder>,
    io: Counted,
    peer: SocketAddr,
    router: Router,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let service = {
        let in_flight = in_flight.clone();
        hyper::service::service_fn(move |mut req: axum::http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let busy = InFlight::enter(&in_flight);
            let router = router.clone();
            async move {
                let _busy = busy;
                router.oneshot(req).await
            }
        })
    };
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            return;
        }
        _ = stop.cancelled() => {}
    }
    if in_flight.load(Ordering::Acquire) == 0 {
        return;
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        _ = hard_stop.cancelled() => {}
    }
}

/// Answers a connection over the caps with `503 Service Unavailable` once its request head has
/// arrived (within the handshake timeout), then closes it. It is not counted.
async fn refuse_connection(
    builder: Arc<http1::Builder>,
    tcp: TcpStream,
    hard_stop: CancellationToken,
) {
    let service = hyper::service::service_fn(|_req: axum::http::Request<Incoming>| async {
        let mut response = Response::new(Body::from("Too many connections; try again later.\n"));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        Ok::<_, std::convert::Infallible>(response)
    });
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::select! {
        _ = conn => {}
        _ = hard_stop.cancelled() => {}
    }
}

/// Counts requests being handled on one connection.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accept errors that concern one connection only (the next accept may well succeed).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Open connections, in all and per client IP.
#[derive(Debug, Default)]
struct Counts {
    inner: Mutex<CountsInner>,
}

#[derive(Debug, Default)]
struct CountsInner {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Counts {
    /// Counts a new connection from `ip`, or `None` if that would go over a cap.
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ServeLimits) -> Option<ConnSlot> {
        let ip = ip.to_canonical();
        let mut inner = crate::sync::lock(&self.inner);
        if inner.total >= limits.max_connections {
            return None;
        }
        let n = inner.per_ip.entry(ip).or_insert(0);
        if *n >= limits.max_connections_per_ip {
            return None;
        }
        *n += 1;
        inner.total += 1;
        Some(ConnSlot {
            counts: self.clone(),
            ip,
        })
    }
}

/// One counted connection; uncounted when dropped (after the WebSocket, if it was upgraded).
#[derive(Debug)]
struct ConnSlot {
    counts: Arc<Counts>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut inner = crate::sync::lock(&self.counts.inner);
        inner.total -= 1;
        if let Some(n) = inner.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                inner.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A TCP stream that holds its connection's slot: the slot lives as long as the socket, through
/// an upgrade to a WebSocket.
#[derive(Debug)]
struct Counted {
    tcp: TcpStream,
    _slot: ConnSlot,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
