//! Serving consumers: the application-wide [`Dcrf`] settings, mounting a consumer on an axum
//! route, the per-connection task, and graceful shutdown.
//!
//! ## One connection
//!
//! The handshake runs the [`Authenticator`], the Origin check, the consumer's `can_connect` and
//! its `connect` hook; any refusal is an HTTP status (401, 403) before the upgrade. After the
//! upgrade the connection is two tasks: a reader that parses each frame and runs its action to
//! completion before reading the next one (so replies come in request order, as in DCRF), and
//! a writer that drains the bounded outbound queue into the socket, batching what is ready
//! into one flush.
//!
//! ## Bad input
//!
//! Every inbound frame gets an answer and the connection stays open:
//!
//! | input | reply |
//! |---|---|
//! | invalid JSON | 400 `Invalid JSON: ...`, `action` and `request_id` null |
//! | JSON that is not an object | 400 `Expected a JSON object ...` |
//! | a binary frame | 400 `Binary frames are not supported; send JSON text frames.` |
//! | no `action` | 405 `Unable to find action in message body.` (`action: null`) |
//! | `action` not a string | 400 `[{"action": ["Not a valid string."]}]` |
//! | permission denied (also for unknown actions) | 403 `You do not have permission to perform this action.` |
//! | unknown action | 405 `Method "x" not allowed.` |
//! | missing or mistyped argument | 400 `[{"field": ["..."]}]` |
//! | an action's server fault or panic | 500 `A server error occurred.` (the cause is logged) |
//!
//! A message larger than [`Dcrf::max_message_size`] (default 1 MiB) is not read: the server
//! closes the connection with close code **1009** (Message Too Big), as RFC 6455 prescribes.
//! Buffering an oversized message only to answer it would defeat the limit.
//!
//! ## Limits and closes
//!
//! Everything a client can make the server hold is capped; the caps, their defaults, where
//! they are set and what a client sees are in one table, [`docs/limits.md`][limits]. In short:
//! handshakes must arrive within [`Dcrf::handshake_timeout`]; [`serve`] admits at most
//! [`Dcrf::max_connections`] sockets ([`Dcrf::max_connections_per_ip`] per client address) and
//! answers the others HTTP 503; a `request_id` over [`Dcrf::max_request_id_size`] answers 400;
//! a reply over [`Dcrf::max_reply_size`] is replaced by a 413 error frame; more than
//! [`Dcrf::max_detached_actions`] detached actions at once answer 503.
//!
//! Close codes (RFC 6455 and the application range):
//!
//! | code | when |
//! |---|---|
//! | the client's own | the client sent a Close frame: it is echoed |
//! | 1001 | server shutdown |
//! | 1002 | protocol error: RSV bits set, a reserved opcode, an unmasked client frame, a fragmented or oversized (> 125 bytes) control frame, a continuation without a start |
//! | 1007 | a text frame that is not UTF-8 |
//! | 1009 | a message over [`Dcrf::max_message_size`] |
//! | 1011 | keepalive: nothing (not even a pong) arrived for [`Dcrf::ping_interval`] + [`Dcrf::pong_timeout`] |
//! | 1013 | too slow: the connection stayed behind its subscriptions for `Dcrf::slow_client_timeout` |
//! | 4401 | the credential expired (see [`auth`](crate::auth); `refresh_token` moves the deadline) |
//!
//! [limits]: https://github.com/dcrf-rs/dcrf-rs/blob/main/docs/limits.md

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, RawPathParams, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use futures_util::{Sink, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::BoxFuture;
use crate::auth::{Authenticator, NoAuth, query_pairs};
use crate::channel::{Delivery, GroupMessage, Lag, Position};
use crate::consumer::sink::SharedSink;
use crate::consumer::{Accept, Event, RESYNC, Replay};
use crate::consumer::{Consumer, Ctx, Dispatched, Link, Outbound, Outbox, catch_panic};
use crate::error::ApiError;
pub use crate::guard::{CLOSE_KEEPALIVE_TIMEOUT, CLOSE_TOKEN_EXPIRED};
use crate::guard::{Guard, SocketLimits};
use crate::listener::ServeLimits;
use crate::permission::{Permission, Permissions};
use crate::protocol::Frame;
use crate::scope::{Scope, parse_cookies};
use crate::wake_gate::WakeGate;

/// Application-wide settings shared by every consumer you mount: the authenticator, default
/// permissions, limits, allowed origins, and the shutdown switch.
///
/// ```no_run
/// use dcrf::prelude::*;
/// # #[derive(Default)] struct Echo;
/// # #[dcrf::consumer] impl Echo {}
/// # impl Consumer for Echo {}
///
/// # async fn run() -> Result<(), dcrf::Error> {
/// let app = Dcrf::new().default_permissions(IsAuthenticated);
/// let router = axum::Router::new().route("/ws/echo/", app.consumer(Echo::default));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
/// dcrf::serve(listener, router, &app, async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Dcrf {
    auth: Arc<dyn Authenticator>,
    permissions: Permissions,
    max_message_size: usize,
    outbound_queue: usize,
    outbound_bytes: usize,
    event_queue: usize,
    event_queue_bytes: usize,
    slow_client_timeout: Duration,
    socket_buffers: (usize, usize),
    allowed_origins: Option<Arc<[String]>>,
    serve_limits: ServeLimits,
    socket_limits: SocketLimits,
    shutdown: CancellationToken,
    connections: TaskTracker,
    slow_closes: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Dcrf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dcrf")
            .field("max_message_size", &self.max_message_size)
            .field("outbound_queue", &self.outbound_queue)
            .field("allowed_origins", &self.allowed_origins)
            .field("serve_limits", &self.serve_limits)
            .field("socket_limits", &self.socket_limits)
            .finish_non_exhaustive()
    }
}

impl Default for Dcrf {
    fn default() -> Self {
        Self::new()
    }
}

/// The default inbound message limit: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 20;
/// The default outbound queue length, in frames, per connection.
pub const DEFAULT_OUTBOUND_QUEUE: usize = 256;
/// The default bytes of outbound frames queued per connection: 4 MiB.
pub const DEFAULT_OUTBOUND_BYTES: usize = 4 << 20;
/// The default event queue length, in group messages, per connection.
pub const DEFAULT_EVENT_QUEUE: usize = 1024;
/// The default bytes of group messages queued per connection: 4 MiB.
pub const DEFAULT_EVENT_QUEUE_BYTES: usize = 4 << 20;
/// How long a connection may stay behind its subscriptions (its event queue overflowing without
/// a catch-up) before it is closed with 1013: 5 seconds.
pub const DEFAULT_SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default WebSocket read and write buffer sizes, in bytes, per connection.
pub const DEFAULT_SOCKET_BUFFERS: (usize, usize) = (2 * 1024, 8 * 1024);
/// The default time a client has to send its whole HTTP request head: 10 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default time [`serve`] waits for connections to end after shutdown begins: 10 s.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// The default cap on open connections per [`serve`]: 10,000.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The default cap on open connections from one client IP address: 1,000.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1_000;
/// The default cap on a frame's `request_id`, in bytes of JSON: 1 KiB.
pub const DEFAULT_MAX_REQUEST_ID_SIZE: usize = 1024;
/// The default cap on one outbound frame, in bytes: 16 MiB.
pub const DEFAULT_MAX_REPLY_SIZE: usize = 16 << 20;
/// The default cap on detached actions running at once on one socket: 64.
pub const DEFAULT_MAX_DETACHED_ACTIONS: usize = 64;
/// The default cap on subscriptions held by one socket (stream + request id pairs, all streams
/// of a multiplexed socket together): 1,000.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1_000;
/// The default interval between keepalive pings: 25 s.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(25);
/// The default grace after a ping before a silent peer is closed: 20 s.
pub const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(20);

impl Dcrf {
    /// Anonymous users, [`AllowAny`](crate::permission::AllowAny), 1 MiB messages, a queue of 256
    /// frames per connection, same-origin cookie sockets, and the limits of `docs/limits.md`
    /// (the `DEFAULT_*` constants of this module).
    pub fn new() -> Self {
        Dcrf {
            auth: Arc::new(NoAuth),
            permissions: Permissions::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            outbound_queue: DEFAULT_OUTBOUND_QUEUE,
            outbound_bytes: DEFAULT_OUTBOUND_BYTES,
            event_queue: DEFAULT_EVENT_QUEUE,
            event_queue_bytes: DEFAULT_EVENT_QUEUE_BYTES,
            slow_client_timeout: DEFAULT_SLOW_CLIENT_TIMEOUT,
            socket_buffers: DEFAULT_SOCKET_BUFFERS,
            allowed_origins: None,
            serve_limits: ServeLimits {
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            },
            socket_limits: SocketLimits {
                max_request_id: DEFAULT_MAX_REQUEST_ID_SIZE,
                max_reply: DEFAULT_MAX_REPLY_SIZE,
                max_detached: DEFAULT_MAX_DETACHED_ACTIONS,
                max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
                keepalive: Some((DEFAULT_PING_INTERVAL, DEFAULT_PONG_TIMEOUT)),
                rate: None,
            },
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            slow_closes: Arc::default(),
        }
    }

    /// How many connections were closed with 1013 because they stayed behind their
    /// subscriptions for longer than the slow-client timeout (a client that stopped reading).
    pub fn slow_client_closes(&self) -> u64 {
        self.slow_closes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves each connection's user (see [`auth`](crate::auth)).
    pub fn authenticator(mut self, auth: impl Authenticator) -> Self {
        self.auth = Arc::new(auth);
        self
    }

    /// The permissions of consumers that do not declare their own.
    pub(crate) fn default_permissions_ref(&self) -> &Permissions {
        &self.permissions
    }

    /// Permissions for consumers that do not declare their own.
    pub fn default_permissions(mut self, p: impl Permission) -> Self {
        self.permissions = Permissions::new(p);
        self
    }

    /// The largest inbound message, in bytes; larger ones close the socket with 1009.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How many frames may wait to be written to one socket. A full queue makes the action that
    /// replies wait, which stops the connection reading: backpressure, not buffering.
    pub fn outbound_queue(mut self, frames: usize) -> Self {
        self.outbound_queue = frames.max(1);
        self
    }

    /// How many bytes of frames may wait to be written to one socket (with
    /// [`outbound_queue`](Self::outbound_queue), whichever is reached first). A frame that does
    /// not fit waits, as for a full queue; one frame larger than the whole budget is still sent,
    /// alone. With the event queue's bytes, this bounds what a client that stops reading can
    /// make the server hold, however large the rows. Default 4 MiB.
    pub fn outbound_bytes(mut self, bytes: usize) -> Self {
        self.outbound_bytes = bytes.max(1);
        self
    }

    /// How many subscription events may wait for one connection. An event that finds the queue
    /// full is not queued: the connection is told it fell behind and, once it has sent what it
    /// has, reads what it missed from the streams' history (or sends a resync notice when the
    /// history no longer holds it). Memory per connection stays bounded and other subscribers
    /// are not delayed.
    pub fn event_queue(mut self, events: usize) -> Self {
        self.event_queue = events.max(1);
        self
    }

    /// How many bytes of subscription events may wait for one connection (with
    /// [`event_queue`](Self::event_queue), whichever is reached first); an event over it is
    /// handled as one that finds the queue full. An empty queue takes any one event. Default
    /// 4 MiB.
    pub fn event_queue_bytes(mut self, bytes: usize) -> Self {
        self.event_queue_bytes = bytes.max(1);
        self
    }

    /// How long a connection may stay behind (events dropped from its full queue, no catch-up
    /// since) before it is closed with code 1013 (Try Again Later): a client that stops
    /// reading. Default [`DEFAULT_SLOW_CLIENT_TIMEOUT`].
    pub fn slow_client_timeout(mut self, timeout: Duration) -> Self {
        self.slow_client_timeout = timeout;
        self
    }

    /// The WebSocket read buffer and write buffer of each connection, in bytes (default 2 KiB
    /// and 8 KiB). They are what an idle connection costs; tungstenite's defaults (128 KiB
    /// each) make an idle connection ~130 KiB. Both grow on demand for large messages; the
    /// write buffer is flushed after each batch of frames anyway.
    pub fn socket_buffers(mut self, read: usize, write: usize) -> Self {
        self.socket_buffers = (read.max(512), write);
        self
    }

    /// Origins allowed to open a socket that carries cookies (against cross-site WebSocket
    /// hijacking), e.g. `https://app.example`. A handshake with cookies whose `Origin` is
    /// missing or not listed is refused with 403.
    ///
    /// Without a list (the default) a cookie-carrying handshake must be same-origin: its
    /// `Origin`'s host and port must be the request's `Host`, else 403. Handshakes without
    /// cookies (tokens) are never checked: a page on another site cannot make a browser send
    /// them.
    pub fn allowed_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_origins = Some(origins.into_iter().map(Into::into).collect());
        self
    }

    /// How long a client has to send its whole HTTP request head (the WebSocket handshake or
    /// any HTTP request) after connecting, or between two requests on a kept-alive connection;
    /// a socket that sends nothing, or trickles header lines, is closed then. Default 10 s.
    /// Applied by [`serve`].
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.serve_limits.handshake_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long [`serve`] waits, after its shutdown signal, for connections to finish; then it
    /// returns whatever clients do. Default 10 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.serve_limits.shutdown_timeout = timeout;
        self
    }

    /// The most connections [`serve`] keeps open at once (WebSockets, plain HTTP and handshakes
    /// in progress). One more is answered HTTP 503 and closed. Default 10,000.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.serve_limits.max_connections = connections;
        self
    }

    /// The most connections [`serve`] keeps open from one client IP address (IPv4-mapped IPv6
    /// addresses count as IPv4); one more is answered HTTP 503. Default 1,000. Behind a reverse
    /// proxy every client has the proxy's address: raise it there.
    pub fn max_connections_per_ip(mut self, connections: usize) -> Self {
        self.serve_limits.max_connections_per_ip = connections;
        self
    }

    /// The largest `request_id` a frame may carry, in bytes of its JSON text. A longer one is
    /// answered with a 400 error frame (with `request_id: null`, since echoing it is what the
    /// cap prevents) and the connection stays open. Default 1 KiB.
    pub fn max_request_id_size(mut self, bytes: usize) -> Self {
        self.socket_limits.max_request_id = bytes;
        self
    }

    /// The largest frame the server sends, in bytes. A reply over it is not sent: the client
    /// gets a **413** error frame with the reply's `action` and `request_id` instead (413 because
    /// the client can act on it: ask for less, e.g. a smaller page); serialization stops at the
    /// cap. Default 16 MiB.
    pub fn max_reply_size(mut self, bytes: usize) -> Self {
        self.socket_limits.max_reply = bytes.max(1024);
        self
    }

    /// How many detached actions (`#[action(detached)]`, [`Ctx::spawn_action`]) may run at once
    /// on one socket (all streams of a multiplexed socket together). One more does not run: it
    /// is answered with a **503** error frame (the server is busy for this client, not
    /// throttling it: 429 is left to rate limiting). Default 64.
    pub fn max_detached_actions(mut self, actions: usize) -> Self {
        self.socket_limits.max_detached = actions;
        self
    }

    /// How many subscriptions one socket may hold (all streams of a multiplexed socket
    /// together). A subscription is one stream + request id pair: `subscribe_to_all` with 1,001
    /// distinct request ids holds 1,001, and one instance subscribed under two request ids holds
    /// two. A subscribe over the cap is answered with a **400** error frame and not kept; the
    /// socket stays open, and an unsubscribe frees its place. Default 1,000.
    pub fn max_subscriptions(mut self, subscriptions: usize) -> Self {
        self.socket_limits.max_subscriptions = subscriptions;
        self
    }

    /// Limits each socket to `frames_per_second` inbound frames per second (a token bucket of
    /// that many frames, from `governor`; all streams of a multiplexed socket together). A frame
    /// over the limit is not run: it is answered with DRF's throttling error, **429**
    /// `Request was throttled. Expected available in N seconds.`, and the socket stays open.
    /// Off by default (as DRF's throttling is); `0` turns it off.
    pub fn rate_limit(mut self, frames_per_second: u32) -> Self {
        self.socket_limits.rate = std::num::NonZeroU32::new(frames_per_second);
        self
    }

    /// How often the server pings each WebSocket. `Duration::ZERO` turns keepalive off.
    /// Default 25 s. See [`pong_timeout`](Self::pong_timeout).
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        let timeout = self
            .socket_limits
            .keepalive
            .map_or(DEFAULT_PONG_TIMEOUT, |(_, t)| t);
        self.socket_limits.keepalive = (!interval.is_zero()).then_some((interval, timeout));
        self
    }

    /// How long past a ping interval a silent peer is kept: a socket from which nothing (no
    /// frame, no pong) arrived for `ping_interval + pong_timeout` is closed with 1011. Default
    /// 20 s.
    pub fn pong_timeout(mut self, timeout: Duration) -> Self {
        if let Some((_, t)) = &mut self.socket_limits.keepalive {
            *t = timeout;
        }
        self
    }

    /// A new socket's guard, with its credential's expiry.
    pub(crate) fn guard(&self, expires_at: Option<u64>) -> Arc<Guard> {
        Arc::new(Guard::new(
            self.socket_limits,
            self.auth.clone(),
            expires_at,
        ))
    }

    /// Starts a graceful shutdown: every connection finishes its current action, gets a close
    /// frame with code 1001 (Going Away) and ends. [`serve`] calls this when its signal fires.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until every connection has ended (after [`Dcrf::shutdown`]).
    pub async fn wait_connections(&self) {
        self.connections.close();
        self.connections.wait().await;
    }

    /// An axum route that upgrades to a WebSocket served by a new consumer from `factory`
    /// for each connection.
    pub fn consumer<C, F, S>(&self, factory: F) -> MethodRouter<S>
    where
        C: Consumer,
        F: Fn() -> C + Clone + Send + Sync + 'static,
        S: Clone + Send + Sync + 'static,
    {
        factory().mounted();
        let app = self.clone();
        axum::routing::get(move |req: Request| {
            let app = app.clone();
            let factory = factory.clone();
            async move { app.upgrade(factory(), req).await }
        })
    }

    async fn upgrade<C: Consumer>(self, consumer: C, req: Request) -> Response {
        let (ws, scope, guard) = match self.handshake(req).await {
            Ok(accepted) => accepted,
            Err(refused) => return refused,
        };
        let (link, queues) = self.link(None, guard);
        let stream = match StreamSession::open(consumer, scope, link, &self.permissions).await {
            Ok(stream) => stream,
            Err(refused) => return refused,
        };
        self.accept(ws, SingleSession(stream), queues)
    }

    /// Checks and describes a handshake: shutdown, upgrade headers, Origin, authentication;
    /// builds the scope and the socket's guard. An error is the HTTP response that refuses it.
    pub(crate) async fn handshake(
        &self,
        req: Request,
    ) -> Result<(WebSocketUpgrade, Scope, Arc<Guard>), Response> {
        let (mut parts, _body) = req.into_parts();
        let ws = WebSocketUpgrade::from_request_parts(&mut parts, &())
            .await
            .map_err(IntoResponse::into_response)?;
        if self.shutdown.is_cancelled() {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response());
        }
        if !self.origin_allowed(&parts) {
            return Err((StatusCode::FORBIDDEN, "origin not allowed").into_response());
        }
        let verified = self
            .auth
            .authenticate_session(&parts)
            .await
            .map_err(|e| (StatusCode::UNAUTHORIZED, e.to_string()).into_response())?;
        let (user, expires_at) = match verified {
            Some(v) => (Some(v.user), v.expires_at),
            None => (None, None),
        };
        let path_params = match RawPathParams::from_request_parts(&mut parts, &()).await {
            Ok(params) => params
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            Err(_) => HashMap::new(),
        };
        let scope = Scope {
            user,
            path: parts.uri.path().to_owned(),
            cookies: parse_cookies(&parts.headers),
            query: parts
                .uri
                .query()
                .map(query_pairs)
                .unwrap_or_default()
                .into_iter()
                .collect(),
            path_params,
            peer_addr: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
            headers: owned_headers(parts.headers),
        };
        Ok((ws, scope, self.guard(expires_at)))
    }

    /// The queues of one socket, and the link its contexts send through.
    pub(crate) fn link(&self, stream: Option<Arc<str>>, guard: Arc<Guard>) -> (Link, Queues) {
        let (out, rx) = Outbox::new(self.outbound_queue, self.outbound_bytes);
        let direct = out.direct().clone();
        let (inbox_tx, inbox) = flume::bounded(self.event_queue);
        let kick = CancellationToken::new();
        let lag = Arc::new(Lag::new(self.slow_client_timeout, self.event_queue_bytes));
        (
            Link {
                out,
                inbox: inbox_tx,
                lag: lag.clone(),
                kick: kick.clone(),
                stream,
                guard: guard.clone(),
            },
            Queues {
                rx,
                direct,
                inbox,
                lag,
                kick,
                guard,
            },
        )
    }

    /// Upgrades and runs a session on its own task, tracked for graceful shutdown.
    pub(crate) fn accept<S: Session>(
        &self,
        ws: WebSocketUpgrade,
        session: S,
        queues: Queues,
    ) -> Response {
        let shutdown = self.shutdown.clone();
        let tracker = self.connections.clone();
        let slow_closes = self.slow_closes.clone();
        let (read, write) = self.socket_buffers;
        ws.read_buffer_size(read)
            .write_buffer_size(write)
            .max_message_size(self.max_message_size)
            .max_frame_size(self.max_message_size)
            .on_upgrade(move |socket| {
                use tracing::Instrument;
                let span =
                    tracing::info_span!("connection", connection_id = session.connection_id());
                // Split here, not in the task: the task's future then holds the two halves, not
                // room for the whole socket for the connection's life.
                let (sink, stream) = socket.split();
                tracker.track_future(
                    run_connection(sink, stream, session, queues, shutdown, slow_closes)
                        .instrument(span),
                )
            })
    }

    fn origin_allowed(&self, parts: &axum::http::request::Parts) -> bool {
        if !parts.headers.contains_key(header::COOKIE) {
            return true;
        }
        let Some(origin) = parts
            .headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
        else {
            return false;
        };
        match &self.allowed_origins {
            Some(allowed) => allowed.iter().any(|a| a == origin),
            None => same_origin(origin, parts),
        }
    }
}

/// The handshake's headers with values of their own. hyper's parsed values are slices of the
/// buffer the request head was read into (8 KiB at least); the scope lives as long as the
/// connection, and keeping those slices would keep that whole buffer for as long: most of what
/// an idle connection cost. The copy is one allocation of the values' bytes, which every value
/// shares.
fn owned_headers(headers: HeaderMap) -> HeaderMap {
    let mut pairs = Vec::with_capacity(headers.len());
    let mut name = None;
    for (next, value) in headers {
        // `into_iter` names a header once, then gives its further values without a name.
        if next.is_some() {
            name = next;
        }
        if let Some(name) = &name {
            pairs.push((name.clone(), value));
        }
    }
    let mut bytes = Vec::with_capacity(pairs.iter().map(|(_, v)| v.len()).sum());
    for (_, value) in &pairs {
        bytes.extend_from_slice(value.as_bytes());
    }
    let bytes = axum::body::Bytes::from(bytes);
    let mut owned = HeaderMap::with_capacity(pairs.len());
    let mut at = 0;
    for (name, value) in pairs {
        let end = at + value.len();
        let mut copy =
            HeaderValue::from_maybe_shared(bytes.slice(at..end)).unwrap_or(value.clone());
        at = end;
        copy.set_sensitive(value.is_sensitive());
        owned.append(name, copy);
    }
    owned
}

/// Does an `Origin` (`scheme://host[:port]`) name the request's own `Host`?
fn same_origin(origin: &str, parts: &axum::http::request::Parts) -> bool {
    let Some(host) = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
    else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "80",
        "https" | "wss" => "443",
        _ => return false,
    };
    // `Host` may leave out the scheme's default port; the origin may spell it out.
    let with_port = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        let has_port = match a.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            None => a.contains(':'),
        };
        if has_port {
            a
        } else {
            format!("{a}:{default_port}")
        }
    };
    with_port(authority) == with_port(host)
}

/// Serves a router until `signal` completes, then shuts down gracefully: stops accepting, sends
/// every WebSocket a close frame (1001) once its current action is done, waits for the
/// connections to end (at most [`Dcrf::shutdown_timeout`], default 10 s) and returns.
///
/// Connections are HTTP/1.1 (WebSockets upgrade from it), with the limits of [`Dcrf`]: the
/// request head must arrive within [`Dcrf::handshake_timeout`] (a socket that sends nothing is
/// closed then too), at most [`Dcrf::max_connections`] at once and
/// [`Dcrf::max_connections_per_ip`] per client address (the rest are answered HTTP 503), and an
/// accept error such as `EMFILE` pauses the accept loop for 50 ms instead of stopping or
/// spinning it. At shutdown a connection with no request in progress (a half-sent request
/// head, an idle keep-alive) is closed at once. See `docs/limits.md`.
///
/// The router is served with connect info, so [`Scope::peer_addr`] is set.
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    app: &Dcrf,
    signal: F,
) -> Result<(), crate::Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    crate::listener::serve(
        listener,
        router,
        app.serve_limits,
        app.shutdown.clone(),
        app.connections.clone(),
        signal,
    )
    .await
}

/// The receiving ends of a socket's queues, its kick switch and its guard.
pub(crate) struct Queues {
    rx: flume::Receiver<Outbound>,
    direct: Arc<SharedSink>,
    inbox: flume::Receiver<Delivery>,
    lag: Arc<Lag>,
    kick: CancellationToken,
    guard: Arc<Guard>,
}

/// What runs on one socket: a consumer, or a demultiplexer of several.
pub(crate) trait Session: Send + 'static {
    /// The connection id of the socket's logs and span (its first consumer's).
    fn connection_id(&self) -> u64;
    /// Handles one inbound text frame to completion.
    fn on_text<'a>(&'a mut self, text: &'a str) -> BoxFuture<'a, ()>;
    /// Answers a binary frame.
    fn on_binary(&mut self) -> BoxFuture<'_, ()>;
    /// Handles one event for one of the session's members.
    fn on_event(&mut self, member: u64, message: Arc<GroupMessage>) -> BoxFuture<'_, ()>;
    /// Checks every subscription against its stream and delivers what was missed.
    fn catch_up(&mut self) -> BoxFuture<'_, ()>;
    /// Leaves groups, cancels detached work, runs disconnect hooks.
    fn finish(&mut self) -> BoxFuture<'_, ()>;
}

/// One consumer with its context: a plain socket, or one stream of a multiplexed socket.
pub(crate) struct StreamSession<C> {
    consumer: C,
    ctx: Ctx,
}

impl<C: Consumer> StreamSession<C> {
    /// Checks `can_connect` and runs the `connect` hook; an error is the refusal response.
    pub(crate) async fn open(
        mut consumer: C,
        scope: Scope,
        link: Link,
        default_permissions: &Permissions,
    ) -> Result<Self, Response> {
        let permissions = consumer
            .permissions()
            .unwrap_or_else(|| default_permissions.clone());
        if !permissions.can_connect(&scope).await {
            return Err((StatusCode::FORBIDDEN, "connection refused").into_response());
        }
        let ctx = Ctx::new(scope, link, permissions);
        match catch_panic(consumer.connect(&ctx)).await {
            Ok(Ok(())) => Ok(StreamSession { consumer, ctx }),
            Ok(Err(e)) | Err(e) => {
                if e.is_server_error() {
                    tracing::error!(error = %e, "connect hook failed");
                }
                let status = e.status();
                Err((status, "connection refused").into_response())
            }
        }
    }
}

/// A type-erased [`StreamSession`], as a demultiplexer holds them.
pub(crate) trait DynStream: Send {
    fn on_text<'a>(&'a mut self, text: &'a str) -> BoxFuture<'a, ()>;
    fn on_event(&mut self, message: Arc<GroupMessage>) -> BoxFuture<'_, ()>;
    fn catch_up(&mut self) -> BoxFuture<'_, ()>;
    fn finish(&mut self) -> BoxFuture<'_, ()>;
    fn ctx(&self) -> &Ctx;
}

impl<C: Consumer> DynStream for StreamSession<C> {
    fn on_text<'a>(&'a mut self, text: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(handle_text(&mut self.consumer, &self.ctx, text))
    }
    fn on_event(&mut self, message: Arc<GroupMessage>) -> BoxFuture<'_, ()> {
        Box::pin(async move { handle_event(&mut self.consumer, &self.ctx, message).await })
    }
    fn catch_up(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for group in self.ctx.subscriptions().groups() {
                catch_up(&mut self.consumer, &self.ctx, &group).await;
            }
        })
    }
    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.ctx.subscriptions().leave_all(self.ctx.connection_id());
            self.ctx.cancel_tasks().await;
            self.consumer.disconnect(&self.ctx).await;
        })
    }
    fn ctx(&self) -> &Ctx {
        &self.ctx
    }
}

/// A socket served by one consumer.
struct SingleSession<C>(StreamSession<C>);

impl<C: Consumer> Session for SingleSession<C> {
    fn connection_id(&self) -> u64 {
        self.0.ctx.connection_id()
    }
    fn on_text<'a>(&'a mut self, text: &'a str) -> BoxFuture<'a, ()> {
        DynStream::on_text(&mut self.0, text)
    }
    fn on_binary(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.0.ctx.send_error(&binary_error(), None, None).await;
        })
    }
    fn on_event(&mut self, _member: u64, message: Arc<GroupMessage>) -> BoxFuture<'_, ()> {
        DynStream::on_event(&mut self.0, message)
    }
    fn catch_up(&mut self) -> BoxFuture<'_, ()> {
        DynStream::catch_up(&mut self.0)
    }
    fn finish(&mut self) -> BoxFuture<'_, ()> {
        DynStream::finish(&mut self.0)
    }
}

/// The answer to a binary frame.
pub(crate) fn binary_error() -> ApiError {
    ApiError::bad_request("Binary frames are not supported; send JSON text frames.")
}

async fn run_connection<S: Session>(
    sink: futures_util::stream::SplitSink<WebSocket, Message>,
    stream: futures_util::stream::SplitStream<WebSocket>,
    mut session: S,
    queues: Queues,
    shutdown: CancellationToken,
    slow_closes: Arc<std::sync::atomic::AtomicU64>,
) {
    let Queues {
        rx,
        direct,
        inbox,
        lag,
        kick,
        guard,
    } = queues;
    let _open = crate::metrics::connection_opened();
    let (close_tx, close_rx) = tokio::sync::oneshot::channel();
    let sent = guard.metrics().sent.clone();
    direct.install(sink, sent.clone());
    // The writer is a task of its own: one future of this task polled beside the reader served
    // the median reply sooner but the slowest ones later (measured in BENCHMARKS.md), and it
    // saved no memory, the writer's state moving into this task. While it is idle, this task
    // writes its own frames to the socket (see `consumer::sink`).
    let mut writer = tokio::spawn(write_loop(
        direct.clone(),
        rx,
        close_rx,
        guard.ping_interval(),
        sent,
    ));
    // The reader writes its own frames, flushed whenever it is about to wait.
    let close = {
        let read = read_loop(stream, &mut session, inbox, &lag, &kick, &guard, &shutdown);
        tokio::pin!(read);
        direct.reading(read).await
    };
    session.finish().await;
    let (code, reason) = close.unwrap_or((1000, ""));
    if code == 1013 {
        slow_closes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::metrics::count(crate::metrics::SLOW_CLIENT_CLOSES_TOTAL);
    }
    let _ = close_tx.send(CloseFrame {
        code,
        reason: reason.into(),
    });
    // The session's outbox senders go with it: the writer drains the queue, then closes.
    drop(session);
    // A client that stopped reading may never take the last frames: give up after a moment.
    if tokio::time::timeout(CLOSE_TIMEOUT, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// The close of a connection that stayed behind its subscriptions.
const TOO_SLOW: (u16, &str) = (1013, "too slow: subscription events dropped");

/// Reads and handles frames, events and catch-ups until the connection is to end; returns the
/// close frame to send, if any.
async fn read_loop<S: Session>(
    mut stream: futures_util::stream::SplitStream<WebSocket>,
    session: &mut S,
    inbox: flume::Receiver<Delivery>,
    lag: &Lag,
    kicked: &CancellationToken,
    guard: &Guard,
    shutdown: &CancellationToken,
) -> Option<(u16, &'static str)> {
    // Keepalive and credential expiry: one timer each for the whole connection.
    let ended = guard.ended();
    tokio::pin!(ended);
    // The signals and the event inbox are waited on by futures that live as long as the loop:
    // each registers with its channel or `Notify` once, not again for every frame.
    let mut inbox = inbox.into_stream();
    let shutting_down = shutdown.cancelled();
    let kick = kicked.cancelled();
    let catch_up_due = lag.due();
    let stuck = lag.stuck();
    tokio::pin!(shutting_down, kick, catch_up_due, stuck);
    // The signals are polled only after one of them woke the task (see `WakeGate`), and the
    // inbox only when it holds something: while it is empty, the waker of its last `Pending`
    // stays registered with the channel. The socket is polled every time until the first
    // event arrives; from then on it has a gate of its own, so that a push does not also try
    // to read a frame from a socket that did not wake the task (a connection that only sends
    // never makes the gate).
    let signals = WakeGate::new();
    let mut socket: Option<WakeGate> = None;
    let mut due = Due::default();
    loop {
        // In this order: the signals, the queued events, a catch-up, the socket.
        let work = std::future::poll_fn(|cx| {
            due.open(&signals, cx);
            if std::mem::take(&mut due.waiting) {
                let waker = signals.waker();
                let mut scx = Context::from_waker(&waker);
                if shutting_down.as_mut().poll(&mut scx).is_ready() {
                    return Poll::Ready(Err((1001, "server shutting down")));
                }
                if kick.as_mut().poll(&mut scx).is_ready() {
                    return Poll::Ready(Err(TOO_SLOW));
                }
                if let Poll::Ready(end) = ended.as_mut().poll(&mut scx) {
                    return Poll::Ready(Err(end));
                }
            }
            if due.inbox || !inbox.is_empty() {
                match inbox.poll_next_unpin(cx) {
                    Poll::Ready(Some((member, event))) => {
                        due.inbox = true;
                        lag.dequeued(&event);
                        return Poll::Ready(Ok(Work::Event(member, event)));
                    }
                    // Closed: as good as empty, with no waker to register.
                    Poll::Ready(None) | Poll::Pending => due.inbox = false,
                }
            }
            // After the queued events: what did not fit is read back from history.
            if std::mem::take(&mut due.catch_up) {
                let waker = signals.waker();
                if catch_up_due
                    .as_mut()
                    .poll(&mut Context::from_waker(&waker))
                    .is_ready()
                {
                    catch_up_due.set(lag.due());
                    due.catch_up = true;
                    return Poll::Ready(Ok(Work::CatchUp));
                }
            }
            let frame = match &socket {
                None => stream.poll_next_unpin(cx),
                Some(gate) => {
                    if gate.open(cx) {
                        due.socket = true;
                    }
                    if !std::mem::take(&mut due.socket) {
                        return Poll::Pending;
                    }
                    let waker = gate.waker();
                    let frame = stream.poll_next_unpin(&mut Context::from_waker(&waker));
                    // Ready: the socket may hold more frames already read, so it stays due
                    // until it answers `Pending`.
                    due.socket = frame.is_ready();
                    frame
                }
            };
            frame.map(|message| Ok(Work::Frame(message)))
        })
        .await;
        let work = match work {
            Ok(work) => work,
            Err(close) => return Some(close),
        };
        if matches!(work, Work::Event(..)) && socket.is_none() {
            socket = Some(WakeGate::new());
        }
        if let Work::Frame(message) = &work {
            guard.seen();
            if let Some(Ok(Message::Text(_) | Message::Binary(_))) = message {
                guard.metrics().received.increment(1);
            }
        }
        let step = async {
            match work {
                Work::Event(member, event) => session.on_event(member, event).await,
                Work::CatchUp => {
                    lag.take();
                    session.catch_up().await;
                }
                Work::Frame(Some(Ok(Message::Text(text)))) => session.on_text(&text).await,
                Work::Frame(Some(Ok(Message::Binary(_)))) => session.on_binary().await,
                Work::Frame(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Work::Frame(Some(Ok(Message::Close(_))) | None) => return Some(None),
                Work::Frame(Some(Err(e))) => return Some(close_for_error(e)),
            }
            None
        };
        let mut step = std::pin::pin!(step);
        // A connection stuck on a client that does not read is let go when the layer kicks it,
        // or once it has been behind for its slow-client timeout. A step that finishes at once
        // (most do: the reply or push fits the socket) leaves the signals to the next wait.
        let end = std::future::poll_fn(|cx| {
            if let Poll::Ready(end) = step.as_mut().poll(cx) {
                return Poll::Ready(end);
            }
            due.open(&signals, cx);
            if std::mem::take(&mut due.stepping) {
                let waker = signals.waker();
                let mut scx = Context::from_waker(&waker);
                if kick.as_mut().poll(&mut scx).is_ready()
                    || stuck.as_mut().poll(&mut scx).is_ready()
                {
                    return Poll::Ready(Some(Some(TOO_SLOW)));
                }
                if let Poll::Ready(end) = ended.as_mut().poll(&mut scx) {
                    return Poll::Ready(Some(Some(end)));
                }
            }
            Poll::Pending
        })
        .await;
        if let Some(close) = end {
            return close;
        }
    }
}

/// What the read loop has left to poll: the signals of the wait for work (shutdown, kick,
/// end), the catch-up signal, the signals watched while a step runs (kick, stuck, end), the
/// inbox (after an event: there may be more) and, once it has a gate, the socket (after a
/// frame, or after it woke the task).
struct Due {
    waiting: bool,
    catch_up: bool,
    stepping: bool,
    inbox: bool,
    socket: bool,
}

impl Default for Due {
    fn default() -> Due {
        Due {
            waiting: true,
            catch_up: true,
            stepping: true,
            inbox: true,
            socket: true,
        }
    }
}

impl Due {
    /// A wake-up of the signals makes every one of them due.
    fn open(&mut self, signals: &WakeGate, cx: &Context<'_>) {
        if signals.open(cx) {
            (self.waiting, self.catch_up, self.stepping) = (true, true, true);
        }
    }
}

/// How long a closing connection waits for its last frames to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One unit of a connection's work.
enum Work {
    Event(u64, Arc<GroupMessage>),
    CatchUp,
    Frame(Option<Result<Message, axum::Error>>),
}

/// The close frame that answers a read error, if the peer can still be told: 1009 for a
/// message over the size cap, 1002 for a protocol violation, 1007 for text that is not UTF-8.
fn close_for_error(e: axum::Error) -> Option<(u16, &'static str)> {
    use tungstenite::error::ProtocolError;
    let e = e.into_inner().downcast::<tungstenite::Error>().ok()?;
    match *e {
        tungstenite::Error::Capacity(_) => Some((1009, "message too big")),
        tungstenite::Error::Utf8(_) => Some((1007, "invalid UTF-8 in a text frame")),
        // The peer is gone: there is no one to tell.
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        tungstenite::Error::Protocol(_) => Some((1002, "protocol error")),
        _ => None,
    }
}

/// Drains the outbound queue into the socket, batching what is ready into one flush. When the
/// queue closes (the session ended), sends the close frame the session chose. The socket is
/// given up when it returns: no direct write reaches it after.
///
/// With keepalive on, a ping goes out every `ping_interval` (the reader closes peers that stay
/// silent, see [`Dcrf::pong_timeout`]).
async fn write_loop(
    shared: Arc<SharedSink>,
    rx: flume::Receiver<Outbound>,
    close: tokio::sync::oneshot::Receiver<CloseFrame>,
    ping_interval: Option<Duration>,
    sent: ::metrics::Counter,
) {
    let sink = &*shared;
    let _release = ReleaseSink(sink);
    let mut pings = crate::guard::Pings::new(ping_interval);
    // The outbound bytes of the frames being written, given back once they are flushed (one
    // buffer for the connection's life: no allocation per flush).
    let mut written = Vec::new();
    let mut flushes = Vec::new();
    let mut queued = rx.stream();
    loop {
        let first = tokio::select! {
            first = queued.next() => first,
            _ = pings.tick() => {
                sink.set_writing(true);
                let pinged = feed(sink, Message::Ping(Default::default())).await.is_ok()
                    && flush(sink).await.is_ok();
                if !pinged {
                    return;
                }
                sink.set_writing(false);
                continue;
            }
        };
        let Some(first) = first else { break };
        sink.set_writing(true);
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Outbound::Text(text, held) => {
                    if feed(sink, Message::Text(text)).await.is_err() {
                        return;
                    }
                    sent.increment(1);
                    written.push(held);
                }
                // The read loop left bytes the socket could not take at once: the flush below.
                Outbound::Flush(ticket) => flushes.push(ticket),
                Outbound::Close(frame, _ticket) => return send_close(sink, frame).await,
            }
            next = rx.try_recv().ok();
        }
        if flush(sink).await.is_err() {
            return;
        }
        // The frames' budget and tickets go back: direct writes may follow them now.
        written.clear();
        flushes.clear();
        sink.set_writing(false);
    }
    if let Ok(frame) = close.await {
        sink.set_writing(true);
        send_close(sink, frame).await;
    }
}

/// Takes the socket out of its shared sink when the writer ends (returns or is aborted).
struct ReleaseSink<'a>(&'a SharedSink);

impl Drop for ReleaseSink<'_> {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

/// Hands one message to the socket (`SinkExt::feed` on the shared sink).
async fn feed(sink: &SharedSink, message: Message) -> Result<(), ()> {
    let mut message = Some(message);
    let fed = std::future::poll_fn(|cx| {
        sink.poll(cx, |mut s, cx| match s.as_mut().poll_ready(cx) {
            Poll::Ready(Ok(())) => match message.take() {
                Some(m) => Poll::Ready(s.start_send(m).map_err(|_| ())),
                None => Poll::Ready(Ok(())),
            },
            Poll::Ready(Err(_)) => Poll::Ready(Err(())),
            Poll::Pending => Poll::Pending,
        })
    })
    .await;
    fed.unwrap_or(Err(()))
}

/// Flushes the socket (`SinkExt::flush` on the shared sink).
async fn flush(sink: &SharedSink) -> Result<(), ()> {
    let flushed = std::future::poll_fn(|cx| sink.poll(cx, |s, cx| s.poll_flush(cx))).await;
    match flushed {
        Some(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Sends our close frame, or, when the client closed first, flushes the echo of its own close
/// frame that tungstenite queued (RFC 6455: the peer must see its code, not 1006).
async fn send_close(sink: &SharedSink, frame: CloseFrame) {
    // After a client's close, sending ours fails (the echo is already queued): closing flushes it.
    if feed(sink, Message::Close(Some(frame))).await.is_ok() {
        let _ = flush(sink).await;
    }
    let _ = std::future::poll_fn(|cx| sink.poll(cx, |s, cx| s.poll_close(cx))).await;
}

/// Handles one group message: delivers it if the connection is subscribed and has not
/// delivered it yet; a gap in the stream is filled from history first (or announced with a
/// resync notice), and a new epoch is announced with one.
pub(crate) async fn handle_event<C: Consumer>(
    consumer: &mut C,
    ctx: &Ctx,
    message: Arc<GroupMessage>,
) {
    match ctx.subscriptions().accept(&message) {
        Accept::Skip => {}
        Accept::Deliver(request_ids) => deliver(consumer, ctx, &message, &request_ids).await,
        Accept::NewEpoch(request_ids) => {
            if let Some(p) = &message.position {
                let head = Position::new(p.epoch.clone(), p.offset.saturating_sub(1));
                resync(
                    consumer,
                    ctx,
                    &message.observer,
                    &message.group,
                    head,
                    &request_ids,
                )
                .await;
            }
            deliver(consumer, ctx, &message, &request_ids).await;
        }
        Accept::Gap => catch_up(consumer, ctx, &message.group).await,
    }
}

/// Brings one subscription up to its stream's head: the events after its cursor from history,
/// in order, or a resync notice when history no longer holds them.
pub(crate) async fn catch_up<C: Consumer>(consumer: &mut C, ctx: &Ctx, group: &Arc<str>) {
    let Some((cursor, layer)) = ctx.subscriptions().cursor(group) else {
        return;
    };
    let state = match layer.recover(group, cursor.clone()).await {
        Ok(state) => state,
        Err(e) => {
            tracing::warn!(group = %group, error = %e, "cannot catch up with a stream yet");
            return;
        }
    };
    if cursor.as_ref() == Some(&state.head) {
        return;
    }
    match state.missed {
        Some(missed) => {
            for message in missed {
                if let Accept::Deliver(request_ids) = ctx.subscriptions().accept(&message) {
                    deliver(consumer, ctx, &message, &request_ids).await;
                }
            }
        }
        None => {
            let Some((observer, request_ids)) =
                ctx.subscriptions().reset_cursor(group, state.head.clone())
            else {
                return;
            };
            resync(consumer, ctx, &observer, group, state.head, &request_ids).await;
        }
    }
}

/// Tells a subscription it missed events that cannot be recovered: a [`RESYNC`] event at
/// `head` for its request ids, through the consumer's handlers.
async fn resync<C: Consumer>(
    consumer: &mut C,
    ctx: &Ctx,
    observer: &Arc<str>,
    group: &Arc<str>,
    head: Position,
    request_ids: &[Box<serde_json::value::RawValue>],
) {
    tracing::info!(connection = ctx.connection_id(), group = %group, "subscription missed events: resync");
    let mut body = String::from("{\"position\":");
    head.write_json(&mut body);
    body.push('}');
    let Ok(body) = serde_json::value::RawValue::from_string(body) else {
        return;
    };
    let mut message =
        GroupMessage::new(observer.clone(), group.clone(), RESYNC.into(), body.into());
    message.position = Some(head);
    run_handler(consumer, ctx, &message, request_ids).await;
}

/// Runs the consumer's handler for a message the connection accepted. One rule for every
/// subscription: a push is allowed as a read of its action on its object.
async fn deliver<C: Consumer>(
    consumer: &mut C,
    ctx: &Ctx,
    message: &GroupMessage,
    request_ids: &[Box<serde_json::value::RawValue>],
) {
    if !crate::consumer::may_receive(ctx, &message.action, message.pk.as_deref()).await {
        return;
    }
    run_handler(consumer, ctx, message, request_ids).await;
}

async fn run_handler<C: Consumer>(
    consumer: &mut C,
    ctx: &Ctx,
    message: &GroupMessage,
    request_ids: &[Box<serde_json::value::RawValue>],
) {
    let event = Event {
        message,
        request_ids,
    };
    // Boxed: the handler's future is as large as its largest push, and the wrappers around it
    // would otherwise copy all of it on every event.
    let handled = crate::consumer::with_event_position(
        message.position.as_ref(),
        catch_panic(Box::pin(consumer.handle_event(ctx, &event))),
    )
    .await;
    if let Err(e) = handled {
        tracing::error!(connection = ctx.connection_id(), observer = %message.observer, error = %e, "event handler failed");
    }
}

/// Sends the history a frame's subscribes recovered, each replay to its own request id.
async fn send_replays<C: Consumer>(consumer: &mut C, ctx: &Ctx, replays: Vec<Replay>) {
    for replay in replays {
        let ids: Vec<Box<serde_json::value::RawValue>> = replay.request_id.into_iter().collect();
        for message in replay.events {
            deliver(consumer, ctx, &message, &ids).await;
        }
    }
}

/// Parses one text frame and runs it: the whole DCRF dispatch order.
pub(crate) async fn handle_text<C: Consumer>(consumer: &mut C, ctx: &Ctx, text: &str) {
    let mut frame = match Frame::parse(text) {
        Ok(frame) => frame,
        Err(e) => {
            let _ = ctx.send_error(&e.to_api_error(), None, None).await;
            return;
        }
    };
    if let Some(err) = ctx.guard().check_request_id(&frame) {
        let _ = ctx.send_error(&err, frame.action_str(), None).await;
        return;
    }
    if let Some(err) = ctx.guard().check_rate() {
        crate::metrics::count(crate::metrics::THROTTLED_TOTAL);
        let _ = ctx
            .send_error(&err, frame.action_str(), frame.request_id())
            .await;
        return;
    }
    let request_id = frame.request_id();
    let Some(raw_action) = frame.action_raw() else {
        let _ = ctx
            .send_error(&ApiError::action_missing(), None, request_id)
            .await;
        return;
    };
    let owned;
    let action: &str = match frame.action_str() {
        Some(a) => a,
        None => match serde_json::from_str::<String>(raw_action.get()) {
            Ok(a) => {
                owned = a;
                &owned
            }
            Err(_) => {
                let err = ApiError::field("action", "Not a valid string.");
                let _ = ctx.send_error(&err, None, request_id).await;
                return;
            }
        },
    };
    let span = tracing::debug_span!(
        "action",
        action,
        request_id = request_id.map(|r| r.get()),
        status = tracing::field::Empty,
    );
    // Boxed, like the dispatch inside it: otherwise this future carries the action's whole
    // state, and the wrappers below and the reader's own box copy it on every frame.
    let run = Box::pin(run_action(consumer, ctx, &mut frame, action));
    let (ran, outcome) =
        crate::metrics::observe(tracing::Instrument::instrument(run, span.clone())).await;
    let label = match ran {
        Ran::Known => action,
        Ran::Unknown => crate::metrics::UNKNOWN_ACTION,
        Ran::Denied => crate::metrics::DENIED_ACTION,
    };
    outcome.record(ctx.guard().metrics(), label, &span);
}

/// What became of a frame's action, for its metrics label.
enum Ran {
    /// The consumer (or the framework, for `refresh_token`) ran it.
    Known,
    /// The consumer has no such action: answered 405.
    Unknown,
    /// The permissions refused it: answered 403.
    Denied,
}

/// Runs a frame's action: the built-in `refresh_token`, or the permission check and the
/// consumer's dispatch, then the history its subscribes recovered.
async fn run_action<C: Consumer>(
    consumer: &mut C,
    ctx: &Ctx,
    frame: &mut Frame<'_>,
    action: &str,
) -> Ran {
    let request_id = frame.request_id();
    if action == crate::guard::REFRESH_ACTION && refresh_token(ctx, frame).await {
        return Ran::Known;
    }
    frame.set_reads(consumer.reads(action));
    if !ctx
        .permissions()
        .has_permission(ctx.scope(), action, frame)
        .await
    {
        let _ = ctx
            .send_error(&ApiError::permission_denied(), Some(action), request_id)
            .await;
        return Ran::Denied;
    }
    let frame: &Frame<'_> = frame;
    // Boxed: the dispatch future is as large as the consumer's largest action, and the
    // wrappers around it (and the futures of every caller up to the reader) would otherwise
    // copy it by value on each frame; profiles of `retrieve` showed those copies as the
    // largest user-space cost.
    let (dispatched, replays) = crate::consumer::with_frame(
        frame,
        catch_panic(Box::pin(consumer.dispatch(ctx, action, frame))),
    )
    .await;
    send_replays(consumer, ctx, replays).await;
    match dispatched {
        Ok(Dispatched::Handled) => Ran::Known,
        Ok(Dispatched::Unknown) => {
            let _ = ctx
                .send_error(
                    &ApiError::method_not_allowed(action),
                    Some(action),
                    request_id,
                )
                .await;
            Ran::Unknown
        }
        Err(err) => {
            let _ = ctx.send_error(&err, Some(action), request_id).await;
            Ran::Known
        }
    }
}

/// Runs the built-in `refresh_token` action if the authenticator supports refreshing; returns
/// whether it did (otherwise the frame is dispatched as usual).
///
/// `{"action": "refresh_token", "token": "<new credential>", "request_id": R}` answers 200
/// `{"exp": <new expiry>}`; an invalid token 401 (the old expiry stays); a token of another user
/// 403.
async fn refresh_token(ctx: &Ctx, frame: &Frame<'_>) -> bool {
    let token: Option<String> = frame
        .field("token")
        .and_then(|raw| serde_json::from_str(raw.get()).ok());
    let guard = ctx.guard();
    let Some(verify) = guard.auth().refresh(token.as_deref().unwrap_or_default()) else {
        return false;
    };
    let request_id = frame.request_id();
    let answer = |err: ApiError| async move {
        let _ = ctx
            .send_error(&err, Some(crate::guard::REFRESH_ACTION), request_id)
            .await;
    };
    if token.is_none() {
        drop(verify);
        answer(ApiError::field("token", "This field is required.")).await;
        return true;
    }
    let verified = match verify.await {
        Ok(verified) => verified,
        Err(e) => {
            answer(ApiError::new(
                StatusCode::UNAUTHORIZED,
                vec![serde_json::Value::String(e.to_string())],
            ))
            .await;
            return true;
        }
    };
    if ctx.user().map(|u| u.id.as_str()) != Some(verified.user.id.as_str()) {
        answer(ApiError::new(
            StatusCode::FORBIDDEN,
            vec![serde_json::json!("The token belongs to a different user.")],
        ))
        .await;
        return true;
    }
    guard.set_expiry(verified.expires_at);
    let _ = ctx
        .reply(
            crate::guard::REFRESH_ACTION,
            request_id,
            &serde_json::json!({ "exp": verified.expires_at }),
            StatusCode::OK,
        )
        .await;
    true
}
