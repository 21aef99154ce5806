//! What one client can make the demo server hold, over real sockets: subscriptions per
//! connection, outbound memory with large rows, the size of what one request returns, and the
//! client mistakes that must answer 400 rather than 500.

use std::time::Duration;

use dcrf::testing::{TestClient, TestServer};
use dcrf_demo::DemoConfig;
use serde_json::{Value, json};

async fn demo(database: &str, seed: u64) -> TestServer {
    let config = DemoConfig {
        database: database.to_owned(),
        layer: "memory".to_owned(),
        seed,
        ..DemoConfig::default()
    };
    let (router, app) = dcrf_demo::build(&config).await.unwrap();
    TestServer::start(router, app).await
}

async fn todos(s: &TestServer) -> TestClient {
    TestClient::connect(&s.url("/ws/todos/")).await.unwrap()
}

/// The error frame DCRF sends for `action` and `request_id`.
fn error_frame(action: &str, status: u16, errors: Value, request_id: Value) -> Value {
    json!({"errors": errors, "data": null, "action": action, "response_status": status, "request_id": request_id})
}

#[tokio::test]
async fn the_1001st_subscription_of_a_connection_is_refused_with_400() {
    let s = demo("sqlite::memory:", 1).await;
    let mut c = todos(&s).await;
    for i in 0..1000 {
        c.send_json(json!({"action": "subscribe_to_all", "request_id": i}))
            .await;
    }
    for i in 0..1000 {
        let reply = c.receive_json().await;
        assert_eq!(
            (reply["response_status"].as_u64(), &reply["request_id"]),
            (Some(201), &json!(i))
        );
    }
    let refused = c
        .request(json!({"action": "subscribe_to_all", "request_id": 1000}))
        .await;
    assert_eq!(
        refused,
        error_frame(
            "subscribe_to_all",
            400,
            json!(["Too many subscriptions on this connection (the limit is 1000); unsubscribe from some first."]),
            json!(1000)
        )
    );
    // The same pair again is not a new subscription.
    let again = c
        .request(json!({"action": "subscribe_to_all", "request_id": 7}))
        .await;
    assert_eq!(again["response_status"], 201);
    // The socket lives on, and an unsubscribe frees a place.
    let gone = c
        .request(json!({"action": "unsubscribe_from_all", "request_id": 3}))
        .await;
    assert_eq!(gone["response_status"], 204);
    let reply = c
        .request(json!({"action": "subscribe_to_all", "request_id": 1000}))
        .await;
    assert_eq!(reply["response_status"], 201);
    // Other kinds of subscription count against the same cap.
    let refused = c
        .request(json!({"action": "subscribe_instance", "pk": 1, "request_id": "i"}))
        .await;
    assert_eq!(refused["response_status"], 400);
    let refused = c
        .request(json!({"action": "subscribe_list", "request_id": "l"}))
        .await;
    assert_eq!(refused["response_status"], 400);
    // Another connection has a cap of its own.
    let mut other = todos(&s).await;
    let reply = other
        .request(json!({"action": "subscribe_to_all", "request_id": 1}))
        .await;
    assert_eq!(reply["response_status"], 201);
    // Pushes still go to every subscription.
    let mut w = todos(&s).await;
    w.request(json!({"action": "create", "data": {"title": "x"}, "request_id": "w"}))
        .await;
    let mut ids = Vec::new();
    while let Some(push) = c.try_receive_json(Duration::from_millis(500)).await {
        assert_eq!(push["action"], "create");
        ids.push(push["request_id"].as_u64().unwrap());
    }
    ids.sort_unstable();
    let expected: Vec<u64> = (0..=1000).filter(|i| *i != 3).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn subscribe_many_over_the_cap_stops_at_it() {
    let s = demo("sqlite::memory:", 0).await;
    let mut c = TestClient::connect(&s.url("/ws")).await.unwrap();
    let ids: Vec<u64> = (1..=100_000).collect();
    let reply = c
        .request(json!({"stream": "things", "payload": {"action": "subscribe_many", "things": ids, "request_id": 1}}))
        .await;
    assert_eq!(reply["payload"]["response_status"], 400, "{reply}");
    assert_eq!(
        reply["payload"]["errors"],
        json!(["Too many subscriptions on this connection (the limit is 1000); unsubscribe from some first."])
    );
    // The streams of one socket share its cap.
    let refused = c
        .request(json!({"stream": "todos", "payload": {"action": "subscribe_to_all", "request_id": 2}}))
        .await;
    assert_eq!(refused["payload"]["response_status"], 400);
    let ping = c
        .request(json!({"stream": "todos", "payload": {"action": "retrieve", "pk": 1, "request_id": 3}}))
        .await;
    assert_eq!(ping["payload"]["response_status"], 404, "the socket lives on");
}
