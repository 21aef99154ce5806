//! Opening WebSocket connections, many at a time, and the measurement window.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Read and write buffer size per connection: ample for the largest reply (a page of 100
/// todos is about 7 KB) and small enough for tens of thousands of connections.
const BUFFER_SIZE: usize = 32 * 1024;

/// Opens one connection with `TCP_NODELAY`, within `timeout`.
pub async fn connect(url: &str, timeout: Duration) -> Result<Ws, String> {
    let config = WebSocketConfig::default()
        .read_buffer_size(BUFFER_SIZE)
        .write_buffer_size(BUFFER_SIZE);
    let handshake = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no handshake within {timeout:?}")),
    }
}

/// Runs `open(i)` for `i` in `0..n`, at most `concurrency` at once, and returns the results
/// in order. The first failure is printed to stderr, with the number of failures.
pub async fn open_many<T, F, Fut>(n: usize, concurrency: usize, open: F) -> Vec<Result<T, String>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permits = Arc::clone(&permits);
        let fut = open(i);
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            fut.await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(
            task.await
                .unwrap_or_else(|e| Err(format!("connection task failed: {e}"))),
        );
    }
    let failures: Vec<&String> = out.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(first) = failures.first() {
        eprintln!(
            "error: {} of {n} connection(s) failed; first: {first}",
            failures.len()
        );
    }
    out
}

/// The run's timeline: load starts at `begin`, measuring at `start`, everything stops at
/// `end`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// When load starts (warm-up begins).
    pub begin: Instant,
    /// When measuring starts.
    pub start: Instant,
    /// When measuring (and sending) stops.
    pub end: Instant,
}

impl Window {
    /// A window starting now.
    pub fn starting_now(warmup: Duration, duration: Duration) -> Window {
        let begin = Instant::now();
        let start = begin + warmup;
        Window {
            begin,
            start,
            end: start + duration,
        }
    }

    /// Whether `t` falls inside the measured part.
    pub fn contains(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}
