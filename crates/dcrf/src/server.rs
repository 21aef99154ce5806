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

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, RawPathParams, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, NoAuth, query_pairs};
use crate::consumer::{Consumer, Ctx, Dispatched, Outbound, catch_panic};
use crate::error::ApiError;
use crate::layer::GroupMessage;
use crate::observer::Event;
use crate::permission::{Permission, Permissions};
use crate::protocol::Frame;
use crate::scope::{Scope, parse_cookies};

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
    event_queue: usize,
    allowed_origins: Option<Arc<[String]>>,
    shutdown: CancellationToken,
    connections: TaskTracker,
}

impl std::fmt::Debug for Dcrf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dcrf")
            .field("max_message_size", &self.max_message_size)
            .field("outbound_queue", &self.outbound_queue)
            .field("allowed_origins", &self.allowed_origins)
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
/// The default event queue length, in group messages, per connection.
pub const DEFAULT_EVENT_QUEUE: usize = 1024;

impl Dcrf {
    /// Anonymous users, [`AllowAny`](crate::permission::AllowAny), 1 MiB messages, a queue of 256
    /// frames per connection, any Origin.
    pub fn new() -> Self {
        Dcrf {
            auth: Arc::new(NoAuth),
            permissions: Permissions::default(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            outbound_queue: DEFAULT_OUTBOUND_QUEUE,
            event_queue: DEFAULT_EVENT_QUEUE,
            allowed_origins: None,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        }
    }

    /// Resolves each connection's user (see [`auth`](crate::auth)).
    pub fn authenticator(mut self, auth: impl Authenticator) -> Self {
        self.auth = Arc::new(auth);
        self
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

    /// How many subscription events may wait for one connection. When a connection falls this
    /// far behind, it is closed with code 1013 (Try Again Later) instead of buffering more:
    /// memory per connection stays bounded and other subscribers are not delayed.
    pub fn event_queue(mut self, events: usize) -> Self {
        self.event_queue = events.max(1);
        self
    }

    /// Origins allowed to open a socket that carries cookies (against cross-site WebSocket
    /// hijacking). A handshake with cookies whose `Origin` is missing or not listed is refused
    /// with 403. Handshakes without cookies (tokens) are not checked.
    pub fn allowed_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_origins = Some(origins.into_iter().map(Into::into).collect());
        self
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

    async fn upgrade<C: Consumer>(self, mut consumer: C, req: Request) -> Response {
        let (mut parts, _body) = req.into_parts();
        let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => ws,
            Err(rejection) => return rejection.into_response(),
        };
        if self.shutdown.is_cancelled() {
            return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
        }
        if !self.origin_allowed(&parts) {
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
        let user = match self.auth.authenticate(&parts).await {
            Ok(user) => user,
            Err(e) => return (StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
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
            headers: parts.headers,
        };
        let permissions = consumer
            .permissions()
            .unwrap_or_else(|| self.permissions.clone());
        if !permissions.can_connect(&scope).await {
            return (StatusCode::FORBIDDEN, "connection refused").into_response();
        }
        let (tx, rx) = mpsc::channel(self.outbound_queue);
        let (inbox_tx, inbox) = mpsc::channel(self.event_queue);
        let ctx = Ctx::new(scope, tx, inbox_tx, permissions.clone());
        match catch_panic(consumer.connect(&ctx)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                if e.is_server_error() {
                    tracing::error!(error = %e, "connect hook failed");
                }
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::FORBIDDEN);
                return (status, "connection refused").into_response();
            }
        }
        let shutdown = self.shutdown.clone();
        let tracker = self.connections.clone();
        ws.max_message_size(self.max_message_size)
            .max_frame_size(self.max_message_size)
            .on_upgrade(move |socket| {
                tracker.track_future(run_connection(
                    socket,
                    consumer,
                    Channels { ctx, rx, inbox },
                    permissions,
                    shutdown,
                ))
            })
    }

    fn origin_allowed(&self, parts: &axum::http::request::Parts) -> bool {
        let Some(allowed) = &self.allowed_origins else {
            return true;
        };
        if !parts.headers.contains_key(header::COOKIE) {
            return true;
        }
        parts
            .headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_some_and(|origin| allowed.iter().any(|a| a == origin))
    }
}

/// Serves a router until `signal` completes, then shuts down gracefully: stops accepting, sends
/// every WebSocket a close frame (1001) once its current action is done, waits for the
/// connections to end (at most 10 seconds) and returns.
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
    let token = app.shutdown.clone();
    let stop = async move {
        tokio::select! {
            _ = signal => {}
            _ = token.cancelled() => {}
        }
        token.cancel();
    };
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stop)
    .await?;
    if tokio::time::timeout(Duration::from_secs(10), app.wait_connections())
        .await
        .is_err()
    {
        tracing::warn!("connections still open 10 s after shutdown; exiting anyway");
    }
    Ok(())
}

/// A connection's context and the receiving ends of its queues.
struct Channels {
    ctx: Ctx,
    rx: mpsc::Receiver<Outbound>,
    inbox: mpsc::Receiver<Arc<GroupMessage>>,
}

async fn run_connection<C: Consumer>(
    socket: WebSocket,
    mut consumer: C,
    channels: Channels,
    permissions: Permissions,
    shutdown: CancellationToken,
) {
    let Channels { ctx, rx, mut inbox } = channels;
    let (sink, mut stream) = socket.split();
    let mut writer = tokio::spawn(write_loop(sink, rx));
    let kicked = ctx.kicked().clone();
    tracing::debug!(connection = ctx.connection_id(), path = %ctx.scope().path, "connected");
    // The close frame to send when the loop ends, if any.
    let close: Option<(u16, &str)> = loop {
        let work = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Some((1001, "server shutting down")),
            _ = kicked.cancelled() => break Some((1013, "too slow: subscription events dropped")),
            Some(event) = inbox.recv() => Work::Event(event),
            message = stream.next() => Work::Frame(message),
        };
        let step = async {
            match work {
                Work::Event(event) => handle_event(&mut consumer, &ctx, &event).await,
                Work::Frame(Some(Ok(Message::Text(text)))) => {
                    handle_text(&mut consumer, &ctx, &permissions, &text).await;
                }
                Work::Frame(Some(Ok(Message::Binary(_)))) => {
                    let err = ApiError::bad_request(
                        "Binary frames are not supported; send JSON text frames.",
                    );
                    let _ = ctx.send_error(&err, None, None).await;
                }
                Work::Frame(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Work::Frame(Some(Ok(Message::Close(_))) | None) => return Some(None),
                Work::Frame(Some(Err(e))) => {
                    return Some(is_too_big(e).then_some((1009, "message too big")));
                }
            }
            None
        };
        // A connection stuck on a client that does not read is let go when the layer kicks it.
        tokio::select! {
            biased;
            _ = kicked.cancelled() => break Some((1013, "too slow: subscription events dropped")),
            end = step => if let Some(close) = end { break close },
        }
    };
    ctx.subscriptions().leave_all(ctx.connection_id());
    ctx.cancel_tasks().await;
    consumer.disconnect(&ctx).await;
    let (code, reason) = close.unwrap_or((1000, ""));
    // A client that stopped reading may never take the close frame: give up after a moment.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ctx.close(code, reason)).await;
    drop(ctx);
    if tokio::time::timeout(CLOSE_TIMEOUT, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// How long a closing connection waits for its last frames to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One unit of a connection's work.
enum Work {
    Event(Arc<GroupMessage>),
    Frame(Option<Result<Message, axum::Error>>),
}

fn is_too_big(e: axum::Error) -> bool {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => matches!(*e, tungstenite::Error::Capacity(_)),
        Err(_) => false,
    }
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Feed everything already queued, then flush once.
        while let Some(out) = next.take() {
            match out {
                Outbound::Text(text) => {
                    if sink.feed(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Outbound::Close(frame) => {
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

/// Runs a consumer's handler for one group message, if the connection is still subscribed.
pub(crate) async fn handle_event<C: Consumer>(consumer: &mut C, ctx: &Ctx, message: &GroupMessage) {
    let Some(request_ids) = ctx.subscriptions().request_ids(&message.group) else {
        return;
    };
    let event = Event {
        message,
        request_ids: &request_ids,
    };
    if let Err(e) = catch_panic(consumer.handle_event(ctx, &event)).await {
        tracing::error!(connection = ctx.connection_id(), observer = %message.observer, error = %e, "event handler failed");
    }
}

/// Parses one text frame and runs it: the whole DCRF dispatch order.
pub(crate) async fn handle_text<C: Consumer>(
    consumer: &mut C,
    ctx: &Ctx,
    permissions: &Permissions,
    text: &str,
) {
    let frame = match Frame::parse(text) {
        Ok(frame) => frame,
        Err(e) => {
            let _ = ctx.send_error(&e.to_api_error(), None, None).await;
            return;
        }
    };
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
    if !permissions
        .has_permission(ctx.scope(), action, &frame)
        .await
    {
        let _ = ctx
            .send_error(&ApiError::permission_denied(), Some(action), request_id)
            .await;
        return;
    }
    match catch_panic(consumer.dispatch(ctx, action, &frame)).await {
        Ok(Dispatched::Handled) => {}
        Ok(Dispatched::Unknown) => {
            let _ = ctx
                .send_error(
                    &ApiError::method_not_allowed(action),
                    Some(action),
                    request_id,
                )
                .await;
        }
        Err(err) => {
            let _ = ctx.send_error(&err, Some(action), request_id).await;
        }
    }
}
