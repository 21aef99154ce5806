//! HTTP routes over the socket (`view_as_consumer`), driven over a real socket: query strings,
//! JSON bodies, path parameters, error statuses, and the socket's user inside the handler.

use std::collections::HashMap;

use axum::extract::{Path, Query};
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Json, Router};
use dcrf::auth::TokenAuth;
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use dcrf::view::ViewConsumer;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Deserialize)]
struct NewThing {
    name: String,
}

fn api() -> Router {
    Router::new()
        .route(
            "/api/things",
            get(|| async { Json(json!(["test1", "test2"])) }).post(
                |Json(body): Json<Value>| async move {
                    match serde_json::from_value::<NewThing>(body.clone()) {
                        Ok(t) if !t.name.is_empty() => {
                            (StatusCode::CREATED, Json(json!({"id": 7, "name": t.name})))
                                .into_response()
                        }
                        _ => (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            Json(json!({"name": ["This field is required."]})),
                        )
                            .into_response(),
                    }
                },
            ),
        )
        .route(
            "/api/things/{id}",
            get(|Path(id): Path<u32>| async move {
                if id == 42 {
                    Json(json!({"id": 42, "name": "answer"})).into_response()
                } else {
                    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))).into_response()
                }
            }),
        )
        .route(
            "/api/echo-query",
            get(|Query(q): Query<HashMap<String, String>>| async move { Json(q) }),
        )
        .route(
            "/api/whoami",
            get(
                |user: Option<Extension<User>>, Extension(scope): Extension<Scope>| async move {
                    Json(json!({
                        "user": user.map(|Extension(u)| u.username),
                        "path": scope.path,
                    }))
                },
            ),
        )
        .route("/api/text", get(|| async { "plain text" }))
}

async fn serve() -> TestServer {
    let app = Dcrf::new().authenticator(TokenAuth::from_map([(
        "t".to_string(),
        User::new("1", "alice"),
    )]));
    let view = ViewConsumer::new(api())
        .rest("/api/things", "/api/things/{id}")
        .action("query", Method::GET, "/api/echo-query")
        .action("whoami", Method::GET, "/api/whoami")
        .action("text", Method::GET, "/api/text");
    let router = Router::new().route("/ws/api/", app.consumer(move || view.clone()));
    TestServer::start(router, app).await
}

fn ok(action: &str, status: u16, data: Value) -> Value {
    json!({"errors": [], "data": data, "action": action, "response_status": status, "request_id": 1})
}

fn err(action: &str, status: u16, errors: Value) -> Value {
    json!({"errors": errors, "data": null, "action": action, "response_status": status, "request_id": 1})
}

#[tokio::test]
async fn get_with_query_and_list() {
    let s = serve().await;
    let mut c = TestClient::connect(&s.url("/ws/api/")).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 1})).await,
        ok("list", 200, json!(["test1", "test2"]))
    );
    assert_eq!(
        c.request(
            json!({"action": "query", "query": {"value": 1, "othervalue": 42}, "request_id": 1})
        )
        .await,
        ok("query", 200, json!({"value": "1", "othervalue": "42"}))
    );
    assert_eq!(
        c.request(json!({"action": "text", "request_id": 1})).await,
        ok("text", 200, json!("plain text"))
    );
}

#[tokio::test]
async fn post_body_reaches_the_handler() {
    let s = serve().await;
    let mut c = TestClient::connect(&s.url("/ws/api/")).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "create", "data": {"name": "new"}, "request_id": 1}))
            .await,
        ok("create", 201, json!({"id": 7, "name": "new"}))
    );
    // The handler's 422 lands in `errors`.
    assert_eq!(
        c.request(json!({"action": "create", "data": {"name": ""}, "request_id": 1}))
            .await,
        err(
            "create",
            422,
            json!([{"name": ["This field is required."]}])
        )
    );
}

#[tokio::test]
async fn path_parameters_and_404() {
    let s = serve().await;
    let mut c = TestClient::connect(&s.url("/ws/api/")).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "retrieve", "parameters": {"id": 42}, "request_id": 1}))
            .await,
        ok("retrieve", 200, json!({"id": 42, "name": "answer"}))
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "parameters": {"id": 7}, "request_id": 1}))
            .await,
        err("retrieve", 404, json!([{"detail": "Not found."}]))
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "request_id": 1}))
            .await,
        err(
            "retrieve",
            400,
            json!([{"parameters": ["Missing path parameter \"id\"."]}])
        )
    );
    // A method the route does not have: axum's 405 (empty body).
    assert_eq!(
        c.request(json!({"action": "delete", "parameters": {"id": 42}, "request_id": 1}))
            .await,
        err("delete", 405, json!([]))
    );
    // An action not mapped at all.
    assert_eq!(
        c.request(json!({"action": "fly", "request_id": 1})).await,
        err("fly", 405, json!(["Method \"fly\" not allowed."]))
    );
}

#[tokio::test]
async fn the_handler_sees_the_socket_user() {
    let s = serve().await;
    let mut anon = TestClient::connect(&s.url("/ws/api/")).await.unwrap();
    assert_eq!(
        anon.request(json!({"action": "whoami", "request_id": 1}))
            .await,
        ok("whoami", 200, json!({"user": null, "path": "/ws/api/"}))
    );
    let mut req = s.url("/ws/api/").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer t".parse().unwrap());
    let mut alice = TestClient::connect_request(req).await.unwrap();
    assert_eq!(
        alice
            .request(json!({"action": "whoami", "request_id": 1}))
            .await,
        ok("whoami", 200, json!({"user": "alice", "path": "/ws/api/"}))
    );
}
