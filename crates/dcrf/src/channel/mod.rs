//! The channel layer: groups of connections, and messages sent to a group.
//!
//! A [`ChannelLayer`] is two pieces (centrifuge's `Hub` and `Broker`):
//! - the [`Hub`] holds this node's connections by group and hands each message to the local
//!   members; it owns the slow-member policy below;
//! - a [`Broker`] carries messages between nodes: [`MemoryBroker`] (the default, one process)
//!   hands every message straight back to the local hub; [`RedisBroker`] (feature `redis`)
//!   `PUBLISH`es it, and every node that has local members of the group (each node
//!   `SUBSCRIBE`s to a group's channel while it has members) receives it once and fans it out
//!   through its hub.
//!
//! The type is named `ChannelLayer`, not `Layer`, so it never collides with tower's `Layer` in
//! an axum application.
//!
//! A message is serialized once; every member gets the same `Arc`.
//!
//! ## Streams, positions and history
//!
//! Each group is a *stream*: the broker numbers its messages (offset + epoch, a [`Position`],
//! carried by every push as the top-level `position`) and keeps a bounded history
//! ([`HistoryOptions`]). A subscribe reads the stream's position; with `since` it replays what
//! the client missed ([`ChannelLayer::recover`]). The [`MemoryBroker`] keeps both in the
//! process; the [`RedisBroker`] numbers, appends (a Redis stream per group) and publishes in one
//! Lua script, so positions are shared by every node.
//!
//! ## Slow members
//!
//! Each connection has a bounded event queue ([`Dcrf::event_queue`](crate::Dcrf::event_queue),
//! default 1024). A message that finds it full is not queued: the connection is marked behind
//! and, once it has written what it holds, reads what it missed from the streams' history
//! (its catch-up). A burst larger than the queue thus reaches every client that keeps reading.
//! A connection that stays behind for
//! [`Dcrf::slow_client_timeout`](crate::Dcrf::slow_client_timeout) (5 s) is closed with code
//! **1013** (Try Again Later), so one client that stopped reading never slows the others nor
//! grows the server's memory.
//!
//! ## Delivery
//!
//! Every event is numbered; a subscription delivers each at most once, in order, and a gap is
//! always filled from history or announced with a resync notice
//! ([`RESYNC`](crate::consumer::RESYNC)). Messages that cannot be published while Redis is
//! unreachable are dropped and their streams restart at a new epoch (so their subscribers are
//! told); after a Redis reconnection every local connection checks its subscriptions against
//! their streams. Subscribing waits until the broker listens to the group (the Redis
//! `SUBSCRIBE` is acknowledged, at most [`SUBSCRIBE_TIMEOUT`] while Redis is down), so a change
//! committed after a subscribe reply reaches the subscriber. The whole contract, with its
//! failure cases, is `docs/delivery.md`.

mod broker;
mod history;
mod hub;
mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;

pub use broker::Broker;
pub use history::{HistoryOptions, Position, StreamState};
pub use hub::Hub;
pub(crate) use hub::{Decoder, Delivery, Lag, Member};
pub use memory::MemoryBroker;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisBroker;

pub use crate::change::Object;
use crate::error::Error;

/// How long a subscribe waits for a remote broker to confirm it listens to a new group. Past
/// it the subscription is kept and the broker subscribes as soon as it can (after a Redis
/// outage, it resubscribes every local group).
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One message sent to a group: serialized once, shared by every member.
#[derive(Debug)]
#[non_exhaustive]
pub struct GroupMessage {
    /// The observer that produced it.
    pub observer: Arc<str>,
    /// The group it was sent to.
    pub group: Arc<str>,
    /// What happened: `create`, `update`, `delete`, or an observer's own word.
    pub action: Arc<str>,
    /// The payload, serialized once (JSON).
    pub body: Arc<RawValue>,
    /// The typed object, when the observer has one (a model instance).
    pub object: Option<Object>,
    /// The object as JSON, for other nodes (serialized only when the layer is remote).
    pub object_json: Option<Arc<RawValue>>,
    /// The object's primary key, when the message is about one (model observers): pushes are
    /// permission-checked as `{"pk": pk}`.
    pub pk: Option<Arc<RawValue>>,
    /// Where the message sits in its group's stream; set by the broker when it is published.
    pub position: Option<Position>,
}

impl GroupMessage {
    /// What the message weighs in a connection's event queue: the bytes of its JSON.
    pub(crate) fn size(&self) -> usize {
        self.body.get().len() + self.object_json.as_ref().map_or(0, |o| o.get().len())
    }

    /// A message without a typed object.
    pub fn new(observer: Arc<str>, group: Arc<str>, action: Arc<str>, body: Arc<RawValue>) -> Self {
        GroupMessage {
            observer,
            group,
            action,
            body,
            object: None,
            object_json: None,
            pk: None,
            position: None,
        }
    }

    /// Names the primary key of the object the message is about.
    pub fn with_pk(mut self, pk: Option<Arc<RawValue>>) -> Self {
        self.pk = pk;
        self
    }

    /// Attaches the typed object, and its JSON for other nodes.
    pub fn with_object(mut self, object: Option<Object>, json: Option<Arc<RawValue>>) -> Self {
        self.object = object;
        self.object_json = json;
        self
    }
}

/// A node's channel layer: a local [`Hub`] and a [`Broker`]. Cheap to clone.
///
/// ```
/// # async fn f() -> Result<(), dcrf::Error> {
/// use dcrf::channel::ChannelLayer;
/// let one_process = ChannelLayer::memory();
/// let from_a_flag = ChannelLayer::from_url("memory").await?;
/// # let _ = (one_process, from_a_flag);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ChannelLayer {
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
}

impl std::fmt::Debug for ChannelLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelLayer")
            .field("remote", &self.is_remote())
            .finish_non_exhaustive()
    }
}

impl Default for ChannelLayer {
    fn default() -> Self {
        Self::memory()
    }
}

impl ChannelLayer {
    /// A layer over any broker; the broker is started with this node's hub.
    pub fn new(broker: impl Broker) -> ChannelLayer {
        let hub = Arc::new(Hub::default());
        let broker: Arc<dyn Broker> = Arc::new(broker);
        broker.start(Arc::downgrade(&hub));
        ChannelLayer { hub, broker }
    }

    /// A process-local layer: messages reach this node's connections only; default history
    /// ([`HistoryOptions::default`]).
    pub fn memory() -> ChannelLayer {
        Self::new(MemoryBroker::default())
    }

    /// A layer shared by every node connected to the same Redis (`redis://host:port`).
    ///
    /// Fails if Redis cannot be reached now; later outages are survived (see the module docs).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn redis(url: &str) -> Result<ChannelLayer, Error> {
        Ok(Self::new(
            RedisBroker::connect(url, HistoryOptions::default()).await?,
        ))
    }

    /// A layer from a URL: `memory` (or empty) or `redis://...` (feature `redis`).
    pub async fn from_url(url: &str) -> Result<ChannelLayer, Error> {
        match url {
            "" | "memory" | "memory://" => Ok(Self::memory()),
            #[cfg(feature = "redis")]
            u if u.starts_with("redis://") || u.starts_with("rediss://") => Self::redis(u).await,
            other => Err(Error::configuration(format!(
                "unknown channel layer URL {other:?}: use \"memory\" or redis://host:port{}",
                if cfg!(feature = "redis") {
                    ""
                } else {
                    " (the latter needs the `redis` feature)"
                }
            ))),
        }
    }

    /// Does this layer reach other nodes?
    pub fn is_remote(&self) -> bool {
        self.broker.is_remote()
    }

    /// Restarts every stream whose group starts with `prefix` at a new epoch: subscribers get
    /// resync notices (see [`Broker::restart`]).
    pub async fn restart_streams(&self, prefix: &str) -> Result<(), Error> {
        self.broker.restart(prefix.into()).await
    }

    /// How many local connections are in a group.
    pub fn local_members(&self, group: &str) -> usize {
        self.hub.local_members(group)
    }

    /// This node's hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Sends a message to every member of its group, on every node, numbered in the group's
    /// stream.
    pub async fn group_send(&self, message: GroupMessage) -> Result<(), Error> {
        self.broker.publish(message).await
    }

    /// The stream of `group`: its position now and, with `since`, what was published after
    /// it, when the history still holds all of it (see [`Broker::recover`]).
    pub async fn recover(
        &self,
        group: &Arc<str>,
        since: Option<Position>,
    ) -> Result<StreamState, Error> {
        self.broker.recover(group.clone(), since).await
    }

    /// Adds a connection to a group (idempotent); returns once the broker delivers the
    /// group's messages to this node (see [`SUBSCRIBE_TIMEOUT`]).
    pub(crate) async fn group_add(&self, group: &Arc<str>, member: &Member) {
        if self.hub.add(group, member) {
            let listening = self.broker.subscribe(group.clone());
            if tokio::time::timeout(SUBSCRIBE_TIMEOUT, listening)
                .await
                .is_err()
            {
                tracing::warn!(group = %group, "broker has not confirmed the subscription yet");
            }
        }
    }

    /// Lets messages of `observer` that arrive from other nodes carry their typed object again.
    pub(crate) fn register_decoder(&self, observer: Arc<str>, decoder: Decoder) {
        self.hub.register_decoder(observer, decoder);
    }

    /// Removes a connection from a group (idempotent).
    pub(crate) fn group_discard(&self, group: &str, member_id: u64) {
        if self.hub.discard(group, member_id) {
            self.broker.unsubscribe(group.into());
        }
    }
}
