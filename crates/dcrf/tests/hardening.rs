//! Attacks from the open internet, each over a real socket: silent and trickling handshakes,
//! connection floods, oversized request ids and replies, detached-action floods, RFC 6455
//! protocol violations, silent peers, JWT claims and expiry, cross-site cookie sockets, and a
//! shutdown held up by a half-sent request. Every assertion is on an exact frame, close code or
//! HTTP status.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dcrf::auth::JwtAuth;
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &[u8] = b"hardening-test-secret-hardening-test-secret";

/// The consumer under attack.
#[derive(Default)]
struct Target;

#[derive(Deserialize)]
struct Size {
    bytes: usize,
}

#[dcrf::consumer]
impl Target {
    #[action]
    async fn echo<'f>(
        &mut self,
        frame: &'f Frame<'f>,
    ) -> Result<Reply<dcrf::protocol::FieldsObject<'f, 'f>>, ApiError> {
        Ok(Reply::ok(frame.fields_object()))
    }

    /// A reply of about `bytes` bytes.
    #[action]
    async fn big(&mut self, args: Size) -> Result<Reply<String>, ApiError> {
        Ok(Reply::ok("x".repeat(args.bytes)))
    }

    #[action]
    async fn whoami(&mut self, ctx: &Ctx) -> Result<Reply<Option<User>>, ApiError> {
        Ok(Reply::ok(ctx.user().cloned()))
    }

    /// Detached: runs until the test releases it.
    #[action(detached)]
    async fn wait() -> Result<Reply<&'static str>, ApiError> {
        RELEASE.notified().await;
        Ok(Reply::ok("released"))
    }

    /// Not detached, and never ends.
    #[action]
    async fn stuck(&mut self) -> Result<Reply<()>, ApiError> {
        std::future::pending().await
    }
}

impl Consumer for Target {}

/// Lets one `wait` finish (a permit is kept when none waits yet).
static RELEASE: Notify = Notify::const_new();

async fn start(app: Dcrf) -> TestServer {
    let router = axum::Router::new().route("/ws/", app.consumer(Target::default));
    TestServer::start(router, app).await
}

fn jwt() -> JwtAuth {
    JwtAuth::hs256(SECRET).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

/// The status and body of a refused handshake.
async fn refused(request: impl IntoClientRequest + Unpin) -> (u16, String) {
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => panic!("handshake accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap(),
        ),
        Err(e) => panic!("handshake failed without an HTTP status: {e}"),
    }
}

/// Reads from a socket until the server closes it (EOF or reset), and returns how long that took.
async fn time_until_closed(tcp: &mut TcpStream, start: Instant, limit: Duration) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((start + limit).into(), tcp.read(&mut buf)).await {
            Err(_) => panic!("socket still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
        }
    }
}

// ---- Raw WebSocket frames, as RFC 6455 lays them out. ----

/// A WebSocket opened by hand, to send frames no well-behaved client would.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One frame: `first` is FIN, RSV1-3 and the opcode; masked as a client must (unless told not
/// to).
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n < 65536 => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

impl Raw {
    async fn open(addr: SocketAddr, path: &str, headers: &str) -> Raw {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Raw::handshake(tcp, addr, path, headers).await
    }

    /// Opens from a given local address (another client IP on the loopback network).
    async fn connect_from(local: &str, addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    }

    async fn handshake(mut tcp: TcpStream, addr: SocketAddr, path: &str, headers: &str) -> Raw {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Raw {
            tcp,
            buf: Vec::new(),
        };
        let head = raw.read_head().await;
        assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
        raw
    }

    /// Reads an HTTP response head (and keeps what follows it).
    async fn read_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return head;
            }
            let n = self.fill().await;
            assert!(n > 0, "closed before a response head");
        }
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), self.tcp.read(&mut chunk))
            .await
            .expect("timed out reading")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    async fn send_text(&mut self, text: &str) {
        self.send(&frame(0x81, text.as_bytes(), true)).await;
    }

    /// The next frame from the server: opcode and payload; `None` at EOF.
    async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let opcode = self.buf[0] & 0x0f;
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n @ 0..=125 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((opcode, payload));
                }
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// The next text frame's text, skipping pings.
    async fn read_text(&mut self) -> String {
        loop {
            match self.read_frame().await {
                Some((0x1, text)) => return String::from_utf8(text).unwrap(),
                Some((0x9, _)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The code of the server's close frame (skipping other frames); `None` if the socket
    /// ended without one.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.read_frame().await? {
                (0x8, payload) if payload.len() >= 2 => {
                    return Some(u16::from_be_bytes([payload[0], payload[1]]));
                }
                (0x8, _) => return Some(1005),
                _ => continue,
            }
        }
    }
}

// ---- 1. Handshake timeout. ----

#[tokio::test]
async fn a_socket_that_sends_nothing_is_closed_at_the_handshake_timeout() {
    let s = start(Dcrf::new().handshake_timeout(Duration::from_millis(300))).await;
    let start = Instant::now();
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    let open_for = time_until_closed(&mut tcp, start, Duration::from_secs(3)).await;
    eprintln!("silent socket closed after {open_for:?}");
    assert!(open_for >= Duration::from_millis(250), "{open_for:?}");
    assert!(open_for < Duration::from_millis(1500), "{open_for:?}");
}

#[tokio::test]
async fn trickled_header_lines_are_cut_off_at_the_handshake_timeout() {
    let s = start(Dcrf::new().handshake_timeout(Duration::from_millis(400))).await;
    let start = Instant::now();
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET /ws/ HTTP/1.1\r\n").await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    // One header line every 100 ms, for longer than the timeout allows.
    let trickle = tokio::spawn(async move {
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if write
                .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                return i;
            }
        }
        40
    });
    let mut buf = [0u8; 1024];
    let open_for = loop {
        match tokio::time::timeout(Duration::from_secs(3), read.read(&mut buf)).await {
            Err(_) => panic!("trickling socket still open after 3 s"),
            Ok(Ok(0)) | Ok(Err(_)) => break start.elapsed(),
            Ok(Ok(_)) => continue,
        }
    };
    eprintln!("trickling socket closed after {open_for:?}");
    assert!(open_for >= Duration::from_millis(350), "{open_for:?}");
    assert!(open_for < Duration::from_millis(1500), "{open_for:?}");
    trickle.abort();
}

#[tokio::test]
async fn a_prompt_handshake_is_not_affected_by_the_timeout() {
    let s = start(Dcrf::new().handshake_timeout(Duration::from_millis(300))).await;
    let mut c = TestClient::connect(&s.url("/ws/")).await.unwrap();
    // The WebSocket outlives the handshake timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        c.request(json!({"action": "echo", "request_id": 1, "x": 1}))
            .await,
        json!({"errors": [], "data": {"x": 1}, "action": "echo", "response_status": 200, "request_id": 1})
    );
}

// ---- 2. Shutdown within its cap. ----

#[tokio::test]
async fn shutdown_is_not_held_up_by_a_half_sent_request() {
    let s = start(Dcrf::new()).await;
    let mut half = TcpStream::connect(s.addr).await.unwrap();
    half.write_all(b"GET /ws/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut ws = TestClient::connect(&s.url("/ws/")).await.unwrap();
    // Let the server read what was sent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    let shutdown = tokio::spawn(s.shutdown());
    let close = ws.receive_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
    drop(ws);
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("serve returned")
        .unwrap();
    let took = start.elapsed();
    eprintln!("shutdown with a half-sent request took {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let open_for = time_until_closed(&mut half, start, Duration::from_secs(1)).await;
    assert!(open_for < Duration::from_secs(1));
}

#[tokio::test]
async fn shutdown_returns_at_its_cap_when_an_action_never_ends() {
    let s = start(Dcrf::new().shutdown_timeout(Duration::from_millis(500))).await;
    let mut c = TestClient::connect(&s.url("/ws/")).await.unwrap();
    c.send_json(json!({"action": "stuck", "request_id": 1}))
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), s.shutdown())
        .await
        .expect("serve returned");
    let took = start.elapsed();
    eprintln!("shutdown with a never-ending action took {took:?}");
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

// ---- 3. Connection caps, request id, reply size, detached actions. ----

#[tokio::test]
async fn connections_over_the_global_cap_are_answered_503() {
    let s = start(Dcrf::new().max_connections(2)).await;
    let a = TestClient::connect(&s.url("/ws/")).await.unwrap();
    let mut b = TestClient::connect(&s.url("/ws/")).await.unwrap();
    let (status, body) = refused(s.url("/ws/")).await;
    assert_eq!(
        (status, body.as_str()),
        (503, "Too many connections; try again later.\n")
    );
    // The admitted ones still work, and a closed one frees its slot.
    assert_eq!(
        b.request(json!({"action": "echo", "request_id": 1})).await["response_status"],
        200
    );
    a.close().await;
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = TestClient::connect(&s.url("/ws/")).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = again.expect("a slot freed by the closed socket");
    assert_eq!(
        c.request(json!({"action": "echo", "request_id": 2})).await["response_status"],
        200
    );
}

#[tokio::test]
async fn connections_over_the_per_ip_cap_are_answered_503_per_address() {
    let s = start(Dcrf::new().max_connections_per_ip(1)).await;
    let mut first = Raw::handshake(
        Raw::connect_from("127.0.0.1", s.addr).await,
        s.addr,
        "/ws/",
        "",
    )
    .await;
    // A second one from the same address is refused before any upgrade.
    let mut second = Raw {
        tcp: Raw::connect_from("127.0.0.1", s.addr).await,
        buf: Vec::new(),
    };
    second
        .send(format!("GET /ws/ HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr).as_bytes())
        .await;
    let head = second.read_head().await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    // Another address is counted on its own.
    let mut other = Raw::handshake(
        Raw::connect_from("127.0.0.2", s.addr).await,
        s.addr,
        "/ws/",
        "",
    )
    .await;
    for raw in [&mut first, &mut other] {
        raw.send_text(r#"{"action":"echo","request_id":1}"#).await;
        assert_eq!(
            raw.read_text().await,
            r#"{"errors":[],"data":{},"action":"echo","response_status":200,"request_id":1}"#
        );
    }
}

#[tokio::test]
async fn a_request_id_over_the_cap_answers_400_and_the_socket_stays_open() {
    let s = start(Dcrf::new()).await;
    let mut c = TestClient::connect(&s.url("/ws/")).await.unwrap();
    // 1024 bytes of JSON: accepted and echoed.
    let ok = format!("\"{}\"", "a".repeat(1022));
    c.send_text(&format!(r#"{{"action":"echo","request_id":{ok}}}"#))
        .await;
    assert_eq!(
        c.receive_text().await,
        format!(
            r#"{{"errors":[],"data":{{}},"action":"echo","response_status":200,"request_id":{ok}}}"#
        )
    );
    // 1025 bytes: refused, not echoed.
    let long = format!("\"{}\"", "a".repeat(1023));
    c.send_text(&format!(r#"{{"action":"echo","request_id":{long}}}"#))
        .await;
    assert_eq!(
        c.receive_text().await,
        r#"{"errors":["request_id is too long (1025 bytes; the limit is 1024 bytes)."],"data":null,"action":"echo","response_status":400,"request_id":null}"#
    );
    // Any JSON type counts by its text; no action → action null.
    let nested = format!("[{}]", vec!["1"; 600].join(","));
    c.send_text(&format!(r#"{{"request_id":{nested}}}"#)).await;
    assert_eq!(
        c.receive_json().await,
        json!({"errors": ["request_id is too long (1201 bytes; the limit is 1024 bytes)."], "data": null, "action": null, "response_status": 400, "request_id": null})
    );
    assert_eq!(
        c.request(json!({"action": "echo", "request_id": 3})).await["response_status"],
        200
    );
    // On a multiplexed socket too, for a known stream and for an unknown one (whose answer
    // would echo it).
    let app = Dcrf::new();
    let router = axum::Router::new().route(
        "/ws",
        dcrf::multiplex::Demultiplexer::new(&app)
            .stream("t", Target::default)
            .route(),
    );
    let s = TestServer::start(router, app).await;
    let mut c = TestClient::connect(&s.url("/ws")).await.unwrap();
    for stream in ["t", "nope"] {
        c.send_text(&format!(
            r#"{{"stream":"{stream}","payload":{{"action":"echo","request_id":{long}}}}}"#
        ))
        .await;
        assert_eq!(
            c.receive_text().await,
            format!(
                r#"{{"stream":"{stream}","payload":{{"errors":["request_id is too long (1025 bytes; the limit is 1024 bytes)."],"data":null,"action":"echo","response_status":400,"request_id":null}}}}"#
            )
        );
    }
}

#[tokio::test]
async fn a_reply_over_the_cap_is_replaced_by_a_413_error_frame() {
    let s = start(Dcrf::new().max_reply_size(4096)).await;
    let mut c = TestClient::connect(&s.url("/ws/")).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "big", "bytes": 3000, "request_id": 1}))
            .await["response_status"],
        200
    );
    c.send_json(json!({"action": "big", "bytes": 5000, "request_id": 2}))
        .await;
    assert_eq!(
        c.receive_text().await,
        r#"{"errors":["The reply is too large to send (over 4096 bytes; the limit is 4096 bytes). Ask for less data, e.g. a smaller page."],"data":null,"action":"big","response_status":413,"request_id":2}"#
    );
    assert_eq!(
        c.request(json!({"action": "echo", "request_id": 3})).await["response_status"],
        200
    );
}

#[tokio::test]
async fn detached_actions_over_the_cap_answer_503_until_one_finishes() {
    let s = start(Dcrf::new().max_detached_actions(2)).await;
    let mut c = TestClient::connect(&s.url("/ws/")).await.unwrap();
    c.send_json(json!({"action": "wait", "request_id": 1}))
        .await;
    c.send_json(json!({"action": "wait", "request_id": 2}))
        .await;
    c.send_json(json!({"action": "wait", "request_id": 3}))
        .await;
    assert_eq!(
        c.receive_text().await,
        r#"{"errors":["Too many actions in progress on this connection (the limit is 2); retry when one has answered."],"data":null,"action":"wait","response_status":503,"request_id":3}"#
    );
    // Non-detached actions are not counted.
    assert_eq!(
        c.request(json!({"action": "echo", "request_id": 4})).await["response_status"],
        200
    );
    let release = &RELEASE;
    release.notify_one();
    let done = c.receive_json().await;
    assert_eq!(done["data"], "released");
    // The finished one gave its slot back.
    c.send_json(json!({"action": "wait", "request_id": 5}))
        .await;
    c.receive_nothing().await;
    release.notify_one();
    release.notify_one();
    let mut ids = vec![
        c.receive_json().await["request_id"].clone(),
        c.receive_json().await["request_id"].clone(),
    ];
    ids.sort_by_key(|v| v.as_i64());
    let first = done["request_id"].as_i64().unwrap();
    let mut expected: Vec<i64> = [1, 2, 5].into_iter().filter(|&i| i != first).collect();
    expected.sort();
    assert_eq!(
        ids,
        expected.into_iter().map(Value::from).collect::<Vec<_>>()
    );
}

// ---- 4. RFC 6455 closes and keepalive. ----

#[tokio::test]
async fn a_client_close_is_answered_with_its_own_code() {
    let s = start(Dcrf::new()).await;
    for code in [1000u16, 4000, 4999] {
        let mut raw = Raw::open(s.addr, "/ws/", "").await;
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        raw.send(&frame(0x88, &payload, true)).await;
        assert_eq!(raw.close_code().await, Some(code));
    }
}

#[tokio::test]
async fn protocol_violations_close_with_1002() {
    let s = start(Dcrf::new()).await;
    let text = br#"{"action":"echo"}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("RSV1 set", frame(0x81 | 0x40, text, true)),
        ("RSV3 set", frame(0x81 | 0x10, text, true)),
        ("reserved data opcode", frame(0x83, text, true)),
        ("reserved control opcode", frame(0x8b, b"", true)),
        ("unmasked client frame", frame(0x81, text, false)),
        ("fragmented ping", frame(0x09, b"ping", true)),
        ("ping over 125 bytes", frame(0x89, &[b'p'; 126], true)),
        ("continuation without a start", frame(0x80, text, true)),
    ];
    for (what, bytes) in cases {
        let mut raw = Raw::open(s.addr, "/ws/", "").await;
        raw.send(&bytes).await;
        assert_eq!(raw.close_code().await, Some(1002), "{what}");
    }
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let s = start(Dcrf::new()).await;
    let mut raw = Raw::open(s.addr, "/ws/", "").await;
    raw.send(&frame(0x81, b"{\"action\":\"\xff\xfe\"}", true))
        .await;
    assert_eq!(raw.close_code().await, Some(1007));
}

#[tokio::test]
async fn keepalive_pings_and_closes_a_peer_that_never_answers() {
    let s = start(
        Dcrf::new()
            .ping_interval(Duration::from_millis(200))
            .pong_timeout(Duration::from_millis(200)),
    )
    .await;
    let start = Instant::now();
    let mut raw = Raw::open(s.addr, "/ws/", "").await;
    let (opcode, _) = raw.read_frame().await.unwrap();
    assert_eq!(opcode, 0x9, "a ping");
    let pinged_after = start.elapsed();
    assert_eq!(raw.close_code().await, Some(1011));
    let closed_after = start.elapsed();
    eprintln!("silent peer: pinged after {pinged_after:?}, closed after {closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(380),
        "{closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_millis(1500),
        "{closed_after:?}"
    );
}

#[tokio::test]
async fn keepalive_keeps_a_peer_that_answers_pings() {
    let s = start(
        Dcrf::new()
            .ping_interval(Duration::from_millis(100))
            .pong_timeout(Duration::from_millis(100)),
    )
    .await;
    let mut raw = Raw::open(s.addr, "/ws/", "").await;
    let until = Instant::now() + Duration::from_millis(1000);
    let mut pongs = 0;
    while Instant::now() < until {
        match raw.read_frame().await {
            Some((0x9, payload)) => {
                raw.send(&frame(0x8a, &payload, true)).await;
                pongs += 1;
            }
            other => panic!("expected pings only, got {other:?}"),
        }
    }
    assert!(pongs >= 5, "{pongs} pings in 1 s");
    raw.send_text(r#"{"action":"echo","request_id":1}"#).await;
    assert_eq!(
        raw.read_text().await,
        r#"{"errors":[],"data":{},"action":"echo","response_status":200,"request_id":1}"#
    );
}

// ---- 5. JWT. ----

fn jwt_server() -> Dcrf {
    Dcrf::new().authenticator(jwt())
}

fn with_token(
    s: &TestServer,
    token: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = s.url("/ws/").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test]
async fn jwt_refusals_say_what_the_client_can_act_on() {
    let s = start(jwt_server()).await;
    let cases = [
        (json!({"sub": "1", "exp": now() - 10}), "Token has expired."),
        (
            json!({"sub": "1", "exp": now() + 60, "nbf": now() + 30}),
            "Token is not valid yet.",
        ),
        (json!({"sub": "1"}), "Invalid token."),
        (
            json!({"sub": "1", "exp": now() + 60, "aud": "elsewhere"}),
            "Token is not meant for this service.",
        ),
    ];
    for (claims, message) in cases {
        let token = sign(claims.clone());
        assert_eq!(
            refused(with_token(&s, &token)).await,
            (401, message.to_owned()),
            "{claims}"
        );
    }
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "1", "exp": now() + 60}),
        &jsonwebtoken::EncodingKey::from_secret(b"another secret").unwrap(),
    )
    .unwrap();
    assert_eq!(
        refused(with_token(&s, &forged)).await,
        (401, "Invalid token.".to_owned())
    );
    assert_eq!(
        refused(with_token(&s, "garbage")).await,
        (401, "Invalid token.".to_owned())
    );
    // A valid nbf is fine.
    let token = sign(json!({"sub": "1", "exp": now() + 60, "nbf": now() - 5}));
    TestClient::connect_request(with_token(&s, &token))
        .await
        .unwrap();
}

#[tokio::test]
async fn jwt_issuer_and_audience_are_checked_when_configured() {
    let app = Dcrf::new().authenticator(jwt().issuer("https://login.example").audience("dcrf"));
    let s = start(app).await;
    let good =
        json!({"sub": "1", "exp": now() + 60, "iss": "https://login.example", "aud": "dcrf"});
    TestClient::connect_request(with_token(&s, &sign(good)))
        .await
        .unwrap();
    let cases = [
        (
            json!({"sub": "1", "exp": now() + 60, "iss": "https://evil.example", "aud": "dcrf"}),
            "Token was issued by an untrusted issuer.",
        ),
        (
            json!({"sub": "1", "exp": now() + 60, "aud": "dcrf"}),
            "Invalid token.",
        ),
        (
            json!({"sub": "1", "exp": now() + 60, "iss": "https://login.example", "aud": "other"}),
            "Token is not meant for this service.",
        ),
        (
            json!({"sub": "1", "exp": now() + 60, "iss": "https://login.example"}),
            "Invalid token.",
        ),
    ];
    for (claims, message) in cases {
        assert_eq!(
            refused(with_token(&s, &sign(claims.clone()))).await,
            (401, message.to_owned()),
            "{claims}"
        );
    }
    // Tokens it issues carry both.
    let issued = jwt()
        .issuer("https://login.example")
        .audience("dcrf")
        .issue("7", "ada", 60)
        .unwrap();
    TestClient::connect_request(with_token(&s, &issued))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_malformed_authorization_header_is_401_not_anonymous() {
    let s = start(jwt_server()).await;
    for value in [
        "Basic YWRhOnB3",
        "Bearer",
        "Bearer   ",
        "Token abc",
        "garbage",
    ] {
        let mut req = s.url("/ws/").into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", value.parse().unwrap());
        assert_eq!(
            refused(req).await,
            (
                401,
                "Invalid Authorization header; expected \"Bearer <token>\".".to_owned()
            ),
            "{value}"
        );
    }
    // No header at all is anonymous.
    let mut c = TestClient::connect(&s.url("/ws/")).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 1}))
            .await["data"],
        Value::Null
    );
}

#[tokio::test]
async fn an_expired_token_closes_the_socket_with_4401() {
    let s = start(jwt_server()).await;
    let token = jwt().issue("1", "ada", 2).unwrap();
    let mut c = TestClient::connect_request(with_token(&s, &token))
        .await
        .unwrap();
    let start = Instant::now();
    let close = c.receive_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4401);
    assert_eq!(close.reason.as_str(), "token expired");
    assert!(start.elapsed() <= Duration::from_millis(2500));
}

#[tokio::test]
async fn refresh_token_moves_the_expiry() {
    let s = start(jwt_server()).await;
    let token = jwt().issue("1", "ada", 2).unwrap();
    let mut c = TestClient::connect_request(with_token(&s, &token))
        .await
        .unwrap();
    let fresh = jwt().issue("1", "ada", 60).unwrap();
    let exp = now() + 60;
    let reply = c
        .request(json!({"action": "refresh_token", "token": fresh, "request_id": 1}))
        .await;
    // The clock may tick between the two `now()`s.
    let got = reply["data"]["exp"].as_u64().unwrap();
    assert!(got == exp || got + 1 == exp, "{reply}");
    assert_eq!(
        reply,
        json!({"errors": [], "data": {"exp": got}, "action": "refresh_token", "response_status": 200, "request_id": 1})
    );
    // Past the old expiry, still open.
    c.receive_nothing_for(Duration::from_millis(2500)).await;
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 2}))
            .await["data"]["id"],
        "1"
    );
}

#[tokio::test]
async fn refresh_token_with_a_bad_token_is_401_and_the_old_expiry_stays() {
    let s = start(jwt_server()).await;
    let token = jwt().issue("1", "ada", 2).unwrap();
    let mut c = TestClient::connect_request(with_token(&s, &token))
        .await
        .unwrap();
    assert_eq!(
        c.request(json!({"action": "refresh_token", "token": "garbage", "request_id": 1}))
            .await,
        json!({"errors": ["Invalid token."], "data": null, "action": "refresh_token", "response_status": 401, "request_id": 1})
    );
    let expired = sign(json!({"sub": "1", "exp": now() - 1}));
    assert_eq!(
        c.request(json!({"action": "refresh_token", "token": expired, "request_id": 2}))
            .await,
        json!({"errors": ["Token has expired."], "data": null, "action": "refresh_token", "response_status": 401, "request_id": 2})
    );
    assert_eq!(
        c.request(json!({"action": "refresh_token", "request_id": 3}))
            .await,
        json!({"errors": [{"token": ["This field is required."]}], "data": null, "action": "refresh_token", "response_status": 400, "request_id": 3})
    );
    let close = c.receive_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 4401);
}

#[tokio::test]
async fn refresh_token_for_another_user_is_403() {
    let s = start(jwt_server()).await;
    let token = jwt().issue("1", "ada", 60).unwrap();
    let mut c = TestClient::connect_request(with_token(&s, &token))
        .await
        .unwrap();
    let other = jwt().issue("2", "eve", 600).unwrap();
    assert_eq!(
        c.request(json!({"action": "refresh_token", "token": other, "request_id": 1}))
            .await,
        json!({"errors": ["The token belongs to a different user."], "data": null, "action": "refresh_token", "response_status": 403, "request_id": 1})
    );
    // An anonymous socket cannot log in this way either.
    let mut anon = TestClient::connect(&s.url("/ws/")).await.unwrap();
    let token = jwt().issue("1", "ada", 60).unwrap();
    assert_eq!(
        anon.request(json!({"action": "refresh_token", "token": token, "request_id": 1}))
            .await["response_status"],
        403
    );
    assert_eq!(
        anon.request(json!({"action": "whoami", "request_id": 2}))
            .await["data"],
        Value::Null
    );
}

#[tokio::test]
async fn refresh_token_is_an_ordinary_action_without_a_refreshing_authenticator() {
    let s = start(Dcrf::new()).await;
    let mut c = TestClient::connect(&s.url("/ws/")).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "refresh_token", "token": "x", "request_id": 1}))
            .await,
        json!({"errors": ["Method \"refresh_token\" not allowed."], "data": null, "action": "refresh_token", "response_status": 405, "request_id": 1})
    );
}

// ---- 6. Origin of cookie sockets. ----

#[tokio::test]
async fn cookie_sockets_must_be_same_origin_without_an_allow_list() {
    let s = start(Dcrf::new()).await;
    let with = |origin: Option<&str>, cookie: bool| {
        let mut req = s.url("/ws/").into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        if cookie {
            req.headers_mut()
                .insert("cookie", "sessionid=abc".parse().unwrap());
        }
        req
    };
    let same = format!("http://{}", s.addr);
    let other_port = format!("http://127.0.0.1:{}", s.addr.port() + 1);
    assert_eq!(
        TestClient::refused_status(with(Some(&same), true)).await,
        None
    );
    assert_eq!(
        refused(with(Some("https://evil.example"), true)).await,
        (403, "origin not allowed".to_owned())
    );
    assert_eq!(
        TestClient::refused_status(with(Some(&other_port), true)).await,
        Some(403)
    );
    assert_eq!(
        TestClient::refused_status(with(None, true)).await,
        Some(403)
    );
    // Without cookies nothing is checked.
    assert_eq!(
        TestClient::refused_status(with(Some("https://evil.example"), false)).await,
        None
    );
    assert_eq!(TestClient::refused_status(with(None, false)).await, None);
    // Behind a proxy: `Host` without a port is the origin scheme's default port.
    let behind = |origin: &str, host: &str| {
        let mut req = with(Some(origin), true);
        req.headers_mut().insert("host", host.parse().unwrap());
        req
    };
    for (origin, host, status) in [
        ("https://app.example", "app.example", None),
        ("https://app.example:443", "app.example", None),
        ("http://APP.example", "app.example:80", None),
        ("https://app.example", "app.example:8443", Some(403)),
        ("http://app.example", "app.example:443", Some(403)),
        ("https://other.example", "app.example", Some(403)),
    ] {
        assert_eq!(
            TestClient::refused_status(behind(origin, host)).await,
            status,
            "{origin} on {host}"
        );
    }
}
