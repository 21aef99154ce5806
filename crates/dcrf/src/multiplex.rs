//! Multiplexing: several consumers on one socket, as channels-multiplexer's
//! `AsyncJsonWebsocketDemultiplexer` does and as the `dcrf-client` JS client always speaks.
//!
//! Client frames are `{"stream": "things", "payload": {<DCRF request>}}`; the payload goes to
//! the consumer registered for that stream, and everything that consumer sends (replies and
//! pushes) goes out as `{"stream": "things", "payload": <frame>}`. Each stream has its own
//! consumer instance per socket; all share the socket's scope (one user per socket).
//!
//! Mistakes get an error frame and the socket stays open (channels-multiplexer raises and drops
//! the connection):
//!
//! | input | reply |
//! |---|---|
//! | invalid JSON, not an object, no `stream`, `stream` not a string | `{"stream": null, "payload": <400 error envelope>}` |
//! | a binary frame | `{"stream": null, "payload": <400 error envelope>}` |
//! | an unknown stream | `{"stream": "x", "payload": {"errors": ["Unknown stream \"x\"."], "response_status": 404, "request_id": <the payload's>, ...}}` |
//! | no `payload` | `{"stream": "x", "payload": <400 error envelope>}` |
//! | a bad payload | whatever that stream's consumer answers (wrapped) |
//!
//! A stream whose permissions refuse the connection (`can_connect`) or whose `connect` hook
//! fails is left out of this socket (its frames get the unknown-stream answer); the handshake is
//! refused only when every stream refuses.
//!
//! ```no_run
//! # use dcrf::prelude::*;
//! # #[derive(Default)] struct Echo;
//! # #[dcrf::consumer] impl Echo {}
//! # impl Consumer for Echo {}
//! use dcrf::multiplex::Demultiplexer;
//!
//! let app = Dcrf::new();
//! let router: axum::Router = axum::Router::new().route(
//!     "/ws",
//!     Demultiplexer::new(&app).stream("echo", Echo::default).route(),
//! );
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::auth::BoxFuture;
use crate::channel::GroupMessage;
use crate::consumer::{Consumer, Link, Outbox, wrap_stream};
use crate::error::ApiError;
use crate::protocol::{Frame, encode_error};
use crate::scope::Scope;
use crate::server::{Dcrf, DynStream, Session, StreamSession, binary_error};

type OpenStream = Arc<
    dyn Fn(Scope, Link) -> Pin<Box<dyn Future<Output = Option<Box<dyn DynStream>>> + Send>>
        + Send
        + Sync,
>;

/// Several named consumers served on one socket. Build it, then mount [`route`](Self::route).
#[derive(Clone)]
pub struct Demultiplexer {
    app: Dcrf,
    streams: Vec<(Arc<str>, OpenStream)>,
}

impl std::fmt::Debug for Demultiplexer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demultiplexer")
            .field(
                "streams",
                &self.streams.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Demultiplexer {
    /// No streams yet; the application's settings apply to the socket.
    pub fn new(app: &Dcrf) -> Self {
        Demultiplexer {
            app: app.clone(),
            streams: Vec::new(),
        }
    }

    /// Serves `name` with a new consumer from `factory` on each socket.
    pub fn stream<C, F>(mut self, name: &str, factory: F) -> Self
    where
        C: Consumer,
        F: Fn() -> C + Send + Sync + 'static,
    {
        factory().mounted();
        let permissions = self.app.default_permissions_ref().clone();
        let open: OpenStream = Arc::new(move |scope: Scope, link: Link| {
            let consumer = factory();
            let permissions = permissions.clone();
            Box::pin(async move {
                StreamSession::open(consumer, scope, link, &permissions)
                    .await
                    .ok()
                    .map(|s| Box::new(s) as Box<dyn DynStream>)
            })
        });
        self.streams.push((name.into(), open));
        self
    }

    /// The axum route of the multiplexed socket.
    pub fn route<S>(self) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let this = Arc::new(self);
        axum::routing::get(move |req: Request| {
            let this = this.clone();
            async move { this.upgrade(req).await }
        })
    }

    async fn upgrade(&self, req: Request) -> Response {
        let (ws, scope, guard) = match self.app.handshake(req).await {
            Ok(accepted) => accepted,
            Err(refused) => return refused,
        };
        let (link, queues) = self.app.link(None, guard);
        let session = self.open(scope, link).await;
        if session.streams.is_empty() {
            return (StatusCode::FORBIDDEN, "connection refused").into_response();
        }
        self.app.accept(ws, session, queues)
    }

    /// Opens every stream that accepts the connection.
    async fn open(&self, scope: Scope, link: Link) -> MuxSession {
        let mut streams = HashMap::new();
        let mut by_member = HashMap::new();
        for (name, open) in &self.streams {
            let stream_link = Link {
                stream: Some(name.clone()),
                ..link.clone()
            };
            if let Some(session) = open(scope.clone(), stream_link).await {
                by_member.insert(session.ctx().connection_id(), name.clone());
                streams.insert(name.clone(), session);
            }
        }
        MuxSession {
            streams,
            by_member,
            out: link.out,
            guard: link.guard,
        }
    }

    /// A multiplexed connection without a socket (anonymous scope), for the fuzz targets and
    /// their corpus test; not API.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub async fn local(&self) -> LocalDemux {
        let (out, rx) = Outbox::new(1024, usize::MAX);
        let (inbox, events) = flume::bounded(1024);
        let link = Link {
            out,
            inbox,
            lag: Arc::new(crate::channel::Lag::new(
                std::time::Duration::from_secs(5),
                usize::MAX,
            )),
            kick: tokio_util::sync::CancellationToken::new(),
            stream: None,
            guard: self.app.guard(None),
        };
        LocalDemux {
            session: self.open(Scope::default(), link).await,
            rx,
            _events: events,
        }
    }
}

/// A multiplexed connection driven without a socket ([`Demultiplexer::local`]): text frames
/// in, text frames out, through the socket's own demultiplexing. Not API.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub struct LocalDemux {
    session: MuxSession,
    rx: flume::Receiver<crate::consumer::Outbound>,
    _events: flume::Receiver<crate::channel::Delivery>,
}

#[cfg(feature = "testing")]
impl std::fmt::Debug for LocalDemux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDemux").finish_non_exhaustive()
    }
}

#[cfg(feature = "testing")]
impl LocalDemux {
    /// Handles one inbound text frame to completion.
    pub async fn send(&mut self, text: &str) {
        self.session.on_text(text).await;
    }

    /// The next outbound text frame, if one is queued.
    pub fn receive(&mut self) -> Option<String> {
        match self.rx.try_recv().ok()? {
            crate::consumer::Outbound::Text(t, _) => Some(t.to_string()),
            crate::consumer::Outbound::Flush(_) | crate::consumer::Outbound::Close(..) => None,
        }
    }
}

/// The session of a multiplexed socket.
struct MuxSession {
    streams: HashMap<Arc<str>, Box<dyn DynStream>>,
    by_member: HashMap<u64, Arc<str>>,
    out: Outbox,
    guard: Arc<crate::guard::Guard>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

const ENVELOPE_HELP: &str =
    "Expected {\"stream\": \"<name>\", \"payload\": {\"action\": ..., \"request_id\": ...}}.";

/// Sends an error envelope, wrapped for a stream (or `"stream": null`).
async fn send_error(
    out: &Outbox,
    stream: Option<&str>,
    err: &ApiError,
    action: Option<&str>,
    rid: Option<&RawValue>,
) {
    {
        let payload = encode_error(err, action, rid);
        let text = match stream {
            Some(name) => wrap_stream(name, &payload),
            None => format!("{{\"stream\":null,\"payload\":{payload}}}"),
        };
        let _ = out.send_text(text.into()).await;
    }
}

impl Session for MuxSession {
    fn connection_id(&self) -> u64 {
        self.by_member.keys().copied().min().unwrap_or_default()
    }
    fn on_text<'a>(&'a mut self, text: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let envelope: Envelope<'_> = match serde_json::from_str(text) {
                Ok(e) => e,
                Err(e) if e.is_data() => {
                    return send_error(
                        &self.out,
                        None,
                        &ApiError::bad_request(ENVELOPE_HELP),
                        None,
                        None,
                    )
                    .await;
                }
                Err(e) => {
                    let err = ApiError::bad_request(format!(
                        "Invalid JSON: {}",
                        crate::protocol::strip_position(&e)
                    ));
                    return send_error(&self.out, None, &err, None, None).await;
                }
            };
            let name: Option<String> = envelope
                .stream
                .and_then(|s| serde_json::from_str::<String>(s.get()).ok());
            let Some(name) = name else {
                return send_error(
                    &self.out,
                    None,
                    &ApiError::bad_request(ENVELOPE_HELP),
                    None,
                    None,
                )
                .await;
            };
            let Some(payload) = envelope.payload else {
                return send_error(
                    &self.out,
                    Some(&name),
                    &ApiError::bad_request(ENVELOPE_HELP),
                    None,
                    None,
                )
                .await;
            };
            match self.streams.get_mut(name.as_str()) {
                Some(stream) => stream.on_text(payload.get()).await,
                None => {
                    // Answer with the payload's action and request id, so clients can match it.
                    let frame = Frame::parse(payload.get()).ok();
                    let action = frame.as_ref().and_then(|f| f.action_str());
                    if let Some(err) = frame.as_ref().and_then(|f| self.guard.check_request_id(f)) {
                        return send_error(&self.out, Some(&name), &err, action, None).await;
                    }
                    let rid = frame.as_ref().and_then(|f| f.request_id());
                    let err = ApiError::new(
                        axum::http::StatusCode::NOT_FOUND,
                        vec![serde_json::Value::String(format!(
                            "Unknown stream \"{name}\"."
                        ))],
                    );
                    send_error(&self.out, Some(&name), &err, action, rid).await;
                }
            }
        })
    }

    fn on_binary(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move { send_error(&self.out, None, &binary_error(), None, None).await })
    }

    fn on_event(&mut self, member: u64, message: Arc<GroupMessage>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(name) = self.by_member.get(&member) else {
                return;
            };
            if let Some(stream) = self.streams.get_mut(name) {
                stream.on_event(message).await;
            }
        })
    }

    fn catch_up(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for stream in self.streams.values_mut() {
                stream.catch_up().await;
            }
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for stream in self.streams.values_mut() {
                stream.finish().await;
            }
        })
    }
}
