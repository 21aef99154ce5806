//! The fuzz harnesses: each takes any bytes, runs them through the real dispatch and checks
//! what came back. Shared by the `cargo fuzz` targets (`fuzz_targets/`) and by
//! `crates/dcrf/tests/fuzz_corpus.rs`, which replays the committed corpus with `cargo test`.
//!
//! A harness panics when an invariant breaks; libFuzzer reports any panic, including one the
//! framework would have caught and answered with a 500.

use std::collections::{BTreeMap, HashMap};

use dcrf::StatusCode;
use dcrf::multiplex::{Demultiplexer, LocalDemux};
use dcrf::prelude::*;
use dcrf::testing::LocalConnection;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Keys every DCRF reply starts with, in this order.
const DCRF_KEYS: [&str; 5] = ["errors", "data", "action", "response_status", "request_id"];

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Point {
    x: i64,
    y: i64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum Shape {
    Circle { r: f64 },
    Square(u32),
    Empty,
}

/// Many kinds of field, as actions declare them.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Typed {
    name: String,
    count: u8,
    ratio: Option<f64>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    point: Option<Point>,
    #[serde(default)]
    shape: Option<Shape>,
    #[serde(default)]
    extra: HashMap<String, i32>,
    #[serde(default)]
    flag: bool,
}

/// A struct that rejects unknown fields and renames one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Strict {
    #[serde(rename = "pk")]
    id: u64,
    #[serde(default)]
    request_id: Value,
    #[serde(default)]
    action: Value,
}

/// Flattened and borrowed-into-owned fields.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Flat {
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

/// A tagged payload inside `data`.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind")]
#[allow(dead_code)]
enum Command {
    Add { amount: i128 },
    Rename { to: char },
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Data {
    data: Command,
}

/// A model-free consumer with typed-argument actions.
#[derive(Debug, Default)]
pub struct Target {
    calls: u64,
}

#[dcrf::consumer]
impl Target {
    #[action]
    async fn echo(&mut self, frame: &Frame<'_>) -> Result<Reply<Value>, ApiError> {
        self.calls += 1;
        let fields: serde_json::Map<String, Value> = frame
            .fields()
            .filter_map(|(k, v)| Some((k.to_owned(), serde_json::from_str(v.get()).ok()?)))
            .collect();
        Ok(Reply::ok(Value::Object(fields)))
    }

    #[action]
    async fn typed(&mut self, args: Typed) -> Result<Reply<String>, ApiError> {
        self.calls += 1;
        Ok(Reply::ok(format!("{args:?}")))
    }

    #[action]
    async fn two(&mut self, point: Point, strict: Strict) -> Result<Reply<i64>, ApiError> {
        Ok(Reply::ok(
            point.x.wrapping_add(point.y).wrapping_add(strict.id as i64),
        ))
    }

    #[action]
    async fn flat(&mut self, args: Flat, data: Data) -> Result<Reply<usize>, ApiError> {
        Ok(Reply::ok(args.rest.len() + format!("{data:?}").len()))
    }

    #[action]
    async fn refuse(&mut self, args: Point) -> Result<Reply<()>, ApiError> {
        Err(ApiError::field("x", format!("{} is not allowed.", args.x)))
    }
}

impl Consumer for Target {
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(AllowAny))
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

/// A reply as the client reads it. The request id stays raw: it is echoed byte for byte, and
/// JSON such as a lone surrogate escape (`"\ud800"`) that JavaScript's and Python's parsers
/// accept (so DCRF echoes it) is refused by `serde_json::Value`.
#[derive(Deserialize)]
struct Envelope<'a> {
    errors: Vec<Value>,
    data: Value,
    action: Option<String>,
    response_status: u16,
    #[serde(borrow)]
    request_id: &'a RawValue,
}

/// Checks one DCRF reply envelope: the five keys, consistent values. `sent` is the frame it
/// answers (for the request id).
fn check_envelope(text: &str, sent: Option<&str>) {
    let keys: BTreeMap<String, &RawValue> = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("a reply that is not a JSON object ({e}): {text}"));
    for key in DCRF_KEYS {
        assert!(keys.contains_key(key), "reply without {key:?}: {text}");
    }
    let reply: Envelope<'_> = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("a reply with a mistyped key ({e}): {text}"));
    let status = reply.response_status;
    assert!((100..600).contains(&status), "status {status}: {text}");
    if status >= 400 {
        assert!(
            !reply.errors.is_empty(),
            "an error status with no errors: {text}"
        );
        assert!(reply.data.is_null(), "an error with data: {text}");
    } else {
        assert!(reply.errors.is_empty(), "a success with errors: {text}");
    }
    let _ = reply.action;
    // The request id is echoed as sent, when the frame had a small one.
    if let Some(sent) = sent
        && let Ok(frame) = Frame::parse(sent)
        && let Some(rid) = frame.request_id()
        && rid.get().len() <= 1024
    {
        assert_eq!(
            reply.request_id.get(),
            rid.get(),
            "request_id not echoed byte for byte: {text}"
        );
    }
}

fn starts_with_keys(text: &str, prefix: &str) {
    assert!(
        text.starts_with(prefix),
        "reply does not start with {prefix:?}: {text}"
    );
}

/// Any bytes as one text frame of a plain socket: exactly one reply, a DCRF envelope.
pub fn frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        // Not UTF-8 is refused by the WebSocket layer (close 1007) before dispatch.
        return;
    };
    block_on(async {
        let mut conn = LocalConnection::new(Target::default());
        conn.send(text).await;
        let reply = conn
            .receive()
            .unwrap_or_else(|| panic!("no reply to {text:?}"));
        assert!(conn.receive().is_none(), "more than one reply to {text:?}");
        starts_with_keys(&reply, "{\"errors\":");
        check_envelope(&reply, Some(text));
    });
}

/// Any bytes as one text frame of a multiplexed socket with streams `a` and `b`: exactly one
/// reply, `{"stream": <name or null>, "payload": <DCRF envelope>}`.
pub fn multiplex(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    block_on(async {
        let mut conn: LocalDemux = Demultiplexer::new(&Dcrf::new())
            .stream("a", Target::default)
            .stream("b", Target::default)
            .local()
            .await;
        conn.send(text).await;
        let reply = conn
            .receive()
            .unwrap_or_else(|| panic!("no reply to {text:?}"));
        assert!(conn.receive().is_none(), "more than one reply to {text:?}");
        #[derive(Deserialize)]
        struct Wrapped<'a> {
            stream: Option<String>,
            #[serde(borrow)]
            payload: &'a RawValue,
        }
        starts_with_keys(&reply, "{\"stream\":");
        let wrapped: Wrapped<'_> = serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("not a stream envelope ({e}): {reply}"));
        // A stream name that was read must be the one the frame named, and the payload is that
        // stream's answer to the frame's payload.
        let mut sent_payload = None;
        if let Some(name) = &wrapped.stream {
            #[derive(Deserialize)]
            struct Sent<'a> {
                stream: String,
                #[serde(borrow)]
                payload: Option<&'a RawValue>,
            }
            let sent: Sent<'_> =
                serde_json::from_str(text).expect("a frame whose stream was read is JSON");
            assert_eq!(&sent.stream, name, "{reply}");
            sent_payload = sent.payload.map(RawValue::get);
        }
        check_envelope(wrapped.payload.get(), sent_payload);
    });
}

fn check_args<T: serde::de::DeserializeOwned>(frame: &Frame<'_>) {
    match frame.args::<T>() {
        Ok(_) => {}
        Err(e) => {
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e:?}");
            assert!(!e.errors().is_empty(), "a 400 without errors");
            serde_json::to_string(e.errors()).expect("errors serialize");
        }
    }
}

/// Any bytes as a frame's arguments: decoding into typed structs fails with a 400 naming the
/// problem, or succeeds; it never panics.
pub fn args(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(frame) = Frame::parse(text) else {
        return;
    };
    check_args::<Typed>(&frame);
    check_args::<Point>(&frame);
    check_args::<Strict>(&frame);
    check_args::<Flat>(&frame);
    check_args::<Data>(&frame);
    check_args::<Value>(&frame);
    check_args::<HashMap<String, Value>>(&frame);
    let _ = frame.field_as::<Vec<Shape>>("shape");
    let _ = frame.field_as::<String>("name");
    for (name, raw) in frame.fields() {
        assert!(
            frame.field(name).is_some(),
            "field {name} listed but not found"
        );
        let _ = serde_json::from_str::<Value>(raw.get());
    }
    // The fields copied through byte for byte are still one JSON object.
    let object = serde_json::to_string(&frame.fields_object()).expect("fields serialize");
    let _: &serde_json::value::RawValue =
        serde_json::from_str(&object).unwrap_or_else(|e| panic!("{e}: {object}"));
}

/// The harness of a corpus directory name.
pub fn by_name(target: &str) -> Option<fn(&[u8])> {
    match target {
        "frame" => Some(frame),
        "multiplex" => Some(multiplex),
        "args" => Some(args),
        _ => None,
    }
}
