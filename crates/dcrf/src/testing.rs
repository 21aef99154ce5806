//! Testing consumers over a real socket (Channels' `WebsocketCommunicator`).
//!
//! Enabled by the `testing` feature. [`TestServer::start`] serves a router on a free loopback
//! port; [`TestClient`] speaks JSON frames to it with timeouts, so a test fails instead of
//! hanging.
//!
//! ```no_run
//! # async fn t(router: axum::Router, app: dcrf::Dcrf) {
//! use dcrf::testing::{TestClient, TestServer};
//! use serde_json::json;
//!
//! let server = TestServer::start(router, app).await;
//! let mut client = TestClient::connect(&server.url("/ws/echo/")).await.unwrap();
//! let reply = client.request(json!({"action": "echo", "request_id": 1, "x": 2})).await;
//! assert_eq!(reply["data"], json!({"x": 2}));
//! client.receive_nothing().await;
//! # }
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::server::Dcrf;

/// How long [`TestClient::receive_json`] waits before failing the test.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`TestClient::receive_nothing`] listens.
pub const NOTHING_TIMEOUT: Duration = Duration::from_millis(150);

/// A server on `127.0.0.1:<free port>`, serving until dropped or shut down.
#[derive(Debug)]
pub struct TestServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The application settings (call [`Dcrf::shutdown`] to test graceful shutdown).
    pub app: Dcrf,
    handle: Option<tokio::task::JoinHandle<Result<(), crate::Error>>>,
}

impl TestServer {
    /// Binds a free port and serves `router` in a background task.
    pub async fn start(router: axum::Router, app: Dcrf) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let app2 = app.clone();
        let handle = tokio::spawn(async move {
            crate::server::serve(listener, router, &app2, std::future::pending()).await
        });
        TestServer {
            addr,
            app,
            handle: Some(handle),
        }
    }

    /// `ws://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Shuts down gracefully and waits until `serve` has returned.
    pub async fn shutdown(mut self) {
        self.app.shutdown();
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), handle).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// A WebSocket client for tests.
#[derive(Debug)]
pub struct TestClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Remove dcrf's extension keys from received JSON (see [`TestClient::dcrf_envelopes`]).
    envelopes_only: bool,
}

impl TestClient {
    /// Connects to a `ws://` URL.
    pub async fn connect(url: &str) -> Result<TestClient, tungstenite::Error> {
        Self::connect_request(url).await
    }

    /// Connects with a custom handshake request (headers such as `Authorization`, `Cookie`,
    /// `Origin`).
    pub async fn connect_request(
        request: impl IntoClientRequest + Unpin,
    ) -> Result<TestClient, tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(TestClient {
            ws,
            envelopes_only: false,
        })
    }

    /// Connects to a `ws://127.0.0.1:port/path` URL over a socket whose kernel receive buffer
    /// is `bytes` (for slow-reader tests: a client that does not read stops the server's
    /// writes after little data, as a slow mobile link does).
    pub async fn connect_with_receive_buffer(
        url: &str,
        bytes: u32,
    ) -> Result<TestClient, tungstenite::Error> {
        let request = url.into_client_request()?;
        let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let addr: SocketAddr = format!("{host}:{port}")
            .parse()
            .map_err(|_| tungstenite::Error::Url(tungstenite::error::UrlError::NoHostName))?;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(bytes)?;
        let stream = socket.connect(addr).await?;
        let (ws, _) =
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await?;
        Ok(TestClient {
            ws,
            envelopes_only: false,
        })
    }

    /// From now on, JSON frames this client receives ([`receive_json`](Self::receive_json),
    /// [`request`](Self::request), [`try_receive_json`](Self::try_receive_json)) lose the keys
    /// dcrf adds to DCRF's envelope (`position`, `recovered`; also inside a multiplexed
    /// `payload`), so a test can assert DCRF's frames exactly. Frames read as text are
    /// unchanged.
    pub fn dcrf_envelopes(mut self) -> Self {
        self.envelopes_only = true;
        self
    }

    fn received(&self, mut value: Value) -> Value {
        if self.envelopes_only {
            strip_extensions(&mut value);
            if let Some(payload) = value.get_mut("payload") {
                strip_extensions(payload);
            }
        }
        value
    }

    /// The HTTP status the handshake was refused with, or `None` if it was accepted.
    pub async fn refused_status(request: impl IntoClientRequest + Unpin) -> Option<u16> {
        match tokio_tungstenite::connect_async(request).await {
            Ok(_) => None,
            Err(tungstenite::Error::Http(resp)) => Some(resp.status().as_u16()),
            Err(e) => panic!("handshake failed without an HTTP status: {e}"),
        }
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .expect("send text frame");
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws
            .send(Message::binary(data))
            .await
            .expect("send binary frame");
    }

    /// Receives the next text frame as JSON; panics after [`RECEIVE_TIMEOUT`] or on close.
    pub async fn receive_json(&mut self) -> Value {
        let text = self.receive_text().await;
        let value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        self.received(value)
    }

    /// Receives the next text frame verbatim.
    pub async fn receive_text(&mut self) -> String {
        loop {
            let next = tokio::time::timeout(RECEIVE_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match next {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next text frame as JSON, or `None` when none arrives within `wait` (or the socket
    /// closed).
    pub async fn try_receive_json(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let next = tokio::time::timeout(wait, self.ws.next()).await.ok()??;
            match next {
                Ok(Message::Text(t)) => {
                    let value =
                        serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"));
                    return Some(self.received(value));
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                _ => return None,
            }
        }
    }

    /// Sends a request and returns the next frame.
    pub async fn request(&mut self, value: Value) -> Value {
        self.send_json(value).await;
        self.receive_json().await
    }

    /// Asserts that nothing arrives within [`NOTHING_TIMEOUT`].
    pub async fn receive_nothing(&mut self) {
        self.receive_nothing_for(NOTHING_TIMEOUT).await;
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn receive_nothing_for(&mut self, wait: Duration) {
        if let Ok(Some(msg)) = tokio::time::timeout(wait, self.ws.next()).await {
            panic!("expected nothing, got {msg:?}");
        }
    }

    /// Waits for the server's close frame and returns it (`None` if the socket ended without
    /// one).
    pub async fn receive_close(&mut self) -> Option<CloseFrame> {
        loop {
            let next = tokio::time::timeout(RECEIVE_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match next {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Closes the connection from the client side.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Removes dcrf's extension keys (`position`, `recovered`) from an envelope.
fn strip_extensions(value: &mut Value) {
    if let Some(map) = value.as_object_mut() {
        map.remove("position");
        map.remove("recovered");
    }
}

#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
/// The databases a model test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    /// An in-memory SQLite database of its own.
    Sqlite,
    /// A SQLite file of its own in the temporary directory (WAL, so retrieves take the inline
    /// read path); [`drop_test_db`] removes it.
    SqliteFile,
    /// A fresh schema in the PostgreSQL database named by `DATABASE_URL`.
    Postgres,
}

#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
/// A fresh, empty database for one test: in-memory SQLite, a new SQLite file, or a new schema in
/// the PostgreSQL database of `DATABASE_URL` (the connection's `search_path` points at it).
///
/// # Panics
///
/// When PostgreSQL is asked for and `DATABASE_URL` is unset: a test that cannot run fails, it
/// never passes without running. Put `postgres` in the names of such tests (the
/// [`backend_tests!`](crate::backend_tests) variants are `name::postgres`) so that a runner
/// without PostgreSQL filters them out and reports them as skipped, as `scripts/test.sh` does.
pub async fn test_db(backend: TestBackend) -> crate::model::Db {
    match backend {
        TestBackend::Sqlite => crate::model::Db::connect("sqlite::memory:")
            .await
            .expect("in-memory sqlite"),
        TestBackend::SqliteFile => {
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "dcrf-test-{}-{}.sqlite3",
                std::process::id(),
                COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            remove_sqlite_file(&path);
            crate::model::Db::connect(&format!("sqlite://{}?mode=rwc", path.display()))
                .await
                .expect("sqlite file in the temporary directory")
        }
        TestBackend::Postgres => {
            let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
                panic!(
                    "DATABASE_URL is not set: this test needs PostgreSQL; run it through \
                     scripts/test.sh, which filters it out when PostgreSQL is unavailable"
                )
            });
            postgres_schema(&url).await
        }
    }
}

#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
/// Creates a uniquely named schema and connects with `search_path` set to it.
pub async fn postgres_schema(url: &str) -> crate::model::Db {
    let scoped = postgres_schema_url(url).await;
    crate::model::Db::connect(&scoped)
        .await
        .expect("connect to test schema")
}

#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
/// Creates a uniquely named schema and returns a URL whose connections use it (for servers
/// started as separate processes).
pub async fn postgres_schema_url(url: &str) -> String {
    use sea_orm::ConnectionTrait;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let schema = format!(
        "dcrf_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        nanos
    );
    let admin = crate::model::Db::connect(url)
        .await
        .expect("connect to DATABASE_URL");
    admin
        .conn()
        .execute_unprepared(&format!("CREATE SCHEMA \"{schema}\""))
        .await
        .expect("create test schema");
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
/// Drops the schema a PostgreSQL test database was created in, or removes the file of a SQLite
/// one (see [`test_db`]); does nothing for an in-memory database.
pub async fn drop_test_db(db: crate::model::Db) {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    #[cfg(feature = "sqlite")]
    if db.backend() == DbBackend::Sqlite {
        let path = db
            .conn()
            .get_sqlite_connection_pool()
            .connect_options()
            .get_filename()
            .to_owned();
        if path.extension().is_some_and(|e| e == "sqlite3") {
            let _ = db.conn().clone().close().await;
            remove_sqlite_file(&path);
        }
        return;
    }
    if db.backend() != DbBackend::Postgres {
        return;
    }
    let row = db
        .conn()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT current_schema()",
        ))
        .await;
    if let Ok(Some(row)) = row
        && let Ok(schema) = row.try_get_by_index::<String>(0)
        && schema.starts_with("dcrf_test_")
    {
        let _ = db
            .conn()
            .execute_unprepared(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .await;
    }
}

/// Removes a SQLite database file with its WAL and shared-memory files.
#[cfg(feature = "model")]
fn remove_sqlite_file(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(name);
    }
}

#[cfg(feature = "model")]
#[cfg_attr(docsrs, doc(cfg(feature = "model")))]
/// Declares a test that runs once per backend: `mod name { sqlite, sqlite_file, postgres }`,
/// calling `async fn name(db: Db)`.
///
/// ```ignore
/// dcrf::backend_tests!(create_works);
/// async fn create_works(db: dcrf::model::Db) { /* ... */ }
/// ```
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let db = $crate::testing::test_db($crate::testing::TestBackend::Sqlite).await;
                super::$name(db).await;
            }
            #[tokio::test]
            async fn sqlite_file() {
                let db = $crate::testing::test_db($crate::testing::TestBackend::SqliteFile).await;
                super::$name(db.clone()).await;
                $crate::testing::drop_test_db(db).await;
            }
            #[tokio::test]
            async fn postgres() {
                let db = $crate::testing::test_db($crate::testing::TestBackend::Postgres).await;
                super::$name(db.clone()).await;
                $crate::testing::drop_test_db(db).await;
            }
        }
    )*};
}

/// A consumer driven without a socket: frames in, frames out, through the same dispatch as a
/// real connection (for unit tests and benchmarks of the hot path).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use dcrf::prelude::*;
/// use dcrf::testing::LocalConnection;
///
/// #[derive(Default)]
/// struct Ping;
/// #[dcrf::consumer]
/// impl Ping {
///     #[action]
///     async fn ping(&mut self) -> Result<Reply<&'static str>, ApiError> { Ok(Reply::ok("pong")) }
/// }
/// impl Consumer for Ping {}
///
/// let mut conn = LocalConnection::new(Ping);
/// conn.send(r#"{"action":"ping","request_id":1}"#).await;
/// assert_eq!(
///     conn.receive().unwrap(),
///     r#"{"errors":[],"data":"pong","action":"ping","response_status":200,"request_id":1}"#
/// );
/// # }
/// ```
#[derive(Debug)]
pub struct LocalConnection<C> {
    consumer: C,
    ctx: crate::consumer::Ctx,
    rx: flume::Receiver<crate::consumer::Outbound>,
    inbox: flume::Receiver<crate::channel::Delivery>,
}

impl<C: crate::consumer::Consumer> LocalConnection<C> {
    /// An anonymous connection with the consumer's (or the default) permissions.
    pub fn new(consumer: C) -> Self {
        Self::with_scope(consumer, crate::scope::Scope::default())
    }

    /// A connection with a given scope.
    pub fn with_scope(consumer: C, scope: crate::scope::Scope) -> Self {
        let (out, rx) = crate::consumer::Outbox::new(1024, usize::MAX);
        let (inbox_tx, inbox) = flume::bounded(1024);
        let permissions = consumer.permissions().unwrap_or_default();
        let link = crate::consumer::Link {
            out,
            inbox: inbox_tx,
            lag: std::sync::Arc::new(crate::channel::Lag::new(
                std::time::Duration::from_secs(5),
                usize::MAX,
            )),
            kick: tokio_util::sync::CancellationToken::new(),
            stream: None,
            guard: Dcrf::new().guard(None),
        };
        LocalConnection {
            consumer,
            ctx: crate::consumer::Ctx::new(scope, link, permissions),
            rx,
            inbox,
        }
    }

    /// The connection's context (to subscribe it, or send through it).
    pub fn ctx(&self) -> &crate::consumer::Ctx {
        &self.ctx
    }

    /// Handles one inbound text frame to completion.
    pub async fn send(&mut self, text: &str) {
        crate::server::handle_text(&mut self.consumer, &self.ctx, text).await;
    }

    /// Runs the handler of every subscription event queued for this connection.
    pub async fn process_events(&mut self) {
        while let Ok((_, message)) = self.inbox.try_recv() {
            self.ctx.lag().dequeued(&message);
            crate::server::handle_event(&mut self.consumer, &self.ctx, message).await;
        }
    }

    /// The next outbound text frame, if one is queued.
    pub fn receive(&mut self) -> Option<String> {
        match self.rx.try_recv().ok()? {
            crate::consumer::Outbound::Text(t, _) => Some(t.to_string()),
            crate::consumer::Outbound::Flush(_) | crate::consumer::Outbound::Close(..) => None,
        }
    }
}
