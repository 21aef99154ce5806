//! Reads and writes, and who receives a push: `IsAuthenticatedOrReadOnly`, `#[action(read)]`, and
//! the one rule for instance subscriptions and model-observer groups (checked at subscribe time
//! and at push time), over real sockets.

mod common;

use std::sync::Arc;

use common::{UserInput, create_user, rename_user, user};
use dcrf::auth::TokenAuth;
use dcrf::model::{Db, ModelActions, ModelConsumer};
use dcrf::observer::ModelObserver;
use dcrf::permission::IsAuthenticatedOrReadOnly;
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use serde_json::{Value, json};

/// Users, read by anyone, written by signed-in users; a custom read and a custom write.
#[derive(Clone)]
struct Users {
    db: Db,
    all: Arc<ModelObserver<user::Model>>,
}

impl ModelConsumer for Users {
    type Entity = user::Entity;
    type Output = user::Model;
    type Input = UserInput;
    fn db(&self) -> &Db {
        &self.db
    }
    fn actions(&self) -> ModelActions {
        ModelActions::ALL | ModelActions::SUBSCRIBE_INSTANCE
    }
}

#[dcrf::consumer(model)]
impl Consumer for Users {
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(IsAuthenticatedOrReadOnly))
    }

    /// A read: anyone may count.
    #[action(read)]
    async fn count(&mut self) -> Result<Reply<u64>, ApiError> {
        use sea_orm::{EntityTrait, PaginatorTrait};
        Ok(Reply::ok(user::Entity::find().count(self.db.conn()).await?))
    }

    /// A write (actions write unless they say otherwise).
    #[action]
    async fn touch(&mut self) -> Result<Reply<()>, ApiError> {
        Ok(Reply::no_content())
    }

    /// Every change of every user, through a model observer's group.
    #[action(read)]
    async fn follow_all(&mut self, ctx: &Ctx, frame: &Frame<'_>) -> Result<Reply<()>, ApiError> {
        self.all.subscribe(ctx, "", frame.request_id()).await?;
        Ok(Reply::with_status((), dcrf::StatusCode::CREATED))
    }
}

/// Refuses `update` and `delete` (and pushes of them), allows the rest.
struct NoUpdatesOrDeletes;

impl Permission for NoUpdatesOrDeletes {
    async fn has_permission(&self, _: &Scope, action: &str, _: &Frame<'_>) -> bool {
        action != "update" && action != "delete"
    }
}

/// The same consumer under a permission that refuses updates and deletes.
#[derive(Clone)]
struct Guarded(Users);

impl ModelConsumer for Guarded {
    type Entity = user::Entity;
    type Output = user::Model;
    type Input = UserInput;
    fn db(&self) -> &Db {
        &self.0.db
    }
    fn actions(&self) -> ModelActions {
        ModelActions::RETRIEVE | ModelActions::SUBSCRIBE_INSTANCE
    }
    fn instance_observer_id(&self) -> String {
        "auth_user.instance.guarded".into()
    }
}

#[dcrf::consumer(model)]
impl Consumer for Guarded {
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(NoUpdatesOrDeletes))
    }

    #[action(read)]
    async fn follow_all(&mut self, ctx: &Ctx, frame: &Frame<'_>) -> Result<Reply<()>, ApiError> {
        self.0.all.subscribe(ctx, "", frame.request_id()).await?;
        Ok(Reply::with_status((), dcrf::StatusCode::CREATED))
    }
}

async fn serve() -> (TestServer, Db) {
    let db = Db::connect("sqlite::memory:").await.unwrap();
    db.create_table(user::Entity).await.unwrap();
    let all = db
        .observe::<user::Entity>("users.all")
        .serialize(|u: &user::Model, _| u.clone());
    let users = Users {
        db: db.clone(),
        all,
    };
    let guarded = Guarded(users.clone());
    let app = Dcrf::new().authenticator(TokenAuth::from_map([(
        "s3cret".to_string(),
        User::new("1", "alice"),
    )]));
    let router = axum::Router::new()
        .route("/users/", app.consumer(move || users.clone()))
        .route("/guarded/", app.consumer(move || guarded.clone()));
    (TestServer::start(router, app).await, db)
}

fn reply(action: &str, rid: i64, status: u16, data: Value) -> Value {
    json!({"errors": [], "data": data, "action": action, "response_status": status, "request_id": rid})
}

fn denied(action: &str, rid: i64) -> Value {
    json!({"errors": ["You do not have permission to perform this action."], "data": null, "action": action, "response_status": 403, "request_id": rid})
}

#[tokio::test]
async fn anonymous_clients_read_and_signed_in_clients_write() {
    let (s, db) = serve().await;
    let ada = create_user(&db, "ada").await;
    let mut anon = TestClient::connect(&s.url("/users/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    let mut alice = TestClient::connect(&s.url("/users/?token=s3cret"))
        .await
        .unwrap()
        .dcrf_envelopes();

    let listed = anon
        .request(json!({"action": "list", "request_id": 1}))
        .await;
    assert_eq!(listed["response_status"], json!(200));
    assert_eq!(
        anon.request(json!({"action": "retrieve", "pk": ada.id, "request_id": 2}))
            .await,
        reply("retrieve", 2, 200, json!(ada))
    );
    assert_eq!(
        anon.request(json!({"action": "count", "request_id": 3}))
            .await,
        reply("count", 3, 200, json!(1))
    );
    for (rid, action) in [(4, "touch"), (5, "create"), (6, "delete"), (7, "no_such")] {
        assert_eq!(
            anon.request(json!({"action": action, "pk": ada.id, "data": {"username": "x", "email": "x@example.com"}, "request_id": rid}))
                .await,
            denied(action, rid),
        );
    }
    assert_eq!(
        alice
            .request(json!({"action": "touch", "request_id": 8}))
            .await,
        reply("touch", 8, 204, Value::Null)
    );
    assert_eq!(
        alice
            .request(json!({"action": "create", "data": {"username": "bob", "email": "bob@example.com"}, "request_id": 9}))
            .await["response_status"],
        json!(201)
    );
}

/// DCRF's gap: an anonymous `subscribe_instance` answered 201 and then never pushed, because the
/// push was checked as an `update` (a write). A push is a read: it arrives.
#[tokio::test]
async fn an_anonymous_reader_receives_the_pushes_it_subscribed_to() {
    let (s, db) = serve().await;
    let ada = create_user(&db, "ada").await;
    let mut anon = TestClient::connect(&s.url("/users/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        anon.request(json!({"action": "subscribe_instance", "pk": ada.id, "request_id": 1}))
            .await,
        reply("subscribe_instance", 1, 201, Value::Null)
    );
    assert_eq!(
        anon.request(json!({"action": "follow_all", "request_id": 2}))
            .await,
        reply("follow_all", 2, 201, Value::Null)
    );
    let renamed = rename_user(&db, &ada, "ada2").await;
    let mut pushes = vec![anon.receive_json().await, anon.receive_json().await];
    pushes.sort_by_key(|p| p["request_id"].as_i64());
    assert_eq!(
        pushes,
        vec![
            reply("update", 1, 200, json!(renamed)),
            reply("update", 2, 200, json!(renamed))
        ]
    );
    anon.receive_nothing().await;
}

/// The same rule for both kinds: a push is delivered when the permissions allow its action (as a
/// read) — for an instance subscription and for a model observer's group alike.
#[tokio::test]
async fn pushes_of_refused_actions_are_not_sent_for_either_kind() {
    let (s, db) = serve().await;
    let ada = create_user(&db, "ada").await;
    let mut c = TestClient::connect(&s.url("/guarded/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    // Refusing update and delete pushes leaves `create` for a group: the subscription stands.
    assert_eq!(
        c.request(json!({"action": "follow_all", "request_id": 2}))
            .await,
        reply("follow_all", 2, 201, Value::Null)
    );
    rename_user(&db, &ada, "quiet").await;
    c.receive_nothing().await;
    let bob = create_user(&db, "bob").await;
    assert_eq!(c.receive_json().await, reply("create", 2, 200, json!(bob)));
    c.receive_nothing().await;
}

/// An instance subscription that could never receive a push (update and delete both refused)
/// is refused at subscribe time with 403, instead of succeeding and staying silent.
#[tokio::test]
async fn a_subscription_that_could_never_push_is_refused() {
    let (s, db) = serve().await;
    let ada = create_user(&db, "ada").await;
    let mut c = TestClient::connect(&s.url("/guarded/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        c.request(json!({"action": "subscribe_instance", "pk": ada.id, "request_id": 1}))
            .await,
        denied("subscribe_instance", 1)
    );
    assert_eq!(
        db.layer()
            .local_members(&format!("auth_user.instance.guarded:{}", ada.id)),
        0
    );
}
