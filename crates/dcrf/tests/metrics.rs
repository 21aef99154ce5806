//! The Prometheus endpoint over real sockets: every dcrf metric, scraped over HTTP after known
//! traffic. One test in its own binary: the recorder is process-wide, so the values are exact.

use std::time::Duration;

use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct Metered;

#[dcrf::consumer]
impl Metered {
    #[action]
    async fn echo<'f>(
        &mut self,
        frame: &'f Frame<'f>,
    ) -> Result<Reply<dcrf::protocol::FieldsObject<'f, 'f>>, ApiError> {
        Ok(Reply::ok(frame.fields_object()))
    }

    #[action]
    async fn missing(&mut self) -> Result<Reply<()>, ApiError> {
        Err(ApiError::new(
            dcrf::StatusCode::NOT_FOUND,
            vec![json!("Not found.")],
        ))
    }

    #[action(detached)]
    async fn later(ctx: Ctx) -> Result<Reply<Value>, ApiError> {
        let _ = ctx;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(Reply::created(json!({"done": true})))
    }
}

impl Consumer for Metered {}

/// `GET /metrics` over a plain TCP connection: the status line, the content type and the body.
async fn scrape(server: &TestServer) -> (String, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_owned();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

/// The sample lines of a scrape (no comments).
fn samples(body: &str) -> Vec<&str> {
    body.lines().filter(|l| !l.starts_with('#')).collect()
}

fn assert_sample(body: &str, line: &str) {
    assert!(
        samples(body).contains(&line),
        "missing sample `{line}` in:\n{body}"
    );
}

#[tokio::test]
async fn metrics_count_connections_frames_actions_and_throttling() {
    let handle = dcrf::metrics::install().unwrap();
    // Installing again gives the same recorder.
    let again = dcrf::metrics::install().unwrap();
    let app = Dcrf::new().rate_limit(6);
    let router = axum::Router::new()
        .route("/ws", app.consumer(Metered::default))
        .merge(dcrf::metrics::router(handle));
    let server = TestServer::start(router, app).await;
    let _ = again;

    // Before any socket: the unlabelled metrics are there, at zero.
    let (status, content_type, body) = scrape(&server).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    for line in [
        "dcrf_connections 0",
        "dcrf_connections_total 0",
        "dcrf_messages_received_total 0",
        "dcrf_messages_sent_total 0",
        "dcrf_pushes_total 0",
        "dcrf_slow_client_closes_total 0",
        "dcrf_throttled_total 0",
        "dcrf_layer_reconnects_total 0",
    ] {
        assert_sample(&body, line);
    }

    let mut a = TestClient::connect(&server.url("/ws"))
        .await
        .unwrap()
        .dcrf_envelopes();
    let b = TestClient::connect(&server.url("/ws")).await.unwrap();
    assert_eq!(
        a.request(json!({"action": "echo", "x": 1, "request_id": 1}))
            .await["response_status"],
        200
    );
    assert_eq!(
        a.request(json!({"action": "echo", "request_id": 2})).await["response_status"],
        200
    );
    assert_eq!(
        a.request(json!({"action": "no_such_action", "request_id": 3}))
            .await,
        json!({"errors": ["Method \"no_such_action\" not allowed."], "data": null, "action": "no_such_action", "response_status": 405, "request_id": 3})
    );
    assert_eq!(
        a.request(json!({"action": "missing", "request_id": 4}))
            .await["response_status"],
        404
    );
    assert_eq!(
        a.request(json!({"action": "later", "request_id": 5})).await,
        json!({"errors": [], "data": {"done": true}, "action": "later", "response_status": 201, "request_id": 5})
    );
    assert_eq!(
        a.request(json!({"action": "echo", "request_id": 6})).await["response_status"],
        200
    );
    // The seventh frame within the second is over the limit.
    assert_eq!(
        a.request(json!({"action": "echo", "request_id": 7})).await["response_status"],
        429
    );

    let (_, _, open) = scrape(&server).await;
    assert_sample(&open, "dcrf_connections 2");
    a.close().await;
    b.close().await;
    // The connection tasks end just after the close handshake.
    let mut body = String::new();
    for _ in 0..100 {
        body = scrape(&server).await.2;
        if samples(&body).contains(&"dcrf_connections 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for line in [
        "dcrf_connections 0",
        "dcrf_connections_total 2",
        "dcrf_messages_received_total 7",
        "dcrf_messages_sent_total 7",
        "dcrf_actions_total{action=\"echo\",status=\"200\"} 3",
        "dcrf_actions_total{action=\"<unknown>\",status=\"405\"} 1",
        "dcrf_actions_total{action=\"missing\",status=\"404\"} 1",
        "dcrf_actions_total{action=\"later\",status=\"201\"} 1",
        "dcrf_action_duration_seconds_count{action=\"echo\"} 3",
        "dcrf_action_duration_seconds_bucket{action=\"echo\",le=\"+Inf\"} 3",
        "dcrf_action_duration_seconds_count{action=\"later\"} 1",
        "dcrf_action_duration_seconds_bucket{action=\"later\",le=\"0.01\"} 0",
        "dcrf_action_duration_seconds_bucket{action=\"<unknown>\",le=\"+Inf\"} 1",
        "dcrf_throttled_total 1",
        "dcrf_pushes_total 0",
        "dcrf_slow_client_closes_total 0",
        "dcrf_layer_reconnects_total 0",
    ] {
        assert_sample(&body, line);
    }
    assert!(body.contains("# TYPE dcrf_action_duration_seconds histogram"));
    assert!(body.contains("# TYPE dcrf_actions_total counter"));
    assert!(body.contains("# TYPE dcrf_connections gauge"));
    // The throttled frame ran no action: no 429 series, no client-chosen label.
    assert!(!body.contains("status=\"429\""), "{body}");
    assert!(!body.contains("no_such_action"), "{body}");
    server.shutdown().await;
}
