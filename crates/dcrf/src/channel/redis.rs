//! [`RedisBroker`]: messages between nodes over Redis pub/sub.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Broker, GroupMessage, Hub};
use crate::error::Error;
use crate::sync::lock;

/// A message as it travels through Redis (private to this broker): observer, group, action,
/// body, and the object's JSON for the receiving nodes' decoders.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    o: Cow<'a, str>,
    #[serde(borrow)]
    g: Cow<'a, str>,
    #[serde(borrow)]
    a: Cow<'a, str>,
    #[serde(borrow)]
    b: &'a RawValue,
    #[serde(borrow)]
    m: Option<&'a RawValue>,
    #[serde(borrow, default)]
    k: Option<&'a RawValue>,
}

/// The Redis channel of a group.
fn channel(group: &str) -> String {
    format!("dcrf:{group}")
}

enum Command {
    /// Subscribe, then say so.
    Subscribe(Arc<str>, oneshot::Sender<()>),
    Unsubscribe(Arc<str>),
}

/// The Redis broker: publishes over a reconnecting connection and subscribes through one
/// pub/sub connection per node, supervised and re-established after Redis restarts (every
/// group with local members is subscribed again).
pub struct RedisBroker {
    client: redis::Client,
    publisher: redis::aio::ConnectionManager,
    commands: mpsc::UnboundedSender<Command>,
    command_rx: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker").finish_non_exhaustive()
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RedisBroker {
    /// Connects to `redis://host:port`; fails if Redis cannot be reached now.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(Error::layer)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let publisher = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(Error::layer)?;
        let (commands, rx) = mpsc::unbounded_channel();
        Ok(RedisBroker {
            client,
            publisher,
            commands,
            command_rx: Mutex::new(Some(rx)),
            stop: CancellationToken::new(),
        })
    }
}

impl Broker for RedisBroker {
    fn start(&self, hub: Weak<Hub>) {
        let Some(rx) = lock(&self.command_rx).take() else {
            return;
        };
        let client = self.client.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = subscriber_loop(client, hub, rx) => {}
            }
        });
    }

    fn publish(&self, message: GroupMessage) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let payload = serde_json::to_vec(&Wire {
                o: Cow::Borrowed(&message.observer),
                g: Cow::Borrowed(&message.group),
                a: Cow::Borrowed(&message.action),
                b: &message.body,
                m: message.object_json.as_deref(),
                k: message.pk.as_deref(),
            })?;
            let mut conn = self.publisher.clone();
            redis::cmd("PUBLISH")
                .arg(channel(&message.group))
                .arg(payload)
                .query_async::<i64>(&mut conn)
                .await
                .map(|_| ())
                .map_err(Error::layer)
        })
    }

    fn subscribe(&self, group: Arc<str>) -> BoxFuture<'static, ()> {
        let (ack, listening) = oneshot::channel();
        let _ = self.commands.send(Command::Subscribe(group, ack));
        Box::pin(async move {
            let _ = listening.await;
        })
    }

    fn unsubscribe(&self, group: Arc<str>) {
        let _ = self.commands.send(Command::Unsubscribe(group));
    }

    fn is_remote(&self) -> bool {
        true
    }
}

/// A message that came from Redis: decode, then deliver locally.
fn deliver(hub: &Hub, payload: &[u8]) {
    let wire: Wire<'_> = match serde_json::from_slice(payload) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed channel-layer message");
            return;
        }
    };
    let object = wire.m.and_then(|m| hub.decode_object(&wire.o, m.get()));
    let message = GroupMessage::new(
        wire.o.as_ref().into(),
        wire.g.as_ref().into(),
        wire.a.as_ref().into(),
        wire.b.to_owned().into(),
    )
    .with_object(object, wire.m.map(|m| Arc::from(m.to_owned())))
    .with_pk(wire.k.map(|k| Arc::from(k.to_owned())));
    hub.deliver(Arc::new(message));
}

/// Keeps one pub/sub connection alive: subscribes every local group after each (re)connect,
/// applies subscribe/unsubscribe commands, and delivers what arrives.
async fn subscriber_loop(
    client: redis::Client,
    hub: Weak<Hub>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    use futures_util::StreamExt;
    let mut backoff = Duration::from_millis(100);
    // Subscribers waiting for a (re)connection: they are listening once every local group is.
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        let Some(local) = hub.upgrade() else { return };
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                drop(local);
                tracing::warn!(error = %e, "redis pub/sub unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        // Pending commands are covered by subscribing the full set of local groups below.
        while let Ok(command) = commands.try_recv() {
            if let Command::Subscribe(_, ack) = command {
                waiting.push(ack);
            }
        }
        let groups: Vec<String> = local.groups().iter().map(|g| channel(g)).collect();
        drop(local);
        if !groups.is_empty() && sink.subscribe(&groups).await.is_err() {
            tokio::time::sleep(backoff).await;
            continue;
        }
        for ack in waiting.drain(..) {
            let _ = ack.send(());
        }
        backoff = Duration::from_millis(100);
        tracing::info!(groups = groups.len(), "redis pub/sub connected");
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { break };
                    let Some(local) = hub.upgrade() else { return };
                    deliver(&local, message.get_payload_bytes());
                }
                command = commands.recv() => {
                    let ok = match command {
                        None => return,
                        Some(Command::Subscribe(g, ack)) => {
                            if sink.subscribe(channel(&g)).await.is_ok() {
                                let _ = ack.send(());
                                true
                            } else {
                                waiting.push(ack);
                                false
                            }
                        }
                        Some(Command::Unsubscribe(g)) => {
                            // A member may have joined again meanwhile.
                            let still = hub.upgrade().is_some_and(|h| h.has_group(&g));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_round_trips_escaped_names() {
        let body = RawValue::from_string(r#"{"x":"\"q\""}"#.into()).unwrap();
        let payload = serde_json::to_vec(&Wire {
            o: Cow::Borrowed("obs\"1"),
            g: Cow::Borrowed("obs\"1:a\\b"),
            a: Cow::Borrowed("update"),
            b: &body,
            m: None,
            k: None,
        })
        .unwrap();
        let wire: Wire<'_> = serde_json::from_slice(&payload).unwrap();
        assert_eq!(wire.o, "obs\"1");
        assert_eq!(wire.g, "obs\"1:a\\b");
        assert_eq!(wire.b.get(), r#"{"x":"\"q\""}"#);
        assert!(wire.m.is_none());
    }
}
