//! [`RedisBroker`]: messages between nodes over Redis pub/sub.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::history::new_epoch;
use super::{Broker, GroupMessage, HistoryOptions, Hub, Position, StreamState};
use crate::error::Error;
use crate::sync::lock;

/// A message as it travels through Redis (private to this broker): observer, group, action,
/// body, the object's JSON for the receiving nodes' decoders, its primary key, and its
/// position (`e`, `n`: written by the publish script, which assigns the offset). A message with
/// `r` set is not an event: it says the stream restarted at a new epoch.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    e: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    r: bool,
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

/// The hash holding a group stream's epoch (`e`) and last offset (`o`).
fn meta_key(group: &str) -> String {
    format!("dcrf:m:{group}")
}

/// The Redis stream holding a group stream's history (entry ids are `offset-0`).
fn history_key(group: &str) -> String {
    format!("dcrf:h:{group}")
}

/// Numbers a message, appends it to the history and publishes it, atomically: the order of a
/// group's messages on its channel is the order of their offsets, on every node.
///
/// KEYS: meta, history. ARGV: channel, the message (a JSON object without `e`/`n`), an epoch
/// for a stream that has none, history size, history ttl, meta ttl (seconds).
const PUBLISH_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[3]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', KEYS[1], 'o', 1)
local msg = '{"e":"' .. epoch .. '","n":' .. offset .. ',' .. string.sub(ARGV[2], 2)
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'd', msg)
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[1], msg)
return offset
"#;

/// A stream's position and, when history covers it, what came after a position.
///
/// KEYS: meta, history. ARGV: an epoch for a stream that has none, meta ttl, the client's
/// epoch (empty: no position), the client's offset. Returns `{epoch, offset, covered, ...}`:
/// `covered` 1 when the messages that follow are every one after the client's offset.
const RECOVER_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
local offset = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
else
  offset = tonumber(redis.call('HGET', KEYS[1], 'o'))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
if ARGV[3] == '' or ARGV[3] ~= epoch then return {epoch, offset, 0} end
local since = tonumber(ARGV[4])
if since > offset then return {epoch, offset, 0} end
if since == offset then return {epoch, offset, 1} end
local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+')
if #entries == 0 or entries[1][1] ~= (since + 1) .. '-0' then return {epoch, offset, 0} end
local out = {epoch, offset, 1}
for _, entry in ipairs(entries) do out[#out + 1] = entry[2][2] end
return out
"#;

/// Restarts a stream at a new epoch (after some of its messages could not be published) and
/// tells every node's subscribers.
///
/// KEYS: meta, history. ARGV: channel, the new epoch, meta ttl, the notice (a JSON object
/// without `e`/`n`).
const RESET_SCRIPT: &str = r#"
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[2], 'o', 0)
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[1], '{"e":"' .. ARGV[2] .. '","n":0,' .. string.sub(ARGV[4], 2))
return 1
"#;

enum Command {
    /// Subscribe, then say so.
    Subscribe(Arc<str>, oneshot::Sender<()>),
    Unsubscribe(Arc<str>),
}

/// A message waiting for the publisher task, and who waits for it.
struct Outgoing {
    group: Arc<str>,
    payload: Vec<u8>,
    done: oneshot::Sender<Result<(), Error>>,
}

/// The Redis broker: numbers, records and publishes messages through one ordered publisher
/// per node (batched into pipelines), subscribes through one pub/sub connection per node
/// (supervised and re-established after Redis restarts: every group with local members is
/// subscribed again, and every local connection checks its subscriptions against their
/// streams), and keeps each group's history in a Redis stream.
///
/// Redis unreachable: messages that cannot be published are dropped with an error, and their
/// groups' streams restart at a new epoch before anything newer is published to them, so every
/// subscriber learns of the gap (a resync notice) instead of missing it silently.
pub struct RedisBroker {
    client: redis::Client,
    conn: redis::aio::ConnectionManager,
    options: HistoryOptions,
    hub: OnceLock<Weak<Hub>>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    outgoing_rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
    commands: mpsc::UnboundedSender<Command>,
    command_rx: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RedisBroker {
    /// Connects to `redis://host:port`; fails if Redis cannot be reached now.
    pub async fn connect(url: &str, options: HistoryOptions) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(Error::layer)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(Error::layer)?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        Ok(RedisBroker {
            client,
            conn,
            options,
            hub: OnceLock::new(),
            outgoing,
            outgoing_rx: Mutex::new(Some(outgoing_rx)),
            commands,
            command_rx: Mutex::new(Some(rx)),
            stop: CancellationToken::new(),
        })
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

impl Broker for RedisBroker {
    fn start(&self, hub: Weak<Hub>) {
        let _ = self.hub.set(hub.clone());
        let (Some(rx), Some(out)) = (
            lock(&self.command_rx).take(),
            lock(&self.outgoing_rx).take(),
        ) else {
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
        let conn = self.conn.clone();
        let options = self.options;
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = publisher_loop(conn, options, out) => {}
            }
        });
    }

    fn publish(&self, message: GroupMessage) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let payload = serde_json::to_vec(&Wire {
                e: None,
                n: None,
                r: false,
                o: Cow::Borrowed(&message.observer),
                g: Cow::Borrowed(&message.group),
                a: Cow::Borrowed(&message.action),
                b: &message.body,
                m: message.object_json.as_deref(),
                k: message.pk.as_deref(),
            })?;
            let (done, published) = oneshot::channel();
            self.outgoing
                .send(Outgoing {
                    group: message.group.clone(),
                    payload,
                    done,
                })
                .map_err(|_| Error::layer("the redis publisher has stopped"))?;
            published
                .await
                .map_err(|_| Error::layer("the redis publisher has stopped"))?
        })
    }

    fn recover(
        &self,
        group: Arc<str>,
        since: Option<Position>,
    ) -> BoxFuture<'_, Result<StreamState, Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let (since_epoch, since_offset) = match &since {
                Some(p) => (p.epoch.as_str(), p.offset),
                None => ("", 0),
            };
            let reply: Vec<redis::Value> = redis::Script::new(RECOVER_SCRIPT)
                .key(meta_key(&group))
                .key(history_key(&group))
                .arg(new_epoch())
                .arg(secs(self.options.meta_ttl))
                .arg(since_epoch)
                .arg(since_offset)
                .invoke_async(&mut conn)
                .await
                .map_err(Error::layer)?;
            let mut items = reply.into_iter();
            let (Some(epoch), Some(offset), Some(covered)) =
                (items.next(), items.next(), items.next())
            else {
                return Err(Error::layer("unexpected reply from the recover script"));
            };
            let epoch: String = redis::from_redis_value(epoch).map_err(Error::layer)?;
            let offset: u64 = redis::from_redis_value(offset).map_err(Error::layer)?;
            let covered: i64 = redis::from_redis_value(covered).map_err(Error::layer)?;
            let head = Position::new(epoch, offset);
            if since.is_none() || covered != 1 {
                return Ok(StreamState::head_only(head));
            }
            let hub = self.hub.get().and_then(Weak::upgrade);
            let mut missed = Vec::new();
            for item in items {
                let payload: Vec<u8> = redis::from_redis_value(item).map_err(Error::layer)?;
                match decode(hub.as_deref(), &payload) {
                    Some(Decoded::Event(m)) => missed.push(Arc::new(m)),
                    _ => return Ok(StreamState::head_only(head)),
                }
            }
            Ok(StreamState {
                head,
                missed: Some(missed),
            })
        })
    }

    fn restart(&self, prefix: Arc<str>) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let pattern = format!("{}*", glob_escape(&meta_key(&prefix)));
            let mut keys: Vec<String> = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(Error::layer)?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            let reset = redis::Script::new(RESET_SCRIPT);
            for key in keys {
                let Some(group) = key.strip_prefix("dcrf:m:") else {
                    continue;
                };
                reset
                    .key(meta_key(group))
                    .key(history_key(group))
                    .arg(channel(group))
                    .arg(new_epoch())
                    .arg(secs(self.options.meta_ttl))
                    .arg(reset_notice(group))
                    .invoke_async::<()>(&mut conn)
                    .await
                    .map_err(Error::layer)?;
            }
            Ok(())
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

/// The most messages sent in one pipeline.
const BATCH: usize = 512;

/// Publishes messages in the order they were handed over, batching what is waiting into one
/// pipeline. Messages that cannot be published are dropped (their senders get the error) and
/// their groups restart at a new epoch before any newer message is published to them.
async fn publisher_loop(
    mut conn: redis::aio::ConnectionManager,
    options: HistoryOptions,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let publish = redis::Script::new(PUBLISH_SCRIPT);
    let reset = redis::Script::new(RESET_SCRIPT);
    // Groups whose stream lost messages and must start a new epoch.
    let mut lost: HashSet<Arc<str>> = HashSet::new();
    let mut batch: Vec<Outgoing> = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if !lost.is_empty() {
            let mut pipe = redis::pipe();
            pipe.load_script(&reset).ignore();
            for group in &lost {
                let notice = reset_notice(group);
                pipe.invoke_script(
                    reset
                        .key(meta_key(group))
                        .key(history_key(group))
                        .arg(channel(group))
                        .arg(new_epoch())
                        .arg(secs(options.meta_ttl))
                        .arg(notice),
                )
                .ignore();
            }
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => {
                    tracing::warn!(
                        streams = lost.len(),
                        "redis is back: streams that lost messages restarted at a new epoch"
                    );
                    lost.clear();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "redis unavailable: cannot restart streams yet")
                }
            }
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&publish).ignore();
        let mut sent = Vec::with_capacity(batch.len());
        for out in batch.drain(..) {
            if lost.contains(&out.group) {
                let _ = out.done.send(Err(Error::layer(
                    "redis unavailable: the message was dropped and its stream restarts at a new epoch",
                )));
                continue;
            }
            pipe.invoke_script(
                publish
                    .key(meta_key(&out.group))
                    .key(history_key(&out.group))
                    .arg(channel(&out.group))
                    .arg(out.payload.as_slice())
                    .arg(new_epoch())
                    .arg(options.size)
                    .arg(secs(options.ttl))
                    .arg(secs(options.meta_ttl)),
            )
            .ignore();
            sent.push(out);
        }
        if sent.is_empty() {
            continue;
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => {
                for out in sent {
                    let _ = out.done.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, messages = sent.len(), "redis unavailable: messages dropped; their streams will restart at a new epoch");
                for out in sent {
                    lost.insert(out.group.clone());
                    let _ = out.done.send(Err(Error::layer(format!(
                        "redis unavailable, message dropped: {e}"
                    ))));
                }
            }
        }
    }
}

/// The notice a stream restart publishes on the group's channel.
fn reset_notice(group: &str) -> String {
    serde_json::to_string(&Wire {
        e: None,
        n: None,
        r: true,
        o: Cow::Borrowed(""),
        g: Cow::Borrowed(group),
        a: Cow::Borrowed("reset"),
        b: &NULL,
        m: None,
        k: None,
    })
    .unwrap_or_default()
}

/// Escapes a literal for a Redis glob pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `null`, as a raw body.
static NULL: std::sync::LazyLock<Box<RawValue>> =
    std::sync::LazyLock::new(|| RawValue::from_string("null".into()).expect("valid JSON"));

/// What a payload from Redis is.
enum Decoded {
    Event(GroupMessage),
    /// The stream of this group restarted at a new epoch.
    Reset(Arc<str>),
}

/// Decodes a payload from a channel or a history entry.
fn decode(hub: Option<&Hub>, payload: &[u8]) -> Option<Decoded> {
    let wire: Wire<'_> = match serde_json::from_slice(payload) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed channel-layer message");
            return None;
        }
    };
    if wire.r {
        return Some(Decoded::Reset(wire.g.as_ref().into()));
    }
    let object = wire
        .m
        .and_then(|m| hub.and_then(|h| h.decode_object(&wire.o, m.get())));
    let mut message = GroupMessage::new(
        wire.o.as_ref().into(),
        wire.g.as_ref().into(),
        wire.a.as_ref().into(),
        wire.b.to_owned().into(),
    )
    .with_object(object, wire.m.map(|m| Arc::from(m.to_owned())))
    .with_pk(wire.k.map(|k| Arc::from(k.to_owned())));
    if let (Some(e), Some(n)) = (wire.e, wire.n) {
        message.position = Some(Position::new(e.into_owned(), n));
    }
    Some(Decoded::Event(message))
}

/// A message that came from Redis: decode, then deliver locally.
fn deliver(hub: &Hub, payload: &[u8]) {
    match decode(Some(hub), payload) {
        Some(Decoded::Event(message)) => hub.deliver(Arc::new(message)),
        Some(Decoded::Reset(group)) => hub.check_group(&group),
        None => {}
    }
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
    // Set once connected: every later connection is a reconnection.
    let mut connected_before = false;
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
        if connected_before {
            crate::metrics::count(crate::metrics::LAYER_RECONNECTS_TOTAL);
        }
        connected_before = true;
        // Messages published while this node was not listening were missed: every local
        // connection checks its subscriptions against their streams.
        if let Some(local) = hub.upgrade() {
            local.check_all();
        }
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
            e: None,
            n: None,
            r: false,
            o: Cow::Borrowed("obs\"1"),
            g: Cow::Borrowed("obs\"1:a\\b"),
            a: Cow::Borrowed("update"),
            b: &body,
            m: None,
            k: None,
        })
        .unwrap();
        let text = String::from_utf8(payload.clone()).unwrap();
        assert!(
            text.starts_with("{\"o\":"),
            "no position before the script adds it"
        );
        // What the publish script does: the position goes first.
        let spliced = format!("{{\"e\":\"ep\",\"n\":7,{}", &text[1..]);
        let Some(Decoded::Event(m)) = decode(None, spliced.as_bytes()) else {
            panic!("not an event")
        };
        assert_eq!(m.position, Some(Position::new("ep", 7)));
        let wire: Wire<'_> = serde_json::from_slice(&payload).unwrap();
        assert_eq!(wire.o, "obs\"1");
        assert_eq!(wire.g, "obs\"1:a\\b");
        assert_eq!(wire.b.get(), r#"{"x":"\"q\""}"#);
        assert!(wire.m.is_none());
    }
}
