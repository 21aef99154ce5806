//! Slow clients: a subscriber that stops reading does not delay the others, and its queue stays
//! bounded: once it is `event_queue` events behind, it is let go (close code 1013).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Counter;
use dcrf::channel::ChannelLayer;
use dcrf::observer::Observer;
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use serde_json::json;

#[derive(Clone)]
struct Feed {
    feed: Observer,
    /// Connections that have ended (their groups left, detached work cancelled).
    left: Arc<Counter>,
}

#[dcrf::consumer]
impl Feed {
    #[action]
    async fn follow(&mut self, ctx: &Ctx, frame: &Frame<'_>) -> Result<Reply<()>, ApiError> {
        self.feed.subscribe(ctx, "news", frame.request_id()).await?;
        Ok(Reply::with_status((), dcrf::StatusCode::CREATED))
    }
}

impl Consumer for Feed {
    async fn disconnect(&mut self, _: &Ctx) {
        self.left.hit();
    }
}

async fn follow(c: &mut TestClient) {
    assert_eq!(
        c.request(json!({"action": "follow", "request_id": "f"}))
            .await,
        json!({"errors": [], "data": null, "action": "follow", "response_status": 201, "request_id": "f"})
    );
}

/// Publishes events `range` one at a time, each once `reader` has received the one before (so
/// the reader's own queues never fill, however slow this machine is), and checks that each one
/// arrives, in order. Returns the longest time from publishing an event to its arrival.
async fn publish_in_step(
    feed: &Observer,
    reader: &mut TestClient,
    range: std::ops::Range<usize>,
    pad: &str,
) -> Duration {
    let mut worst = Duration::ZERO;
    for i in range {
        let published = Instant::now();
        feed.send("news", "tick", &json!({"i": i, "pad": pad}))
            .await
            .unwrap();
        let push = reader.receive_json().await;
        worst = worst.max(published.elapsed());
        assert_eq!(push["action"], json!("tick"));
        assert_eq!(push["request_id"], json!("f"));
        assert_eq!(push["data"]["i"], json!(i));
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_others_are_not_delayed() {
    let layer = ChannelLayer::memory();
    let feed = Observer::new(&layer, "feed");
    let left = Arc::new(Counter::default());
    let app = Dcrf::new().outbound_queue(4).event_queue(8);
    let consumer = Feed {
        feed: feed.clone(),
        left: left.clone(),
    };
    let router = axum::Router::new().route("/ws/feed/", app.consumer(move || consumer.clone()));
    let s = TestServer::start(router, app).await;
    let pad = "x".repeat(32 * 1024);

    let mut reader = TestClient::connect(&s.url("/ws/feed/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    follow(&mut reader).await;
    // Baseline: the reading client alone.
    const BASELINE: usize = 100;
    let baseline = publish_in_step(&feed, &mut reader, 0..BASELINE, &pad).await;

    let mut stalled = TestClient::connect(&s.url("/ws/feed/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    follow(&mut stalled).await;
    assert_eq!(layer.local_members("feed:news"), 2);
    // The stalled client reads nothing until its connection has been let go; then it reads
    // what its socket holds, which must end with the close frame: the server writes it if the
    // client takes it within the server's close timeout (2 s), and this reads at once.
    let stalled_end = tokio::spawn({
        let left = left.clone();
        async move {
            left.wait_for_within(1, Duration::from_secs(60), "the stalled connection to end")
                .await;
            stalled.receive_close().await
        }
    });

    // 400 events of 32 KiB (12.5 MiB in all): far more than the stalled client's socket
    // buffers, its outbound queue (4 frames) and its event queue (8 events) can hold.
    const EVENTS: usize = 400;
    let worst = publish_in_step(&feed, &mut reader, BASELINE..BASELINE + EVENTS, &pad).await;
    // Not delayed by the stalled client: a hub that waited on it would hold every event for
    // as long as it waited (or for ever). The bound is generous for a loaded machine: 1 s, or
    // ten times the worst latency of the baseline if that is more.
    let bound = Duration::from_secs(1).max(baseline * 10);
    assert!(
        worst < bound,
        "an event took {worst:?} to reach the reading client (baseline worst {baseline:?})"
    );
    reader.receive_nothing().await;

    let close = tokio::time::timeout(Duration::from_secs(30), stalled_end)
        .await
        .expect("the stalled connection ends")
        .unwrap()
        .expect("a close frame, not a dropped connection");
    assert_eq!(u16::from(close.code), 1013);
    assert_eq!(left.get(), 1, "only the stalled connection ended");
    // It left the group: events are no longer queued for it.
    assert_eq!(layer.local_members("feed:news"), 1);
}

/// Sends `count` frames from its action, then replies; a detached task sends as many more.
#[derive(Clone, Default)]
struct Burst;

#[dcrf::consumer]
impl Burst {
    #[action]
    async fn burst(&mut self, ctx: &Ctx, frame: &Frame<'_>) -> Result<Reply<()>, ApiError> {
        let count = frame
            .field("count")
            .and_then(|c| c.get().parse::<usize>().ok())
            .unwrap_or(0);
        let pad = "p".repeat(1000);
        for i in 0..count {
            ctx.send_json(&json!({"from": "action", "i": i, "pad": pad}))
                .await
                .unwrap();
        }
        let detached = ctx.clone();
        ctx.spawn(async move {
            let pad = "d".repeat(1000);
            for i in 0..count {
                detached
                    .send_json(&json!({"from": "task", "i": i, "pad": pad}))
                    .await
                    .unwrap();
            }
        });
        Ok(Reply::ok(()))
    }
}

impl Consumer for Burst {}

/// Frames keep the order they were sent in while the socket is full and the connection's
/// writer takes over, and again once it is idle and frames are written at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_keep_their_order_through_a_full_socket() {
    let app = Dcrf::new().outbound_queue(16);
    let router = axum::Router::new().route("/ws/burst/", app.consumer(Burst::default));
    let s = TestServer::start(router, app).await;
    let mut c = TestClient::connect_with_receive_buffer(&s.url("/ws/burst/"), 4096)
        .await
        .unwrap();
    for round in 0..3 {
        const COUNT: usize = 2000;
        c.send_json(json!({"action": "burst", "count": COUNT, "request_id": round}))
            .await;
        // Not read yet: the frames back up into the socket and the queue.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut action, mut task, mut replied) = (0, 0, false);
        while action < COUNT || task < COUNT || !replied {
            let frame = c.receive_json().await;
            match frame["from"].as_str() {
                Some("action") => {
                    assert!(
                        !replied,
                        "round {round}: a frame of the action after its reply"
                    );
                    assert_eq!(frame["i"], json!(action), "round {round}");
                    action += 1;
                }
                Some("task") => {
                    assert_eq!(frame["i"], json!(task), "round {round}");
                    task += 1;
                }
                _ => {
                    assert_eq!(frame["request_id"], json!(round), "{frame}");
                    assert_eq!(action, COUNT, "round {round}: the reply before the frames");
                    replied = true;
                }
            }
        }
    }
    c.receive_nothing().await;
}
