//! The demo's `/metrics`: scraped over HTTP, in-process (exact values: this binary has one
//! in-process test) and from the built binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use dcrf::testing::{TestClient, TestServer};
use dcrf_demo::DemoConfig;
use serde_json::json;

/// `GET /metrics`: the status line and the body.
fn scrape(addr: &str) -> (String, String) {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

fn has_sample(body: &str, line: &str) -> bool {
    body.lines().any(|l| l == line)
}

#[tokio::test]
async fn the_demo_serves_its_metrics() {
    let config = DemoConfig {
        database: "sqlite::memory:".to_owned(),
        seed: 1,
        ..DemoConfig::default()
    };
    let (router, app) = dcrf_demo::build(&config).await.unwrap();
    let s = TestServer::start(router, app).await;
    let mut sub = TestClient::connect(&s.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        sub.request(json!({"action": "subscribe_to_all", "request_id": "a"}))
            .await["response_status"],
        201
    );
    assert_eq!(
        sub.request(json!({"action": "create", "data": {"title": "New"}, "request_id": 1}))
            .await["response_status"],
        201
    );
    // The push for the create.
    let push = sub.receive_json().await;
    assert_eq!(push["action"], "create");
    let addr = s.addr.to_string();
    let (status, body) = tokio::task::spawn_blocking(move || scrape(&addr))
        .await
        .unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    for line in [
        "dcrf_connections 1",
        "dcrf_connections_total 1",
        "dcrf_messages_received_total 2",
        "dcrf_messages_sent_total 3",
        "dcrf_pushes_total 1",
        "dcrf_actions_total{action=\"subscribe_to_all\",status=\"201\"} 1",
        "dcrf_actions_total{action=\"create\",status=\"201\"} 1",
        "dcrf_action_duration_seconds_count{action=\"create\"} 1",
        "dcrf_throttled_total 0",
        "dcrf_slow_client_closes_total 0",
        "dcrf_layer_reconnects_total 0",
    ] {
        assert!(has_sample(&body, line), "missing `{line}` in:\n{body}");
    }
    sub.close().await;
    s.shutdown().await;
}

#[test]
fn the_binary_serves_metrics_unless_told_not_to() {
    for (flag, served) in [(None, true), (Some("--no-metrics"), false)] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dcrf-demo"));
        command.args(["--bind", "127.0.0.1:0", "--database", "sqlite::memory:"]);
        command.args(flag);
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
        let (status, body) = scrape(&addr);
        let _ = child.kill();
        let _ = child.wait();
        if served {
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert!(has_sample(&body, "dcrf_connections 0"), "{body}");
            assert!(
                body.contains("# TYPE dcrf_throttled_total counter"),
                "{body}"
            );
        } else {
            assert_eq!(status, "HTTP/1.1 404 Not Found");
        }
    }
}
