//! Stream positions and history: where an event sits in its stream, how much of the stream is
//! kept, and what a broker answers when a client asks for what it missed.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::GroupMessage;

/// Where an event sits in its stream: the stream's `epoch` and the event's `offset`.
///
/// Offsets grow by exactly one per event of a stream, starting at 1; a stream that has had no
/// event is at offset 0. The epoch names one unbroken run of offsets: it changes whenever the
/// stream's history is lost (the stream expired, the memory layer restarted, Redis was flushed
/// or lost messages while unreachable), so a position from another epoch can never be resumed
/// from.
///
/// On the wire: `{"epoch": "6f1c…", "offset": 42}`.
///
/// ```
/// use dcrf::channel::Position;
/// let p: Position = serde_json::from_str(r#"{"epoch": "e1", "offset": 7}"#).unwrap();
/// assert_eq!(p.offset, 7);
/// assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"epoch":"e1","offset":7}"#);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// The stream's epoch.
    pub epoch: String,
    /// The event's offset within the epoch (0: before the first event).
    pub offset: u64,
}

impl Position {
    /// A position.
    pub fn new(epoch: impl Into<String>, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
        }
    }

    /// Writes `{"epoch":"…","offset":n}`.
    pub(crate) fn write_json(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("{\"epoch\":");
        crate::protocol::push_json_str(out, &self.epoch);
        let _ = write!(out, ",\"offset\":{}}}", self.offset);
    }
}

/// How much history a broker keeps per stream (Centrifugo's `history_size` and
/// `history_ttl`).
///
/// | limit | default | meaning |
/// |---|---|---|
/// | `size` | 10 000 events | the newest events kept per stream |
/// | `max_bytes` | 16 MiB | the most body bytes kept per stream (memory layer) |
/// | `max_total_bytes` | 64 MiB | the most body bytes kept by all streams together (memory layer; the oldest events go first) |
/// | `ttl` | 5 minutes | a stream's history is dropped after this long without a new event |
/// | `meta_ttl` | 24 hours | a stream's epoch and offset are forgotten after this long unused |
///
/// `size: 0` keeps no history: positions still number every event, and every resume answers
/// `recovered: false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryOptions {
    /// The newest events kept per stream.
    pub size: usize,
    /// The most body bytes kept per stream (the memory broker; Redis counts events only).
    pub max_bytes: usize,
    /// The most body bytes kept by all streams of a memory broker together; over it, the
    /// oldest events of any stream are dropped first. (Redis keeps history in Redis's memory,
    /// bounded by `size` per stream and `ttl`.)
    pub max_total_bytes: usize,
    /// How long a stream's history lives after its last event.
    pub ttl: Duration,
    /// How long a stream's position (epoch, offset) lives after its last use. A subscriber
    /// idle for longer sees the stream start a new epoch (a resync notice).
    pub meta_ttl: Duration,
}

impl Default for HistoryOptions {
    fn default() -> Self {
        HistoryOptions {
            size: 10_000,
            max_bytes: 16 << 20,
            max_total_bytes: 64 << 20,
            ttl: Duration::from_secs(300),
            meta_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl HistoryOptions {
    /// Keep at most `events` per stream.
    pub fn size(mut self, events: usize) -> Self {
        self.size = events;
        self
    }

    /// Keep at most `bytes` of bodies per stream (memory broker).
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Keep at most `bytes` of bodies in all streams together (memory broker).
    pub fn max_total_bytes(mut self, bytes: usize) -> Self {
        self.max_total_bytes = bytes;
        self
    }

    /// Drop a stream's history after `ttl` without a new event.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Forget a stream's position after `ttl` unused.
    pub fn meta_ttl(mut self, ttl: Duration) -> Self {
        self.meta_ttl = ttl;
        self
    }
}

/// What a broker knows about a stream when a client (re)joins it.
#[derive(Debug)]
pub struct StreamState {
    /// The stream's current position (the offset of its newest event).
    pub head: Position,
    /// The events after the client's position, oldest first, when history covers every one
    /// of them; `None` when it does not (another epoch, trimmed, expired) or when no position
    /// was asked about.
    pub missed: Option<Vec<Arc<GroupMessage>>>,
}

impl StreamState {
    /// The state of a stream with no history to offer.
    pub fn head_only(head: Position) -> StreamState {
        StreamState { head, missed: None }
    }
}

/// A fresh epoch: unique per process and per call (no randomness crate needed: the standard
/// library's hasher keys are random per process).
pub(crate) fn new_epoch() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::time::SystemTime::now().hash(&mut h);
    n.hash(&mut h);
    std::process::id().hash(&mut h);
    format!("{:016x}", std::hash::Hasher::finish(&h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_differ() {
        let a = new_epoch();
        let b = new_epoch();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn positions_write_their_wire_form() {
        let mut s = String::new();
        Position::new("a\"b", 3).write_json(&mut s);
        assert_eq!(s, r#"{"epoch":"a\"b","offset":3}"#);
        let back: Position = serde_json::from_str(&s).unwrap();
        assert_eq!(back, Position::new("a\"b", 3));
    }

    #[test]
    fn a_position_must_be_an_epoch_and_an_offset() {
        for bad in [
            r#"{"epoch": 1, "offset": 2}"#,
            r#"{"epoch": "e", "offset": -1}"#,
            r#"{"epoch": "e"}"#,
            r#"{"epoch": "e", "offset": 1, "x": 0}"#,
            r#"[1, 2]"#,
        ] {
            assert!(serde_json::from_str::<Position>(bad).is_err(), "{bad}");
        }
    }
}
