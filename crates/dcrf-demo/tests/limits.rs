//! What one client can make the demo server hold, over real sockets: subscriptions per
//! connection, outbound memory with large rows, the size of what one request returns, and the
//! client mistakes that must answer 400 rather than 500.

mod common;

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
            json!([
                "Too many subscriptions on this connection (the limit is 1000); unsubscribe from some first."
            ]),
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
        json!([
            "Too many subscriptions on this connection (the limit is 1000); unsubscribe from some first."
        ])
    );
    // The streams of one socket share its cap.
    let refused = c
        .request(
            json!({"stream": "todos", "payload": {"action": "subscribe_to_all", "request_id": 2}}),
        )
        .await;
    assert_eq!(refused["payload"]["response_status"], 400);
    let ping = c
        .request(
            json!({"stream": "todos", "payload": {"action": "retrieve", "pk": 1, "request_id": 3}}),
        )
        .await;
    assert_eq!(
        ping["payload"]["response_status"], 404,
        "the socket lives on"
    );
}

/// A subscriber that never reads while 200 rows of 500 kB are created (100 MB of pushes for
/// it): the server holds at most its outbound and event-queue bytes (4 MiB each) and the
/// stream's history (16 MiB) for it, then lets it go with 1013. Before the byte bounds, 256
/// queued frames and 1,024 queued events of this size could hold 640 MB (2,000 such rows
/// peaked at 1.19 GB).
///
/// Two runtime threads: once let go, the stalled client must read its backlog (some MiB)
/// within the server's close timeout (2 s) while the rows are still being written, and on one
/// thread that race depends on how busy the machine is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_of_large_rows_costs_its_byte_budget_then_1013() {
    let dir = std::env::temp_dir().join(format!("dcrf-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let database = format!("sqlite://{}?mode=rwc", dir.join("large.db").display());
    let s = demo(&database, 0).await;
    let mut stalled = TestClient::connect_with_receive_buffer(&s.url("/ws/todos/"), 4096)
        .await
        .unwrap();
    let reply = stalled
        .request(json!({"action": "subscribe_to_all", "request_id": "s"}))
        .await;
    assert_eq!(reply["response_status"], 201);
    let mut w = todos(&s).await;
    let owner = "o".repeat(500_000);
    // Warm up the allocator and the database with a few rows first.
    for i in 0..8 {
        w.request(
            json!({"action": "create", "data": {"title": "warm", "owner": owner}, "request_id": i}),
        )
        .await;
    }
    // Let go while the rows are being written: it reads as soon as it is, and gets the close.
    let stalled_end = common::close_once_let_go(s.app.clone(), stalled, Duration::from_secs(60));
    let before = common::rss_kib();
    let mut peak = before;
    for i in 0..200 {
        let reply = w
            .request(json!({"action": "create", "data": {"title": "big", "owner": owner}, "request_id": i}))
            .await;
        assert_eq!(reply["response_status"], 201, "create {i}");
        peak = peak.max(common::rss_kib());
    }
    let growth = peak.saturating_sub(before);
    eprintln!("peak RSS growth with a stalled subscriber of 200 x 500 kB pushes: {growth} KiB");
    assert!(growth < 64 * 1024, "memory grew by {growth} KiB");
    let close = stalled_end.await.unwrap().expect("a close frame");
    assert_eq!(u16::from(close.code), 1013);
    // The writer was never held up by the stalled subscriber.
    let reply = w
        .request(json!({"action": "retrieve", "pk": 1, "request_id": "after"}))
        .await;
    assert_eq!(reply["response_status"], 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Client mistakes answer 400 with a clear message, never 500, and the socket lives on.
#[tokio::test]
async fn malformed_values_answer_400() {
    let s = demo("sqlite::memory:", 3).await;
    let mut c = todos(&s).await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let cases: Vec<(String, &str)> = vec![
        (
            format!(r#"{{"action": "create", "data": {{"title": {deep}}}, "request_id": 1}}"#),
            "deep",
        ),
        (
            r#"{"action": "list", "limit": 1e400, "request_id": 2}"#.to_owned(),
            "limit",
        ),
        (
            r#"{"action": "list", "offset": 1e400, "request_id": 3}"#.to_owned(),
            "offset",
        ),
        (
            r#"{"action": "create", "data": {"title": 1e400}, "request_id": 4}"#.to_owned(),
            "data number",
        ),
        (
            r#"{"action": "create", "data": {"title": "a\udc00b"}, "request_id": 5}"#.to_owned(),
            "lone surrogate",
        ),
        (
            r#"{"action": "create", "data": {"title": "a\u0000b"}, "request_id": 6}"#.to_owned(),
            "NUL",
        ),
        (
            r#"{"action": "patch", "pk": 1, "data": {"owner": "a\u0000b"}, "request_id": 7}"#
                .to_owned(),
            "NUL in patch",
        ),
        (
            format!(
                r#"{{"action": "bulk_set_done", "ids": {:?}, "done": true, "request_id": 8}}"#,
                (1..=40_000).collect::<Vec<u32>>()
            ),
            "bulk",
        ),
    ];
    // Not a mistake: 40,000 ids (past SQLite's 32,766 parameters) update what exists.
    let (bulk, cases) = cases.split_last().unwrap();
    let invalid =
        |column: u32, what: &str| format!("Invalid JSON: {what} at line 1 column {column}");
    let expected = [
        json!({"errors": [invalid(137, "recursion limit exceeded")], "data": null, "action": "create", "response_status": 400, "request_id": 1}),
        json!({"errors": [invalid(5, "number out of range")], "data": null, "action": "list", "response_status": 400, "request_id": 2}),
        json!({"errors": [invalid(5, "number out of range")], "data": null, "action": "list", "response_status": 400, "request_id": 3}),
        json!({"errors": [invalid(15, "number out of range")], "data": null, "action": "create", "response_status": 400, "request_id": 4}),
        json!({"errors": [invalid(18, "lone leading surrogate in hex escape")], "data": null, "action": "create", "response_status": 400, "request_id": 5}),
        json!({"errors": [{"title": ["Null characters are not allowed."]}], "data": null, "action": "create", "response_status": 400, "request_id": 6}),
        json!({"errors": [{"owner": ["Null characters are not allowed."]}], "data": null, "action": "patch", "response_status": 400, "request_id": 7}),
    ];
    for ((frame, what), expected) in cases.iter().zip(expected) {
        c.send_text(frame).await;
        assert_eq!(c.receive_json().await, expected, "{what}");
    }
    c.send_text(&bulk.0).await;
    let reply = c.receive_json().await;
    assert_eq!(reply["data"], json!({"updated": 3}), "{reply}");
    // A filter or lookup value with NUL matches nothing (and never reaches the database).
    let reply = c
        .request(json!({"action": "list", "filters": {"owner": "a\u{0}"}, "request_id": 9}))
        .await;
    assert_eq!(reply["response_status"], 400, "{reply}");
}

/// PostgreSQL cannot store NUL in text: a write with one answers 400 (not a database error),
/// and a lookup or filter with one finds nothing.
#[tokio::test]
async fn nul_characters_answer_400_on_postgres() {
    let (database, _dir) = common::shared_database(common::Backend::Postgres, "nul").await;
    let s = demo(&database, 2).await;
    let mut c = todos(&s).await;
    let reply = c
        .request(json!({"action": "create", "data": {"title": "a\u{0}b"}, "request_id": 1}))
        .await;
    assert_eq!(
        reply,
        json!({"errors": [{"title": ["Null characters are not allowed."]}], "data": null, "action": "create", "response_status": 400, "request_id": 1})
    );
    let reply = c
        .request(json!({"action": "update", "pk": 1, "data": {"title": "t", "owner": "\u{0}"}, "request_id": 2}))
        .await;
    assert_eq!(
        reply["errors"],
        json!([{"owner": ["Null characters are not allowed."]}])
    );
    let reply = c
        .request(json!({"action": "list", "filters": {"owner": "\u{0}"}, "request_id": 3}))
        .await;
    assert_eq!(reply["response_status"], 400, "{reply}");
    let reply = c
        .request(json!({"action": "retrieve", "pk": "1\u{0}", "request_id": 4}))
        .await;
    assert_eq!(reply["response_status"], 404, "{reply}");
    let reply = c
        .request(json!({"action": "retrieve", "pk": 1, "request_id": 5}))
        .await;
    assert_eq!(
        reply["response_status"], 200,
        "the socket and the database connection live on"
    );
}

/// A 50-byte `list` over large rows: the query stops once the rows outgrow the reply cap
/// (16 MiB) and the answer is 413, three at once included; `GET /api/todos` likewise. Before,
/// each held every row and its JSON (three at once: 837 MB).
#[tokio::test]
async fn a_list_over_large_rows_stops_at_the_reply_cap() {
    let dir = std::env::temp_dir().join(format!("dcrf-amplify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let database = format!("sqlite://{}?mode=rwc", dir.join("amplify.db").display());
    let s = demo(&database, 0).await;
    {
        use dcrf::sea_orm::ConnectionTrait;
        let db = dcrf::model::Db::connect(&database).await.unwrap();
        // 60 rows of 500 kB (30 MB), written behind the server's back.
        db.conn()
            .execute_unprepared(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60) \
                 INSERT INTO todo (title, done, owner) SELECT 't' || i, 0, printf('%.500000c', 'o') FROM n",
            )
            .await
            .unwrap();
    }
    let before = common::rss_kib();
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(todos(&s).await);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_json(json!({"action": "list", "limit": 1000, "request_id": i}))
            .await;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            c.receive_json().await,
            error_frame(
                "list",
                413,
                json!([
                    "The reply is too large to send (over 16777216 bytes; the limit is 16777216 bytes). Ask for less data, e.g. a smaller page."
                ]),
                json!(i)
            )
        );
    }
    let growth = common::rss_kib().saturating_sub(before);
    eprintln!("RSS growth over three lists of 30 MB: {growth} KiB");
    assert!(growth < 96 * 1024, "memory grew by {growth} KiB");
    // A page that fits is served.
    let page = clients[0]
        .request(json!({"action": "list", "limit": 10, "request_id": "p"}))
        .await;
    assert_eq!(page["response_status"], 200);
    assert_eq!(page["data"]["results"].as_array().map(Vec::len), Some(10));
    assert_eq!(page["data"]["count"], 60);
    // Plain HTTP.
    let http = |path: &'static str| http_get(s.addr, path);
    let (status, body) = http("/api/todos").await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"detail": "The response is too large (over 16777216 bytes). Ask for less data with limit and offset, or filters."})
    );
    let (status, body) = http("/api/todos?limit=2&offset=1").await;
    assert_eq!(status, 200);
    let rows: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        rows.as_array()
            .map(|r| r.iter().map(|t| t["id"].clone()).collect::<Vec<_>>()),
        Some(vec![json!(2), json!(3)])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET path` over plain HTTP/1.1: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    (status, body.to_owned())
}
