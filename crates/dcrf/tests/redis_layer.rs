//! The Redis broker: a subscribe reply is sent only once the subscription is live on Redis, so a
//! change committed right after the reply reaches the subscriber. Needs `REDIS_URL` (the test
//! runner filters `redis` tests out when Redis is unavailable).

use dcrf::channel::ChannelLayer;
use dcrf::observer::Observer;
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use serde::Deserialize;
use serde_json::json;

#[derive(Clone)]
struct Feed {
    feed: Observer,
}

#[derive(Deserialize)]
struct Follow {
    topic: String,
}

#[dcrf::consumer]
impl Feed {
    /// Subscribes to a topic's group; the reply is the subscription's confirmation.
    #[action]
    async fn follow(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: Follow,
    ) -> Result<Reply<()>, ApiError> {
        self.feed
            .subscribe(ctx, &args.topic, frame.request_id())
            .await?;
        Ok(Reply::with_status((), dcrf::StatusCode::CREATED))
    }

    /// Subscribes, then publishes to the topic at once, before replying: the tightest race
    /// between this node's `SUBSCRIBE` and any `PUBLISH`.
    #[action]
    async fn follow_then_publish(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: Follow,
    ) -> Result<Reply<()>, ApiError> {
        self.feed
            .subscribe(ctx, &args.topic, frame.request_id())
            .await?;
        self.feed
            .send(&args.topic, "news", &json!({"topic": args.topic}))
            .await
            .map_err(ApiError::internal)?;
        Ok(Reply::with_status((), dcrf::StatusCode::CREATED))
    }
}

impl Consumer for Feed {}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "REDIS_URL is not set: this test needs Redis; run it through scripts/test.sh, which \
             filters it out when Redis is unavailable"
        )
    })
}

/// Each round uses a group no node has subscribed yet, so every reply has to wait for a fresh
/// Redis `SUBSCRIBE`; the event is sent from a second node the moment the reply arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_publish_right_after_the_subscribe_reply_is_delivered() {
    let url = redis_url();
    let serving = ChannelLayer::redis(&url).await.unwrap();
    let publishing = ChannelLayer::redis(&url).await.unwrap();
    let feed = Feed {
        feed: Observer::new(&serving, "redis-race"),
    };
    let app = Dcrf::new();
    let router = axum::Router::new().route("/ws/feed/", app.consumer(move || feed.clone()));
    let s = TestServer::start(router, app).await;
    let other_node = Observer::new(&publishing, "redis-race");
    let run = std::process::id();

    let mut c = TestClient::connect(&s.url("/ws/feed/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    for round in 0..25 {
        let topic = format!("{run}-{round}");
        assert_eq!(
            c.request(json!({"action": "follow", "topic": topic, "request_id": round}))
                .await,
            json!({"errors": [], "data": null, "action": "follow", "response_status": 201, "request_id": round})
        );
        other_node
            .send(&topic, "news", &json!({"round": round}))
            .await
            .unwrap();
        assert_eq!(
            c.receive_json().await,
            json!({"errors": [], "data": {"round": round}, "action": "news", "response_status": 200, "request_id": round}),
            "round {round}: the event published right after the reply was lost"
        );
    }
    c.receive_nothing().await;
}

/// The change is published by the subscribing node itself, right after `subscribe` returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_publish_right_after_subscribe_returns_is_delivered() {
    let url = redis_url();
    let serving = ChannelLayer::redis(&url).await.unwrap();
    let feed = Feed {
        feed: Observer::new(&serving, "redis-race-inline"),
    };
    let app = Dcrf::new();
    let router = axum::Router::new().route("/ws/feed/", app.consumer(move || feed.clone()));
    let s = TestServer::start(router, app).await;
    let run = std::process::id();

    let mut c = TestClient::connect(&s.url("/ws/feed/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    for round in 0..25 {
        let topic = format!("{run}-{round}");
        c.send_json(json!({"action": "follow_then_publish", "topic": topic, "request_id": round}))
            .await;
        let mut frames = vec![c.receive_json().await, c.receive_json().await];
        frames.sort_by_key(|f| f["action"].as_str().unwrap_or_default().to_owned());
        assert_eq!(
            frames,
            vec![
                json!({"errors": [], "data": null, "action": "follow_then_publish", "response_status": 201, "request_id": round}),
                json!({"errors": [], "data": {"topic": topic}, "action": "news", "response_status": 200, "request_id": round}),
            ],
            "round {round}"
        );
    }
    c.receive_nothing().await;
}
