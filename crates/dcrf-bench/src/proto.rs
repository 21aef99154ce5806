//! The DCRF wire format as the generator needs it: building requests, reading the few
//! fields of a reply that matter, and small helpers (clock, random numbers).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Instant;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cli::Scenario;

/// The fields of a reply or push the generator reads; every other field is skipped.
#[derive(Debug, Deserialize)]
pub struct ReplyHead<'a> {
    /// `action` of the reply (for pushes: `create`, `update` or `delete`).
    #[serde(default, borrow)]
    pub action: Option<Cow<'a, str>>,
    /// `request_id`, unparsed.
    #[serde(default, borrow)]
    pub request_id: Option<&'a RawValue>,
    /// `response_status`; absent in a raw echo (then the reply counts as a success).
    #[serde(default)]
    pub response_status: Option<i64>,
    /// `data`, unparsed.
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

impl ReplyHead<'_> {
    /// Parses a text frame; `None` if it is not a JSON object.
    pub fn parse(text: &str) -> Option<ReplyHead<'_>> {
        serde_json::from_str(text).ok()
    }

    /// The request id if it is a non-negative integer.
    pub fn numeric_id(&self) -> Option<u64> {
        self.request_id.and_then(|r| r.get().parse().ok())
    }

    /// The request id if it is a string without escapes.
    pub fn string_id(&self) -> Option<&str> {
        let raw = self.request_id?.get();
        raw.strip_prefix('"')?.strip_suffix('"')
    }

    /// Whether the status is 2xx (or absent, as in a raw echo).
    pub fn is_success(&self) -> bool {
        self.response_status.is_none_or(|s| (200..300).contains(&s))
    }

    /// `data.title` of a push, if present.
    pub fn data_title(&self) -> Option<Cow<'_, str>> {
        #[derive(Deserialize)]
        struct Data<'b> {
            #[serde(default, borrow)]
            title: Option<Cow<'b, str>>,
        }
        let data: Data<'_> = serde_json::from_str(self.data?.get()).ok()?;
        data.title
    }
}

/// Writes the request of a request/reply scenario into `buf` (cleared first).
pub fn build_request(
    buf: &mut String,
    scenario: Scenario,
    id: u64,
    rng: &mut Rng,
    rows: u64,
    payload: &str,
) {
    buf.clear();
    // Writing into a String cannot fail.
    let _ = match scenario {
        Scenario::Echo => write!(
            buf,
            r#"{{"action":"echo","request_id":{id},"x":"{payload}"}}"#
        ),
        Scenario::Retrieve => write!(
            buf,
            r#"{{"action":"retrieve","pk":{},"request_id":{id}}}"#,
            1 + rng.below(rows)
        ),
        Scenario::List => write!(
            buf,
            r#"{{"action":"list","limit":100,"offset":{},"request_id":{id}}}"#,
            rng.below(rows.saturating_sub(100) + 1)
        ),
        Scenario::Create => write!(
            buf,
            r#"{{"action":"create","data":{{"title":"bench {id}"}},"request_id":{id}}}"#
        ),
        Scenario::Patch => write!(
            buf,
            r#"{{"action":"patch","pk":{},"data":{{"done":{}}},"request_id":{id}}}"#,
            1 + rng.below(rows),
            rng.below(2) == 1
        ),
        Scenario::Fanout
        | Scenario::Idle
        | Scenario::Resume
        | Scenario::RawEcho
        | Scenario::RawRetrieve
        | Scenario::RawFanout => Ok(()),
    };
}

/// The fan-out writer's patch: the title carries the write's sequence number and its
/// (scheduled) send time in nanoseconds since [`clock_ns`]'s origin, as `"SEQ:NANOS"`.
pub fn build_fanout_patch(buf: &mut String, pk: u64, id: u64, seq: u64, sent_ns: u64) {
    buf.clear();
    let _ = write!(
        buf,
        r#"{{"action":"patch","pk":{pk},"data":{{"title":"{seq}:{sent_ns}"}},"request_id":{id}}}"#
    );
}

/// Parses a fan-out title written by [`build_fanout_patch`] into `(seq, sent_ns)`.
pub fn parse_fanout_title(title: &str) -> Option<(u64, u64)> {
    let (seq, ns) = title.split_once(':')?;
    Some((seq.parse().ok()?, ns.parse().ok()?))
}

/// The subscription request of fan-out subscriber `i`.
pub fn build_subscribe(all: bool, pk: u64, i: usize) -> String {
    if all {
        format!(r#"{{"action":"subscribe_to_all","request_id":"sub-{i}"}}"#)
    } else {
        format!(r#"{{"action":"subscribe_instance","pk":{pk},"request_id":"sub-{i}"}}"#)
    }
}

/// Nanoseconds since the first call in this process (a monotonic clock shared by every task,
/// so a timestamp written by one connection can be compared on another).
pub fn clock_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Converts an [`Instant`] to [`clock_ns`]'s scale.
pub fn instant_ns(t: Instant) -> u64 {
    let now_i = Instant::now();
    let now_ns = clock_ns();
    match t.checked_duration_since(now_i) {
        Some(ahead) => now_ns.saturating_add(nanos(ahead)),
        None => now_ns.saturating_sub(nanos(now_i - t)),
    }
}

/// A duration in whole nanoseconds, saturating.
pub fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A small, fast pseudo-random generator (SplitMix64); quality is ample for picking keys.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` must be at least 1).
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the bias is negligible for our ranges.
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_fields() {
        let r = ReplyHead::parse(
            r#"{"errors":[],"data":{"id":1,"title":"3:99"},"action":"update","response_status":200,"request_id":"sub-4"}"#,
        )
        .unwrap();
        assert_eq!(r.string_id(), Some("sub-4"));
        assert_eq!(r.numeric_id(), None);
        assert!(r.is_success());
        assert_eq!(r.action.as_deref(), Some("update"));
        assert_eq!(
            r.data_title().as_deref().and_then(parse_fanout_title),
            Some((3, 99))
        );
        let r = ReplyHead::parse(r#"{"action":"x","response_status":404,"request_id":7}"#).unwrap();
        assert_eq!(r.numeric_id(), Some(7));
        assert!(!r.is_success());
        let echo = ReplyHead::parse(r#"{"action":"echo","request_id":3,"x":"aa"}"#).unwrap();
        assert!(echo.is_success());
        assert!(ReplyHead::parse("[1,2]").is_none());
    }

    #[test]
    fn requests_are_json() {
        let mut rng = Rng::new(1);
        let mut buf = String::new();
        for s in [
            Scenario::Echo,
            Scenario::Retrieve,
            Scenario::List,
            Scenario::Create,
            Scenario::Patch,
        ] {
            build_request(&mut buf, s, 42, &mut rng, 1000, "aaaa");
            let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
            assert_eq!(v["request_id"], 42);
            assert_eq!(v["action"], s.name());
        }
        build_fanout_patch(&mut buf, 5, 9, 3, 12345);
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        assert_eq!(v["data"]["title"], "3:12345");
        let v: serde_json::Value = serde_json::from_str(&build_subscribe(false, 5, 2)).unwrap();
        assert_eq!(v["request_id"], "sub-2");
        assert_eq!(v["pk"], 5);
    }

    #[test]
    fn rng_range() {
        let mut rng = Rng::new(7);
        for _ in 0..10_000 {
            assert!(rng.below(10) < 10);
        }
        assert_eq!(rng.below(1), 0);
    }
}
