//! The channel layer: groups of connections, and messages sent to a group.
//!
//! A [`Layer`] is one node's view: which local connections are members of which group. Sending
//! to a group delivers to the local members; with Redis ([`Layer::redis`]) the message is
//! published instead, every node that has local members of that group receives it once
//! (each node `SUBSCRIBE`s to a group's channel while it has members) and fans it out locally.
//!
//! A message is serialized once; every member gets the same `Arc`.
//!
//! ## Slow members
//!
//! Each connection has a bounded event queue ([`Dcrf::event_queue`](crate::Dcrf::event_queue),
//! default 1024). A message that finds it full is not queued: the connection is closed with
//! code **1013** (Try Again Later), so one slow client never slows the others nor grows the
//! server's memory. A reconnecting client (dcrf-client does it by itself) resubscribes and
//! reads current state.
//!
//! ## Delivery
//!
//! At most once: a message sent while Redis is unreachable is lost, as with Channels' layers.
//! After Redis comes back the node resubscribes every group with local members.

use std::any::Any;
use std::collections::HashMap;
#[cfg(feature = "redis")]
use std::sync::Mutex;
use std::sync::{Arc, RwLock};
#[cfg(feature = "redis")]
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// A typed object carried in-process beside its serialized form (the model instance of a
/// change), so handlers can check permissions without a database read.
pub type Object = Arc<dyn Any + Send + Sync>;

/// One message to a group: serialized once, shared by every member.
#[derive(Debug)]
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
    /// The object as JSON, for other nodes (only serialized when the layer is remote).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) object_json: Option<Arc<RawValue>>,
}

/// An event on its way to a connection: the member it is for (a multiplexed socket has one
/// member per stream) and the shared message.
pub(crate) type Delivery = (u64, Arc<GroupMessage>);

/// A connection's membership card: where its events go.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) id: u64,
    pub(crate) inbox: mpsc::Sender<Delivery>,
    pub(crate) kick: CancellationToken,
}

/// Turns an object's JSON back into the typed object on a node that received it from Redis.
pub(crate) type Decoder = Arc<dyn Fn(&str) -> Option<Object> + Send + Sync>;

/// A node's channel layer: in memory (the default) or over Redis. Cheap to clone.
#[derive(Clone)]
pub struct Layer {
    inner: Arc<LayerInner>,
}

struct LayerInner {
    groups: RwLock<HashMap<Arc<str>, Vec<Member>>>,
    decoders: RwLock<HashMap<Arc<str>, Decoder>>,
    #[cfg(feature = "redis")]
    redis: Option<RedisTransport>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("remote", &self.is_remote())
            .finish_non_exhaustive()
    }
}

impl Default for Layer {
    fn default() -> Self {
        Self::memory()
    }
}

impl Layer {
    /// A process-local layer: messages reach this node's connections only.
    pub fn memory() -> Layer {
        Layer {
            inner: Arc::new(LayerInner {
                groups: RwLock::new(HashMap::new()),
                decoders: RwLock::new(HashMap::new()),
                #[cfg(feature = "redis")]
                redis: None,
            }),
        }
    }

    /// A layer shared by every node connected to the same Redis (`redis://host:port`).
    /// Needs the `redis` feature.
    ///
    /// Fails if Redis cannot be reached now; later outages are survived (see the module docs).
    #[cfg(feature = "redis")]
    pub async fn redis(url: &str) -> Result<Layer, Error> {
        let transport = RedisTransport::connect(url).await?;
        let layer = Layer {
            inner: Arc::new(LayerInner {
                groups: RwLock::new(HashMap::new()),
                decoders: RwLock::new(HashMap::new()),
                redis: Some(transport),
            }),
        };
        if let Some(redis) = &layer.inner.redis {
            redis.start(Arc::downgrade(&layer.inner));
        }
        Ok(layer)
    }

    /// A layer from a URL: `memory` (or empty) or `redis://...`.
    pub async fn from_url(url: &str) -> Result<Layer, Error> {
        match url {
            "" | "memory" | "memory://" => Ok(Layer::memory()),
            #[cfg(feature = "redis")]
            u if u.starts_with("redis://") || u.starts_with("rediss://") => Layer::redis(u).await,
            other => Err(Error::Configuration(format!(
                "unknown channel layer URL {other:?}: use \"memory\" or redis://host:port"
            ))),
        }
    }

    /// Does this layer reach other nodes?
    pub fn is_remote(&self) -> bool {
        #[cfg(feature = "redis")]
        return self.inner.redis.is_some();
        #[cfg(not(feature = "redis"))]
        false
    }

    /// How many local connections are in a group.
    pub fn local_members(&self, group: &str) -> usize {
        self.inner
            .groups
            .read()
            .map(|g| g.get(group).map_or(0, Vec::len))
            .unwrap_or(0)
    }

    /// Sends a message to every member of its group, on every node.
    pub async fn group_send(&self, message: GroupMessage) -> Result<(), Error> {
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.inner.redis {
            return redis.publish(&message).await;
        }
        self.inner.deliver(Arc::new(message));
        Ok(())
    }

    pub(crate) fn register_decoder(&self, observer: Arc<str>, decoder: Decoder) {
        if let Ok(mut d) = self.inner.decoders.write() {
            d.insert(observer, decoder);
        }
    }

    /// Adds a connection to a group (idempotent).
    pub(crate) fn group_add(&self, group: &Arc<str>, member: &Member) {
        let first = {
            let Ok(mut groups) = self.inner.groups.write() else {
                return;
            };
            let members = groups.entry(group.clone()).or_default();
            if members.iter().any(|m| m.id == member.id) {
                return;
            }
            members.push(member.clone());
            members.len() == 1
        };
        #[cfg(feature = "redis")]
        if first && let Some(redis) = &self.inner.redis {
            redis.subscribe(group.clone());
        }
        #[cfg(not(feature = "redis"))]
        let _ = first;
    }

    /// Removes a connection from a group (idempotent).
    pub(crate) fn group_discard(&self, group: &str, member_id: u64) {
        let emptied = {
            let Ok(mut groups) = self.inner.groups.write() else {
                return;
            };
            let Some(members) = groups.get_mut(group) else {
                return;
            };
            members.retain(|m| m.id != member_id);
            if members.is_empty() {
                groups.remove(group);
                true
            } else {
                false
            }
        };
        #[cfg(feature = "redis")]
        if emptied && let Some(redis) = &self.inner.redis {
            redis.unsubscribe(group);
        }
        #[cfg(not(feature = "redis"))]
        let _ = emptied;
    }
}

impl LayerInner {
    /// Hands a message to every local member of its group.
    fn deliver(&self, message: Arc<GroupMessage>) {
        let Ok(groups) = self.groups.read() else {
            return;
        };
        let Some(members) = groups.get(&*message.group) else {
            return;
        };
        for member in members {
            match member.inbox.try_send((member.id, message.clone())) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if !member.kick.is_cancelled() {
                        tracing::warn!(
                            connection = member.id,
                            group = %message.group,
                            "event queue full: closing the slow connection with 1013"
                        );
                        member.kick.cancel();
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    /// A message that came from Redis: decode, then deliver locally.
    #[cfg(feature = "redis")]
    fn deliver_remote(&self, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Wire<'a> {
            #[serde(borrow)]
            o: &'a str,
            #[serde(borrow)]
            g: &'a str,
            #[serde(borrow)]
            a: &'a str,
            #[serde(borrow)]
            b: &'a RawValue,
            #[serde(borrow)]
            m: Option<&'a RawValue>,
        }
        let wire: Wire<'_> = match serde_json::from_slice(payload) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed channel-layer message");
                return;
            }
        };
        let object = wire.m.and_then(|m| {
            let decoder = self.decoders.read().ok()?.get(wire.o).cloned()?;
            decoder(m.get())
        });
        self.deliver(Arc::new(GroupMessage {
            observer: wire.o.into(),
            group: wire.g.into(),
            action: wire.a.into(),
            body: wire.b.to_owned().into(),
            object,
            object_json: None,
        }));
    }

    #[cfg(feature = "redis")]
    fn local_groups(&self) -> Vec<Arc<str>> {
        self.groups
            .read()
            .map(|g| g.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(feature = "redis")]
mod redis_transport {
    use super::*;

    /// The Redis channel of a group.
    fn channel(group: &str) -> String {
        format!("dcrf:{group}")
    }

    enum Command {
        Subscribe(Arc<str>),
        Unsubscribe(Arc<str>),
    }

    /// Publishing over a reconnecting connection, subscribing through one pub/sub connection per
    /// node, supervised and re-established after Redis restarts.
    pub(super) struct RedisTransport {
        client: redis::Client,
        publisher: redis::aio::ConnectionManager,
        commands: mpsc::UnboundedSender<Command>,
        command_rx: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
        stop: CancellationToken,
    }

    impl Drop for RedisTransport {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    impl RedisTransport {
        pub(super) async fn connect(url: &str) -> Result<Self, Error> {
            let layer_err = |e: redis::RedisError| Error::Layer(e.to_string());
            let client = redis::Client::open(url).map_err(layer_err)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(2);
            let publisher = client
                .get_connection_manager_with_config(config)
                .await
                .map_err(layer_err)?;
            let (commands, rx) = mpsc::unbounded_channel();
            Ok(RedisTransport {
                client,
                publisher,
                commands,
                command_rx: Mutex::new(Some(rx)),
                stop: CancellationToken::new(),
            })
        }

        pub(super) fn start(&self, layer: std::sync::Weak<LayerInner>) {
            let Some(rx) = self.command_rx.lock().ok().and_then(|mut r| r.take()) else {
                return;
            };
            let client = self.client.clone();
            let stop = self.stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = subscriber_loop(client, layer, rx) => {}
                }
            });
        }

        pub(super) async fn publish(&self, message: &GroupMessage) -> Result<(), Error> {
            #[derive(serde::Serialize)]
            struct Wire<'a> {
                o: &'a str,
                g: &'a str,
                a: &'a str,
                b: &'a RawValue,
                m: Option<&'a RawValue>,
            }
            let payload = serde_json::to_vec(&Wire {
                o: &message.observer,
                g: &message.group,
                a: &message.action,
                b: &message.body,
                m: message.object_json.as_deref(),
            })?;
            let mut conn = self.publisher.clone();
            redis::cmd("PUBLISH")
                .arg(channel(&message.group))
                .arg(payload)
                .query_async::<i64>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| Error::Layer(e.to_string()))
        }

        pub(super) fn subscribe(&self, group: Arc<str>) {
            let _ = self.commands.send(Command::Subscribe(group));
        }

        pub(super) fn unsubscribe(&self, group: &str) {
            let _ = self.commands.send(Command::Unsubscribe(group.into()));
        }
    }

    /// Keeps one pub/sub connection alive: subscribes every local group after each (re)connect,
    /// applies subscribe/unsubscribe commands, and delivers what arrives.
    async fn subscriber_loop(
        client: redis::Client,
        layer: std::sync::Weak<LayerInner>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        use futures_util::StreamExt;
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(inner) = layer.upgrade() else { return };
            let pubsub = match client.get_async_pubsub().await {
                Ok(p) => p,
                Err(e) => {
                    drop(inner);
                    tracing::warn!(error = %e, "redis pub/sub unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();
            // Drain stale commands: the full set of local groups is subscribed below.
            while commands.try_recv().is_ok() {}
            let groups: Vec<String> = inner.local_groups().iter().map(|g| channel(g)).collect();
            drop(inner);
            if !groups.is_empty() && sink.subscribe(&groups).await.is_err() {
                tokio::time::sleep(backoff).await;
                continue;
            }
            backoff = Duration::from_millis(100);
            tracing::info!(groups = groups.len(), "redis pub/sub connected");
            loop {
                tokio::select! {
                    message = stream.next() => {
                        let Some(message) = message else { break };
                        let Some(inner) = layer.upgrade() else { return };
                        inner.deliver_remote(message.get_payload_bytes());
                    }
                    command = commands.recv() => {
                        let ok = match command {
                            None => return,
                            Some(Command::Subscribe(g)) => sink.subscribe(channel(&g)).await.is_ok(),
                            Some(Command::Unsubscribe(g)) => {
                                // A member may have joined again meanwhile.
                                let still = layer.upgrade().is_some_and(|i| {
                                    i.groups.read().map(|m| m.contains_key(&*g)).unwrap_or(false)
                                });
                                still || sink.unsubscribe(channel(&g)).await.is_ok()
                            }
                        };
                        if !ok {
                            break;
                        }
                    }
                }
            }
            tracing::warn!("redis pub/sub connection lost; reconnecting");
            tokio::time::sleep(backoff).await;
        }
    }
}
#[cfg(feature = "redis")]
use redis_transport::RedisTransport;
