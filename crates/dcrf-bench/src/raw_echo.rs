//! `raw-echo`: a bare axum WebSocket server that sends every text frame back unchanged. It
//! parses no JSON and has no framework around it: the ceiling the DCRF servers are compared
//! with.

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::serve::ListenerExt;
use futures_util::{FutureExt, SinkExt};
use tokio::net::TcpListener;

/// Serves the echo server on `bind` (on any path) until the process is stopped.
pub async fn serve(bind: &str) -> std::io::Result<()> {
    let listener = listen(bind).await?;
    println!(
        "dcrf-bench raw-echo listening on {}",
        listener.local_addr()?
    );
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().fallback(upgrade);
    axum::serve(listener, app).await
}

/// The accept queue asked for, as `dcrf-demo` does (the kernel caps it at
/// `net.core.somaxconn`); `TcpListener::bind` asks for 128, which thousands of handshakes at
/// once overflow.
const LISTEN_BACKLOG: u32 = 4096;

/// The WebSocket read and write buffers of every raw server: dcrf's defaults
/// (`dcrf::server::DEFAULT_SOCKET_BUFFERS`). axum's own default read buffer is 128 KiB, which
/// tungstenite zero-fills before every read: a third of raw-retrieve's time went to that
/// `memset`, a ceiling slower than it need be.
pub(crate) const SOCKET_BUFFERS: (usize, usize) = (2 * 1024, 8 * 1024);

/// Applies [`SOCKET_BUFFERS`] to an upgrade.
pub(crate) fn sized(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.read_buffer_size(SOCKET_BUFFERS.0)
        .write_buffer_size(SOCKET_BUFFERS.1)
}

/// Listens on the first address `bind` resolves to, with [`LISTEN_BACKLOG`].
pub(crate) async fn listen(bind: &str) -> std::io::Result<TcpListener> {
    let addr = tokio::net::lookup_host(bind).await?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("no address for {bind}"),
        )
    })?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn upgrade(ws: WebSocketUpgrade) -> Response {
    sized(ws).on_upgrade(echo)
}

/// Echoes text frames; whatever is already received is sent back with one flush.
async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let mut next = Some(msg);
        while let Some(msg) = next.take() {
            if matches!(msg, Message::Close(_)) {
                let _ = socket.flush().await;
                return;
            }
            if matches!(msg, Message::Text(_)) && socket.feed(msg).await.is_err() {
                return;
            }
            next = match socket.recv().now_or_never() {
                Some(Some(Ok(m))) => Some(m),
                Some(_) => {
                    let _ = socket.flush().await;
                    return;
                }
                None => None,
            };
        }
        if socket.flush().await.is_err() {
            return;
        }
    }
}
