//! The demo server's endpoints over real sockets: `/ws/echo/` and `/ws/todos/`, in-process and
//! as the built binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use dcrf::auth::JwtAuth;
use dcrf::model::Db;
use dcrf::testing::{TestClient, TestServer};
use dcrf_demo::{DEFAULT_JWT_SECRET, DemoConfig};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn demo(database: &str, seed: u64) -> TestServer {
    let config = DemoConfig {
        database: database.to_owned(),
        seed,
        ..DemoConfig::default()
    };
    let (router, app) = dcrf_demo::build(&config).await.unwrap();
    TestServer::start(router, app).await
}

#[tokio::test]
async fn echo_returns_all_other_fields_with_any_request_id() {
    let s = demo("sqlite::memory:", 0).await;
    let mut c = TestClient::connect(&s.url("/ws/echo/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    c.send_text(r#"{"action":"echo","request_id":{"client":"x","n":[1]},"text":"hi","n":1.5}"#)
        .await;
    assert_eq!(
        c.receive_text().await,
        r#"{"errors":[],"data":{"text":"hi","n":1.5},"action":"echo","response_status":200,"request_id":{"client":"x","n":[1]}}"#
    );
    assert_eq!(
        c.request(json!({"action": "echo"})).await,
        json!({"errors": [], "data": {}, "action": "echo", "response_status": 200, "request_id": null})
    );
    c.send_text("not json").await;
    assert_eq!(
        c.receive_json().await,
        json!({"errors": ["Invalid JSON: expected ident"], "data": null, "action": null, "response_status": 400, "request_id": null})
    );
    assert_eq!(
        c.request(json!({"action": "echo", "request_id": 2, "still": "alive"}))
            .await["data"],
        json!({"still": "alive"})
    );
}

#[tokio::test]
async fn whoami_is_null_anonymous_and_the_user_with_a_jwt() {
    let s = demo("sqlite::memory:", 0).await;
    let mut c = TestClient::connect(&s.url("/ws/echo/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 1}))
            .await,
        json!({"errors": [], "data": null, "action": "whoami", "response_status": 200, "request_id": 1})
    );
    let token = JwtAuth::hs256(DEFAULT_JWT_SECRET.as_bytes())
        .unwrap()
        .issue("u1", "ada", 60)
        .unwrap();
    let mut req = s.url("/ws/echo/").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut c = TestClient::connect_request(req)
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 1}))
            .await["data"],
        json!({"id": "u1", "username": "ada"})
    );
    assert_eq!(
        TestClient::refused_status(s.url("/ws/echo/?token=forged")).await,
        Some(401)
    );
}

dcrf::backend_tests!(todos_crud);

async fn todos_crud(db: Db) {
    // The demo's own consumer and table, on the test's database (SQLite or a PostgreSQL
    // schema).
    dcrf_demo::todos::setup(&db, 3).await.unwrap();
    let app = dcrf::Dcrf::new();
    let consumer_db = db.clone();
    let router = axum::Router::new().route(
        "/ws/todos/",
        app.consumer(move || dcrf_demo::todos::Todos::new(&consumer_db)),
    );
    let s = TestServer::start(router, app).await;
    let mut c = TestClient::connect(&s.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    let todo = |id: i64, title: &str, done: bool, owner: &str| json!({"id": id, "title": title, "done": done, "owner": owner});
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 1})).await,
        json!({"errors": [], "data": {"count": 3, "results": [
            todo(1, "Todo 1", false, ""), todo(2, "Todo 2", false, ""), todo(3, "Todo 3", false, "")
        ], "limit": 100, "offset": 0}, "action": "list", "response_status": 200, "request_id": 1})
    );
    assert_eq!(
        c.request(json!({"action": "create", "data": {"title": "Write tests"}, "request_id": 2}))
            .await,
        json!({"errors": [], "data": todo(4, "Write tests", false, ""), "action": "create", "response_status": 201, "request_id": 2})
    );
    assert_eq!(
        c.request(json!({"action": "create", "data": {"title": "x".repeat(201)}, "request_id": 3}))
            .await,
        json!({"errors": [{"title": ["Ensure this field has no more than 200 characters."]}], "data": null, "action": "create", "response_status": 400, "request_id": 3})
    );
    assert_eq!(
        c.request(json!({"action": "create", "data": {"done": true}, "request_id": 4}))
            .await,
        json!({"errors": [{"title": ["This field is required."]}], "data": null, "action": "create", "response_status": 400, "request_id": 4})
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": 4, "request_id": 5}))
            .await["data"],
        todo(4, "Write tests", false, "")
    );
    assert_eq!(
        c.request(json!({"action": "patch", "pk": 4, "data": {"done": true}, "request_id": 6}))
            .await["data"],
        todo(4, "Write tests", true, "")
    );
    assert_eq!(
        c.request(json!({"action": "update", "pk": 4, "data": {"title": "Tested", "owner": "ada"}, "request_id": 7}))
            .await["data"],
        todo(4, "Tested", true, "ada")
    );
    assert_eq!(
        c.request(json!({"action": "list", "filters": {"done": true}, "ordering": "-id", "limit": 1, "request_id": 8}))
            .await["data"],
        json!({"count": 1, "results": [todo(4, "Tested", true, "ada")], "limit": 1, "offset": 0})
    );
    assert_eq!(
        c.request(json!({"action": "delete", "pk": 4, "request_id": 9}))
            .await,
        json!({"errors": [], "data": null, "action": "delete", "response_status": 204, "request_id": 9})
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": 4, "request_id": 10}))
            .await,
        json!({"errors": ["Not found"], "data": null, "action": "retrieve", "response_status": 404, "request_id": 10})
    );
}

#[tokio::test]
async fn demo_database_url_and_seed() {
    let s = demo("sqlite::memory:", 1000).await;
    let mut c = TestClient::connect(&s.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    let page = c
        .request(json!({"action": "list", "limit": 100, "offset": 900, "request_id": 1}))
        .await;
    assert_eq!(page["data"]["count"], json!(1000));
    assert_eq!(page["data"]["results"][99]["title"], json!("Todo 1000"));
}

/// The real binary: prints its address, serves, and exits cleanly on SIGTERM after closing
/// sockets with 1001.
#[tokio::test]
async fn binary_starts_serves_and_shuts_down_gracefully() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dcrf-demo"))
        .args([
            "--bind",
            "127.0.0.1:0",
            "--database",
            "sqlite::memory:",
            "--seed",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    let Some(addr) = first
        .strip_prefix("dcrf-demo listening on ")
        .map(str::to_owned)
    else {
        let _ = child.kill();
        panic!("unexpected first line: {first:?}");
    };
    let mut c = TestClient::connect(&format!("ws://{addr}/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": 2, "request_id": "r"}))
            .await["data"]["title"],
        json!("Todo 2")
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let close = c.receive_close().await.expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    // `wait` blocks until the process exits; a thread hands its status over.
    let pid = child.id().to_string();
    let (exited, exit) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = exited.send(child.wait());
    });
    let exit = match tokio::time::timeout(Duration::from_secs(10), exit).await {
        Ok(status) => status.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            panic!("the server did not exit within 10 s of SIGTERM");
        }
    };
    assert!(exit.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(rest, vec!["dcrf-demo stopped".to_owned()]);
}

dcrf::backend_tests!(todos_subscriptions);

async fn todos_subscriptions(db: Db) {
    dcrf_demo::todos::setup(&db, 2).await.unwrap();
    let app = dcrf::Dcrf::new();
    let todos = dcrf_demo::todos::Todos::new(&db);
    let router = axum::Router::new().route("/ws/todos/", app.consumer(move || todos.clone()));
    let s = TestServer::start(router, app).await;
    let mut sub = TestClient::connect(&s.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    let mut writer = TestClient::connect(&s.url("/ws/todos/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        sub.request(json!({"action": "subscribe_instance", "pk": 1, "request_id": "i"}))
            .await,
        json!({"errors": [], "data": null, "action": "subscribe_instance", "response_status": 201, "request_id": "i"})
    );
    assert_eq!(
        sub.request(json!({"action": "subscribe_to_all", "request_id": "a"}))
            .await,
        json!({"errors": [], "data": {"subscribed": true}, "action": "subscribe_to_all", "response_status": 201, "request_id": "a"})
    );
    // A change to todo 1: the instance push and the all-changes push.
    writer
        .request(json!({"action": "patch", "pk": 1, "data": {"title": "Renamed"}, "request_id": 1}))
        .await;
    let todo1 = json!({"id": 1, "title": "Renamed", "done": false, "owner": ""});
    let mut updates = vec![sub.receive_json().await, sub.receive_json().await];
    updates.sort_by_key(|p| p["request_id"].to_string());
    assert_eq!(
        updates,
        vec![
            json!({"errors": [], "data": todo1, "action": "update", "response_status": 200, "request_id": "a"}),
            json!({"errors": [], "data": todo1, "action": "update", "response_status": 200, "request_id": "i"}),
        ]
    );
    // A create reaches only subscribe_to_all.
    writer
        .request(json!({"action": "create", "data": {"title": "New"}, "request_id": 2}))
        .await;
    assert_eq!(
        sub.receive_json().await,
        json!({"errors": [], "data": {"id": 3, "title": "New", "done": false, "owner": ""}, "action": "create", "response_status": 200, "request_id": "a"})
    );
    // One SQL statement, three rows: three pushes (plus the instance push for todo 1).
    assert_eq!(
        writer
            .request(
                json!({"action": "bulk_set_done", "ids": [1, 2, 3], "done": true, "request_id": 3})
            )
            .await,
        json!({"errors": [], "data": {"updated": 3}, "action": "bulk_set_done", "response_status": 200, "request_id": 3})
    );
    let mut pushes = Vec::new();
    for _ in 0..4 {
        let p = sub.receive_json().await;
        assert_eq!(p["data"]["done"], json!(true));
        pushes.push((
            p["request_id"].as_str().unwrap().to_owned(),
            p["data"]["id"].as_i64().unwrap(),
        ));
    }
    pushes.sort();
    assert_eq!(
        pushes,
        vec![
            ("a".into(), 1),
            ("a".into(), 2),
            ("a".into(), 3),
            ("i".into(), 1)
        ]
    );
    // Delete: the instance push carries {"pk"} with 204, the all-changes push the old todo.
    writer
        .request(json!({"action": "delete", "pk": 1, "request_id": 4}))
        .await;
    let mut deletes = vec![sub.receive_json().await, sub.receive_json().await];
    deletes.sort_by_key(|p| p["request_id"].to_string());
    assert_eq!(
        deletes,
        vec![
            json!({"errors": [], "data": {"id": 1, "title": "Renamed", "done": true, "owner": ""}, "action": "delete", "response_status": 200, "request_id": "a"}),
            json!({"errors": [], "data": {"pk": 1}, "action": "delete", "response_status": 204, "request_id": "i"}),
        ]
    );
    assert_eq!(
        sub.request(json!({"action": "unsubscribe_from_all", "request_id": "a"}))
            .await,
        json!({"errors": [], "data": {"subscribed": false}, "action": "unsubscribe_from_all", "response_status": 204, "request_id": "a"})
    );
    writer
        .request(json!({"action": "patch", "pk": 2, "data": {"done": false}, "request_id": 5}))
        .await;
    sub.receive_nothing().await;
}

/// The demo's `/api/` routes answer plain HTTP and the same routes answer over the socket.
#[tokio::test]
async fn api_routes_over_http_and_over_the_socket() {
    let s = demo("sqlite::memory:", 2).await;
    // Plain HTTP/1.1 on the same server.
    let http = |path: &str| {
        let addr = s.addr;
        let path = path.to_owned();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut raw = String::new();
            tcp.read_to_string(&mut raw).await.unwrap();
            let (head, body) = raw.split_once("\r\n\r\n").unwrap();
            (head.lines().next().unwrap().to_owned(), body.to_owned())
        }
    };
    let (status, body) = http("/api/todos/2").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        json!({"id": 2, "title": "Todo 2", "done": false, "owner": ""})
    );
    let (status, _) = http("/api/todos/99").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    let token = JwtAuth::hs256(DEFAULT_JWT_SECRET.as_bytes())
        .unwrap()
        .issue("u1", "ada", 60)
        .unwrap();
    let mut c = TestClient::connect(&s.url(&format!("/ws/api/?token={token}")))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        c.request(json!({"action": "retrieve", "parameters": {"id": 2}, "request_id": 1}))
            .await,
        json!({"errors": [], "data": {"id": 2, "title": "Todo 2", "done": false, "owner": ""}, "action": "retrieve", "response_status": 200, "request_id": 1})
    );
    assert_eq!(
        c.request(json!({"action": "list", "query": {"done": false}, "request_id": 2}))
            .await["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        c.request(json!({"action": "create", "data": {"title": "via socket"}, "request_id": 3}))
            .await,
        json!({"errors": [], "data": {"id": 3, "title": "via socket", "done": false, "owner": ""}, "action": "create", "response_status": 201, "request_id": 3})
    );
    assert_eq!(
        c.request(json!({"action": "create", "data": {"done": true}, "request_id": 4}))
            .await,
        json!({"errors": [{"title": ["This field is required."]}], "data": null, "action": "create", "response_status": 422, "request_id": 4})
    );
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 5}))
            .await["data"],
        json!({"id": "u1", "username": "ada"})
    );
    // The same over the multiplexed socket's `api` stream.
    let mut m = TestClient::connect(&s.url("/ws"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        m.request(json!({"stream": "api", "payload": {"action": "retrieve", "parameters": {"id": 99}, "request_id": 6}}))
            .await,
        json!({"stream": "api", "payload": {"errors": [{"detail": "Not found."}], "data": null, "action": "retrieve", "response_status": 404, "request_id": 6}})
    );
}
