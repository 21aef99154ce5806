//! The live-list guarantee as a seeded model test: writers make random creates, patches,
//! deletes and bulk updates through `dcrf-demo` processes while live-list subscribers with
//! different filters apply the snapshot and every push; some disconnect and resume with
//! `since` (on the other node, when there are two). At the end every subscriber's view equals
//! what `list` returns with its filters.
//!
//! Runs on SQLite with the in-memory layer (one node; subscribers resume on it) and on
//! PostgreSQL with Redis (two nodes sharing a private `redis-server`). `DCRF_MODEL_SEED`
//! replays a seed; `DCRF_MODEL_OPS` sets the writes per writer.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Backend, Demo, RedisServer, require_redis, shared_database};
use dcrf::testing::TestClient;
use serde_json::{Value, json};

/// splitmix64: a small, seedable generator (the test must replay from its seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn seed() -> u64 {
    std::env::var("DCRF_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        })
}

fn ops_per_writer() -> usize {
    std::env::var("DCRF_MODEL_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

const OWNERS: [&str; 3] = ["a", "b", ""];

/// One writer: random writes through one node.
async fn writer(url: String, seed: u64, ops: usize, ids: Arc<Mutex<Vec<i64>>>) {
    let mut rng = Rng(seed);
    let mut c = TestClient::connect(&url).await.unwrap();
    for n in 0..ops {
        let known: Vec<i64> = ids.lock().unwrap().clone();
        let pick = |rng: &mut Rng| known[rng.below(known.len() as u64) as usize];
        let owner = OWNERS[rng.below(3) as usize];
        let frame = match rng.below(10) {
            _ if known.is_empty() => None,
            0..=2 => None,
            3..=5 => Some(json!({"action": "patch", "pk": pick(&mut rng),
                                 "data": {"done": rng.chance(50), "owner": owner}})),
            6 => Some(
                json!({"action": "patch", "pk": pick(&mut rng), "data": {"title": format!("t{n}")}}),
            ),
            7 => Some(json!({"action": "delete", "pk": pick(&mut rng)})),
            _ => {
                let some: Vec<i64> = (0..1 + rng.below(6)).map(|_| pick(&mut rng)).collect();
                Some(json!({"action": "bulk_set_done", "ids": some, "done": rng.chance(50)}))
            }
        };
        let mut frame = frame.unwrap_or_else(|| {
            json!({"action": "create", "data": {"title": format!("n{n}"), "done": rng.chance(50), "owner": owner}})
        });
        frame["request_id"] = json!(n);
        let reply = c.request(frame.clone()).await;
        let status = reply["response_status"].as_u64().unwrap();
        // A row another writer deleted meanwhile is a 404; anything else must succeed.
        assert!(
            status < 300 || status == 404,
            "{frame} answered {reply} (seed {seed})"
        );
        if frame["action"] == "create" {
            ids.lock()
                .unwrap()
                .push(reply["data"]["id"].as_i64().unwrap());
        }
    }
}

/// What a live-list subscriber holds: rows by id.
type View = BTreeMap<i64, Value>;

/// One subscriber: applies the snapshot and the pushes; every `every` frames (at random) it
/// disconnects and resumes with `since` on the next node. Returns its view once the writers
/// are done and nothing has arrived for a while.
async fn subscriber(
    urls: Vec<String>,
    filters: Value,
    seed: u64,
    done: Arc<tokio::sync::Notify>,
) -> (View, usize, usize) {
    let mut rng = Rng(seed);
    let mut view = View::new();
    let mut position: Option<Value> = None;
    let mut node = rng.below(urls.len() as u64) as usize;
    let (mut resumes, mut recovered) = (0, 0);
    let finished = done.notified();
    tokio::pin!(finished);
    let mut writers_done = false;
    loop {
        let mut c = TestClient::connect(&urls[node]).await.unwrap();
        let mut frame = json!({"action": "subscribe_list", "filters": filters, "request_id": "L"});
        if let Some(p) = &position {
            frame["since"] = p.clone();
            resumes += 1;
        }
        let reply = c.request(frame).await;
        assert_eq!(reply["response_status"], 201, "{reply}");
        if reply["recovered"] == true {
            recovered += 1;
        } else {
            view = rows(&reply["data"]["results"]);
        }
        position = Some(reply["position"].clone());
        let mut budget = 10 + rng.below(60);
        loop {
            let wait = if writers_done {
                Duration::from_millis(1500)
            } else {
                Duration::from_millis(200)
            };
            let next = tokio::select! {
                f = c.try_receive_json(wait) => f,
                _ = &mut finished, if !writers_done => {
                    writers_done = true;
                    continue;
                }
            };
            let Some(push) = next else {
                if writers_done {
                    return (view, resumes, recovered);
                }
                // Quiet for a while: a good moment to reconnect too.
                budget = budget.saturating_sub(5);
                if budget == 0 {
                    break;
                }
                continue;
            };
            assert_eq!(push["request_id"], "L", "{push}");
            match push["action"].as_str().unwrap() {
                "create" | "update" => {
                    view.insert(push["data"]["id"].as_i64().unwrap(), push["data"].clone());
                }
                "delete" => {
                    view.remove(&push["data"]["id"].as_i64().unwrap());
                }
                "resync" => view = rows(&push["data"]["results"]),
                other => panic!("unexpected push {other}: {push}"),
            }
            position = Some(push["position"].clone());
            budget = budget.saturating_sub(1);
            if budget == 0 && !writers_done {
                break;
            }
        }
        c.close().await;
        node = (node + 1) % urls.len();
    }
}

fn rows(results: &Value) -> View {
    results
        .as_array()
        .unwrap_or_else(|| panic!("no results: {results}"))
        .iter()
        .map(|r| (r["id"].as_i64().unwrap(), r.clone()))
        .collect()
}

/// What `list` returns with these filters, by id.
async fn listed(url: &str, filters: &Value) -> View {
    let mut c = TestClient::connect(url).await.unwrap();
    let reply = c
        .request(json!({"action": "list", "filters": filters, "limit": 1000, "request_id": 1}))
        .await;
    rows(&reply["data"]["results"])
}

async fn run(urls: Vec<String>) {
    let seed = seed();
    eprintln!("live-list model test: seed {seed} (replay with DCRF_MODEL_SEED={seed})");
    let ops = ops_per_writer();
    let filters = [
        json!({}),
        json!({"done": true}),
        json!({"done": false, "owner": "a"}),
        json!({"owner": "b"}),
        json!({"owner": ""}),
    ];
    let done = Arc::new(tokio::sync::Notify::new());
    let subscribers: Vec<_> = filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            tokio::spawn(subscriber(
                urls.clone(),
                f.clone(),
                seed ^ ((i as u64 + 1) * 0x1000),
                done.clone(),
            ))
        })
        .collect();
    // Let the subscribers take their first snapshot while the writers start.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ids = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(writer(
                urls[w % urls.len()].clone(),
                seed.wrapping_add(w as u64),
                ops,
                ids.clone(),
            ))
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    done.notify_waiters();
    // Subscribers that are reconnecting when the writers finish wait for the next wake-up.
    let notifier = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                done.notify_waiters();
            }
        })
    };
    let mut total_resumes = 0;
    let mut total_recovered = 0;
    for (sub, f) in subscribers.into_iter().zip(&filters) {
        let (view, resumes, recovered) = sub.await.unwrap();
        total_resumes += resumes;
        total_recovered += recovered;
        let expected = listed(&urls[0], f).await;
        assert_eq!(
            view, expected,
            "the live list with filters {f} differs from list (seed {seed})"
        );
    }
    notifier.abort();
    eprintln!("{total_resumes} resumes, {total_recovered} recovered from history");
    assert!(total_resumes > 0, "subscribers resumed with since");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_lists_equal_list_under_random_writes_sqlite_memory() {
    let (database, _dir) = shared_database(Backend::Sqlite, "model").await;
    let node = Demo::start(&database, "memory", 0);
    run(vec![node.url("/ws/todos/")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_lists_equal_list_under_random_writes_two_nodes_postgres_redis() {
    require_redis();
    let redis = RedisServer::start_on_free_port();
    let (database, _dir) = shared_database(Backend::Postgres, "model").await;
    let a = Demo::start(&database, &redis.url(), 0);
    let b = Demo::start(&database, &redis.url(), 0);
    run(vec![a.url("/ws/todos/"), b.url("/ws/todos/")]).await;
}
