//! Consumers and actions: the [`Consumer`] hooks (the actions themselves are written with the
//! [`#[dcrf::consumer]`](macro@crate::consumer) attribute), the per-connection
//! [`Ctx`], what actions return ([`Reply`], [`ApiError`]), and the events of a connection's
//! subscriptions ([`Event`]).

pub(crate) mod sink;
pub(crate) mod subscriptions;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::{CloseFrame, Utf8Bytes};
use axum::http::StatusCode;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use subscriptions::{
    Accept, Replay, Subscriptions, decorate, with_event_position, with_frame,
};
pub use subscriptions::{Event, Joined, RESYNC, could_receive, default_push, may_receive, since};

use crate::channel::{Delivery, Lag, Member};
use crate::error::ApiError;
use crate::guard::{CappedWriter, DetachSlot, Guard, reply_too_large};
use crate::permission::Permissions;
use crate::protocol::{Envelope, Frame, encode_error};
use crate::scope::{Scope, User};

/// A WebSocket consumer: one value per connection, holding whatever state that connection keeps.
///
/// Its actions are `async fn`s in an `impl` block marked [`#[dcrf::consumer]`](macro@crate::consumer);
/// this trait holds the hooks, all optional:
///
/// ```
/// use dcrf::prelude::*;
///
/// #[derive(Default)]
/// struct Counter { hits: u64 }
///
/// #[dcrf::consumer]
/// impl Counter {
///     /// `{"action": "hit", "request_id": 1}` → `{"data": 1, ...}`
///     #[action]
///     async fn hit(&mut self) -> Result<Reply<u64>, ApiError> {
///         self.hits += 1;
///         Ok(Reply::ok(self.hits))
///     }
/// }
///
/// impl Consumer for Counter {
///     fn permissions(&self) -> Option<Permissions> {
///         Some(Permissions::new(IsAuthenticated))
///     }
/// }
/// ```
pub trait Consumer: ActionTable {
    /// This consumer's permissions; `None` (the default) uses the application's defaults
    /// ([`Dcrf::default_permissions`](crate::Dcrf::default_permissions)).
    fn permissions(&self) -> Option<Permissions> {
        None
    }

    /// Runs at the handshake, after authentication and `can_connect`, before the socket is
    /// accepted. An error refuses the handshake with its status. Frames sent here are delivered
    /// first thing after the upgrade.
    fn connect(&mut self, ctx: &Ctx) -> impl Future<Output = Result<(), ApiError>> + Send {
        let _ = ctx;
        async { Ok(()) }
    }

    /// Handles one event from a group this connection subscribed to (DCRF's observer handler
    /// methods). Default: [`default_push`], one reply envelope per subscribing request id.
    /// Match on [`Event::observer`] to treat observers differently.
    fn on_event(&mut self, ctx: &Ctx, event: &Event<'_>) -> impl Future<Output = ()> + Send {
        default_push(ctx, event)
    }

    /// Runs once when the connection ends (client close, error or server shutdown), after
    /// detached tasks were cancelled.
    fn disconnect(&mut self, ctx: &Ctx) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }
}

/// Room left in a push's buffer for the `position` key an event handler adds
/// (`,"position":{"epoch":"…","offset":…}` with an epoch of up to 32 characters).
const POSITION_ROOM: usize = 96;

/// Was an action found for a frame? (Macro plumbing.)
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dispatched {
    /// The action ran (its reply, if any, is sent or on its way).
    Handled,
    /// No action has that name: the caller answers 405.
    Unknown,
}

/// A consumer's actions by name (macro plumbing). Written by [`#[dcrf::consumer]`](macro@crate::consumer); the
/// generated `dispatch` is one `match` over the action names.
#[doc(hidden)]
pub trait ActionTable: Send + Sized + 'static {
    /// Runs the action named `action`: deserializes its arguments from `frame`, calls it, and
    /// sends its reply through `ctx`.
    fn dispatch<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        action: &'a str,
        frame: &'a Frame<'a>,
    ) -> impl Future<Output = Dispatched> + Send + 'a;

    /// Handles an event from a subscribed group: built-in subscriptions first (model instance
    /// pushes), then [`Consumer::on_event`].
    fn handle_event<'a>(
        &'a mut self,
        ctx: &'a Ctx,
        event: &'a Event<'a>,
    ) -> impl Future<Output = ()> + Send + 'a;

    /// Called once when the consumer is mounted on a route, with one instance from its factory
    /// (model consumers register their observers here).
    fn mounted(&self) {}

    /// Does `action` only read (see [`Frame::reads`])? Default: no action reads.
    fn reads(&self, action: &str) -> bool {
        let _ = action;
        false
    }
}

/// A successful action's answer: `data` and a `response_status`.
///
/// ```
/// use dcrf::Reply;
/// let r = Reply::created(serde_json::json!({"id": 1}));
/// assert_eq!(r.status(), dcrf::StatusCode::CREATED);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Reply<T> {
    data: T,
    status: StatusCode,
}

impl<T> Reply<T> {
    /// 200 with data.
    pub fn ok(data: T) -> Self {
        Reply {
            data,
            status: StatusCode::OK,
        }
    }
    /// 201 with data.
    pub fn created(data: T) -> Self {
        Reply {
            data,
            status: StatusCode::CREATED,
        }
    }
    /// Any status with data.
    pub fn with_status(data: T, status: StatusCode) -> Self {
        Reply { data, status }
    }
    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    /// The data.
    pub fn data(&self) -> &T {
        &self.data
    }
    /// Takes the data out.
    pub fn into_data(self) -> T {
        self.data
    }
}

impl Reply<()> {
    /// 204 with `data: null` (DCRF's delete).
    pub fn no_content() -> Self {
        Reply {
            data: (),
            status: StatusCode::NO_CONTENT,
        }
    }
}

/// What an action may return: `Result<Reply<T>, E>` sends a reply; `Result<(), E>` sends
/// nothing on success (DCRF's "non-tuple result"); `E` is anything that converts into
/// [`ApiError`].
#[doc(hidden)]
pub trait IntoActionResult {
    /// The data type of the reply.
    type Data: Serialize;
    /// Converts into the framework's form.
    fn into_action_result(self) -> Result<Option<Reply<Self::Data>>, ApiError>;
}

impl<T: Serialize, E: Into<ApiError>> IntoActionResult for Result<Reply<T>, E> {
    type Data = T;
    fn into_action_result(self) -> Result<Option<Reply<T>>, ApiError> {
        self.map(Some).map_err(Into::into)
    }
}

impl<E: Into<ApiError>> IntoActionResult for Result<(), E> {
    type Data = ();
    fn into_action_result(self) -> Result<Option<Reply<()>>, ApiError> {
        self.map(|()| None).map_err(Into::into)
    }
}

/// How a context reaches its socket: the writer's queue, the event inbox, the socket's kick
/// switch, the stream name on a multiplexed socket, and the socket's guard (its caps).
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) out: Outbox,
    pub(crate) inbox: flume::Sender<Delivery>,
    pub(crate) lag: Arc<Lag>,
    pub(crate) kick: CancellationToken,
    pub(crate) stream: Option<Arc<str>>,
    pub(crate) guard: Arc<Guard>,
}

/// `{"stream": S, "payload": <text>}` around an already serialized JSON frame.
pub(crate) fn wrap_stream(stream: &str, payload: &str) -> String {
    let mut out = String::with_capacity(payload.len() + stream.len() + 24);
    out.push_str("{\"stream\":");
    crate::protocol::push_json_str(&mut out, stream);
    out.push_str(",\"payload\":");
    out.push_str(payload);
    out.push('}');
    out
}

/// What a connection's writer task receives.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A text frame, with the bytes of the outbound budget it holds until it is written.
    Text(Utf8Bytes, Held),
    /// Flush what the read loop's direct writes left in the socket's buffer (see [`sink`]).
    Flush(sink::Ticket),
    Close(CloseFrame, sink::Ticket),
}

/// What a queued frame holds until it is flushed: its bytes of the outbound budget, and its
/// place in the order of direct writes.
#[derive(Debug)]
pub(crate) struct Held {
    _bytes: OwnedSemaphorePermit,
    _ticket: sink::Ticket,
}

/// A connection's outbound queue, bounded twice: in frames (the channel's capacity) and in
/// bytes (a semaphore with one permit per byte; a frame waits until the frames before it have
/// been written and enough bytes are free, and one frame larger than the whole budget takes all
/// of it). A sender that finds it full waits: backpressure on whatever produces the frames.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: flume::Sender<Outbound>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
    /// The socket, for frames written at once while the writer is idle.
    direct: Arc<sink::SharedSink>,
}

impl Outbox {
    /// A queue of `frames` frames and `bytes` bytes, and its receiving end.
    pub(crate) fn new(frames: usize, bytes: usize) -> (Outbox, flume::Receiver<Outbound>) {
        let (tx, rx) = flume::bounded(frames.max(1));
        let max_bytes = u32::try_from(bytes.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        let outbox = Outbox {
            direct: Arc::new(sink::SharedSink::new(&tx)),
            tx,
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
        };
        (outbox, rx)
    }

    /// The socket sink this outbox writes to directly, once installed.
    pub(crate) fn direct(&self) -> &Arc<sink::SharedSink> {
        &self.direct
    }

    /// Writes a text frame at once when this is the connection's read loop, its writer is idle
    /// and nothing is queued (see [`sink`]); otherwise queues it, waiting for room.
    pub(crate) async fn send_text(&self, text: Utf8Bytes) -> Result<(), Closed> {
        let (text, ticket) = match self.direct.write_now(text) {
            Ok(()) => return Ok(()),
            Err(queued) => queued,
        };
        let want = u32::try_from(text.len())
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_bytes);
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| Closed)?;
        let held = Held {
            _bytes: permit,
            _ticket: ticket,
        };
        self.tx
            .send_async(Outbound::Text(text, held))
            .await
            .map_err(|_| Closed)
    }

    /// Queues a close frame (after the frames already queued).
    pub(crate) async fn send_close(&self, frame: CloseFrame) -> Result<(), Closed> {
        self.tx
            .send_async(Outbound::Close(frame, self.direct.ticket()))
            .await
            .map_err(|_| Closed)
    }
}

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// The per-connection context every action gets: the [`Scope`], a way to send frames, and
/// the connection's task set (for detached work, cancelled when the socket closes).
///
/// Cheap to clone; detached actions own a clone.
#[derive(Clone, Debug)]
pub struct Ctx {
    inner: Arc<CtxInner>,
}

#[derive(Debug)]
struct CtxInner {
    id: u64,
    scope: Scope,
    out: Outbox,
    tasks: TaskTracker,
    cancel: CancellationToken,
    extensions: std::sync::Mutex<axum::http::Extensions>,
    inbox: flume::Sender<Delivery>,
    lag: Arc<Lag>,
    kick: CancellationToken,
    stream: Option<Arc<str>>,
    subscriptions: Subscriptions,
    permissions: Permissions,
    guard: Arc<Guard>,
}

/// The connection is gone; nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection is closed")]
pub struct Closed;

impl Ctx {
    pub(crate) fn new(scope: Scope, link: Link, permissions: Permissions) -> Self {
        let Link {
            out,
            inbox,
            lag,
            kick,
            stream,
            guard,
        } = link;
        Ctx {
            inner: Arc::new(CtxInner {
                id: CONNECTION_IDS.fetch_add(1, Ordering::Relaxed),
                scope,
                out,
                tasks: TaskTracker::new(),
                cancel: CancellationToken::new(),
                extensions: Default::default(),
                inbox,
                lag,
                kick,
                stream,
                subscriptions: Subscriptions::new(guard.subscription_budget()),
                permissions,
                guard,
            }),
        }
    }

    /// This connection as a channel-layer member.
    pub(crate) fn member(&self) -> Member {
        Member {
            id: self.inner.id,
            inbox: self.inner.inbox.clone(),
            lag: self.lag().clone(),
            kick: self.inner.kick.clone(),
        }
    }

    /// The connection's catch-up signal and event-queue accounting.
    pub(crate) fn lag(&self) -> &Arc<Lag> {
        &self.inner.lag
    }

    /// The permissions in force on this connection.
    pub(crate) fn permissions(&self) -> &Permissions {
        &self.inner.permissions
    }

    /// The socket's caps, keepalive and credential expiry.
    pub(crate) fn guard(&self) -> &Arc<Guard> {
        &self.inner.guard
    }

    /// The connection's subscriptions.
    pub(crate) fn subscriptions(&self) -> &Subscriptions {
        &self.inner.subscriptions
    }

    /// A process-unique number for this connection (for logs and channel-layer names).
    pub fn connection_id(&self) -> u64 {
        self.inner.id
    }

    /// The connection's scope.
    pub fn scope(&self) -> &Scope {
        &self.inner.scope
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&User> {
        self.inner.scope.user.as_ref()
    }

    /// Stores a per-connection value, shared with detached actions (which own a `Ctx` clone
    /// and cannot borrow the consumer). Set it in [`Consumer::connect`].
    pub fn insert_extension<T: Clone + Send + Sync + 'static>(&self, value: T) {
        crate::sync::lock(&self.inner.extensions).insert(value);
    }

    /// A clone of a value stored with [`Ctx::insert_extension`].
    pub fn extension<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        crate::sync::lock(&self.inner.extensions)
            .get::<T>()
            .cloned()
    }

    /// Sends a text frame as is. Waits while the outbound queue is full.
    ///
    /// On a multiplexed socket the frame goes out as `{"stream": S, "payload": <text>}`. A frame
    /// over [`Dcrf::max_reply_size`](crate::Dcrf::max_reply_size) is not sent: a 413 error
    /// frame (action and request id null) goes instead, and the cause is logged.
    pub async fn send_text(&self, text: impl Into<Utf8Bytes>) -> Result<(), Closed> {
        let mut text: Utf8Bytes = text.into();
        let max = self.inner.guard.max_reply();
        if text.len() > max {
            tracing::error!(
                connection = self.inner.id,
                bytes = text.len(),
                max,
                "frame over the reply size cap not sent"
            );
            text = encode_error(&reply_too_large(Some(text.len()), max), None, None).into();
        }
        let text = match &self.inner.stream {
            None => text,
            Some(stream) => wrap_stream(stream, &text).into(),
        };
        self.inner.out.send_text(text).await
    }

    /// The stream this consumer serves on a multiplexed socket.
    pub fn stream(&self) -> Option<&str> {
        self.inner.stream.as_deref()
    }

    /// Serializes a value and sends it as one frame (DCRF's `send_json`).
    pub async fn send_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Closed> {
        match serde_json::to_string(value) {
            Ok(text) => self.send_text(text).await,
            Err(e) => {
                tracing::error!(connection = self.inner.id, error = %e, "cannot serialize frame");
                Ok(())
            }
        }
    }

    /// Sends a reply envelope for `action` with `request_id` (DCRF's `reply`).
    pub async fn reply<T: Serialize + ?Sized>(
        &self,
        action: &str,
        request_id: Option<&RawValue>,
        data: &T,
        status: StatusCode,
    ) -> Result<(), Closed> {
        crate::metrics::note_status(status.as_u16());
        let text = decorate(
            self.encode_reply(action, request_id, data, status),
            Some(request_id),
        );
        self.send_text(text).await
    }

    /// Sends a reply envelope whose data is already serialized (a push's shared body): the
    /// envelope is written around the bytes, nothing is re-serialized.
    pub async fn push(
        &self,
        action: &str,
        request_id: Option<&RawValue>,
        body: &RawValue,
        status: StatusCode,
    ) -> Result<(), Closed> {
        let rid = request_id.map_or("null", |r| r.get());
        let len = body.get().len() + rid.len() + action.len() + 72;
        let max = self.inner.guard.max_reply();
        if len > max {
            let err = reply_too_large(Some(len), max);
            return self.send_error(&err, Some(action), request_id).await;
        }
        let mut text = String::with_capacity(len + POSITION_ROOM);
        text.push_str("{\"errors\":[],\"data\":");
        text.push_str(body.get());
        text.push_str(",\"action\":");
        // Escapes whatever the action name holds.
        crate::protocol::push_json_str(&mut text, action);
        text.push_str(",\"response_status\":");
        text.push_str(status.as_str());
        text.push_str(",\"request_id\":");
        text.push_str(rid);
        text.push('}');
        // In an event handler: the event's position.
        self.send_text(decorate(text, None)).await?;
        self.inner.guard.metrics().pushes.increment(1);
        Ok(())
    }

    /// Encodes a reply envelope; a serialization failure becomes a logged 500 envelope, a reply
    /// over the size cap a logged 413 envelope (serialization stops at the cap).
    fn encode_reply<T: Serialize + ?Sized>(
        &self,
        action: &str,
        request_id: Option<&RawValue>,
        data: &T,
        status: StatusCode,
    ) -> String {
        let env = Envelope {
            errors: &[],
            data,
            action: Some(action),
            response_status: status,
            request_id,
        };
        let max = self.inner.guard.max_reply();
        let mut out = CappedWriter::new(max);
        match serde_json::to_writer(&mut out, &env) {
            // serde_json writes valid UTF-8.
            Ok(()) => String::from_utf8(out.buf).unwrap_or_default(),
            Err(_) if out.exceeded => {
                tracing::error!(
                    connection = self.inner.id,
                    action,
                    max,
                    "reply over the size cap not sent"
                );
                encode_error(&reply_too_large(None, max), Some(action), request_id)
            }
            Err(e) => self.encode_error(&ApiError::internal(e), Some(action), request_id),
        }
    }

    /// Encodes an error envelope; server faults are logged with the action and request id.
    fn encode_error(
        &self,
        err: &ApiError,
        action: Option<&str>,
        request_id: Option<&RawValue>,
    ) -> String {
        if err.is_server_error() {
            tracing::error!(
                connection = self.inner.id,
                action = action.unwrap_or("<none>"),
                request_id = request_id.map(|r| r.get()).unwrap_or("null"),
                error = %err,
                "server error while handling a request"
            );
        }
        encode_error(err, action, request_id)
    }

    /// Sends an error envelope; server faults are logged with the action and request id.
    pub async fn send_error(
        &self,
        err: &ApiError,
        action: Option<&str>,
        request_id: Option<&RawValue>,
    ) -> Result<(), Closed> {
        crate::metrics::note_status(err.status().as_u16());
        let text = decorate(self.encode_error(err, action, request_id), None);
        self.send_text(text).await
    }

    /// Sends what an action returned: its reply, its error, or nothing.
    pub async fn finish<R: IntoActionResult>(
        &self,
        action: &str,
        request_id: Option<&RawValue>,
        result: R,
    ) {
        // A block: the result (maybe not `Send`) is gone before the await.
        let text = {
            let result = result.into_action_result();
            crate::metrics::note_status(match &result {
                Ok(Some(reply)) => reply.status.as_u16(),
                Ok(None) => 0,
                Err(err) => err.status().as_u16(),
            });
            match result {
                Ok(Some(reply)) => decorate(
                    self.encode_reply(action, request_id, &reply.data, reply.status),
                    Some(request_id),
                ),
                Ok(None) => return,
                Err(err) => decorate(self.encode_error(&err, Some(action), request_id), None),
            }
        };
        let _ = self.send_text(text).await;
    }

    /// Runs a future concurrently with the connection's other work (DCRF's `@detached`).
    /// It is cancelled when the connection closes.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.inner.cancel.clone();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// Runs a detached action: the future runs concurrently, and its result is sent as a reply
    /// with the given action and request id when it finishes. Cancelled on disconnect.
    ///
    /// At most [`Dcrf::max_detached_actions`](crate::Dcrf::max_detached_actions) run at once
    /// per socket; beyond that the action does not run and is answered with a 503 error frame
    /// (sent from a background task here; detached actions written with the attribute are
    /// answered in line, so a flood waits for the client to read).
    pub fn spawn_action<F>(&self, action: &str, request_id: Option<&RawValue>, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: IntoActionResult + Send,
    {
        match self.inner.guard.try_detach() {
            Some(slot) => self.run_detached(slot, action, request_id, fut),
            None => {
                crate::metrics::note_status(StatusCode::SERVICE_UNAVAILABLE.as_u16());
                let ctx = self.clone();
                let action = action.to_owned();
                let request_id: Option<Box<RawValue>> = request_id.map(|r| r.to_owned());
                self.spawn(async move {
                    let err = ctx.inner.guard.too_many_detached();
                    let _ = ctx
                        .send_error(&err, Some(&action), request_id.as_deref())
                        .await;
                });
            }
        }
    }

    /// What `#[action(detached)]` expands to (macro plumbing): [`Ctx::spawn_action`], but the
    /// 503 answer to one action too many is sent before this returns.
    #[doc(hidden)]
    pub async fn start_detached<F>(&self, action: &str, request_id: Option<&RawValue>, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: IntoActionResult + Send,
    {
        match self.inner.guard.try_detach() {
            Some(slot) => self.run_detached(slot, action, request_id, fut),
            None => {
                let err = self.inner.guard.too_many_detached();
                let _ = self.send_error(&err, Some(action), request_id).await;
            }
        }
    }

    fn run_detached<F>(&self, slot: DetachSlot, action: &str, request_id: Option<&RawValue>, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: IntoActionResult + Send,
    {
        crate::metrics::note_detached();
        let ctx = self.clone();
        let action = action.to_owned();
        let request_id: Option<Box<RawValue>> = request_id.map(|r| r.to_owned());
        let span = tracing::debug_span!(
            "action",
            action,
            request_id = request_id.as_deref().map(|r| r.get()),
            detached = true,
            status = tracing::field::Empty,
        );
        self.spawn(async move {
            // Given back when the action ends or is cancelled.
            let _slot = slot;
            let run = async {
                let result = catch_panic(fut).await;
                match result {
                    Ok(r) => ctx.finish(&action, request_id.as_deref(), r).await,
                    Err(err) => {
                        let _ = ctx
                            .send_error(&err, Some(&action), request_id.as_deref())
                            .await;
                    }
                }
            };
            let ((), outcome) =
                crate::metrics::observe(tracing::Instrument::instrument(run, span.clone())).await;
            outcome.record(ctx.inner.guard.metrics(), &action, &span);
        });
    }

    /// Runs a blocking closure on tokio's blocking pool (DCRF's sync actions) and waits for it.
    pub async fn run_blocking<F, R>(&self, f: F) -> Result<R, ApiError>
    where
        F: FnOnce(&Ctx) -> R + Send + 'static,
        R: Send + 'static,
    {
        let ctx = self.clone();
        tokio::task::spawn_blocking(move || f(&ctx))
            .await
            .map_err(ApiError::internal)
    }

    /// Closes the connection with a close code and reason (after frames already queued).
    pub async fn close(&self, code: u16, reason: &str) {
        let _ = self
            .inner
            .out
            .send_close(CloseFrame {
                code,
                reason: reason.into(),
            })
            .await;
    }

    /// Is the connection shutting down (detached work should stop)?
    pub fn is_closing(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Cancels detached tasks and waits for them to end.
    pub(crate) async fn cancel_tasks(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// Awaits a future, turning a panic into a 500 [`ApiError`].
pub(crate) async fn catch_panic<F: Future>(fut: F) -> Result<F::Output, ApiError> {
    use futures_util::FutureExt;
    std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            ApiError::internal(format!("action panicked: {msg}"))
        })
}
