//! [`Hub`]: this node's connections by group, and the slow-member policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{GroupMessage, Object};
use crate::sync::{lock, read, write};

/// An event on its way to a connection: the member it is for (a multiplexed socket has one
/// member per stream) and the shared message.
pub(crate) type Delivery = (u64, Arc<GroupMessage>);

/// A connection's membership card: where its events go, how to tell it that it fell behind,
/// and how to let it go.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) id: u64,
    pub(crate) inbox: flume::Sender<Delivery>,
    pub(crate) lag: Arc<Lag>,
    pub(crate) kick: CancellationToken,
}

/// A socket's catch-up signal: set when an event found its inbox full (the event is dropped;
/// the connection reads it back from the stream's history) or when the broker may have lost
/// messages (a Redis reconnect). A socket that stays behind for longer than its slow-client
/// timeout without catching up is kicked (1013).
#[derive(Debug)]
pub(crate) struct Lag {
    /// Since when events have been dropped without a catch-up.
    behind: Mutex<Option<Instant>>,
    /// Woken when a catch-up is due (fell behind, or asked to check).
    notify: Notify,
    /// Woken when the socket falls behind (for [`Lag::stuck`]).
    fell_behind: Notify,
    timeout: Duration,
    /// Bytes of the messages in the socket's event queue, and the most it may hold.
    queued: AtomicUsize,
    max_queued: usize,
}

impl Lag {
    /// A socket's signal: behind for `timeout` means kicked; its event queue holds at most
    /// `max_queued` bytes of messages (and one message, however large).
    pub(crate) fn new(timeout: Duration, max_queued: usize) -> Lag {
        Lag {
            behind: Mutex::new(None),
            notify: Notify::new(),
            fell_behind: Notify::new(),
            timeout,
            queued: AtomicUsize::new(0),
            max_queued,
        }
    }

    /// Counts a message into the event queue, unless the queue's bytes are spent (a message
    /// always fits an empty queue).
    fn enqueue(&self, message: &GroupMessage) -> bool {
        let size = message.size();
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q == 0 || q.saturating_add(size) <= self.max_queued)
                    .then(|| q.saturating_add(size))
            })
            .is_ok()
    }

    /// Counts a message out of the event queue (taken by the connection, or not sent).
    pub(crate) fn dequeued(&self, message: &GroupMessage) {
        let size = message.size();
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(size))
            });
    }

    /// An event was dropped; true when the socket has been behind for too long.
    fn dropped(&self) -> bool {
        let mut behind = lock(&self.behind);
        match *behind {
            Some(since) => since.elapsed() > self.timeout,
            None => {
                *behind = Some(Instant::now());
                self.notify.notify_one();
                self.fell_behind.notify_one();
                false
            }
        }
    }

    /// Asks the socket to check its subscriptions against their streams.
    pub(crate) fn request_check(&self) {
        self.notify.notify_one();
    }

    /// Waits until a catch-up is due.
    pub(crate) async fn due(&self) {
        self.notify.notified().await;
    }

    /// Resolves once the socket has been behind for longer than its timeout without a catch-up
    /// (a client that stopped reading: its connection is stuck writing).
    pub(crate) async fn stuck(&self) {
        loop {
            let since = *lock(&self.behind);
            match since {
                Some(t) => {
                    let deadline = t + self.timeout;
                    if Instant::now() >= deadline {
                        return;
                    }
                    tokio::time::sleep_until(deadline.into()).await;
                }
                None => self.fell_behind.notified().await,
            }
        }
    }

    /// Starts a catch-up: clears the signal.
    pub(crate) fn take(&self) {
        *lock(&self.behind) = None;
    }
}

/// Turns an object's JSON back into the typed object on a node that received it remotely.
pub(crate) type Decoder = Arc<dyn Fn(&str) -> Option<Object> + Send + Sync>;

/// The local connections of one node, by group. A [`Broker`](super::Broker) hands it the
/// messages of the groups it has members of.
///
/// A member whose event queue is full (in messages, or in bytes) does not get the message: it is told it fell behind,
/// and reads what it missed from the stream's history (its catch-up). A member that stays
/// behind for longer than its slow-client timeout is kicked (1013).
#[derive(Default)]
pub struct Hub {
    groups: RwLock<HashMap<Arc<str>, Vec<Member>>>,
    decoders: RwLock<HashMap<Arc<str>, Decoder>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("groups", &read(&self.groups).len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Hands a message to every local member of its group. A member whose event queue is full
    /// is not waited for: the message is dropped for it and it is told it fell behind (it
    /// catches up from history); one behind for longer than its timeout is kicked (1013).
    pub fn deliver(&self, message: Arc<GroupMessage>) {
        let groups = read(&self.groups);
        let Some(members) = groups.get(&*message.group) else {
            return;
        };
        for member in members {
            let sent = if member.lag.enqueue(&message) {
                let sent = member.inbox.try_send((member.id, message.clone()));
                if sent.is_err() {
                    member.lag.dequeued(&message);
                }
                sent
            } else {
                Err(flume::TrySendError::Full((member.id, message.clone())))
            };
            match sent {
                Ok(()) => {}
                Err(flume::TrySendError::Full(_)) => {
                    // Dropped here, read back from history by the connection's catch-up.
                    if member.lag.dropped() && !member.kick.is_cancelled() {
                        tracing::warn!(
                            connection = member.id,
                            group = %message.group,
                            "connection behind for too long: closing it with 1013"
                        );
                        member.kick.cancel();
                    }
                }
                Err(flume::TrySendError::Disconnected(_)) => {}
            }
        }
    }

    /// Asks every local connection to check its subscriptions against their streams (after
    /// the broker may have lost messages, e.g. a Redis reconnection).
    pub fn check_all(&self) {
        let groups = read(&self.groups);
        for members in groups.values() {
            for member in members {
                member.lag.request_check();
            }
        }
    }

    /// Asks the local members of `group` to check their subscriptions against their streams
    /// (the group's stream restarted at a new epoch).
    pub fn check_group(&self, group: &str) {
        if let Some(members) = read(&self.groups).get(group) {
            for member in members {
                member.lag.request_check();
            }
        }
    }

    /// The typed object of a message received from another node, decoded by its observer's
    /// decoder; `None` when the observer is unknown here or the JSON does not decode.
    pub fn decode_object(&self, observer: &str, json: &str) -> Option<Object> {
        let decoder = read(&self.decoders).get(observer).cloned()?;
        decoder(json)
    }

    /// The groups that have local members now.
    pub fn groups(&self) -> Vec<Arc<str>> {
        read(&self.groups).keys().cloned().collect()
    }

    /// Does `group` have local members now?
    pub fn has_group(&self, group: &str) -> bool {
        read(&self.groups).contains_key(group)
    }

    /// How many local connections are in a group.
    pub fn local_members(&self, group: &str) -> usize {
        read(&self.groups).get(group).map_or(0, Vec::len)
    }

    pub(crate) fn register_decoder(&self, observer: Arc<str>, decoder: Decoder) {
        write(&self.decoders).insert(observer, decoder);
    }

    /// Adds a member (idempotent); true when it is the group's first local member.
    pub(crate) fn add(&self, group: &Arc<str>, member: &Member) -> bool {
        let mut groups = write(&self.groups);
        let members = groups.entry(group.clone()).or_default();
        if members.iter().any(|m| m.id == member.id) {
            return false;
        }
        members.push(member.clone());
        members.len() == 1
    }

    /// Removes a member (idempotent); true when the group has no local member left.
    pub(crate) fn discard(&self, group: &str, member_id: u64) -> bool {
        let mut groups = write(&self.groups);
        let Some(members) = groups.get_mut(group) else {
            return false;
        };
        members.retain(|m| m.id != member_id);
        if members.is_empty() {
            groups.remove(group);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn member(id: u64, capacity: usize) -> (Member, flume::Receiver<Delivery>) {
        let (inbox, rx) = flume::bounded(capacity);
        let member = Member {
            id,
            inbox,
            lag: Arc::new(Lag::new(Duration::ZERO, usize::MAX)),
            kick: CancellationToken::new(),
        };
        (member, rx)
    }

    fn message(group: &str) -> Arc<GroupMessage> {
        let body: Box<RawValue> = RawValue::from_string("{}".into()).unwrap();
        Arc::new(GroupMessage::new(
            "o".into(),
            group.into(),
            "update".into(),
            body.into(),
        ))
    }

    #[test]
    fn first_member_and_last_member_are_reported() {
        let hub = Hub::default();
        let g: Arc<str> = "g".into();
        let (a, _ra) = member(1, 4);
        let (b, _rb) = member(2, 4);
        assert!(hub.add(&g, &a), "first member");
        assert!(!hub.add(&g, &a), "same member again");
        assert!(!hub.add(&g, &b), "second member");
        assert_eq!(hub.local_members("g"), 2);
        assert!(!hub.discard("g", 1));
        assert!(!hub.discard("g", 1), "idempotent");
        assert!(hub.discard("g", 2), "last member left");
        assert!(!hub.has_group("g"));
        assert!(!hub.discard("g", 2));
    }

    #[test]
    fn deliver_reaches_members_of_the_group_only() {
        let hub = Hub::default();
        let (a, ra) = member(1, 4);
        let (b, rb) = member(2, 4);
        hub.add(&"g".into(), &a);
        hub.add(&"h".into(), &b);
        hub.deliver(message("g"));
        let (id, m) = ra.try_recv().expect("delivered");
        assert_eq!((id, &*m.group), (1, "g"));
        assert!(rb.try_recv().is_err());
        hub.deliver(message("nobody"));
        assert!(ra.try_recv().is_err());
    }

    #[test]
    fn a_full_inbox_marks_the_member_behind_then_kicks_it_if_it_stays_behind() {
        let hub = Hub::default();
        let (slow, _rs) = member(1, 1);
        let (fast, rf) = member(2, 8);
        hub.add(&"g".into(), &slow);
        hub.add(&"g".into(), &fast);
        hub.deliver(message("g"));
        hub.deliver(message("g"));
        assert!(lock(&slow.lag.behind).is_some(), "told it fell behind");
        assert!(!slow.kick.is_cancelled(), "not kicked at the first drop");
        std::thread::sleep(Duration::from_millis(2));
        hub.deliver(message("g"));
        assert!(slow.kick.is_cancelled(), "behind past its timeout: let go");
        assert!(!fast.kick.is_cancelled());
        assert!(rf.try_recv().is_ok() && rf.try_recv().is_ok() && rf.try_recv().is_ok());
    }

    #[test]
    fn a_catch_up_clears_the_signal() {
        let hub = Hub::default();
        let (slow, _rs) = member(1, 1);
        hub.add(&"g".into(), &slow);
        hub.deliver(message("g"));
        hub.deliver(message("g"));
        slow.lag.take();
        hub.deliver(message("g"));
        assert!(
            !slow.kick.is_cancelled(),
            "a new drop after a catch-up starts over"
        );
    }
}
