//! Delivery guarantees on the demo's `/ws/todos/`, over real sockets: stream positions,
//! resuming with `since`, live lists, bursts larger than a connection's queue, and Redis
//! restarts.

mod common;

use std::time::Duration;

use dcrf::testing::{TestClient, TestServer};
use dcrf_demo::DemoConfig;
use serde_json::{Value, json};

async fn demo(database: &str, layer: &str, seed: u64) -> TestServer {
    let config = DemoConfig {
        database: database.to_owned(),
        layer: layer.to_owned(),
        seed,
        ..DemoConfig::default()
    };
    let (router, app) = dcrf_demo::build(&config).await.unwrap();
    TestServer::start(router, app).await
}

async fn todos(s: &TestServer) -> TestClient {
    TestClient::connect(&s.url("/ws/todos/")).await.unwrap()
}

/// Every frame until none arrives for `quiet`.
async fn drain(c: &mut TestClient, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(v) = c.try_receive_json(quiet).await {
        out.push(v);
    }
    out
}

fn offset(frame: &Value) -> u64 {
    frame["position"]["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no position in {frame}"))
}

fn epoch(frame: &Value) -> String {
    frame["position"]["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch in {frame}"))
        .to_owned()
}

async fn create(c: &mut TestClient, title: &str, done: bool) -> Value {
    let reply = c
        .request(
            json!({"action": "create", "data": {"title": title, "done": done}, "request_id": "w"}),
        )
        .await;
    assert_eq!(reply["response_status"], 201, "{reply}");
    reply["data"].clone()
}

#[tokio::test]
async fn pushes_carry_positions_that_grow_by_one_and_the_reply_carries_the_start() {
    let s = demo("sqlite::memory:", "memory", 0).await;
    let mut sub = todos(&s).await;
    let reply = sub
        .request(json!({"action": "subscribe_to_all", "request_id": "all"}))
        .await;
    assert_eq!(reply["response_status"], 201);
    assert_eq!(reply["data"], json!({"subscribed": true}));
    assert!(
        reply.get("recovered").is_none(),
        "no since, no recovered: {reply}"
    );
    let start = offset(&reply);
    let e = epoch(&reply);
    let mut w = todos(&s).await;
    for i in 0..3 {
        create(&mut w, &format!("t{i}"), false).await;
    }
    for i in 0..3u64 {
        let push = sub.receive_json().await;
        assert_eq!(push["action"], "create");
        assert_eq!(push["request_id"], "all");
        assert_eq!(
            push["position"],
            json!({"epoch": e, "offset": start + 1 + i})
        );
    }
}

#[tokio::test]
async fn resuming_within_history_recovers_exactly_the_missed_pushes_in_order() {
    let s = demo("sqlite::memory:", "memory", 0).await;
    let mut w = todos(&s).await;
    let mut sub = todos(&s).await;
    sub.request(json!({"action": "subscribe_to_all", "request_id": 1}))
        .await;
    create(&mut w, "seen", false).await;
    let last = sub.receive_json().await;
    let since = last["position"].clone();
    sub.close().await;
    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(create(&mut w, &format!("missed {i}"), false).await);
    }
    let mut back = todos(&s).await;
    let reply = back
        .request(json!({"action": "subscribe_to_all", "request_id": 1, "since": since}))
        .await;
    assert_eq!(reply["response_status"], 201);
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["position"]["offset"], offset(&last) + 5);
    for (i, todo) in missed.iter().enumerate() {
        let push = back.receive_json().await;
        assert_eq!(push["action"], "create");
        assert_eq!(push["data"], *todo);
        assert_eq!(push["request_id"], 1);
        assert_eq!(offset(&push), offset(&last) + 1 + i as u64);
    }
    // Then live, continuing the same offsets.
    let next = create(&mut w, "live", false).await;
    let push = back.receive_json().await;
    assert_eq!(push["data"], next);
    assert_eq!(offset(&push), offset(&last) + 6);
    back.receive_nothing().await;
}

#[tokio::test]
async fn resuming_from_an_unknown_epoch_or_beyond_history_is_not_recovered() {
    let s = demo("sqlite::memory:", "memory", 0).await;
    let mut sub = todos(&s).await;
    let reply = sub
        .request(json!({"action": "subscribe_to_all", "request_id": 1,
                        "since": {"epoch": "not-an-epoch", "offset": 3}}))
        .await;
    assert_eq!(reply["recovered"], false, "{reply}");
    let e = epoch(&reply);
    let reply = sub
        .request(json!({"action": "subscribe_to_all", "request_id": 2,
                        "since": {"epoch": e, "offset": 999}}))
        .await;
    assert_eq!(
        reply["recovered"], false,
        "a position from the future: {reply}"
    );
    let reply = sub
        .request(json!({"action": "subscribe_to_all", "request_id": 3, "since": "yesterday"}))
        .await;
    assert_eq!(reply["recovered"], false, "not a position: {reply}");
    sub.receive_nothing().await;
    // Model subscribe actions say so with a 400.
    let mut w = todos(&s).await;
    let todo = create(&mut w, "x", false).await;
    let reply = w
        .request(
            json!({"action": "subscribe_instance", "pk": todo["id"], "request_id": 4,
                        "since": {"epoch": 5}}),
        )
        .await;
    assert_eq!(
        reply,
        json!({"errors": [{"since": ["Expected a position: {\"epoch\": string, \"offset\": integer}."]}],
               "data": null, "action": "subscribe_instance", "response_status": 400, "request_id": 4})
    );
}

#[tokio::test]
async fn an_instance_subscription_resumes_with_since() {
    let s = demo("sqlite::memory:", "memory", 0).await;
    let mut w = todos(&s).await;
    let todo = create(&mut w, "a", false).await;
    let id = todo["id"].clone();
    let mut sub = todos(&s).await;
    let reply = sub
        .request(json!({"action": "subscribe_instance", "pk": id, "request_id": "i"}))
        .await;
    assert_eq!(reply["response_status"], 201);
    assert_eq!(reply["data"], Value::Null);
    let since = reply["position"].clone();
    assert_eq!(
        since["offset"], 0,
        "the create came before anyone asked for the stream: the memory layer did not number it"
    );
    sub.close().await;
    w.request(json!({"action": "patch", "pk": id, "data": {"title": "b"}, "request_id": 1}))
        .await;
    w.request(json!({"action": "delete", "pk": id, "request_id": 2}))
        .await;
    let mut back = todos(&s).await;
    // The object is gone: resume through the multiplexed `todos` stream's sibling? No, the
    // same endpoint: an id that no longer exists is a 404, as in DCRF.
    let reply = back
        .request(
            json!({"action": "subscribe_instance", "pk": id, "request_id": "i", "since": since}),
        )
        .await;
    assert_eq!(reply["response_status"], 404);
    // Resume an object that still exists.
    let todo = create(&mut w, "c", false).await;
    let id = todo["id"].clone();
    let reply = back
        .request(json!({"action": "subscribe_instance", "pk": id, "request_id": "j"}))
        .await;
    let since = reply["position"].clone();
    back.close().await;
    w.request(json!({"action": "patch", "pk": id, "data": {"title": "d"}, "request_id": 3}))
        .await;
    let mut again = todos(&s).await;
    let reply = again
        .request(
            json!({"action": "subscribe_instance", "pk": id, "request_id": "j", "since": since}),
        )
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    let push = again.receive_json().await;
    assert_eq!(push["action"], "update");
    assert_eq!(push["data"]["title"], "d");
    assert_eq!(push["response_status"], 200);
    assert_eq!(push["request_id"], "j");
    again.receive_nothing().await;
}

#[tokio::test]
async fn a_live_list_follows_rows_into_and_out_of_its_filter() {
    let s = demo("sqlite::memory:", "memory", 0).await;
    let mut w = todos(&s).await;
    let open = create(&mut w, "open", false).await;
    create(&mut w, "closed", true).await;
    let mut sub = todos(&s).await;
    let reply = sub
        .request(
            json!({"action": "subscribe_list", "filters": {"done": false},
                        "ordering": "-id", "request_id": "L"}),
        )
        .await;
    assert_eq!(reply["response_status"], 201, "{reply}");
    assert_eq!(reply["action"], "subscribe_list");
    assert_eq!(reply["data"]["results"], json!([open]));
    assert_eq!(reply["data"]["position"], reply["position"]);
    let start = offset(&reply);

    let fresh = create(&mut w, "fresh", false).await;
    let push = sub.receive_json().await;
    assert_eq!(
        push,
        json!({"errors": [], "data": fresh, "action": "create", "response_status": 200,
               "request_id": "L", "position": {"epoch": epoch(&reply), "offset": start + 1}})
    );
    // A row outside the filter: nothing.
    create(&mut w, "also closed", true).await;
    // Updated out of the set: a delete with its key.
    let id = fresh["id"].clone();
    w.request(json!({"action": "patch", "pk": id, "data": {"done": true}, "request_id": 1}))
        .await;
    let push = sub.receive_json().await;
    assert_eq!(push["action"], "delete");
    assert_eq!(push["response_status"], 204);
    assert_eq!(push["data"], json!({"pk": id, "id": id}));
    assert_eq!(
        offset(&push),
        start + 3,
        "offsets count the stream, not the pushes"
    );
    // Back into it: a create; changed inside it: an update.
    w.request(json!({"action": "patch", "pk": id, "data": {"done": false}, "request_id": 2}))
        .await;
    assert_eq!(sub.receive_json().await["action"], "create");
    w.request(json!({"action": "patch", "pk": id, "data": {"title": "renamed"}, "request_id": 3}))
        .await;
    let push = sub.receive_json().await;
    assert_eq!(push["action"], "update");
    assert_eq!(push["data"]["title"], "renamed");
    // Deleted: a delete.
    w.request(json!({"action": "delete", "pk": id, "request_id": 4}))
        .await;
    let push = sub.receive_json().await;
    assert_eq!(
        (push["action"].clone(), push["data"].clone()),
        (json!("delete"), json!({"pk": id, "id": id}))
    );
    // A bulk statement moves rows in and out too.
    w.request(
        json!({"action": "bulk_set_done", "ids": [open["id"]], "done": true, "request_id": 5}),
    )
    .await;
    let push = sub.receive_json().await;
    assert_eq!(
        (push["action"].clone(), push["data"]["id"].clone()),
        (json!("delete"), open["id"].clone())
    );
    let reply = sub
        .request(json!({"action": "unsubscribe_list", "request_id": "L"}))
        .await;
    assert_eq!(
        reply,
        json!({"errors": [], "data": null, "action": "unsubscribe_list", "response_status": 204, "request_id": "L"})
    );
    create(&mut w, "after", false).await;
    sub.receive_nothing().await;
}

#[tokio::test]
async fn a_live_list_uses_the_list_rules_and_refuses_a_set_over_its_cap() {
    let s = demo("sqlite::memory:", "memory", 1001).await;
    let mut c = todos(&s).await;
    let reply = c
        .request(json!({"action": "subscribe_list", "request_id": 1}))
        .await;
    assert_eq!(
        reply,
        json!({"errors": ["This list has more than 1000 rows; a live list holds at most 1000. Narrow it with filters."],
               "data": null, "action": "subscribe_list", "response_status": 400, "request_id": 1})
    );
    let reply = c
        .request(json!({"action": "subscribe_list", "filters": {"title": "x"}, "request_id": 2}))
        .await;
    assert_eq!(
        reply["errors"],
        json!([{"filters": ["Cannot filter by \"title\"."]}])
    );
    let reply = c
        .request(json!({"action": "subscribe_list", "filters": {"owner": "nobody"}}))
        .await;
    assert_eq!(
        reply["errors"],
        json!(["A request_id is required: pushes carry it."])
    );
    let reply = c
        .request(
            json!({"action": "subscribe_list", "filters": {"owner": "nobody"}, "request_id": 3}),
        )
        .await;
    assert_eq!(reply["data"]["results"], json!([]));
    // The refused subscription left nothing behind: a change to the whole table is not pushed
    // to request 1.
    let mut w = todos(&s).await;
    create(&mut w, "x", false).await;
    c.receive_nothing().await;
}

#[tokio::test]
async fn a_live_list_resumes_with_since_or_gets_a_fresh_snapshot() {
    let s = demo("sqlite::memory:", "memory", 0).await;
    let mut w = todos(&s).await;
    let mut sub = todos(&s).await;
    let reply = sub
        .request(json!({"action": "subscribe_list", "filters": {"done": false}, "request_id": "L"}))
        .await;
    let since = reply["position"].clone();
    sub.close().await;
    let a = create(&mut w, "a", false).await;
    create(&mut w, "b", true).await;
    let mut back = todos(&s).await;
    let reply = back
        .request(json!({"action": "subscribe_list", "filters": {"done": false}, "request_id": "L", "since": since}))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert!(
        reply["data"].get("results").is_none(),
        "no snapshot when recovered: {reply}"
    );
    let push = back.receive_json().await;
    assert_eq!(
        (push["action"].clone(), push["data"].clone()),
        (json!("create"), a.clone())
    );
    back.receive_nothing().await;
    let reply = back
        .request(
            json!({"action": "subscribe_list", "filters": {"done": false}, "request_id": "M",
                        "since": {"epoch": "gone", "offset": 1}}),
        )
        .await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["data"]["results"], json!([a]));
}

/// The ids of the `update` pushes among frames.
fn update_ids(frames: &[Value]) -> Vec<i64> {
    frames
        .iter()
        .filter(|f| f["action"] == "update")
        .map(|f| f["data"]["id"].as_i64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_queue_reaches_a_reading_client_and_closes_a_stalled_one() {
    let dir = std::env::temp_dir().join(format!("dcrf-burst-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let database = format!("sqlite://{}?mode=rwc", dir.join("burst.db").display());
    let s = demo(&database, "memory", 5000).await;
    // Rows of 200-character titles (written behind the server's back): each push is ~300
    // bytes, so the bursts below outgrow any socket buffer of the stalled client.
    {
        use dcrf::sea_orm::ConnectionTrait;
        let db = dcrf::model::Db::connect(&database).await.unwrap();
        db.conn()
            .execute_unprepared(&format!("UPDATE todo SET title = '{}'", "t".repeat(200)))
            .await
            .unwrap();
    }
    let mut reader = todos(&s).await;
    reader
        .request(json!({"action": "subscribe_to_all", "request_id": "r"}))
        .await;
    // A small socket buffer: the server's writes to a client that does not read stop soon.
    let mut stalled = TestClient::connect_with_receive_buffer(&s.url("/ws/todos/"), 4096)
        .await
        .unwrap();
    stalled
        .request(json!({"action": "subscribe_to_all", "request_id": "s"}))
        .await;
    let mut w = todos(&s).await;
    let burst = |done: bool| json!({"action": "bulk_set_done", "ids": (1..=5000).collect::<Vec<i64>>(), "done": done, "request_id": 1});
    let reply = w.request(burst(true)).await;
    assert_eq!(reply["data"], json!({"updated": 5000}));
    // The stalled client reads nothing. Its socket takes a few MiB (the kernel's buffers),
    // then the server's writes to it block; once it has been behind for the slow-client
    // timeout (5 s) it is let go, and the server waits 2 s for it to take its last frames and
    // the close frame. Two more bursts right away fill its buffers; it reads as soon as the
    // server has let it go.
    let stalled_end = common::close_once_let_go(s.app.clone(), stalled, Duration::from_secs(30));
    let frames = drain(&mut reader, Duration::from_millis(500)).await;
    let mut got = update_ids(&frames);
    got.sort_unstable();
    got.dedup();
    assert_eq!(got.len(), 5000, "every change, pushed or recovered");
    assert!(frames.iter().all(|f| f["action"] != "resync"));
    let offsets: Vec<u64> = frames.iter().map(offset).collect();
    assert!(
        offsets.windows(2).all(|p| p[1] == p[0] + 1),
        "in order, none twice"
    );
    let rss_before = common::rss_kib();
    for round in 0..2 {
        w.request(burst(round % 2 == 0)).await;
        let frames = drain(&mut reader, Duration::from_millis(500)).await;
        assert_eq!(update_ids(&frames).len(), 5000, "round {round}");
    }
    let growth = common::rss_kib().saturating_sub(rss_before);
    eprintln!("RSS growth over 10,000 more changes with a stalled subscriber: {growth} KiB");
    assert!(growth < 256 * 1024, "memory grew by {growth} KiB");
    let frame = stalled_end.await.unwrap().expect("a close frame");
    assert_eq!(u16::from(frame.code), 1013);
    assert_eq!(
        s.app.slow_client_closes(),
        1,
        "only the stalled client was let go"
    );
    let _ = std::fs::remove_dir_all(&dir);
    // The reader is still connected and served.
    let reply = reader
        .request(json!({"action": "retrieve", "pk": 1, "request_id": "still"}))
        .await;
    let reply = if reply["request_id"] == "still" {
        reply
    } else {
        loop {
            let f = reader.receive_json().await;
            if f["request_id"] == "still" {
                break f;
            }
        }
    };
    assert_eq!(reply["response_status"], 200);
}
