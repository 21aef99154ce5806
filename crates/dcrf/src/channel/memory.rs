//! [`MemoryBroker`]: one process, no network; positions and history in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::history::new_epoch;
use super::{Broker, GroupMessage, HistoryOptions, Hub, Position, StreamState};
use crate::error::Error;
use crate::sync::lock;

/// The in-memory broker: a published message is numbered in its stream, kept in the stream's
/// history (see [`HistoryOptions`]) and handed straight to this node's hub. The default.
///
/// Every stream's epoch is new in each process, so a client resuming after a restart is told
/// its history is gone (`recovered: false`).
///
/// A stream exists once a connection has joined or subscribed to its group: an event of a
/// group no connection of this process ever asked for is neither numbered nor kept (no client
/// can hold a position in it, so there is nothing to resume). The history of all streams
/// together is capped at [`HistoryOptions::max_total_bytes`], oldest events first.
#[derive(Debug, Default)]
pub struct MemoryBroker {
    hub: OnceLock<Weak<Hub>>,
    options: HistoryOptions,
    streams: Mutex<Streams>,
    /// Every kept event in publish order (some already dropped by their stream), for the cap
    /// on all streams' bytes.
    order: Mutex<VecDeque<(Weak<Mutex<Stream>>, u64)>>,
    totals: Arc<Totals>,
}

/// What all streams hold together.
#[derive(Debug, Default)]
struct Totals {
    bytes: AtomicUsize,
    events: AtomicUsize,
}

#[derive(Debug, Default)]
struct Streams {
    by_group: HashMap<Arc<str>, Arc<Mutex<Stream>>>,
    swept: Option<Instant>,
}

#[derive(Debug)]
struct Stream {
    epoch: String,
    offset: u64,
    events: VecDeque<Arc<GroupMessage>>,
    bytes: usize,
    /// The last event (history expiry).
    published: Instant,
    /// The last use of any kind (position expiry).
    used: Instant,
    totals: Arc<Totals>,
}

impl Stream {
    fn new(now: Instant, totals: Arc<Totals>) -> Stream {
        Stream {
            epoch: new_epoch(),
            offset: 0,
            events: VecDeque::new(),
            bytes: 0,
            published: now,
            used: now,
            totals,
        }
    }

    fn head(&self) -> Position {
        Position::new(self.epoch.clone(), self.offset)
    }

    fn push(&mut self, message: Arc<GroupMessage>) {
        let bytes = message.body.get().len();
        self.bytes += bytes;
        self.events.push_back(message);
        self.totals.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.totals.events.fetch_add(1, Ordering::Relaxed);
    }

    fn pop_front(&mut self) {
        if let Some(old) = self.events.pop_front() {
            let bytes = old.body.get().len();
            self.bytes -= bytes;
            self.totals.bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.totals.events.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn clear(&mut self) {
        self.totals.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        self.totals
            .events
            .fetch_sub(self.events.len(), Ordering::Relaxed);
        self.events.clear();
        self.bytes = 0;
    }

    /// Is the event at `offset` of this epoch still kept?
    fn holds(&self, offset: u64) -> bool {
        let first = self.offset + 1 - self.events.len() as u64;
        !self.events.is_empty() && offset >= first && offset <= self.offset
    }

    /// Drops history older than the ttl (all of it: the ttl counts from the last event).
    fn expire(&mut self, now: Instant, ttl: Duration) {
        if now.duration_since(self.published) > ttl {
            self.clear();
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.clear();
    }
}

impl MemoryBroker {
    /// A memory broker keeping this much history per stream.
    pub fn with_history(options: HistoryOptions) -> MemoryBroker {
        MemoryBroker {
            options,
            ..MemoryBroker::default()
        }
    }

    fn stream(&self, group: &Arc<str>, now: Instant) -> Arc<Mutex<Stream>> {
        let mut streams = lock(&self.streams);
        self.sweep(&mut streams, now);
        streams
            .by_group
            .entry(group.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Stream::new(now, self.totals.clone()))))
            .clone()
    }

    /// The stream of a group being published to: the existing one, or a new one when the
    /// group has local members (joined, not yet positioned); `None` when nobody asked for it.
    fn published_stream(&self, group: &Arc<str>, now: Instant) -> Option<Arc<Mutex<Stream>>> {
        let exists = lock(&self.streams).by_group.get(group).cloned();
        if exists.is_some() {
            return exists;
        }
        let hub = self.hub.get().and_then(Weak::upgrade)?;
        hub.has_group(group).then(|| self.stream(group, now))
    }

    /// Bytes of event bodies kept by all streams together.
    pub fn history_bytes(&self) -> usize {
        self.totals.bytes.load(Ordering::Relaxed)
    }

    /// Drops the oldest events of any stream while all streams together hold more than
    /// `max_total_bytes`; forgets the order of events their streams dropped themselves.
    fn trim_total(&self, order: &mut VecDeque<(Weak<Mutex<Stream>>, u64)>) {
        while self.totals.bytes.load(Ordering::Relaxed) > self.options.max_total_bytes {
            let Some((stream, offset)) = order.pop_front() else {
                break;
            };
            let Some(stream) = stream.upgrade() else {
                continue;
            };
            let mut s = lock(&stream);
            while s.holds(offset) {
                s.pop_front();
            }
        }
        // Entries of events already dropped (by their stream's own caps or ttl): compact once
        // they outnumber the kept events, so the order stays as small as the history.
        let live = self.totals.events.load(Ordering::Relaxed);
        if order.len() > 2 * live + 1024 {
            order.retain(|(stream, offset)| {
                stream
                    .upgrade()
                    .is_some_and(|stream| lock(&stream).holds(*offset))
            });
        }
    }

    /// Forgets streams unused for `meta_ttl` that have no local member, and expired history;
    /// at most once per minute (or per ttl, if shorter).
    fn sweep(&self, streams: &mut Streams, now: Instant) {
        let every = self.options.ttl.min(Duration::from_secs(60));
        if streams.swept.is_some_and(|t| now.duration_since(t) < every) {
            return;
        }
        streams.swept = Some(now);
        let hub = self.hub.get().and_then(Weak::upgrade);
        let (ttl, meta_ttl) = (self.options.ttl, self.options.meta_ttl);
        streams.by_group.retain(|group, stream| {
            let mut s = lock(stream);
            s.expire(now, ttl);
            now.duration_since(s.used) <= meta_ttl
                || hub.as_ref().is_some_and(|h| h.has_group(group))
        });
    }
}

impl Broker for MemoryBroker {
    fn start(&self, hub: Weak<Hub>) {
        let _ = self.hub.set(hub);
    }

    fn publish(&self, mut message: GroupMessage) -> BoxFuture<'_, Result<(), Error>> {
        let now = Instant::now();
        let Some(stream) = self.published_stream(&message.group, now) else {
            return Box::pin(std::future::ready(Ok(())));
        };
        let mut s = lock(&stream);
        s.expire(now, self.options.ttl);
        s.offset += 1;
        s.published = now;
        s.used = now;
        let offset = s.offset;
        message.position = Some(Position::new(s.epoch.clone(), offset));
        let message = Arc::new(message);
        let kept = self.options.size > 0;
        if kept {
            s.push(message.clone());
            while s.events.len() > self.options.size
                || (s.bytes > self.options.max_bytes && s.events.len() > 1)
            {
                s.pop_front();
            }
        }
        // Delivered while the stream is locked: members see the stream's events in order.
        if let Some(hub) = self.hub.get().and_then(Weak::upgrade) {
            hub.deliver(message);
        }
        drop(s);
        if kept {
            // Not under the stream's lock: the order's lock is taken before streams' locks.
            let mut order = lock(&self.order);
            order.push_back((Arc::downgrade(&stream), offset));
            self.trim_total(&mut order);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn recover(
        &self,
        group: Arc<str>,
        since: Option<Position>,
    ) -> BoxFuture<'_, Result<StreamState, Error>> {
        let now = Instant::now();
        let stream = self.stream(&group, now);
        let mut s = lock(&stream);
        s.expire(now, self.options.ttl);
        s.used = now;
        let head = s.head();
        let missed = since.and_then(|since| {
            if since.epoch != s.epoch || since.offset > s.offset {
                return None;
            }
            let first = s.offset + 1 - s.events.len() as u64;
            if since.offset + 1 < first {
                return None;
            }
            let skip = (since.offset + 1 - first) as usize;
            Some(s.events.iter().skip(skip).cloned().collect())
        });
        drop(s);
        Box::pin(std::future::ready(Ok(StreamState { head, missed })))
    }

    fn restart(&self, prefix: Arc<str>) -> BoxFuture<'_, Result<(), Error>> {
        let now = Instant::now();
        let restarted: Vec<Arc<str>> = {
            let streams = lock(&self.streams);
            streams
                .by_group
                .iter()
                .filter(|(group, _)| group.starts_with(&*prefix))
                .map(|(group, stream)| {
                    *lock(stream) = Stream::new(now, self.totals.clone());
                    group.clone()
                })
                .collect()
        };
        if let Some(hub) = self.hub.get().and_then(Weak::upgrade) {
            for group in restarted {
                hub.check_group(&group);
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn subscribe(&self, _group: Arc<str>) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    fn unsubscribe(&self, _group: Arc<str>) {}

    fn is_remote(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;

    fn message(group: &str, body: &str) -> GroupMessage {
        let body: Box<RawValue> = RawValue::from_string(body.into()).unwrap();
        GroupMessage::new("o".into(), group.into(), "update".into(), body.into())
    }

    fn recover(b: &MemoryBroker, group: &str, since: Option<Position>) -> StreamState {
        futures_util::FutureExt::now_or_never(b.recover(group.into(), since))
            .unwrap()
            .unwrap()
    }

    fn publish(b: &MemoryBroker, group: &str, body: &str) {
        futures_util::FutureExt::now_or_never(b.publish(message(group, body)))
            .unwrap()
            .unwrap();
    }

    #[test]
    fn offsets_count_events_per_stream() {
        let b = MemoryBroker::default();
        let start = recover(&b, "g", None).head;
        assert_eq!(start.offset, 0);
        recover(&b, "h", None);
        publish(&b, "g", "1");
        publish(&b, "g", "2");
        publish(&b, "h", "3");
        let head = recover(&b, "g", None).head;
        assert_eq!(head, Position::new(start.epoch.clone(), 2));
        assert_eq!(recover(&b, "h", None).head.offset, 1);
        assert_ne!(recover(&b, "h", None).head.epoch, start.epoch);
    }

    #[test]
    fn history_covers_what_it_holds_and_nothing_else() {
        let b = MemoryBroker::with_history(HistoryOptions::default().size(3));
        let epoch = recover(&b, "g", None).head.epoch;
        for i in 1..=5 {
            publish(&b, "g", &i.to_string());
        }
        let bodies = |since: u64| {
            recover(&b, "g", Some(Position::new(epoch.clone(), since)))
                .missed
                .map(|v| {
                    v.iter()
                        .map(|m| m.body.get().to_owned())
                        .collect::<Vec<_>>()
                })
        };
        assert_eq!(bodies(2), Some(vec!["3".into(), "4".into(), "5".into()]));
        assert_eq!(bodies(4), Some(vec!["5".into()]));
        assert_eq!(bodies(5), Some(vec![]), "nothing missed");
        assert_eq!(bodies(1), None, "offset 2 was trimmed");
        assert_eq!(bodies(6), None, "a position from the future");
        let other = recover(&b, "g", Some(Position::new("other", 4)));
        assert!(other.missed.is_none(), "another epoch");
    }

    #[test]
    fn the_byte_cap_trims_history() {
        let b = MemoryBroker::with_history(HistoryOptions::default().max_bytes(10));
        let epoch = recover(&b, "g", None).head.epoch;
        publish(&b, "g", "\"aaaa\"");
        publish(&b, "g", "\"bbbb\"");
        let state = recover(&b, "g", Some(Position::new(epoch.clone(), 0)));
        assert!(state.missed.is_none(), "the first event was dropped");
        let state = recover(&b, "g", Some(Position::new(epoch, 1)));
        assert_eq!(state.missed.unwrap().len(), 1);
    }

    #[test]
    fn a_group_nobody_asked_for_is_not_numbered_or_kept() {
        let b = MemoryBroker::default();
        publish(&b, "g", "\"big\"");
        assert_eq!(b.history_bytes(), 0);
        assert_eq!(recover(&b, "g", None).head.offset, 0);
        publish(&b, "g", "\"big\"");
        assert_eq!(recover(&b, "g", None).head.offset, 1, "asked for: numbered");
        assert_eq!(b.history_bytes(), 5);
    }

    #[test]
    fn all_streams_together_keep_at_most_max_total_bytes_oldest_first() {
        let b = MemoryBroker::with_history(HistoryOptions::default().max_total_bytes(100));
        let body = format!("\"{}\"", "x".repeat(18)); // 20 bytes
        let epochs: Vec<String> = (0..10)
            .map(|g| recover(&b, &format!("g{g}"), None).head.epoch)
            .collect();
        for round in 0..3 {
            for g in 0..10 {
                publish(&b, &format!("g{g}"), &body);
                assert!(b.history_bytes() <= 100, "round {round}, group {g}");
            }
        }
        assert_eq!(b.history_bytes(), 100);
        // The five newest events are kept (groups 5..9 of the last round), the rest dropped.
        for (g, epoch) in epochs.iter().enumerate() {
            let state = recover(&b, &format!("g{g}"), Some(Position::new(epoch.clone(), 2)));
            assert_eq!(state.missed.is_some(), g >= 5, "group {g}");
        }
        // Streams' own trims are forgotten by the order, which stays small.
        let b = MemoryBroker::with_history(HistoryOptions::default().size(1));
        recover(&b, "g", None);
        for _ in 0..10_000 {
            publish(&b, "g", "1");
        }
        assert_eq!(b.history_bytes(), 1);
        assert!(lock(&b.order).len() <= 1024 + 3);
    }

    #[test]
    fn history_expires_after_its_ttl_without_events() {
        let b = MemoryBroker::with_history(HistoryOptions::default().ttl(Duration::ZERO));
        let epoch = recover(&b, "g", None).head.epoch;
        publish(&b, "g", "1");
        std::thread::sleep(Duration::from_millis(5));
        let state = recover(&b, "g", Some(Position::new(epoch.clone(), 0)));
        assert_eq!(state.head, Position::new(epoch, 1), "the position stays");
        assert!(state.missed.is_none(), "the history is gone");
    }

    #[test]
    fn a_restart_changes_the_epoch_of_matching_streams_only() {
        let b = MemoryBroker::default();
        let a1 = recover(&b, "a:1", None).head;
        let other = recover(&b, "b:1", None).head;
        publish(&b, "a:1", "1");
        futures_util::FutureExt::now_or_never(b.restart("a:".into()))
            .unwrap()
            .unwrap();
        let after = recover(&b, "a:1", Some(Position::new(a1.epoch.clone(), 0)));
        assert_ne!(after.head.epoch, a1.epoch);
        assert_eq!(after.head.offset, 0);
        assert!(after.missed.is_none());
        assert_eq!(recover(&b, "b:1", None).head, other);
    }

    #[test]
    fn without_history_positions_still_count() {
        let b = MemoryBroker::with_history(HistoryOptions::default().size(0));
        let epoch = recover(&b, "g", None).head.epoch;
        publish(&b, "g", "1");
        let state = recover(&b, "g", Some(Position::new(epoch.clone(), 0)));
        assert_eq!(state.head.offset, 1);
        assert!(state.missed.is_none());
        let state = recover(&b, "g", Some(Position::new(epoch, 1)));
        assert_eq!(state.missed.map(|v| v.len()), Some(0));
    }
}
