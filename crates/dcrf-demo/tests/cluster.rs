//! Several `dcrf-demo` processes sharing a database and a Redis channel layer: a change made
//! through one server reaches subscribers of the other, also after Redis restarts.
//!
//! Needs `REDIS_URL` (skipped with a message when unset). Uses PostgreSQL when `DATABASE_URL` is
//! set, else a SQLite file shared by the processes. The restart test runs its own
//! `redis-server` on a free port (skipped when the binary is missing).

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

/// A database both processes can reach: a fresh PostgreSQL schema, or a SQLite file.
async fn shared_database(tag: &str) -> (String, Option<tempdir::Dir>) {
    match std::env::var("DATABASE_URL") {
        Ok(url) => (postgres_schema_url(&url).await, None),
        Err(_) => {
            let dir = tempdir::Dir::new(tag);
            let url = format!(
                "sqlite://{}?mode=rwc",
                dir.path.join("cluster.db").display()
            );
            (url, Some(dir))
        }
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
async fn a_change_through_one_node_reaches_subscribers_of_the_other() {
    let Ok(redis) = std::env::var("REDIS_URL") else {
        println!("SKIPPED: REDIS_URL is not set; multi-node test not run");
        return;
    };
    let (database, _dir) = shared_database("cluster").await;
    let a = Demo::start(&database, &redis, 3);
    let b = Demo::start(&database, &redis, 0);
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

fn start_redis(port: u16) -> Option<Child> {
    let child = Command::new("redis-server")
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
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_recover_after_redis_restarts() {
    if std::env::var("REDIS_URL").is_err() {
        println!("SKIPPED: REDIS_URL is not set; Redis restart test not run");
        return;
    }
    let port = free_port();
    let Some(mut redis) = start_redis(port) else {
        println!("SKIPPED: cannot start redis-server; Redis restart test not run");
        return;
    };
    let layer = format!("redis://127.0.0.1:{port}");
    let (database, _dir) = shared_database("restart").await;
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
    let _ = redis.kill();
    let _ = redis.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut redis = start_redis(port).expect("restart redis-server");

    // Writes go on (the database does not need Redis); pushes resume once both nodes have
    // reconnected and resubscribed: retry until one arrives, within a few seconds.
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
    let _ = redis.kill();
    let _ = redis.wait();
}
