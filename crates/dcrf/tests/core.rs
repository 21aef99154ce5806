//! The framework's core over real sockets: protocol, errors, actions, permissions, auth,
//! shutdown. Every assertion is on an exact frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dcrf::auth::{JwtAuth, TokenAuth};
use dcrf::permission::Not;
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

mod common;

use common::Counter;

/// Shared probes the test consumer reports to.
#[derive(Default)]
struct Probes {
    cancelled: AtomicUsize,
    disconnected: Counter,
    /// Actions `hold` that have started.
    holding: Counter,
    /// Lets one waiting action or background task go on (`notify_one`: a permit is kept when
    /// nothing waits yet, so a release sent before the wait is not lost).
    release: Notify,
}

struct TestConsumer {
    probes: Arc<Probes>,
    counter: u64,
}

#[derive(Deserialize)]
struct Pk {
    pk: u64,
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

/// Counts how many times a detached task was cancelled (dropped before finishing).
struct CancelGuard(Arc<Probes>, bool);
impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[dcrf::consumer]
impl TestConsumer {
    #[action]
    async fn echo<'f>(
        &mut self,
        frame: &'f Frame<'f>,
    ) -> Result<Reply<dcrf::protocol::FieldsObject<'f, 'f>>, ApiError> {
        Ok(Reply::ok(frame.fields_object()))
    }

    #[action]
    async fn test_async_action(&mut self, args: Pk) -> Result<Reply<Value>, ApiError> {
        Ok(Reply::ok(json!({ "pk": args.pk })))
    }

    #[action(blocking)]
    fn test_sync_action(args: Pk) -> Result<Reply<Value>, ApiError> {
        // Deliberate delay under test: blocking work, run off the async workers.
        std::thread::sleep(Duration::from_millis(20));
        Ok(Reply::ok(json!({ "pk": args.pk, "sync": true })))
    }

    #[action]
    async fn add(&mut self, args: Add) -> Result<Reply<i64>, ApiError> {
        Ok(Reply::ok(args.a + args.b))
    }

    /// Per-connection state.
    #[action]
    async fn count(&mut self) -> Result<Reply<u64>, ApiError> {
        self.counter += 1;
        Ok(Reply::ok(self.counter))
    }

    /// Non-detached, slow: later frames wait for it.
    #[action]
    async fn slow(&mut self, args: Sleep) -> Result<Reply<u64>, ApiError> {
        // Deliberate delay under test: an action that takes time, so later frames could
        // overtake it if the reader did not run actions one at a time.
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        Ok(Reply::ok(args.ms))
    }

    /// Non-detached: says it started, then runs until the test releases it.
    #[action]
    async fn hold(&mut self) -> Result<Reply<&'static str>, ApiError> {
        self.probes.holding.hit();
        self.probes.release.notified().await;
        Ok(Reply::ok("released"))
    }

    #[action(detached)]
    async fn test_detached_async_action(ctx: Ctx, args: Pk) -> Result<Reply<Value>, ApiError> {
        let probes = ctx_probes(&ctx);
        let mut guard = CancelGuard(probes.clone(), false);
        probes.release.notified().await;
        guard.1 = true;
        Ok(Reply::ok(json!({ "pk": args.pk })))
    }

    #[action(detached)]
    async fn detached_throttled(ctx: Ctx) -> Result<Reply<()>, ApiError> {
        ctx_probes(&ctx).release.notified().await;
        Err(ApiError::new(
            dcrf::StatusCode::TOO_MANY_REQUESTS,
            vec![json!("Request was throttled.")],
        ))
    }

    #[action(name = "renamed")]
    async fn python_name(&mut self) -> Result<Reply<&'static str>, ApiError> {
        Ok(Reply::ok("renamed"))
    }

    #[action]
    async fn silent(&mut self) -> Result<(), ApiError> {
        Ok(())
    }

    #[action]
    async fn fail(&mut self) -> Result<Reply<()>, ApiError> {
        Err(ApiError::internal(std::io::Error::other("disk on fire")))
    }

    #[action]
    async fn explode(&mut self) -> Result<Reply<()>, ApiError> {
        panic!("boom")
    }

    #[action]
    async fn whoami(&mut self, ctx: &Ctx) -> Result<Reply<Option<User>>, ApiError> {
        Ok(Reply::ok(ctx.user().cloned()))
    }

    #[action]
    async fn scope_info(&mut self, ctx: &Ctx) -> Result<Reply<Value>, ApiError> {
        let s = ctx.scope();
        Ok(Reply::ok(json!({
            "path": s.path,
            "query": s.query,
            "cookies": s.cookies,
            "path_params": s.path_params,
            "has_peer": s.peer_addr.is_some(),
            "x_test": s.header("x-test"),
        })))
    }

    /// `ctx.spawn` (DCRF's `@detached` method): the reply first, the pushed frame later. The
    /// background task waits for the test's release, so the reply can only come first if the
    /// action does not wait for the task.
    #[action]
    async fn start_background(&mut self, ctx: &Ctx) -> Result<Reply<&'static str>, ApiError> {
        let c = ctx.clone();
        let probes = self.probes.clone();
        ctx.spawn(async move {
            probes.release.notified().await;
            let _ = c.send_json(&json!({"waited": 1})).await;
        });
        Ok(Reply::ok("started"))
    }
}

fn ctx_probes(ctx: &Ctx) -> Arc<Probes> {
    ctx.extension::<Arc<Probes>>()
        .expect("probes set in connect")
}

impl Consumer for TestConsumer {
    async fn connect(&mut self, ctx: &Ctx) -> Result<(), ApiError> {
        ctx.insert_extension(self.probes.clone());
        Ok(())
    }
    async fn disconnect(&mut self, _ctx: &Ctx) {
        self.probes.disconnected.hit();
    }
}

/// Denies the action named "secret" and refuses connections with `?deny=1`.
struct Guard;
impl Permission for Guard {
    async fn has_permission(&self, _: &Scope, action: &str, _: &Frame<'_>) -> bool {
        action != "secret" && action != "nope_denied"
    }
    async fn can_connect(&self, scope: &Scope) -> bool {
        !scope.query.contains_key("deny")
    }
}
dcrf::impl_permission_ops!(Guard);

async fn start(app: Dcrf, probes: Arc<Probes>) -> TestServer {
    let p = probes.clone();
    let factory = move || TestConsumer {
        probes: p.clone(),
        counter: 0,
    };
    let router = axum::Router::new()
        .route("/ws/test/", app.consumer(factory.clone()))
        .route("/ws/rooms/{room}/", app.consumer(factory));
    TestServer::start(router, app).await
}

async fn server() -> (TestServer, Arc<Probes>) {
    let probes = Arc::new(Probes::default());
    let app = Dcrf::new().default_permissions(Guard);
    (start(app, probes.clone()).await, probes)
}

async fn client(s: &TestServer) -> TestClient {
    TestClient::connect(&s.url("/ws/test/")).await.unwrap()
}

#[tokio::test]
async fn request_id_is_echoed_verbatim_whatever_its_type() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    for rid in [
        r#""abc""#,
        "42",
        "1.50",
        r#"{"nested":[1,{"x":null}]}"#,
        "null",
        "[1,2]",
        "true",
    ] {
        c.send_text(&format!(
            r#"{{"action":"add","a":1,"b":2,"request_id":{rid}}}"#
        ))
        .await;
        assert_eq!(
            c.receive_text().await,
            format!(
                r#"{{"errors":[],"data":3,"action":"add","response_status":200,"request_id":{rid}}}"#
            )
        );
    }
    // Absent request_id → null.
    assert_eq!(
        c.request(json!({"action": "add", "a": 1, "b": 1})).await,
        json!({"errors": [], "data": 2, "action": "add", "response_status": 200, "request_id": null})
    );
}

#[tokio::test]
async fn echo_returns_every_other_field() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_text(r#"{"action":"echo","request_id":1,"a":1,"b":[1,2],"s":"é\"x"}"#)
        .await;
    assert_eq!(
        c.receive_text().await,
        r#"{"errors":[],"data":{"a":1,"b":[1,2],"s":"é\"x"},"action":"echo","response_status":200,"request_id":1}"#
    );
}

#[tokio::test]
async fn dcrf_decorator_async_and_blocking_actions() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    assert_eq!(
        c.request(json!({"action": "test_async_action", "pk": 2, "request_id": 1}))
            .await,
        json!({"errors": [], "data": {"pk": 2}, "action": "test_async_action", "response_status": 200, "request_id": 1})
    );
    assert_eq!(
        c.request(json!({"action": "test_sync_action", "pk": 3, "request_id": 10}))
            .await,
        json!({"errors": [], "data": {"pk": 3, "sync": true}, "action": "test_sync_action", "response_status": 200, "request_id": 10})
    );
}

/// Sends a bad frame, checks the exact error reply, then proves the socket still works.
async fn bad_then_alive(c: &mut TestClient, expected: Value) {
    assert_eq!(c.receive_json().await, expected);
    assert_eq!(
        c.request(json!({"action": "add", "a": 2, "b": 2, "request_id": "alive"}))
            .await,
        json!({"errors": [], "data": 4, "action": "add", "response_status": 200, "request_id": "alive"})
    );
}

#[tokio::test]
async fn invalid_json_gets_an_error_and_the_connection_lives() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_text("{\"action\": \"add\",").await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["Invalid JSON: EOF while parsing a value"], "data": null, "action": null, "response_status": 400, "request_id": null}),
    )
    .await;
    c.send_text("{\"action\" \"add\"}").await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["Invalid JSON: expected `:`"], "data": null, "action": null, "response_status": 400, "request_id": null}),
    )
    .await;
    c.send_text("").await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["Invalid JSON: EOF while parsing a value"], "data": null, "action": null, "response_status": 400, "request_id": null}),
    )
    .await;
}

#[tokio::test]
async fn non_object_frames_get_an_error() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    for text in ["[1,2]", "5", "\"add\"", "null"] {
        c.send_text(text).await;
        bad_then_alive(
            &mut c,
            json!({"errors": ["Expected a JSON object with an \"action\" key, e.g. {\"action\": \"list\", \"request_id\": 1}."], "data": null, "action": null, "response_status": 400, "request_id": null}),
        )
        .await;
    }
}

#[tokio::test]
async fn binary_frames_get_an_error() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_binary(b"{\"action\":\"add\"}".to_vec()).await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["Binary frames are not supported; send JSON text frames."], "data": null, "action": null, "response_status": 400, "request_id": null}),
    )
    .await;
}

#[tokio::test]
async fn missing_action_is_405_with_null_action() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"pk": 2, "request_id": 1})).await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["Unable to find action in message body."], "data": null, "action": null, "response_status": 405, "request_id": 1}),
    )
    .await;
}

#[tokio::test]
async fn non_string_action_is_400() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": 5, "request_id": 1})).await;
    bad_then_alive(
        &mut c,
        json!({"errors": [{"action": ["Not a valid string."]}], "data": null, "action": null, "response_status": 400, "request_id": 1}),
    )
    .await;
}

#[tokio::test]
async fn unknown_action_is_405_and_renamed_action_answers_only_to_its_name() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "nope", "request_id": "abc"}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["Method \"nope\" not allowed."], "data": null, "action": "nope", "response_status": 405, "request_id": "abc"}),
    )
    .await;
    c.send_json(json!({"action": "python_name", "request_id": 2}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["Method \"python_name\" not allowed."], "data": null, "action": "python_name", "response_status": 405, "request_id": 2}),
    )
    .await;
    assert_eq!(
        c.request(json!({"action": "renamed", "request_id": 3}))
            .await,
        json!({"errors": [], "data": "renamed", "action": "renamed", "response_status": 200, "request_id": 3})
    );
    // An escaped action name is decoded before lookup.
    c.send_text(r#"{"action":"a\"b","request_id":4}"#).await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["Method \"a\"b\" not allowed."], "data": null, "action": "a\"b", "response_status": 405, "request_id": 4}),
    )
    .await;
}

#[tokio::test]
async fn missing_and_mistyped_arguments_are_400_naming_the_field() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "add", "a": 1, "request_id": 1}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": [{"b": ["This field is required."]}], "data": null, "action": "add", "response_status": 400, "request_id": 1}),
    )
    .await;
    c.send_json(json!({"action": "add", "a": 1, "b": "two", "request_id": 2}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": [{"b": ["A valid integer is required."]}], "data": null, "action": "add", "response_status": 400, "request_id": 2}),
    )
    .await;
    // Blocking and detached actions parse their arguments the same way.
    c.send_json(json!({"action": "test_sync_action", "request_id": 3}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": [{"pk": ["This field is required."]}], "data": null, "action": "test_sync_action", "response_status": 400, "request_id": 3}),
    )
    .await;
    c.send_json(json!({"action": "test_detached_async_action", "pk": -1, "request_id": 4}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": [{"pk": ["Ensure this value is greater than or equal to 0."]}], "data": null, "action": "test_detached_async_action", "response_status": 400, "request_id": 4}),
    )
    .await;
}

#[tokio::test]
async fn server_faults_and_panics_are_500_and_the_connection_lives() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "fail", "request_id": 1}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["A server error occurred."], "data": null, "action": "fail", "response_status": 500, "request_id": 1}),
    )
    .await;
    c.send_json(json!({"action": "explode", "request_id": 2}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["A server error occurred."], "data": null, "action": "explode", "response_status": 500, "request_id": 2}),
    )
    .await;
}

#[tokio::test]
async fn a_result_without_reply_sends_nothing() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "silent", "request_id": 1}))
        .await;
    c.receive_nothing().await;
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let probes = Arc::new(Probes::default());
    let s = start(Dcrf::new().max_message_size(1024), probes).await;
    let mut c = client(&s).await;
    // Just under the limit works.
    let pad = "x".repeat(900);
    assert_eq!(
        c.request(json!({"action": "add", "a": 1, "b": 1, "pad": pad, "request_id": 1}))
            .await["data"],
        json!(2)
    );
    let pad = "x".repeat(2000);
    c.send_json(json!({"action": "add", "a": 1, "b": 1, "pad": pad}))
        .await;
    let close = c.receive_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009);
}

#[tokio::test]
async fn permission_denied_is_403_even_for_unknown_actions() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "secret", "request_id": 1}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["You do not have permission to perform this action."], "data": null, "action": "secret", "response_status": 403, "request_id": 1}),
    )
    .await;
    c.send_json(json!({"action": "nope_denied", "request_id": 2}))
        .await;
    bad_then_alive(
        &mut c,
        json!({"errors": ["You do not have permission to perform this action."], "data": null, "action": "nope_denied", "response_status": 403, "request_id": 2}),
    )
    .await;
}

#[tokio::test]
async fn can_connect_false_refuses_the_handshake_with_403() {
    let (s, _) = server().await;
    assert_eq!(
        TestClient::refused_status(s.url("/ws/test/?deny=1")).await,
        Some(403)
    );
    assert_eq!(TestClient::refused_status(s.url("/ws/test/")).await, None);
}

#[tokio::test]
async fn composed_permissions() {
    let probes = Arc::new(Probes::default());
    // Authenticated users, or anyone but never the "secret" action.
    let app = Dcrf::new()
        .authenticator(TokenAuth::from_map([(
            "t1".to_string(),
            User::new("1", "alice"),
        )]))
        .default_permissions(IsAuthenticated & Guard | Not(AllowAny));
    let s = start(app, probes).await;
    let mut anon = client(&s).await;
    assert_eq!(
        anon.request(json!({"action": "add", "a": 1, "b": 1, "request_id": 1}))
            .await["response_status"],
        json!(403)
    );
    let mut req = s.url("/ws/test/").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer t1".parse().unwrap());
    let mut alice = TestClient::connect_request(req).await.unwrap();
    assert_eq!(
        alice
            .request(json!({"action": "add", "a": 1, "b": 1, "request_id": 1}))
            .await["response_status"],
        json!(200)
    );
    assert_eq!(
        alice
            .request(json!({"action": "secret", "request_id": 2}))
            .await["response_status"],
        json!(403)
    );
    // `!` negates `can_connect` too, as DCRF's NOT does: `!IsAuthenticated` refuses every
    // handshake because `IsAuthenticated` lets everyone connect.
    let s2 = start(
        Dcrf::new().default_permissions(!IsAuthenticated),
        Arc::new(Probes::default()),
    )
    .await;
    assert_eq!(
        TestClient::refused_status(s2.url("/ws/test/")).await,
        Some(403)
    );
}

#[tokio::test]
async fn deny_anonymous_refuses_the_handshake() {
    let s = start(
        Dcrf::new().default_permissions(DenyAnonymous),
        Arc::new(Probes::default()),
    )
    .await;
    assert_eq!(
        TestClient::refused_status(s.url("/ws/test/")).await,
        Some(403)
    );
}

fn token_app() -> Dcrf {
    Dcrf::new().authenticator(TokenAuth::from_map([(
        "s3cret".to_string(),
        User::new("7", "alice"),
    )]))
}

#[tokio::test]
async fn token_auth_header_query_missing_and_invalid() {
    let s = start(token_app(), Arc::new(Probes::default())).await;
    let mut req = s.url("/ws/test/").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let mut c = TestClient::connect_request(req).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 1}))
            .await,
        json!({"errors": [], "data": {"id": "7", "username": "alice"}, "action": "whoami", "response_status": 200, "request_id": 1})
    );
    let mut c = TestClient::connect(&s.url("/ws/test/?token=s3cret"))
        .await
        .unwrap();
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 2}))
            .await["data"],
        json!({"id": "7", "username": "alice"})
    );
    // Missing: anonymous.
    let mut c = client(&s).await;
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 3}))
            .await,
        json!({"errors": [], "data": null, "action": "whoami", "response_status": 200, "request_id": 3})
    );
    // Invalid: refused with 401.
    assert_eq!(
        TestClient::refused_status(s.url("/ws/test/?token=wrong")).await,
        Some(401)
    );
}

#[tokio::test]
async fn jwt_auth_valid_invalid_expired_missing() {
    let jwt = JwtAuth::hs256(b"test secret").unwrap();
    let s = start(
        Dcrf::new().authenticator(jwt.clone()),
        Arc::new(Probes::default()),
    )
    .await;
    let token = jwt.issue("42", "ada", 60).unwrap();
    let mut req = s.url("/ws/test/").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut c = TestClient::connect_request(req).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 1}))
            .await,
        json!({"errors": [], "data": {"id": "42", "username": "ada"}, "action": "whoami", "response_status": 200, "request_id": 1})
    );
    let mut c = TestClient::connect(&s.url(&format!("/ws/test/?token={token}")))
        .await
        .unwrap();
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 2}))
            .await["data"]["username"],
        json!("ada")
    );
    // Signed with another key.
    let other = JwtAuth::hs256(b"another secret").unwrap();
    let forged = other.issue("42", "ada", 60).unwrap();
    assert_eq!(
        TestClient::refused_status(s.url(&format!("/ws/test/?token={forged}"))).await,
        Some(401)
    );
    // Garbage and expired.
    assert_eq!(
        TestClient::refused_status(s.url("/ws/test/?token=not.a.jwt")).await,
        Some(401)
    );
    let expired = {
        let claims = json!({"sub": "42", "username": "ada", "exp": 1_000_000_000u64});
        jsonwebtoken_encode(&claims)
    };
    assert_eq!(
        TestClient::refused_status(s.url(&format!("/ws/test/?token={expired}"))).await,
        Some(401)
    );
    // Missing: anonymous.
    let mut c = client(&s).await;
    assert_eq!(
        c.request(json!({"action": "whoami", "request_id": 3}))
            .await["data"],
        Value::Null
    );
}

/// An HS256 token for arbitrary claims, signed with the test secret (built by hand so the test
/// does not depend on the crate's own signing).
fn jsonwebtoken_encode(claims: &Value) -> String {
    // Reuse the library's issuer for the signature by round-tripping through a custom claim
    // set is not possible; use jsonwebtoken through dcrf's dependency instead.
    dcrf_test_jwt::encode(claims)
}

mod dcrf_test_jwt {
    use serde_json::Value;
    pub fn encode(claims: &Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(b"test secret").unwrap();
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).unwrap()
    }
}

#[tokio::test]
async fn scope_has_path_query_cookies_headers_params_and_peer() {
    let (s, _) = server().await;
    let mut req = s
        .url("/ws/rooms/lobby/?a=1&b=x%20y")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("cookie", "sessionid=abc; theme=dark".parse().unwrap());
    // A cookie socket must be same-origin (no allow-list is configured).
    let origin = format!("http://{}", s.addr);
    req.headers_mut().insert("origin", origin.parse().unwrap());
    req.headers_mut().insert("x-test", "yes".parse().unwrap());
    let mut c = TestClient::connect_request(req).await.unwrap();
    assert_eq!(
        c.request(json!({"action": "scope_info", "request_id": 1}))
            .await["data"],
        json!({
            "path": "/ws/rooms/lobby/",
            "query": {"a": "1", "b": "x y"},
            "cookies": {"sessionid": "abc", "theme": "dark"},
            "path_params": {"room": "lobby"},
            "has_peer": true,
            "x_test": "yes",
        })
    );
}

#[tokio::test]
async fn origin_allow_list_applies_to_cookie_sockets() {
    let s = start(
        Dcrf::new().allowed_origins(["https://app.example"]),
        Arc::new(Probes::default()),
    )
    .await;
    let with = |origin: Option<&str>, cookie: bool| {
        let mut req = s.url("/ws/test/").into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        if cookie {
            req.headers_mut()
                .insert("cookie", "sessionid=abc".parse().unwrap());
        }
        req
    };
    assert_eq!(
        TestClient::refused_status(with(Some("https://evil.example"), true)).await,
        Some(403)
    );
    assert_eq!(
        TestClient::refused_status(with(None, true)).await,
        Some(403)
    );
    assert_eq!(
        TestClient::refused_status(with(Some("https://app.example"), true)).await,
        None
    );
    // Token sockets (no cookies) are not checked.
    assert_eq!(
        TestClient::refused_status(with(Some("https://evil.example"), false)).await,
        None
    );
}

#[tokio::test]
async fn non_detached_actions_reply_in_arrival_order() {
    let (s, _) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "slow", "ms": 200, "request_id": "A"}))
        .await;
    c.send_json(json!({"action": "add", "a": 1, "b": 1, "request_id": "B"}))
        .await;
    c.send_json(json!({"action": "slow", "ms": 10, "request_id": "C"}))
        .await;
    let ids: Vec<Value> = [
        c.receive_json().await,
        c.receive_json().await,
        c.receive_json().await,
    ]
    .iter()
    .map(|r| r["request_id"].clone())
    .collect();
    assert_eq!(ids, vec![json!("A"), json!("B"), json!("C")]);
}

#[tokio::test]
async fn per_connection_state_is_kept_and_isolated() {
    let (s, _) = server().await;
    let mut a = client(&s).await;
    let mut b = client(&s).await;
    for expected in 1..=3 {
        assert_eq!(
            a.request(json!({"action": "count", "request_id": 1})).await["data"],
            json!(expected)
        );
    }
    assert_eq!(
        b.request(json!({"action": "count", "request_id": 1})).await["data"],
        json!(1)
    );
}

#[tokio::test]
async fn detached_action_replies_later_with_its_own_action_and_request_id() {
    let (s, probes) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "test_detached_async_action", "pk": 2, "request_id": 1}))
        .await;
    c.send_json(json!({"action": "test_async_action", "pk": 3, "request_id": 2}))
        .await;
    assert_eq!(
        c.receive_json().await,
        json!({"errors": [], "data": {"pk": 3}, "action": "test_async_action", "response_status": 200, "request_id": 2})
    );
    c.receive_nothing().await;
    probes.release.notify_one();
    assert_eq!(
        c.receive_json().await,
        json!({"errors": [], "data": {"pk": 2}, "action": "test_detached_async_action", "response_status": 200, "request_id": 1})
    );
}

#[tokio::test]
async fn error_in_detached_action_is_a_frame() {
    let (s, probes) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "detached_throttled", "request_id": 1}))
        .await;
    c.send_json(json!({"action": "test_async_action", "pk": 3, "request_id": 2}))
        .await;
    assert_eq!(c.receive_json().await["request_id"], json!(2));
    // Released whether or not the detached task already waits (the permit is kept).
    probes.release.notify_one();
    assert_eq!(
        c.receive_json().await,
        json!({"errors": ["Request was throttled."], "data": null, "action": "detached_throttled", "response_status": 429, "request_id": 1})
    );
}

#[tokio::test]
async fn detached_work_is_cancelled_on_disconnect() {
    let (s, probes) = server().await;
    let mut c = client(&s).await;
    c.send_json(json!({"action": "test_detached_async_action", "pk": 2, "request_id": 1}))
        .await;
    c.send_json(json!({"action": "add", "a": 1, "b": 1, "request_id": 2}))
        .await;
    assert_eq!(c.receive_json().await["request_id"], json!(2));
    c.close().await;
    // Detached work is cancelled (and waited for) before the disconnect hook runs.
    probes.disconnected.wait_for(1, "the disconnect hook").await;
    assert_eq!(probes.cancelled.load(Ordering::SeqCst), 1);
    assert_eq!(probes.disconnected.get(), 1);
}

#[tokio::test]
async fn detached_method_pushes_after_the_reply() {
    let (s, probes) = server().await;
    let mut c = client(&s).await;
    assert_eq!(
        c.request(json!({"action": "start_background", "request_id": 1}))
            .await["data"],
        json!("started")
    );
    probes.release.notify_one();
    assert_eq!(c.receive_json().await, json!({"waited": 1}));
}

#[tokio::test]
async fn graceful_shutdown_sends_1001_after_the_current_action() {
    let (s, probes) = server().await;
    let mut idle = client(&s).await;
    let mut busy = client(&s).await;
    busy.send_json(json!({"action": "hold", "request_id": "last"}))
        .await;
    probes.holding.wait_for(1, "the action to start").await;
    let url = s.url("/ws/test/");
    // Shutdown starts while the action is in flight.
    s.app.shutdown();
    assert_eq!(u16::from(idle.receive_close().await.unwrap().code), 1001);
    busy.receive_nothing().await;
    let shutdown = tokio::spawn(s.shutdown());
    probes.release.notify_one();
    // The in-flight action still answers, then the close frame comes.
    assert_eq!(
        busy.receive_json().await,
        json!({"errors": [], "data": "released", "action": "hold", "response_status": 200, "request_id": "last"})
    );
    assert_eq!(u16::from(busy.receive_close().await.unwrap().code), 1001);
    shutdown.await.unwrap();
    assert_eq!(probes.disconnected.get(), 2);
    // Nothing listens any more.
    assert!(TestClient::connect(&url).await.is_err());
}
