//! Several `dcrf-demo` processes sharing a database and a Redis channel layer: a change made
//! through one server reaches subscribers of the other, also after Redis restarts.
//!
//! Every test needs Redis and fails without `REDIS_URL`, which says Redis is available here;
//! each runs once on a SQLite file shared by the processes (`..._sqlite`) and once on a
//! PostgreSQL schema (`..._postgres`, needs `DATABASE_URL`). The test script leaves `redis` /
//! `postgres` tests out when the service is unavailable. Redis channels are global to a
//! server and tests run in parallel, so each test runs a `redis-server` of its own on a free
//! port.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Demo, RedisServer, require_redis, shared_database};
use dcrf::testing::TestClient;
use serde_json::{Value, json};

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
    let mut sub = TestClient::connect(&a.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    subscribe_both(&mut sub, 2).await;
    let mut writer = TestClient::connect(&b.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
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
    let mut sub = TestClient::connect(&a.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    subscribe_both(&mut sub, 1).await;
    let mut writer = TestClient::connect(&b.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    writer
        .request(json!({"action": "patch", "pk": 1, "data": {"owner": "before"}, "request_id": 1}))
        .await;
    assert_eq!(sub.receive_json().await["data"]["owner"], json!("before"));
    assert_eq!(sub.receive_json().await["data"]["owner"], json!("before"));

    // Restart Redis on the same port.
    redis.stop();
    let redis = RedisServer::start(port);

    // Writes go on (the database does not need Redis). The restarted Redis has no positions:
    // every stream starts a new epoch, so the subscriber is told it may have missed changes
    // (a resync notice per subscription) instead of missing them silently; pushes resume once
    // both nodes have reconnected. Nothing outside the nodes tells when that is done, so:
    // write again, each time waiting up to 500 ms for frames, for at most 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    let mut resynced = Vec::new();
    let push = 'found: loop {
        n += 1;
        let owner = format!("after-{n}");
        let reply = writer
            .request(json!({"action": "patch", "pk": 1, "data": {"owner": owner}, "request_id": n}))
            .await;
        assert_eq!(reply["response_status"], json!(200));
        while let Some(frame) = sub.try_receive_json(Duration::from_millis(500)).await {
            if frame["action"] == "resync" {
                resynced.push(frame["request_id"].clone());
            } else {
                break 'found frame;
            }
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
    resynced.sort_by_key(|r| r.to_string());
    resynced.dedup();
    assert_eq!(
        resynced.len(),
        2,
        "both subscriptions were told to resync: {resynced:?}"
    );
    redis.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_client_resumes_on_the_other_node_sqlite() {
    a_client_resumes_on_the_other_node(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_client_resumes_on_the_other_node_postgres() {
    a_client_resumes_on_the_other_node(Backend::Postgres).await;
}

/// Positions are the stream's, not a node's: a client that read pushes through node A
/// resumes through node B with `since` and gets exactly what it missed, from Redis's history.
async fn a_client_resumes_on_the_other_node(backend: Backend) {
    require_redis();
    let redis = RedisServer::start_on_free_port();
    let (database, _dir) = shared_database(backend, "resume").await;
    let a = Demo::start(&database, &redis.url(), 0);
    let b = Demo::start(&database, &redis.url(), 0);
    let mut writer = TestClient::connect(&b.url("/ws/todos/")).await.unwrap();
    let mut sub = TestClient::connect(&a.url("/ws/todos/")).await.unwrap();
    let reply = sub
        .request(json!({"action": "subscribe_list", "filters": {"done": false}, "request_id": "L"}))
        .await;
    assert_eq!(reply["data"]["results"], json!([]));
    let create = |title: &str, done: bool| json!({"action": "create", "data": {"title": title, "done": done}, "request_id": title});
    writer.request(create("seen", false)).await;
    let seen = sub.receive_json().await;
    assert_eq!(seen["action"], "create");
    let since = seen["position"].clone();
    sub.close().await;
    let missed = writer.request(create("missed", false)).await["data"].clone();
    writer.request(create("filtered out", true)).await;
    let moved = writer
        .request(json!({"action": "patch", "pk": seen["data"]["id"], "data": {"done": true}, "request_id": "p"}))
        .await;
    assert_eq!(moved["response_status"], 200);

    let mut back = TestClient::connect(&b.url("/ws/todos/")).await.unwrap();
    let reply = back
        .request(json!({"action": "subscribe_list", "filters": {"done": false}, "request_id": "L", "since": since}))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["position"]["epoch"], since["epoch"]);
    assert_eq!(
        reply["position"]["offset"],
        since["offset"].as_u64().unwrap() + 3
    );
    let first = back.receive_json().await;
    assert_eq!(
        (&first["action"], &first["data"]),
        (&json!("create"), &missed)
    );
    let second = back.receive_json().await;
    assert_eq!(second["action"], "delete");
    assert_eq!(second["data"]["id"], seen["data"]["id"]);
    assert_eq!(
        second["position"]["offset"],
        since["offset"].as_u64().unwrap() + 3
    );
    back.receive_nothing().await;
}
