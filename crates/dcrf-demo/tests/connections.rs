//! What an idle connection costs the demo server: 800 WebSockets held open on `/ws/echo/`, each
//! answering one echo, and the server process's resident memory per socket. The measurement
//! behind the numbers is `dcrf-bench idle` (docs/sizing.md); this guards against a regression
//! that would multiply them (the handshake's 8 KiB read buffer kept alive by the scope's
//! headers, a WebSocket buffer at tungstenite's 128 KiB default).

mod common;

use std::time::Duration;

use dcrf::testing::TestClient;
use serde_json::json;

/// Connections opened: under the usual 1,024 open files of the test and the server.
const CONNECTIONS: usize = 800;

/// The bound per connection, KiB. The debug build measured 12.6 KiB after the echo (release:
/// about 12); keeping the handshake's read buffer added 4 to 5, tungstenite's default buffers
/// add over 100.
const MAX_KIB_PER_CONNECTION: f64 = 16.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_stay_small() {
    let demo = common::Demo::start("sqlite::memory:", "memory", 0);
    let url = demo.url("/ws/echo/");
    // One connection first, so that start-up allocations are not counted per connection.
    let mut first = TestClient::connect(&url).await.unwrap();
    let reply = first
        .request(json!({"action": "echo", "request_id": 0, "x": "warm"}))
        .await;
    assert_eq!(reply["response_status"], 200, "{reply}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = demo.rss_kib();
    assert!(before > 0, "cannot read the server's memory");

    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(TestClient::connect(&url).await.unwrap());
    }
    for (i, client) in clients.iter_mut().enumerate() {
        client
            .send_json(json!({"action": "echo", "request_id": i, "x": "hello"}))
            .await;
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let reply = client.receive_json().await;
        assert_eq!(reply["request_id"], i, "{reply}");
        assert_eq!(reply["data"], json!({"x": "hello"}), "{reply}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = demo.rss_kib();
    let per_connection = after.saturating_sub(before) as f64 / CONNECTIONS as f64;
    eprintln!(
        "server RSS {before} KiB → {after} KiB with {CONNECTIONS} connections: \
         {per_connection:.1} KiB each"
    );
    assert!(
        per_connection < MAX_KIB_PER_CONNECTION,
        "{per_connection:.1} KiB per idle connection (bound {MAX_KIB_PER_CONNECTION})"
    );
    drop(first);
}
