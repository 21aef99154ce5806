//! Several `dcrf-demo` processes sharing a database and a Redis channel layer: a change made
//! through one server reaches subscribers of the other, also after Redis restarts.
//!
//! Every test needs Redis and fails without `REDIS_URL`, which says Redis is available here;
//! each runs once on a SQLite file shared by the processes (`..._sqlite`) and once on a
//! PostgreSQL schema (`..._postgres`, needs `DATABASE_URL`). The test script leaves `redis` /
//! `postgres` tests out when the service is unavailable. Redis channels are global to a
//! server and tests run in parallel, so each test runs a `redis-server` of its own on a free
//! port.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dcrf::testing::{TestClient, postgres_schema_url};
use serde_json::{Value, json};

/// A demo server process, killed on drop.
struct Demo {
    child: Child,
    addr: String,
}

impl Demo {
    fn start(database: &str, layer: &str, seed: u64) -> Demo {
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

    fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
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
enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh schema of the PostgreSQL database of `DATABASE_URL`.
    Postgres,
}

/// A database both processes can reach: a fresh PostgreSQL schema, or a SQLite file.
async fn shared_database(backend: Backend, tag: &str) -> (String, Option<tempdir::Dir>) {
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
fn require_redis() {
    if std::env::var_os("REDIS_URL").is_none() {
        panic!(
            "REDIS_URL is not set: this test needs Redis; run it through scripts/test.sh, \
             which filters it out when Redis is unavailable"
        );
    }
}

/// A temporary directory removed on drop (std only).
mod tempdir {
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

async fn subscribe_both(c: &mut TestClient, pk: i64) {
    assert_eq!(
        c.request(json!({"action": "subscribe_to_all", "request_id": "all"}))
            .await,
        json!({"errors": [], "data": {"subscribed": true}, "action": "subscribe_to_all", "response_status": 201, "request_id": "all"})
    );
    assert_eq!(
        c.request(json!({"action": "subscribe_instance", "pk": pk, "request_id": "one"}))
            .await["response_status"],
        json!(201)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_change_through_one_node_reaches_subscribers_of_the_other_sqlite() {
    a_change_through_one_node_reaches_subscribers_of_the_other(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_change_through_one_node_reaches_subscribers_of_the_other_postgres() {
    a_change_through_one_node_reaches_subscribers_of_the_other(Backend::Postgres).await;
}

async fn a_change_through_one_node_reaches_subscribers_of_the_other(backend: Backend) {
    require_redis();
    let redis = RedisServer::start_on_free_port();
    let (database, _dir) = shared_database(backend, "cluster").await;
    let a = Demo::start(&database, &redis.url(), 3);
    let b = Demo::start(&database, &redis.url(), 0);
    let mut sub = TestClient::connect(&a.url("/ws/todos/")).await.unwrap();
    subscribe_both(&mut sub, 2).await;
    let mut writer = TestClient::connect(&b.url("/ws/todos/")).await.unwrap();
    assert_eq!(
        writer
            .request(json!({"action": "patch", "pk": 2, "data": {"done": true}, "request_id": 1}))
            .await["response_status"],
        json!(200)
    );
    let todo = json!({"id": 2, "title": "Todo 2", "done": true, "owner": ""});
    let mut pushes = vec![sub.receive_json().await, sub.receive_json().await];
    pushes.sort_by_key(|p| p["request_id"].to_string());
    assert_eq!(
        pushes,
        vec![
            json!({"errors": [], "data": todo, "action": "update", "response_status": 200, "request_id": "all"}),
            json!({"errors": [], "data": todo, "action": "update", "response_status": 200, "request_id": "one"}),
        ]
    );
    // A bulk statement on node B is observed on node A, one push per row.
    assert_eq!(
        writer
            .request(
                json!({"action": "bulk_set_done", "ids": [1, 3], "done": true, "request_id": 2})
            )
            .await["data"],
        json!({"updated": 2})
    );
    let mut ids: Vec<Value> = vec![
        sub.receive_json().await["data"]["id"].clone(),
        sub.receive_json().await["data"]["id"].clone(),
    ];
    ids.sort_by_key(|v| v.as_i64());
    assert_eq!(ids, vec![json!(1), json!(3)]);
    // A create on B reaches subscribe_to_all on A.
    writer
        .request(json!({"action": "create", "data": {"title": "from B"}, "request_id": 3}))
        .await;
    let push = sub.receive_json().await;
    assert_eq!(push["action"], json!("create"));
    assert_eq!(push["data"]["title"], json!("from B"));
    sub.receive_nothing().await;
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `redis-server` process, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    /// Starts `redis-server` on a free port (trying another if the port was taken meanwhile).
    fn start_on_free_port() -> RedisServer {
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
    fn start(port: u16) -> RedisServer {
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
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server and waits until it has exited (its port is closed then).
    fn stop(mut self) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_recover_after_redis_restarts_sqlite() {
    subscriptions_recover_after_redis_restarts(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_recover_after_redis_restarts_postgres() {
    subscriptions_recover_after_redis_restarts(Backend::Postgres).await;
}

async fn subscriptions_recover_after_redis_restarts(backend: Backend) {
    require_redis();
    let redis = RedisServer::start_on_free_port();
    let port = redis.port;
    let layer = redis.url();
    let (database, _dir) = shared_database(backend, "restart").await;
    let a = Demo::start(&database, &layer, 1);
    let b = Demo::start(&database, &layer, 0);
    let mut sub = TestClient::connect(&a.url("/ws/todos/")).await.unwrap();
    subscribe_both(&mut sub, 1).await;
    let mut writer = TestClient::connect(&b.url("/ws/todos/")).await.unwrap();
    writer
        .request(json!({"action": "patch", "pk": 1, "data": {"owner": "before"}, "request_id": 1}))
        .await;
    assert_eq!(sub.receive_json().await["data"]["owner"], json!("before"));
    assert_eq!(sub.receive_json().await["data"]["owner"], json!("before"));

    // Restart Redis on the same port.
    redis.stop();
    let redis = RedisServer::start(port);

    // Writes go on (the database does not need Redis); pushes resume once both nodes have
    // reconnected and resubscribed. Nothing outside the nodes tells when that is done, so:
    // write again, each time waiting up to 500 ms for the push, for at most 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    let push = loop {
        n += 1;
        let owner = format!("after-{n}");
        let reply = writer
            .request(json!({"action": "patch", "pk": 1, "data": {"owner": owner}, "request_id": n}))
            .await;
        assert_eq!(reply["response_status"], json!(200));
        let got = tokio::time::timeout(Duration::from_millis(500), async {
            sub.receive_json().await
        })
        .await;
        if let Ok(push) = got {
            break push;
        }
        assert!(
            Instant::now() < deadline,
            "no push within 10 s of the restart"
        );
    };
    assert_eq!(push["action"], json!("update"));
    assert!(
        push["data"]["owner"]
            .as_str()
            .unwrap()
            .starts_with("after-")
    );
    redis.stop();
}
