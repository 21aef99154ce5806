//! Action parameters built by `FromFrame`, over real sockets: type aliases, the raw frame,
//! several argument structs, user extractors (borrowing, owned, failing), in the three kinds of
//! action, and the one-block `#[dcrf::consumer] impl Consumer for T` form. Every assertion is on
//! an exact frame.

use dcrf::extract::FromFrame;
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// An alias of `Ctx`: the macro does not read type names.
type Connection = Ctx;
/// An alias of `&Ctx`.
type ConnectionRef<'a> = &'a Ctx;
/// An alias of `&Frame`.
type RawFrame<'a> = &'a Frame<'a>;

#[derive(Deserialize)]
struct Point {
    x: i64,
    y: i64,
}

#[derive(Deserialize)]
struct Label {
    label: String,
}

/// The handshake's `?role=` query parameter, or `"anonymous"`.
struct Role(String);

impl<'a> FromFrame<'a> for Role {
    fn from_frame(ctx: &'a Ctx, _frame: &'a Frame<'a>) -> Result<Self, ApiError> {
        let role = ctx.scope().query.get("role").cloned();
        Ok(Role(role.unwrap_or_else(|| "anonymous".to_owned())))
    }
}

/// Only a connection opened with `?role=staff`; anyone else gets 403 and the action does not run.
struct Staff;

impl<'a> FromFrame<'a> for Staff {
    fn from_frame(ctx: &'a Ctx, _frame: &'a Frame<'a>) -> Result<Self, ApiError> {
        match ctx.scope().query.get("role").map(String::as_str) {
            Some("staff") => Ok(Staff),
            _ => Err(ApiError::permission_denied()),
        }
    }
}

/// The request id as written in the frame, borrowed from it (normal actions may borrow).
struct RequestIdText<'a>(&'a str);

impl<'a> FromFrame<'a> for RequestIdText<'a> {
    fn from_frame(_ctx: &'a Ctx, frame: &'a Frame<'a>) -> Result<Self, ApiError> {
        frame
            .request_id()
            .map(|r| RequestIdText(r.get()))
            .ok_or_else(|| ApiError::bad_request("A request_id is required."))
    }
}

struct Extracting {
    calls: u64,
}

/// One block: hooks and actions together.
#[dcrf::consumer]
impl Consumer for Extracting {
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(AllowAny))
    }

    async fn connect(&mut self, ctx: &Ctx) -> Result<(), ApiError> {
        ctx.insert_extension(Greeting("hello".to_owned()));
        Ok(())
    }

    /// Aliases of `Ctx` and `&Ctx`.
    #[action]
    async fn aliases(
        &mut self,
        owned: Connection,
        borrowed: ConnectionRef<'_>,
    ) -> Result<Reply<Value>, ApiError> {
        Ok(Reply::ok(json!({
            "same_connection": owned.connection_id() == borrowed.connection_id(),
            "path": owned.scope().path,
            "greeting": borrowed.extension::<Greeting>().map(|g| g.0),
        })))
    }

    /// `&Frame` (through an alias too) and two argument structs, each reading its fields.
    #[action]
    async fn fields(
        &mut self,
        frame: &Frame<'_>,
        point: Point,
        again: RawFrame<'_>,
        label: Label,
    ) -> Result<Reply<Value>, ApiError> {
        Ok(Reply::ok(json!({
            "x": point.x,
            "y": point.y,
            "label": label.label,
            "field_count": frame.fields().len(),
            "same_frame": std::ptr::eq(frame, again),
        })))
    }

    /// A user extractor that always succeeds.
    #[action]
    async fn role(&mut self, role: Role) -> Result<Reply<String>, ApiError> {
        Ok(Reply::ok(role.0))
    }

    /// A user extractor that borrows from the frame.
    #[action]
    async fn request_id_text<'f>(
        &mut self,
        rid: RequestIdText<'f>,
    ) -> Result<Reply<&'f str>, ApiError> {
        Ok(Reply::ok(rid.0))
    }

    /// A user extractor that fails for non-staff, before the arguments are read.
    #[action]
    async fn admin(&mut self, _staff: Staff, point: Point) -> Result<Reply<Value>, ApiError> {
        self.calls += 1;
        Ok(Reply::ok(
            json!({"calls": self.calls, "sum": point.x + point.y}),
        ))
    }

    /// How many times `admin` ran on this connection.
    #[action]
    async fn calls(&mut self) -> Result<Reply<u64>, ApiError> {
        Ok(Reply::ok(self.calls))
    }

    /// Owned parameters of every sort in a detached action.
    #[action(detached)]
    async fn detached_mix(
        ctx: Connection,
        role: Role,
        point: Point,
        label: Label,
    ) -> Result<Reply<Value>, ApiError> {
        tokio::task::yield_now().await;
        Ok(Reply::ok(json!({
            "role": role.0,
            "x": point.x,
            "y": point.y,
            "label": label.label,
            "path": ctx.scope().path,
        })))
    }

    /// A failing user extractor in a detached action: nothing is spawned.
    #[action(detached)]
    async fn detached_admin(_staff: Staff) -> Result<Reply<&'static str>, ApiError> {
        Ok(Reply::ok("detached staff"))
    }

    /// Owned parameters in a blocking action; `Staff` fails for non-staff.
    #[action(blocking)]
    fn blocking_admin(ctx: Ctx, _staff: Staff, point: Point) -> Result<Reply<Value>, ApiError> {
        Ok(Reply::ok(json!({
            "product": point.x * point.y,
            "path": ctx.scope().path,
        })))
    }
}

/// A value stored in `connect`.
#[derive(Clone)]
struct Greeting(String);

/// A generic consumer in the one-block form, with a where clause and the trait by its path.
struct Tagged<T> {
    tag: T,
}

#[dcrf::consumer]
impl<T> dcrf::Consumer for Tagged<T>
where
    T: Clone + Serialize + Send + Sync + 'static,
{
    #[action]
    async fn tag(&mut self, label: Label) -> Result<Reply<Value>, ApiError> {
        Ok(Reply::ok(
            json!({"tag": self.tag.clone(), "label": label.label}),
        ))
    }
}

async fn server() -> TestServer {
    let app = Dcrf::new();
    let router = axum::Router::new()
        .route("/ws/x/", app.consumer(|| Extracting { calls: 0 }))
        .route("/ws/tagged/", app.consumer(|| Tagged { tag: 7u8 }));
    TestServer::start(router, app).await
}

async fn client(s: &TestServer, query: &str) -> TestClient {
    TestClient::connect(&s.url(&format!("/ws/x/{query}")))
        .await
        .unwrap()
}

/// Sends a frame and asserts the exact text of the next one.
async fn exchange(c: &mut TestClient, frame: Value, expected: &str) {
    c.send_json(frame).await;
    assert_eq!(c.receive_text().await, expected);
}

#[tokio::test]
async fn aliases_of_ctx_are_the_connection() {
    let s = server().await;
    let mut c = client(&s, "").await;
    exchange(
        &mut c,
        json!({"action": "aliases", "request_id": 1}),
        r#"{"errors":[],"data":{"greeting":"hello","path":"/ws/x/","same_connection":true},"action":"aliases","response_status":200,"request_id":1}"#,
    )
    .await;
}

#[tokio::test]
async fn frame_and_several_argument_structs() {
    let s = server().await;
    let mut c = client(&s, "").await;
    exchange(
        &mut c,
        json!({"action": "fields", "x": 2, "y": 3, "label": "p", "request_id": 1}),
        r#"{"errors":[],"data":{"field_count":3,"label":"p","same_frame":true,"x":2,"y":3},"action":"fields","response_status":200,"request_id":1}"#,
    )
    .await;
    // Each struct names its own missing field; the first parameter that fails answers.
    exchange(
        &mut c,
        json!({"action": "fields", "x": 2, "y": 3, "request_id": 2}),
        r#"{"errors":[{"label":["This field is required."]}],"data":null,"action":"fields","response_status":400,"request_id":2}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "fields", "x": 2, "label": "p", "request_id": 3}),
        r#"{"errors":[{"y":["This field is required."]}],"data":null,"action":"fields","response_status":400,"request_id":3}"#,
    )
    .await;
}

#[tokio::test]
async fn user_extractors_that_succeed() {
    let s = server().await;
    let mut c = client(&s, "?role=staff").await;
    exchange(
        &mut c,
        json!({"action": "role", "request_id": 1}),
        r#"{"errors":[],"data":"staff","action":"role","response_status":200,"request_id":1}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "request_id_text", "request_id": {"k": [1, "two"]}}),
        r#"{"errors":[],"data":"{\"k\":[1,\"two\"]}","action":"request_id_text","response_status":200,"request_id":{"k":[1,"two"]}}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "admin", "x": 4, "y": 5, "request_id": 2}),
        r#"{"errors":[],"data":{"calls":1,"sum":9},"action":"admin","response_status":200,"request_id":2}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "blocking_admin", "x": 4, "y": 5, "request_id": 3}),
        r#"{"errors":[],"data":{"path":"/ws/x/","product":20},"action":"blocking_admin","response_status":200,"request_id":3}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "detached_admin", "request_id": 4}),
        r#"{"errors":[],"data":"detached staff","action":"detached_admin","response_status":200,"request_id":4}"#,
    )
    .await;
    let mut anonymous = client(&s, "").await;
    exchange(
        &mut anonymous,
        json!({"action": "role", "request_id": "r"}),
        r#"{"errors":[],"data":"anonymous","action":"role","response_status":200,"request_id":"r"}"#,
    )
    .await;
}

#[tokio::test]
async fn a_failing_user_extractor_answers_its_error_and_the_action_does_not_run() {
    let s = server().await;
    let mut c = client(&s, "?role=guest").await;
    // Before the argument struct: a frame without `x` and `y` still answers 403.
    exchange(
        &mut c,
        json!({"action": "admin", "request_id": 1}),
        r#"{"errors":["You do not have permission to perform this action."],"data":null,"action":"admin","response_status":403,"request_id":1}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "admin", "x": 1, "y": 1, "request_id": "two"}),
        r#"{"errors":["You do not have permission to perform this action."],"data":null,"action":"admin","response_status":403,"request_id":"two"}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "calls", "request_id": 3}),
        r#"{"errors":[],"data":0,"action":"calls","response_status":200,"request_id":3}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "blocking_admin", "x": 1, "y": 1, "request_id": 4}),
        r#"{"errors":["You do not have permission to perform this action."],"data":null,"action":"blocking_admin","response_status":403,"request_id":4}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "detached_admin", "request_id": 5}),
        r#"{"errors":["You do not have permission to perform this action."],"data":null,"action":"detached_admin","response_status":403,"request_id":5}"#,
    )
    .await;
    // A borrowing extractor's error: no request id.
    exchange(
        &mut c,
        json!({"action": "request_id_text"}),
        r#"{"errors":["A request_id is required."],"data":null,"action":"request_id_text","response_status":400,"request_id":null}"#,
    )
    .await;
    c.receive_nothing().await;
}

#[tokio::test]
async fn detached_actions_take_owned_extractors() {
    let s = server().await;
    let mut c = client(&s, "?role=ops").await;
    exchange(
        &mut c,
        json!({"action": "detached_mix", "x": 1, "y": 2, "label": "d", "request_id": 1}),
        r#"{"errors":[],"data":{"label":"d","path":"/ws/x/","role":"ops","x":1,"y":2},"action":"detached_mix","response_status":200,"request_id":1}"#,
    )
    .await;
    // Extracted before spawning: a missing field answers at once.
    exchange(
        &mut c,
        json!({"action": "detached_mix", "x": 1, "y": 2, "request_id": 2}),
        r#"{"errors":[{"label":["This field is required."]}],"data":null,"action":"detached_mix","response_status":400,"request_id":2}"#,
    )
    .await;
}

#[tokio::test]
async fn generic_one_block_consumer() {
    let s = server().await;
    let mut c = TestClient::connect(&s.url("/ws/tagged/")).await.unwrap();
    exchange(
        &mut c,
        json!({"action": "tag", "label": "t", "request_id": 1}),
        r#"{"errors":[],"data":{"label":"t","tag":7},"action":"tag","response_status":200,"request_id":1}"#,
    )
    .await;
    exchange(
        &mut c,
        json!({"action": "nope", "request_id": 2}),
        r#"{"errors":["Method \"nope\" not allowed."],"data":null,"action":"nope","response_status":405,"request_id":2}"#,
    )
    .await;
}
