//! Runs every scenario briefly against real servers on 127.0.0.1: the bench's own raw echo
//! server, and the dcrf demo (the binary `cargo test --workspace` builds, asked for on first
//! use); checks that the raw-retrieve anchor answers with the demo's bytes and that raw-fanout
//! serves the fan-out scenario.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_dcrf-bench");

/// A server process, killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    /// Starts `cmd` and waits for the line `... listening on ADDR` on its stdout.
    fn start(mut cmd: Command) -> Result<Server, String> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some((_, addr)) = line.split_once("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                    sent = true;
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => {
                // Keep draining stderr so the server never blocks on it.
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut stderr, &mut std::io::sink());
                });
                Ok(Server { child, addr })
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let mut err = String::new();
                let _ = stderr.read_to_string(&mut err);
                Err(format!("{cmd:?} did not start: {err}"))
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_echo() -> Server {
    let mut cmd = Command::new(BENCH);
    cmd.args(["raw-echo", "--bind", "127.0.0.1:0", "--threads", "2"]);
    Server::start(cmd).expect("raw-echo starts")
}

/// The demo binary next to this crate's binary. Cargo is asked for the workspace's test build,
/// the one that built these tests (a no-op then, and never a stale binary): building the demo
/// package alone (`-p dcrf-demo`) would resolve its features alone and compile dcrf and much of
/// the dependency graph a second time.
fn demo_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = PathBuf::from(BENCH)
                .parent()
                .expect("binary directory")
                .to_path_buf();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args([
                    "test",
                    "--workspace",
                    "--no-run",
                    "--quiet",
                    "--manifest-path",
                ])
                .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"));
            if dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("cargo runs");
            assert!(status.success(), "cargo test --workspace --no-run failed");
            dir.join("dcrf-demo")
        })
        .clone()
}

/// Starts the demo on a free port with an in-memory database and `seed` todos.
fn demo(seed: u64) -> Server {
    let mut cmd = Command::new(demo_binary());
    cmd.args(["--bind", "127.0.0.1:0", "--database", "sqlite::memory:"])
        .args(["--seed", &seed.to_string()])
        .env("RUST_LOG", "warn");
    Server::start(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// The HTTP status the server answers to a WebSocket handshake on `path`.
fn handshake_status(addr: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The demo, checked to serve `/ws/todos/`.
fn demo_with_todos(seed: u64) -> Server {
    let server = demo(seed);
    assert_eq!(
        handshake_status(&server.addr, "/ws/todos/"),
        101,
        "the demo's handshake on /ws/todos/"
    );
    server
}

/// Runs the bench with `--json` and returns its results; `Err(stderr)` if it failed.
fn try_bench(args: &[&str]) -> Result<Value, String> {
    let out = Command::new(BENCH)
        .args(args)
        .args(["--json", "--threads", "2"])
        .output()
        .expect("dcrf-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("last line is not JSON ({e}): {stdout}"))
}

fn bench(args: &[&str]) -> Value {
    try_bench(args).unwrap_or_else(|e| panic!("dcrf-bench {args:?} failed: {e}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing in {v}"))
}

/// The checks every request/reply run must pass.
fn assert_clean(v: &Value) {
    for key in [
        "msgs_per_s",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "client_cpu_pct",
        "connections",
        "duration_s",
        "sent",
        "received",
    ] {
        num(v, key);
    }
    assert!(num(v, "received") > 0.0, "no replies: {v}");
    assert!(num(v, "msgs_per_s") > 0.0, "{v}");
    assert!(
        num(v, "p50_us") > 0.0 && num(v, "p99_us") >= num(v, "p50_us"),
        "{v}"
    );
    assert_eq!(num(v, "errors"), 0.0, "errors: {v}");
    assert_eq!(num(v, "unmatched"), 0.0, "unmatched: {v}");
    assert!(v["client_saturated"].is_boolean(), "{v}");
}

const SHORT: [&str; 4] = ["--duration", "0.6", "--warmup", "0.2"];

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BENCH).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--url",
        "--connections",
        "--duration",
        "--json",
        "--window",
        "--rate",
        "--warmup",
        "--rows",
        "--threads",
        "--subscribe",
        "--pk",
        "--server-pid",
        "--bind",
        "--label",
        "--connect-concurrency",
        "--payload",
        "--timeout",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
    for scenario in [
        "echo",
        "retrieve",
        "list",
        "create",
        "patch",
        "fanout",
        "idle",
        "raw-echo",
        "raw-retrieve",
        "raw-fanout",
        "--database",
    ] {
        assert!(
            help.contains(scenario),
            "--help does not mention {scenario}"
        );
    }
}

#[test]
fn missing_url_is_an_error() {
    let out = Command::new(BENCH).args(["echo"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--url"));
}

#[test]
fn raw_echo_closed_and_open_loop() {
    let server = raw_echo();
    let url = server.url("/ws/echo/");
    let pid = server.pid();
    let mut args = vec!["echo", "--url", &url, "--connections", "4", "--window", "8"];
    args.extend(SHORT);
    args.extend(["--server-pid", &pid, "--label", "raw"]);
    let v = bench(&args);
    assert_clean(&v);
    assert_eq!(v["scenario"], "echo");
    assert_eq!(v["label"], "raw");
    assert_eq!(num(&v, "lost"), 0.0);
    assert!(v["server_cpu_pct"].is_number(), "{v}");

    let mut args = vec!["echo", "--url", &url, "--connections", "4", "--rate", "400"];
    args.extend(SHORT);
    let v = bench(&args);
    assert_clean(&v);
    assert_eq!(num(&v, "target_rate"), 400.0);
    // The open loop's schedule is fixed: each of the 4 connections is due every 4/400 s = 10 ms
    // (staggered by 2.5 ms), and sends that fall behind are caught up, not dropped. Exactly 60
    // due times per connection fall in the 0.6 s window [0.2 s, 0.8 s), however loaded the
    // machine is.
    assert_eq!(num(&v, "sent"), 240.0, "{v}");
}

#[test]
fn raw_echo_idle_reports_memory() {
    let server = raw_echo();
    let url = server.url("/");
    let pid = server.pid();
    let mut args = vec![
        "idle",
        "--url",
        &url,
        "--connections",
        "30",
        "--server-pid",
        &pid,
    ];
    args.extend(["--duration", "0.3", "--warmup", "0.2"]);
    let v = bench(&args);
    assert_eq!(num(&v, "connections_open"), 30.0, "{v}");
    assert_eq!(num(&v, "errors"), 0.0, "{v}");
    assert!(num(&v, "server_rss_kib") > 0.0, "{v}");
    assert!(v["rss_per_conn_kib"].is_number(), "{v}");
    assert!(num(&v, "p50_us") > 0.0, "handshake latency: {v}");
    assert_eq!(num(&v, "msgs_per_s"), 0.0);
}

#[test]
fn unreachable_server_fails() {
    // Nothing listens on port 1.
    let err = try_bench(&[
        "echo",
        "--url",
        "ws://127.0.0.1:1/",
        "--connections",
        "2",
        "--timeout",
        "2",
    ])
    .expect_err("no server");
    assert!(err.contains("no connection"), "{err}");
}

#[test]
fn demo_echo_and_idle() {
    let server = demo(0);
    let url = server.url("/ws/echo/");
    let pid = server.pid();
    let mut args = vec!["echo", "--url", &url, "--connections", "4", "--window", "4"];
    args.extend(SHORT);
    args.extend(["--server-pid", &pid]);
    let v = bench(&args);
    assert_clean(&v);
    assert_eq!(num(&v, "lost"), 0.0);

    let mut args = vec![
        "idle",
        "--url",
        &url,
        "--connections",
        "30",
        "--server-pid",
        &pid,
    ];
    args.extend(["--duration", "0.3", "--warmup", "0.2"]);
    let v = bench(&args);
    assert_eq!(num(&v, "connections_open"), 30.0, "{v}");
    assert_eq!(num(&v, "errors"), 0.0, "{v}");
    assert!(v["rss_per_conn_kib"].is_number(), "{v}");
}

#[test]
fn demo_todos_request_scenarios() {
    let server = demo_with_todos(200);
    let url = server.url("/ws/todos/");
    for scenario in ["retrieve", "list", "create", "patch"] {
        let mut args = vec![
            scenario,
            "--url",
            &url,
            "--connections",
            "4",
            "--rows",
            "200",
        ];
        args.extend(SHORT);
        let v = bench(&args);
        assert_clean(&v);
        assert_eq!(v["scenario"], scenario);
        assert_eq!(num(&v, "lost"), 0.0, "{v}");
    }
}

#[test]
fn demo_todos_fanout() {
    let server = demo_with_todos(10);
    for v in fanout_runs(&server.url("/ws/todos/")) {
        assert!(num(&v, "deliveries_per_s") > 0.0, "{v}");
    }
}

/// The `fanout` scenario against `url`, per instance, to all, and rate-limited: each run's
/// report, checked for 20 subscribers, every expected delivery, and no error.
fn fanout_runs(url: &str) -> Vec<serde_json::Value> {
    let mut reports = Vec::new();
    for (how, rate) in [("instance", None), ("all", None), ("instance", Some("50"))] {
        let mut args = vec![
            "fanout",
            "--url",
            url,
            "--connections",
            "20",
            "--subscribe",
            how,
        ];
        args.extend(["--pk", "3"]);
        if let Some(r) = rate {
            args.extend(["--rate", r]);
        }
        args.extend(SHORT);
        let v = try_bench(&args).unwrap_or_else(|e| panic!("fanout {how}: {e}"));
        assert_eq!(num(&v, "connections_open"), 20.0, "{v}");
        assert!(num(&v, "deliveries") > 0.0, "{v}");
        assert_eq!(num(&v, "deliveries"), num(&v, "deliveries_expected"), "{v}");
        assert_eq!(num(&v, "errors"), 0.0, "{v}");
        assert_eq!(num(&v, "unmatched"), 0.0, "{v}");
        assert_eq!(v["subscribe"], how);
        reports.push(v);
    }
    reports
}

/// A directory under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("dcrf-bench-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sends every frame on one connection to `url` (all first, then reads as many replies) and
/// returns the replies in order.
fn replies(url: &str, frames: &[&str]) -> Vec<String> {
    use tokio_tungstenite::tungstenite::{Message, connect};
    let (mut ws, _) = connect(url).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    for f in frames {
        ws.send(Message::text(*f)).expect("send");
    }
    let mut out = Vec::new();
    while out.len() < frames.len() {
        match ws.read().expect("read") {
            Message::Text(t) => out.push(t.as_str().to_owned()),
            Message::Close(_) => panic!("{url} closed after {out:?}"),
            _ => {}
        }
    }
    let _ = ws.close(None);
    out
}

#[test]
fn raw_retrieve_replies_like_the_demo() {
    let dir = TempDir::new("raw-retrieve");
    let file = dir.0.join("todos.sqlite3");
    let file = file.to_str().expect("UTF-8 path");
    raw_retrieve_like_demo(
        &format!("sqlite://{file}?mode=rwc"),
        &format!("sqlite://{file}"),
    );
}

/// The same on a fresh schema of the PostgreSQL database of `DATABASE_URL`.
#[test]
fn raw_retrieve_replies_like_the_demo_on_postgres() {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set: this test needs PostgreSQL; run it through \
             scripts/test.sh, which filters it out when PostgreSQL is unavailable"
        )
    });
    let schema = format!("dcrf_bench_raw_{}", std::process::id());
    let admin = |sql: String| {
        let url = url.clone();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let pool = sqlx::PgPool::connect(&url)
                    .await
                    .expect("connect to DATABASE_URL");
                // Our own schema name, no input.
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&pool)
                    .await
                    .expect(&sql);
                pool.close().await;
            });
    };
    admin(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE; CREATE SCHEMA \"{schema}\""
    ));
    let sep = if url.contains('?') { '&' } else { '?' };
    let in_schema = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    raw_retrieve_like_demo(&in_schema, &in_schema);
    admin(format!("DROP SCHEMA \"{schema}\" CASCADE"));
}

/// Starts the demo on `demo_db` (seeded with 25 todos, one patched to need escaping) and
/// raw-retrieve on `raw_db` (the same data), and checks that both answer the same retrieve
/// frames with the same bytes; then runs the `retrieve` scenario against raw-retrieve.
fn raw_retrieve_like_demo(demo_db: &str, raw_db: &str) {
    let mut cmd = Command::new(demo_binary());
    cmd.args([
        "--bind",
        "127.0.0.1:0",
        "--seed",
        "25",
        "--database",
        demo_db,
    ])
    .env("RUST_LOG", "warn");
    let demo = Server::start(cmd).unwrap_or_else(|e| panic!("{e}"));
    // A title and an owner that need escaping, written through the demo.
    let patched = replies(
        &demo.url("/ws/todos/"),
        &[
            r#"{"action":"patch","pk":4,"data":{"title":"q\"b\\s\/ é\n\t\u0001 😀","owner":"ada"},"request_id":1}"#,
        ],
    );
    assert!(
        patched[0].contains(r#""response_status":200"#),
        "{patched:?}"
    );
    let mut cmd = Command::new(BENCH);
    cmd.args(["raw-retrieve", "--bind", "127.0.0.1:0", "--threads", "2"])
        .args(["--database", raw_db]);
    let raw = Server::start(cmd).unwrap_or_else(|e| panic!("{e}"));

    let frames = [
        r#"{"action":"retrieve","pk":1,"request_id":1}"#,
        r#"{"action":"retrieve","pk":4,"request_id":2}"#,
        r#"{"action":"retrieve","pk":25,"request_id":3}"#,
        r#"{"action":"retrieve","pk":26,"request_id":4}"#,
        r#"{"action":"retrieve","pk":0,"request_id":"r-5"}"#,
        r#"{"action":"retrieve","pk":7}"#,
        r#"{"request_id":7,"pk":13,"action":"retrieve"}"#,
        r#"{"action":"retrieve","pk":9999999999,"request_id":8}"#,
    ];
    let want = replies(&demo.url("/ws/todos/"), &frames);
    let got = replies(&raw.url("/any/path/"), &frames);
    for ((frame, w), g) in frames.iter().zip(&want).zip(&got) {
        assert_eq!(g, w, "reply to {frame}");
    }
    assert!(want[1].contains("ada"), "{want:?}");
    assert!(want[3].contains(r#""response_status":404"#), "{want:?}");

    // The retrieve scenario runs against it.
    let url = raw.url("/ws/todos/");
    let mut args = vec![
        "retrieve",
        "--url",
        &url,
        "--connections",
        "4",
        "--rows",
        "25",
    ];
    args.extend(SHORT);
    let v = bench(&args);
    assert_clean(&v);
    assert_eq!(num(&v, "lost"), 0.0);
}

#[test]
fn raw_retrieve_needs_a_database() {
    let out = Command::new(BENCH)
        .args(["raw-retrieve", "--bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--database"));
    let out = Command::new(BENCH)
        .args([
            "raw-retrieve",
            "--bind",
            "127.0.0.1:0",
            "--database",
            "sqlite::memory:",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn raw_fanout_serves_the_fanout_scenario() {
    let mut cmd = Command::new(BENCH);
    cmd.args(["raw-fanout", "--bind", "127.0.0.1:0", "--threads", "2"]);
    let server = Server::start(cmd).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url("/ws/todos/");
    for v in fanout_runs(&url) {
        assert_eq!(num(&v, "duplicates"), 0.0, "{v}");
    }
    // A subscriber of another row gets nothing; the writer gets its reply.
    let frames = [
        r#"{"action":"subscribe_instance","pk":2,"request_id":"s"}"#,
        r#"{"action":"patch","pk":1,"data":{"title":"x"},"request_id":5}"#,
    ];
    let got = replies(&url, &frames);
    assert!(
        got[0].contains(r#""response_status":201,"request_id":"s""#),
        "{got:?}"
    );
    assert_eq!(
        got[1],
        r#"{"errors":[],"data":{"id":1,"title":"x","done":false,"owner":""},"action":"patch","response_status":200,"request_id":5}"#
    );
}
