//! The built binary under hostile conditions: a client holding a half-sent request at
//! shutdown, running out of file descriptors, and the built-in JWT secret on a public address.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dcrf::testing::TestClient;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The demo binary with an in-memory database, logs at `info`, and no secret from the
/// environment.
fn demo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dcrf-demo"));
    cmd.args(["--database", "sqlite::memory:"])
        .env_remove("DCRF_DEMO_JWT_SECRET")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A started server: the child and the address it printed.
struct Running {
    child: Option<Child>,
    addr: String,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().expect("start dcrf-demo");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let Some(addr) = first.strip_prefix("dcrf-demo listening on ") else {
            let _ = child.kill();
            panic!("unexpected first line: {first:?}");
        };
        Running {
            addr: addr.to_owned(),
            child: Some(child),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit; kills it and fails after that.
    async fn exit_within(
        mut self,
        limit: Duration,
    ) -> (std::process::ExitStatus, String, Duration) {
        let start = Instant::now();
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let (exited, exit) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let status = child.wait();
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            let _ = exited.send((status, stderr));
        });
        match tokio::time::timeout(limit, exit).await {
            Ok(Ok((status, stderr))) => (status.unwrap(), stderr, start.elapsed()),
            _ => {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                panic!("dcrf-demo did not exit within {limit:?}");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU time (user + system) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesized command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn sigterm_exits_within_the_shutdown_cap_while_a_client_holds_a_half_sent_request() {
    let mut cmd = demo();
    cmd.args(["--bind", "127.0.0.1:0"]);
    let server = Running::start(cmd);
    let mut half = TcpStream::connect(&server.addr).await.unwrap();
    half.write_all(b"GET /ws/echo/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // And a socket that never sent a byte.
    let _silent = TcpStream::connect(&server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.signal("-TERM");
    // The cap is 10 s (the default shutdown timeout); a half-sent request is dropped at once.
    let (status, _, took) = server.exit_within(Duration::from_secs(12)).await;
    eprintln!("exited {took:?} after SIGTERM with a half-sent request held open");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn the_built_in_jwt_secret_is_refused_on_a_non_loopback_address() {
    let mut cmd = demo();
    cmd.args(["--bind", "0.0.0.0:0"]);
    let child = cmd.spawn().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "it never listened");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:")
            && stderr.contains("with the built-in JWT secret"),
        "{stderr}"
    );
    // With a secret of its own it serves there.
    let mut cmd = demo();
    cmd.args(["--bind", "0.0.0.0:0", "--jwt-secret", "a secret of our own"]);
    let server = Running::start(cmd);
    assert!(server.addr.starts_with("0.0.0.0:"));
}

#[tokio::test]
async fn the_built_in_jwt_secret_is_a_warning_on_loopback() {
    let mut cmd = demo();
    cmd.args(["--bind", "127.0.0.1:0"]);
    let server = Running::start(cmd);
    server.signal("-TERM");
    let (status, stderr, _) = server.exit_within(Duration::from_secs(12)).await;
    assert!(status.success());
    assert!(
        stderr.contains("WARN") && stderr.contains("serving with the built-in JWT secret"),
        "{stderr}"
    );
}

#[tokio::test]
async fn running_out_of_file_descriptors_neither_stops_nor_spins_the_accept_loop() {
    // A shell lowers the limit, then becomes the server.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "ulimit -n 64 && exec \"$0\" --bind 127.0.0.1:0 --database sqlite::memory:",
        env!("CARGO_BIN_EXE_dcrf-demo"),
    ])
    .env_remove("DCRF_DEMO_JWT_SECRET")
    .env("RUST_LOG", "error")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let server = Running::start(cmd);
    let pid = server.pid();
    // More connections than the server has descriptors: the kernel completes them, the server
    // cannot accept them all (EMFILE).
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(TcpStream::connect(&server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    eprintln!("CPU while out of descriptors: {used} ticks in 1 s");
    // A spinning loop would burn a whole core (~100 ticks).
    assert!(used < 30, "{used} ticks in 1 s");
    // Freed descriptors: the server accepts again.
    drop(held);
    let url = format!("ws://{}/ws/echo/", server.addr);
    let start = Instant::now();
    let mut client = loop {
        match TestClient::connect(&url).await {
            Ok(c) => break c,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("server did not recover: {e}"),
        }
    };
    assert_eq!(
        client
            .request(json!({"action": "echo", "request_id": 1, "ok": true}))
            .await,
        json!({"errors": [], "data": {"ok": true}, "action": "echo", "response_status": 200, "request_id": 1})
    );
}

#[tokio::test]
async fn rate_limit_answers_429_and_keeps_the_socket() {
    let mut cmd = demo();
    cmd.args(["--bind", "127.0.0.1:0", "--rate-limit", "5"]);
    let server = Running::start(cmd);
    let mut c = TestClient::connect(&format!("ws://{}/ws/echo/", server.addr))
        .await
        .unwrap();
    // 5 frames of burst pass; the next ones, sent at once, are throttled.
    for n in 0..12 {
        c.send_json(json!({"action": "echo", "request_id": n, "n": n}))
            .await;
    }
    let mut ok = 0;
    let mut throttled = 0;
    for n in 0..12 {
        let reply = c.receive_json().await;
        assert_eq!(reply["request_id"], n, "one answer per frame, in order");
        match reply["response_status"].as_u64() {
            Some(200) => ok += 1,
            Some(429) => {
                throttled += 1;
                assert_eq!(
                    reply,
                    json!({"errors": ["Request was throttled. Expected available in 1 seconds."],
                           "data": null, "action": "echo", "response_status": 429, "request_id": n})
                );
            }
            _ => panic!("unexpected {reply}"),
        }
    }
    assert!((5..=6).contains(&ok), "{ok} passed");
    assert_eq!(ok + throttled, 12);
    // The socket is kept; a second later the bucket has refilled.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = c
        .request(json!({"action": "echo", "request_id": "later", "x": 1}))
        .await;
    assert_eq!(reply["response_status"], 200);
    assert_eq!(reply["data"], json!({"x": 1}));
}
