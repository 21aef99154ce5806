//! The multiplexed `/ws` of the demo: routing by stream, wrapped replies and pushes, and every
//! malformed envelope answered with an error frame on a socket that stays open.

use dcrf::testing::{TestClient, TestServer};
use dcrf_demo::DemoConfig;
use serde_json::{Value, json};

async fn demo() -> TestServer {
    let config = DemoConfig {
        database: "sqlite::memory:".to_owned(),
        seed: 2,
        ..DemoConfig::default()
    };
    let (router, app) = dcrf_demo::build(&config).await.unwrap();
    TestServer::start(router, app).await
}

async fn ws(s: &TestServer) -> TestClient {
    TestClient::connect(&s.url("/ws"))
        .await
        .unwrap()
        .dcrf_envelopes()
}

fn error(stream: Value, status: u16, errors: Value, action: Value, rid: Value) -> Value {
    json!({"stream": stream, "payload": {"errors": errors, "data": null, "action": action, "response_status": status, "request_id": rid}})
}

/// Proves the socket still works after a mistake.
async fn alive(c: &mut TestClient) {
    assert_eq!(
        c.request(json!({"stream": "echo", "payload": {"action": "echo", "request_id": "alive", "ok": true}}))
            .await,
        json!({"stream": "echo", "payload": {"errors": [], "data": {"ok": true}, "action": "echo", "response_status": 200, "request_id": "alive"}})
    );
}

const HELP: &str =
    "Expected {\"stream\": \"<name>\", \"payload\": {\"action\": ..., \"request_id\": ...}}.";

#[tokio::test]
async fn streams_route_and_replies_are_wrapped() {
    let s = demo().await;
    let mut c = ws(&s).await;
    alive(&mut c).await;
    assert_eq!(
        c.request(json!({"stream": "things", "payload": {"action": "create", "data": {"name": "a"}, "request_id": 1}}))
            .await,
        json!({"stream": "things", "payload": {"errors": [], "data": {"pk": 1, "name": "a", "counter": 0}, "action": "create", "response_status": 201, "request_id": 1}})
    );
    assert_eq!(
        c.request(json!({"stream": "things_with_id", "payload": {"action": "retrieve", "pk": 1, "data": {}, "request_id": 2}}))
            .await,
        json!({"stream": "things_with_id", "payload": {"errors": [], "data": {"id": 1, "name": "a", "counter": 0}, "action": "retrieve", "response_status": 200, "request_id": 2}})
    );
    assert_eq!(
        c.request(
            json!({"stream": "todos", "payload": {"action": "retrieve", "pk": 2, "request_id": 3}})
        )
        .await["payload"]["data"]["title"],
        json!("Todo 2")
    );
}

#[tokio::test]
async fn pushes_are_wrapped_in_their_stream() {
    let s = demo().await;
    let mut c = ws(&s).await;
    c.request(json!({"stream": "things", "payload": {"action": "create", "data": {"name": "a"}, "request_id": 1}}))
        .await;
    // The same row watched through both streams: each push in its own representation.
    for (stream, rid) in [("things", "s1"), ("things_with_id", "s2")] {
        assert_eq!(
            c.request(json!({"stream": stream, "payload": {"action": "subscribe_instance", "pk": 1, "request_id": rid}}))
                .await["payload"]["response_status"],
            json!(201)
        );
    }
    c.request(
        json!({"stream": "things", "payload": {"action": "subscribe_many", "request_id": "many"}}),
    )
    .await;
    c.request(json!({"stream": "things", "payload": {"action": "patch", "pk": 1, "data": {"counter": 5}, "request_id": 2}}))
        .await;
    let mut pushes = vec![
        c.receive_json().await,
        c.receive_json().await,
        c.receive_json().await,
    ];
    pushes.sort_by_key(|p| p["payload"]["request_id"].to_string());
    assert_eq!(
        pushes,
        vec![
            json!({"stream": "things", "payload": {"errors": [], "data": {"pk": 1, "name": "a", "counter": 5}, "action": "update", "response_status": 200, "request_id": "many"}}),
            json!({"stream": "things", "payload": {"errors": [], "data": {"pk": 1, "name": "a", "counter": 5}, "action": "update", "response_status": 200, "request_id": "s1"}}),
            json!({"stream": "things_with_id", "payload": {"errors": [], "data": {"id": 1, "name": "a", "counter": 5}, "action": "update", "response_status": 200, "request_id": "s2"}}),
        ]
    );
    // subscribe_many also sees creates; deletes carry the `pk` representation with 204.
    c.request(json!({"stream": "things", "payload": {"action": "create", "data": {"name": "b"}, "request_id": 3}}))
        .await;
    assert_eq!(
        c.receive_json().await,
        json!({"stream": "things", "payload": {"errors": [], "data": {"pk": 2, "name": "b", "counter": 0}, "action": "create", "response_status": 200, "request_id": "many"}})
    );
    c.request(
        json!({"stream": "things", "payload": {"action": "delete", "pk": 2, "request_id": 4}}),
    )
    .await;
    assert_eq!(
        c.receive_json().await,
        json!({"stream": "things", "payload": {"errors": [], "data": {"pk": 2, "name": "b", "counter": 0}, "action": "delete", "response_status": 204, "request_id": "many"}})
    );
    c.receive_nothing().await;
}

#[tokio::test]
async fn malformed_envelopes_get_error_frames() {
    let s = demo().await;
    let mut c = ws(&s).await;
    c.send_text("{not json").await;
    assert_eq!(
        c.receive_json().await,
        error(
            Value::Null,
            400,
            json!(["Invalid JSON: key must be a string"]),
            Value::Null,
            Value::Null
        )
    );
    alive(&mut c).await;
    for bad in [
        json!([1, 2]),
        json!("x"),
        json!({"payload": {}}),
        json!({"stream": 5, "payload": {}}),
    ] {
        c.send_json(bad).await;
        assert_eq!(
            c.receive_json().await,
            error(Value::Null, 400, json!([HELP]), Value::Null, Value::Null)
        );
        alive(&mut c).await;
    }
    c.send_json(json!({"stream": "things"})).await;
    assert_eq!(
        c.receive_json().await,
        error(
            json!("things"),
            400,
            json!([HELP]),
            Value::Null,
            Value::Null
        )
    );
    alive(&mut c).await;
    c.send_binary(b"binary".to_vec()).await;
    assert_eq!(
        c.receive_json().await,
        error(
            Value::Null,
            400,
            json!(["Binary frames are not supported; send JSON text frames."]),
            Value::Null,
            Value::Null
        )
    );
    alive(&mut c).await;
}

#[tokio::test]
async fn unknown_streams_and_bad_payloads_are_answered_in_their_stream() {
    let s = demo().await;
    let mut c = ws(&s).await;
    assert_eq!(
        c.request(json!({"stream": "nope", "payload": {"action": "list", "request_id": "r1"}}))
            .await,
        error(
            json!("nope"),
            404,
            json!(["Unknown stream \"nope\"."]),
            json!("list"),
            json!("r1")
        )
    );
    alive(&mut c).await;
    // The stream's consumer answers a bad payload as it would on its own socket.
    assert_eq!(
        c.request(json!({"stream": "things", "payload": [1]})).await,
        error(
            json!("things"),
            400,
            json!([
                "Expected a JSON object with an \"action\" key, e.g. {\"action\": \"list\", \"request_id\": 1}."
            ]),
            Value::Null,
            Value::Null
        )
    );
    assert_eq!(
        c.request(json!({"stream": "things", "payload": {"action": "fly", "request_id": 9}}))
            .await,
        error(
            json!("things"),
            405,
            json!(["Method \"fly\" not allowed."]),
            json!("fly"),
            json!(9)
        )
    );
    assert_eq!(
        c.request(json!({"stream": "things", "payload": {"request_id": 10}}))
            .await,
        error(
            json!("things"),
            405,
            json!(["Unable to find action in message body."]),
            Value::Null,
            json!(10)
        )
    );
    alive(&mut c).await;
}

#[tokio::test]
async fn one_consumer_per_stream_per_socket() {
    let s = demo().await;
    let mut a = ws(&s).await;
    let mut b = ws(&s).await;
    a.request(json!({"stream": "things", "payload": {"action": "create", "data": {"name": "x"}, "request_id": 1}}))
        .await;
    a.request(json!({"stream": "things", "payload": {"action": "subscribe_instance", "pk": 1, "request_id": "a"}}))
        .await;
    // A change made on another socket reaches a's subscription only.
    b.request(json!({"stream": "things_with_id", "payload": {"action": "patch", "pk": 1, "data": {"name": "y"}, "request_id": 2}}))
        .await;
    assert_eq!(
        a.receive_json().await,
        json!({"stream": "things", "payload": {"errors": [], "data": {"pk": 1, "name": "y", "counter": 0}, "action": "update", "response_status": 200, "request_id": "a"}})
    );
    b.receive_nothing().await;
}
