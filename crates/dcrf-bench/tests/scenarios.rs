//! Runs every scenario briefly against real servers on 127.0.0.1: the bench's own raw echo
//! server, and the dcrf demo (built with `cargo build -p dcrf-demo` on first use).

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

/// The demo binary, built once per test run next to this crate's binary.
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
                .args(["build", "-p", "dcrf-demo", "--manifest-path"])
                .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"));
            if dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("cargo runs");
            assert!(status.success(), "cargo build -p dcrf-demo failed");
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
        "echo", "retrieve", "list", "create", "patch", "fanout", "idle", "raw-echo",
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
    let url = server.url("/ws/todos/");
    for (how, rate) in [("instance", None), ("all", None), ("instance", Some("50"))] {
        let mut args = vec![
            "fanout",
            "--url",
            &url,
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
        assert!(num(&v, "deliveries_per_s") > 0.0, "{v}");
        assert_eq!(num(&v, "errors"), 0.0, "{v}");
        assert_eq!(num(&v, "unmatched"), 0.0, "{v}");
        assert_eq!(v["subscribe"], how);
    }
}
