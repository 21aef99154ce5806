//! Slow clients: a subscriber that stops reading does not delay the others, and its queue stays
//! bounded: once it is `event_queue` events behind, it is let go (close code 1013).

use std::time::Duration;

use dcrf::channel::ChannelLayer;
use dcrf::observer::Observer;
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use serde_json::json;

#[derive(Clone)]
struct Feed {
    feed: Observer,
}

#[dcrf::consumer]
impl Feed {
    #[action]
    async fn follow(&mut self, ctx: &Ctx, frame: &Frame<'_>) -> Result<Reply<()>, ApiError> {
        self.feed.subscribe(ctx, "news", frame.request_id()).await;
        Ok(Reply::with_status((), dcrf::StatusCode::CREATED))
    }
}

impl Consumer for Feed {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_others_are_not_delayed() {
    let layer = ChannelLayer::memory();
    let feed = Observer::new(&layer, "feed");
    let app = Dcrf::new().outbound_queue(4).event_queue(8);
    let consumer = Feed { feed: feed.clone() };
    let router = axum::Router::new().route("/ws/feed/", app.consumer(move || consumer.clone()));
    let s = TestServer::start(router, app).await;

    let mut stalled = TestClient::connect(&s.url("/ws/feed/")).await.unwrap();
    let mut reader = TestClient::connect(&s.url("/ws/feed/")).await.unwrap();
    for c in [&mut stalled, &mut reader] {
        assert_eq!(
            c.request(json!({"action": "follow", "request_id": "f"}))
                .await["response_status"],
            json!(201)
        );
    }

    // 400 events of 32 KiB (12.5 MiB in all): far more than the stalled client's socket
    // buffers, its outbound queue (4 frames) and its event queue (8 events) can hold.
    const EVENTS: usize = 400;
    let body = "x".repeat(32 * 1024);
    let publisher = {
        let feed = feed.clone();
        tokio::spawn(async move {
            for i in 0..EVENTS {
                feed.send("news", "tick", &json!({"i": i, "pad": body}))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    // The reading client gets every event, in order, while the other one reads nothing.
    for i in 0..EVENTS {
        let push = reader.receive_json().await;
        assert_eq!(push["action"], json!("tick"));
        assert_eq!(push["request_id"], json!("f"));
        assert_eq!(push["data"]["i"], json!(i));
    }
    publisher.await.unwrap();
    reader.receive_nothing().await;

    // The stalled client was let go: reading now drains what its socket held, then the
    // connection ends (with close code 1013 when the close frame could still be written).
    let ended = tokio::time::timeout(Duration::from_secs(10), stalled.receive_close())
        .await
        .expect("the stalled connection ends");
    if let Some(frame) = ended {
        assert_eq!(u16::from(frame.code), 1013);
    }
    // It left the group: events are no longer queued for it.
    assert_eq!(layer.local_members("feed:news"), 1);
}
