//! What the multi-process tests share: demo server processes, private `redis-server`s, and
//! databases several processes can reach.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dcrf::testing::postgres_schema_url;

/// A demo server process, killed on drop.
pub struct Demo {
    child: Child,
    pub addr: String,
}

impl Demo {
    pub fn start(database: &str, layer: &str, seed: u64) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dcrf-demo"))
            .args([
                "--bind",
                "127.0.0.1:0",
                "--database",
                database,
                "--layer",
                layer,
            ])
            .args(["--seed", &seed.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dcrf-demo");
        let stdout = child.stdout.take().unwrap();
        // Built before reading, so the process is killed even if the start fails.
        let mut demo = Demo {
            child,
            addr: String::new(),
        };
        let first = BufReader::new(stdout)
            .lines()
            .next()
            .expect("a line")
            .expect("stdout");
        demo.addr = first
            .strip_prefix("dcrf-demo listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_owned();
        demo
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// The server's resident memory, in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(&format!("/proc/{}/status", self.child.id()))
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The database the processes of a test share.
#[derive(Clone, Copy)]
pub enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh schema of the PostgreSQL database of `DATABASE_URL`.
    Postgres,
}

/// A database both processes can reach: a fresh PostgreSQL schema, or a SQLite file.
pub async fn shared_database(backend: Backend, tag: &str) -> (String, Option<tempdir::Dir>) {
    match backend {
        Backend::Postgres => {
            let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
                panic!(
                    "DATABASE_URL is not set: this test needs PostgreSQL; run it through \
                     scripts/test.sh, which filters it out when PostgreSQL is unavailable"
                )
            });
            (postgres_schema_url(&url).await, None)
        }
        Backend::Sqlite => {
            let dir = tempdir::Dir::new(tag);
            let url = format!(
                "sqlite://{}?mode=rwc",
                dir.path.join("cluster.db").display()
            );
            (url, Some(dir))
        }
    }
}

/// Panics unless `REDIS_URL` is set (the mark that Redis is available here).
pub fn require_redis() {
    if std::env::var_os("REDIS_URL").is_none() {
        panic!(
            "REDIS_URL is not set: this test needs Redis; run it through scripts/test.sh, \
             which filters it out when Redis is unavailable"
        );
    }
}

/// A temporary directory removed on drop (std only).
pub mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "dcrf-{tag}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` process, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts `redis-server` on a free port (trying another if the port was taken meanwhile).
    pub fn start_on_free_port() -> RedisServer {
        let mut failures = Vec::new();
        for _ in 0..5 {
            match RedisServer::try_start(free_port()) {
                Ok(server) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("cannot start redis-server: {failures:#?}");
    }

    /// Starts `redis-server` on `port` and waits for its "Ready to accept connections" line.
    pub fn start(port: u16) -> RedisServer {
        RedisServer::try_start(port).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start(port: u16) -> Result<RedisServer, String> {
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (needed by this test): {e}"));
        let stdout = child.stdout.take().unwrap();
        let server = RedisServer { child, port };
        let (ready_tx, ready) = std::sync::mpsc::channel();
        // Reads the log to the end, so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut log = Vec::new();
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Ready to accept connections") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                } else if ready_tx.is_some() {
                    log.push(line);
                }
            }
            if let Some(tx) = ready_tx {
                let _ = tx.send(Err(log.join("\n")));
            }
        });
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(log)) => Err(format!(
                "redis-server on port {port} exited before it was ready:\n{log}"
            )),
            Err(_) => Err(format!(
                "redis-server on port {port} was not ready within 10 s"
            )),
        }
    }

    /// The `--layer` URL of this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server and waits until it has exited (its port is closed then).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This process's resident memory, in KiB (Linux).
pub fn rss_kib() -> u64 {
    rss_kib_of("/proc/self/status")
}

/// The resident memory in a `/proc/PID/status` file, in KiB (0 if it cannot be read).
fn rss_kib_of(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// On its own task: waits until the server has let a client go for being too slow
/// ([`Dcrf::slow_client_closes`](dcrf::Dcrf::slow_client_closes)), then reads the client's
/// close frame. Panics if that takes longer than `within`.
pub fn close_once_let_go(
    app: dcrf::Dcrf,
    mut client: dcrf::testing::TestClient,
    within: Duration,
) -> tokio::task::JoinHandle<Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>> {
    tokio::spawn(async move {
        let deadline = std::time::Instant::now() + within;
        while app.slow_client_closes() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "not let go within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.receive_close().await
    })
}
