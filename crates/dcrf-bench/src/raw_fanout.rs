//! `raw-fanout`: a hand-written axum WebSocket server (no framework, no database) that speaks
//! the part of the DCRF protocol the `fanout` scenario uses: the ceiling for `fanout`.
//!
//! ```text
//! → {"action":"subscribe_instance","pk":1,"request_id":"sub-0"}   (or subscribe_to_all)
//! ← {"errors":[],"data":null,"action":"subscribe_instance","response_status":201,"request_id":"sub-0","position":{"epoch":"raw","offset":0}}
//! → {"action":"patch","pk":1,"data":{"title":"3:1234"},"request_id":9}
//! ← to every subscriber of row 1 or of all rows:
//!   {"errors":[],"data":{"id":1,"title":"3:1234","done":false,"owner":""},"action":"update","response_status":200,"request_id":"sub-0","position":{"epoch":"raw","offset":3}}
//! ← to the writer: {"errors":[],"data":{"id":1,"title":"3:1234","done":false,"owner":""},"action":"patch","response_status":200,"request_id":9}
//! ```
//!
//! A patch encodes its push once; each subscriber's frame is that encoding with the
//! subscription's own `request_id` spliced in (pre-encoded when it subscribed), as the
//! protocol requires. The pushes are written by the writer's task straight into every
//! subscriber's socket, one after the other, and then the writer's reply. The row lives in
//! memory only: `done` is false and `owner` empty.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::serve::ListenerExt;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::Mutex;

use crate::raw_retrieve::write_row;

/// The sending half of a socket, shared by its connection and the subscriber list.
type Sink = Arc<Mutex<SplitSink<WebSocket, Message>>>;

/// One subscription.
#[derive(Debug)]
struct Subscriber {
    /// The connection it belongs to (its entries go when it closes).
    conn: u64,
    /// The row it watches; `None` for every row (`subscribe_to_all`).
    pk: Option<i64>,
    /// Its `request_id`, encoded.
    request_id: String,
    sink: Sink,
    /// Its socket failed (it is dropped after the current push).
    dead: bool,
}

/// The subscribers and the stream position.
#[derive(Debug, Default)]
struct Hub {
    subscribers: Mutex<Vec<Subscriber>>,
    /// Pushes so far (the offset of the last one).
    offset: AtomicU64,
    /// Connection ids.
    next_conn: AtomicU64,
}

/// Serves raw-fanout on `bind` (on any path) until the process is stopped.
pub async fn serve(bind: &str) -> std::io::Result<()> {
    let listener = crate::raw_echo::listen(bind).await?;
    println!(
        "dcrf-bench raw-fanout listening on {}",
        listener.local_addr()?
    );
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new()
        .fallback(upgrade)
        .with_state(Arc::new(Hub::default()));
    axum::serve(listener, app).await
}

async fn upgrade(State(hub): State<Arc<Hub>>, ws: WebSocketUpgrade) -> Response {
    crate::raw_echo::sized(ws).on_upgrade(move |socket| connection(socket, hub))
}

/// The fields of a request that matter.
#[derive(Debug, Deserialize)]
struct Request<'a> {
    #[serde(default, borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(default)]
    pk: Option<i64>,
    #[serde(default, borrow)]
    data: Option<PatchData<'a>>,
    #[serde(default, borrow)]
    request_id: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
struct PatchData<'a> {
    #[serde(default, borrow)]
    title: Option<Cow<'a, str>>,
}

/// Reads one connection's frames until it closes, then drops its subscriptions.
async fn connection(socket: WebSocket, hub: Arc<Hub>) {
    let conn = hub.next_conn.fetch_add(1, Ordering::Relaxed);
    let (sink, mut stream) = socket.split();
    let sink: Sink = Arc::new(Mutex::new(sink));
    let mut buf = String::with_capacity(256);
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            continue;
        };
        let Ok(req) = serde_json::from_str::<Request<'_>>(&text) else {
            continue;
        };
        let request_id = req.request_id.map_or("null", RawValue::get);
        let ok = match req.action.as_deref() {
            Some(action @ ("subscribe_instance" | "subscribe_to_all")) => {
                let pk = if action == "subscribe_instance" {
                    match req.pk {
                        Some(pk) => Some(pk),
                        None => continue,
                    }
                } else {
                    None
                };
                hub.subscribers.lock().await.push(Subscriber {
                    conn,
                    pk,
                    request_id: request_id.to_owned(),
                    sink: Arc::clone(&sink),
                    dead: false,
                });
                buf.clear();
                let offset = hub.offset.load(Ordering::Relaxed);
                let _ = write!(
                    buf,
                    r#"{{"errors":[],"data":null,"action":"{action}","response_status":201,"request_id":{request_id},"position":{{"epoch":"raw","offset":{offset}}}}}"#
                );
                sink.lock().await.send(Message::text(buf.as_str())).await
            }
            Some("patch") => {
                let (Some(pk), Some(title)) = (req.pk, req.data.and_then(|d| d.title)) else {
                    continue;
                };
                buf.clear();
                write_row(&mut buf, pk, &title, false, "");
                publish(&hub, pk, &buf).await;
                let mut reply = String::with_capacity(buf.len() + 96);
                reply.push_str(r#"{"errors":[],"data":"#);
                reply.push_str(&buf);
                reply.push_str(r#","action":"patch","response_status":200,"request_id":"#);
                reply.push_str(request_id);
                reply.push('}');
                sink.lock().await.send(Message::text(reply)).await
            }
            _ => continue,
        };
        if ok.is_err() {
            break;
        }
    }
    hub.subscribers.lock().await.retain(|s| s.conn != conn);
}

/// Writes the push of `row` (row `pk`'s JSON) to every subscriber of `pk` or of all rows;
/// subscribers whose socket fails are dropped.
async fn publish(hub: &Hub, pk: i64, row: &str) {
    let offset = hub.offset.fetch_add(1, Ordering::Relaxed) + 1;
    let mut head = String::with_capacity(row.len() + 80);
    head.push_str(r#"{"errors":[],"data":"#);
    head.push_str(row);
    head.push_str(r#","action":"update","response_status":200,"request_id":"#);
    let mut tail = String::with_capacity(48);
    let _ = write!(tail, r#","position":{{"epoch":"raw","offset":{offset}}}}}"#);
    let mut subscribers = hub.subscribers.lock().await;
    let mut failed = false;
    for s in subscribers.iter_mut() {
        if s.dead || s.pk.is_some_and(|p| p != pk) {
            continue;
        }
        let mut frame = String::with_capacity(head.len() + s.request_id.len() + tail.len());
        frame.push_str(&head);
        frame.push_str(&s.request_id);
        frame.push_str(&tail);
        if s.sink
            .lock()
            .await
            .send(Message::text(frame))
            .await
            .is_err()
        {
            s.dead = true;
            failed = true;
        }
    }
    if failed {
        subscribers.retain(|s| !s.dead);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        let r: Request<'_> = serde_json::from_str(
            r#"{"action":"patch","pk":1,"data":{"title":"3:12"},"request_id":9}"#,
        )
        .unwrap();
        assert_eq!(r.pk, Some(1));
        assert_eq!(r.data.and_then(|d| d.title).as_deref(), Some("3:12"));
        assert_eq!(r.request_id.map(RawValue::get), Some("9"));
    }
}
