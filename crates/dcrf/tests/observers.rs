//! DCRF's observer scenarios (test_model_observer.py, test_observer.py,
//! test_model_with_custom_pk_observer.py) replayed frame for frame over real sockets, plus
//! transactions (rollback, several saves), group moves, bulk updates, and the DCRF quirks we fix
//! (Q2 denied push, Q4 early unsubscribe, Q6 custom lookup). Each runs on SQLite and PostgreSQL.

mod common;

use std::sync::Arc;

use common::{
    Counter, ThingInput, UserInput, create_user, custom_pk, delete_user, rename_user, thing, user,
};
use dcrf::consumer::Event;
use dcrf::model::{ChangeKind, Db, ModelActions, ModelConsumer};
use dcrf::observer::{ModelObserver, Observer};
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use sea_orm::ActiveValue::Set;
use sea_orm::entity::prelude::*;
use sea_orm::{Condition, sea_query::Expr};
use serde::Deserialize;
use serde_json::{Value, json};

/// How a [`UserInstances`] route behaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Plain,
    /// The consumer's permissions deny `update` (push-time check, DCRF's Q2).
    DenyUpdatePushes,
    /// Users named `hidden...` are outside the queryset.
    HiddenOutsideQueryset,
    /// Lookup by username (DCRF's Q6).
    ByUsername,
}

#[derive(Clone)]
struct UserInstances {
    db: Db,
    mode: Mode,
}

impl ModelConsumer for UserInstances {
    type Entity = user::Entity;
    type Output = user::Model;
    type Input = UserInput;
    fn db(&self) -> &Db {
        &self.db
    }
    fn actions(&self) -> ModelActions {
        ModelActions::RETRIEVE | ModelActions::SUBSCRIBE_INSTANCE
    }
    fn lookup_field(&self) -> &'static str {
        if self.mode == Mode::ByUsername {
            "username"
        } else {
            "pk"
        }
    }
    async fn in_queryset(&self, _: &Ctx, object: &user::Model) -> bool {
        !(self.mode == Mode::HiddenOutsideQueryset && object.username.starts_with("hidden"))
    }
}

#[derive(Deserialize)]
struct UpdateUsername {
    pk: i32,
    username: String,
}

#[dcrf::consumer(model)]
impl UserInstances {
    /// DCRF's `update_username`: saves, then answers `{"pk": pk}`.
    #[action]
    async fn update_username(&mut self, args: UpdateUsername) -> Result<Reply<Value>, ApiError> {
        let mut txn = self.db.begin().await?;
        let am = user::ActiveModel {
            id: sea_orm::ActiveValue::Unchanged(args.pk),
            username: Set(args.username),
            ..Default::default()
        };
        txn.update(am).await?;
        txn.commit().await?;
        Ok(Reply::ok(json!({ "pk": args.pk })))
    }
}

/// Denies the `update` action (and so update pushes) when asked to.
struct DenyUpdate;
impl Permission for DenyUpdate {
    async fn has_permission(&self, _: &Scope, action: &str, _: &Frame<'_>) -> bool {
        action != "update"
    }
}

impl Consumer for UserInstances {
    fn permissions(&self) -> Option<Permissions> {
        (self.mode == Mode::DenyUpdatePushes).then(|| Permissions::new(DenyUpdate))
    }
}

#[derive(Clone)]
struct ThingInstances {
    db: Db,
}

impl ModelConsumer for ThingInstances {
    type Entity = thing::Entity;
    type Output = thing::Model;
    type Input = ThingInput;
    fn db(&self) -> &Db {
        &self.db
    }
    fn actions(&self) -> ModelActions {
        ModelActions::ALL | ModelActions::SUBSCRIBE_INSTANCE
    }
}

#[dcrf::consumer(model)]
impl ThingInstances {}
impl Consumer for ThingInstances {}

/// Users served with every default hook but `validate`, which changes the row being updated
/// when the update's email asks for it, as another writer could between the update's read of
/// the row and its write: `rename@…` renames the user to `y`, `remove@…` deletes it.
#[derive(Clone)]
struct Meddled {
    db: Db,
}

impl ModelConsumer for Meddled {
    type Entity = user::Entity;
    type Output = user::Model;
    type Input = UserInput;
    fn db(&self) -> &Db {
        &self.db
    }
    async fn validate(
        &self,
        _: &Ctx,
        input: &UserInput,
        instance: Option<&user::Model>,
    ) -> Result<(), ApiError> {
        match (instance, input.email.split('@').next()) {
            (Some(user), Some("rename")) => {
                rename_user(&self.db, user, "y").await;
            }
            (Some(user), Some("remove")) => delete_user(&self.db, user).await,
            _ => {}
        }
        Ok(())
    }
}

#[dcrf::consumer(model)]
impl Consumer for Meddled {}

/// Observers declared once per database, as DCRF declares them once per class.
#[derive(Clone)]
struct Observers {
    wrapper: Arc<ModelObserver<user::Model>>,
    by_username: Arc<ModelObserver<user::Model>>,
    class_serializer: Arc<ModelObserver<user::Model>>,
    custom_pk: Arc<ModelObserver<custom_pk::Model>>,
    logged_in: Observer,
    /// Watcher connections that have ended (their groups left).
    left: Arc<Counter>,
}

impl Observers {
    fn new(db: &Db) -> Self {
        Observers {
            wrapper: db.observe::<user::Entity>("user.change.observer.wrapper"),
            by_username: db
                .observe::<user::Entity>("user.change.custom.groups")
                .group_by(|u: &user::Model| vec![u.username.clone()]),
            class_serializer: db
                .observe::<user::Entity>("user.change.class.serializer")
                .serialize(|u: &user::Model, _| json!({"id": u.id, "username": u.username})),
            custom_pk: db
                .observe::<custom_pk::Entity>("custom.pk.all")
                .serialize(|m: &custom_pk::Model, kind: ChangeKind| {
                    json!({"action": kind.as_str(), "data": m})
                }),
            logged_in: Observer::new(db.layer(), "user_logged_in"),
            left: Arc::default(),
        }
    }
}

/// DCRF's observer test consumers in one: what it subscribes to at connect is chosen by the
/// route, and its handler formats frames as the upstream tests' handlers do.
#[derive(Clone)]
struct Watcher {
    obs: Observers,
    at_connect: &'static str,
}

#[derive(Deserialize)]
struct ByName {
    username: String,
}

#[dcrf::consumer]
impl Watcher {
    #[action]
    async fn subscribe(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: ByName,
    ) -> Result<(), ApiError> {
        self.obs
            .by_username
            .subscribe(ctx, &args.username, frame.request_id())
            .await?;
        ctx.send_json(&json!({"request_id": raw(frame), "action": "subscribed"}))
            .await
            .ok();
        Ok(())
    }

    #[action]
    async fn unsubscribe(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: ByName,
    ) -> Result<(), ApiError> {
        self.obs
            .by_username
            .unsubscribe(ctx, &args.username, frame.request_id());
        ctx.send_json(&json!({"request_id": raw(frame), "action": "unsubscribed"}))
            .await
            .ok();
        Ok(())
    }

    #[action]
    async fn subscribe_to_all_changes(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
    ) -> Result<(), ApiError> {
        self.obs
            .custom_pk
            .subscribe(ctx, "", frame.request_id())
            .await?;
        ctx.send_json(&json!({"action": "subscribed_to_all_changes", "request_id": raw(frame)}))
            .await
            .ok();
        Ok(())
    }
}

fn raw(frame: &Frame<'_>) -> Value {
    frame
        .request_id()
        .map(|r| serde_json::from_str(r.get()).unwrap())
        .unwrap_or(Value::Null)
}

impl Consumer for Watcher {
    async fn connect(&mut self, ctx: &Ctx) -> Result<(), ApiError> {
        match self.at_connect {
            "wrapper" => {
                self.obs.wrapper.subscribe(ctx, "", None).await?;
            }
            "class_serializer" => {
                self.obs.class_serializer.subscribe(ctx, "", None).await?;
            }
            "logged_in" => {
                self.obs.logged_in.subscribe(ctx, "", None).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Runs after the connection has left its groups.
    async fn disconnect(&mut self, _: &Ctx) {
        self.obs.left.hit();
    }

    async fn on_event(&mut self, ctx: &Ctx, event: &Event<'_>) {
        let body: Value = serde_json::from_str(event.body().get()).unwrap();
        let ids: Vec<Value> = event
            .request_ids
            .iter()
            .map(|r| serde_json::from_str(r.get()).unwrap())
            .collect();
        match event.observer() {
            "user.change.observer.wrapper" => {
                let _ = ctx
                    .send_json(
                        &json!({"action": event.action(), "body": body, "type": event.observer()}),
                    )
                    .await;
            }
            "user.change.custom.groups" => {
                let _ = ctx
                    .send_json(&json!({"action": event.action(), "body": body, "type": event.observer(), "subscribing_request_ids": ids}))
                    .await;
            }
            "user.change.class.serializer" => {
                let _ = ctx
                    .reply(event.action(), None, event.body(), dcrf::StatusCode::OK)
                    .await;
            }
            "custom.pk.all" => {
                for id in ids {
                    let mut frame = body.clone();
                    frame["request_id"] = id;
                    let _ = ctx.send_json(&frame).await;
                }
            }
            "user_logged_in" => {
                let _ = ctx
                    .send_json(&json!({"message": body, "observer": true}))
                    .await;
            }
            _ => {}
        }
    }
}

async fn serve(db: &Db) -> (TestServer, Observers) {
    db.create_table(user::Entity).await.unwrap();
    db.create_table(thing::Entity).await.unwrap();
    db.create_table(custom_pk::Entity).await.unwrap();
    let obs = Observers::new(db);
    let app = Dcrf::new();
    let mut router = axum::Router::new();
    for (path, mode) in [
        ("/users/", Mode::Plain),
        ("/users-deny-update/", Mode::DenyUpdatePushes),
        ("/users-hidden/", Mode::HiddenOutsideQueryset),
        ("/users-by-name/", Mode::ByUsername),
    ] {
        let c = UserInstances {
            db: db.clone(),
            mode,
        };
        router = router.route(path, app.consumer(move || c.clone()));
    }
    let things = ThingInstances { db: db.clone() };
    router = router.route("/things/", app.consumer(move || things.clone()));
    let meddled = Meddled { db: db.clone() };
    router = router.route("/meddled/", app.consumer(move || meddled.clone()));
    for at_connect in ["none", "wrapper", "class_serializer", "logged_in"] {
        let w = Watcher {
            obs: obs.clone(),
            at_connect,
        };
        router = router.route(
            &format!("/watch/{at_connect}/"),
            app.consumer(move || w.clone()),
        );
    }
    (TestServer::start(router, app).await, obs)
}

async fn connect(s: &TestServer, path: &str) -> TestClient {
    TestClient::connect(&s.url(path))
        .await
        .unwrap()
        .dcrf_envelopes()
}

fn frame(action: &str, rid: Value, status: u16, data: Value) -> Value {
    json!({"errors": [], "data": data, "action": action, "response_status": status, "request_id": rid})
}

fn user_json(u: &user::Model) -> Value {
    json!({"id": u.id, "username": u.username, "email": u.email})
}

dcrf::backend_tests!(
    observer_model_instance_mixin,
    two_observer_model_instance_mixins,
    unsubscribe_observer_model_instance_mixin,
    instance_mixin_with_many_subs,
    multiple_changes_within_transaction,
    rollback_publishes_nothing,
    model_observer_wrapper,
    model_observer_wrapper_in_transaction,
    model_observer_delete_wrapper,
    model_observer_many_connections,
    model_observer_custom_groups_and_request_ids,
    observer_unsubscribe_behavior_with_custom_groups,
    model_observer_with_class_serializer,
    subscription_create_notification_custom_pk,
    generic_observer,
    group_moves,
    bulk_update_and_delete_are_observed,
    denied_push_sends_nothing,
    push_outside_queryset_is_404,
    custom_lookup_field_subscription,
    unsubscribe_before_any_event_and_idempotent_subscribe,
    unsubscribe_request_id_leaves_every_instance,
    subscribe_instance_errors,
    instance_observer_has_a_stable_name,
    instance_push_without_its_object_is_not_sent,
    update_of_a_row_changed_meanwhile,
    pushes_and_frames_interleave_on_one_socket,
);

async fn observer_model_instance_mixin(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": 100, "request_id": 1}))
            .await,
        json!({"errors": ["Not found"], "data": null, "action": "retrieve", "response_status": 404, "request_id": 1})
    );
    let u1 = create_user(&db, "test1").await;
    let u2 = create_user(&db, "test2").await;
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": u1.id, "request_id": 1}))
            .await,
        frame("retrieve", json!(1), 200, user_json(&u1))
    );
    assert_eq!(
        c.request(json!({"action": "subscribe_instance", "pk": u1.id, "request_id": 4}))
            .await,
        frame("subscribe_instance", json!(4), 201, Value::Null)
    );
    create_user(&db, "test3").await;
    c.receive_nothing().await;
    assert_eq!(
        c.request(json!({"action": "update_username", "pk": u1.id, "username": "thenewname", "request_id": 5}))
            .await,
        frame("update_username", json!(5), 200, json!({"pk": u1.id}))
    );
    assert_eq!(
        c.receive_json().await,
        frame(
            "update",
            json!(4),
            200,
            json!({"email": "42@example.com", "id": u1.id, "username": "thenewname"})
        )
    );
    let current = rename_user(&db, &u2, "other").await;
    c.receive_nothing().await;
    let _ = current;
    let u1_now = user::Entity::find_by_id(u1.id)
        .one(db.conn())
        .await
        .unwrap()
        .unwrap();
    delete_user(&db, &u1_now).await;
    assert_eq!(
        c.receive_json().await,
        frame("delete", json!(4), 204, json!({"pk": u1.id}))
    );
    c.receive_nothing().await;
}

async fn two_observer_model_instance_mixins(db: Db) {
    let (s, _) = serve(&db).await;
    let u1 = create_user(&db, "test1").await;
    let mut txn = db.begin().await.unwrap();
    let t = txn
        .insert(thing::ActiveModel {
            name: Set("t".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    txn.commit().await.unwrap();
    let mut users = connect(&s, "/users/").await;
    let mut things = connect(&s, "/things/").await;
    assert_eq!(
        users
            .request(json!({"action": "subscribe_instance", "pk": u1.id, "request_id": 4}))
            .await["response_status"],
        json!(201)
    );
    assert_eq!(
        things
            .request(json!({"action": "subscribe_instance", "pk": t.id, "request_id": 4}))
            .await["response_status"],
        json!(201)
    );
    rename_user(&db, &u1, "renamed").await;
    assert_eq!(users.receive_json().await["action"], json!("update"));
    things.receive_nothing().await;
    // A patch through the thing consumer's own mixin pushes to its subscriber only.
    assert_eq!(
        things
            .request(json!({"action": "patch", "pk": t.id, "data": {"name": "u"}, "request_id": 5}))
            .await["response_status"],
        json!(200)
    );
    assert_eq!(
        things.receive_json().await,
        frame("update", json!(4), 200, json!({"id": t.id, "name": "u"}))
    );
    users.receive_nothing().await;
}

async fn unsubscribe_observer_model_instance_mixin(db: Db) {
    let (s, _) = serve(&db).await;
    let u1 = create_user(&db, "test1").await;
    let mut c = connect(&s, "/users/").await;
    c.request(json!({"action": "subscribe_instance", "pk": u1.id, "request_id": 4}))
        .await;
    c.receive_nothing().await;
    // Reply first, then the push (the action runs to completion before events are handled).
    assert_eq!(
        c.request(json!({"action": "update_username", "pk": u1.id, "username": "thenewname", "request_id": 5}))
            .await["request_id"],
        json!(5)
    );
    assert_eq!(c.receive_json().await["request_id"], json!(4));
    assert_eq!(
        c.request(json!({"action": "unsubscribe_instance", "pk": u1.id, "request_id": 4}))
            .await,
        frame("unsubscribe_instance", json!(4), 204, Value::Null)
    );
    c.receive_nothing().await;
    assert_eq!(
        c.request(json!({"action": "update_username", "pk": u1.id, "username": "thenewname2", "request_id": 5}))
            .await,
        frame("update_username", json!(5), 200, json!({"pk": u1.id}))
    );
    c.receive_nothing().await;
}

async fn instance_mixin_with_many_subs(db: Db) {
    let (s, _) = serve(&db).await;
    let u1 = create_user(&db, "test1").await;
    let u2 = create_user(&db, "test2").await;
    let mut c = connect(&s, "/users/").await;
    c.request(json!({"action": "subscribe_instance", "pk": u1.id, "request_id": 4}))
        .await;
    c.request(json!({"action": "subscribe_instance", "pk": u2.id, "request_id": 5}))
        .await;
    c.request(json!({"action": "update_username", "pk": u1.id, "username": "a1", "request_id": 6}))
        .await;
    let push = c.receive_json().await;
    assert_eq!(push["request_id"], json!(4));
    assert_eq!(push["data"]["username"], json!("a1"));
    c.receive_nothing().await;
    c.request(json!({"action": "update_username", "pk": u2.id, "username": "a2", "request_id": 7}))
        .await;
    let push = c.receive_json().await;
    assert_eq!(push["request_id"], json!(5));
    assert_eq!(push["data"]["username"], json!("a2"));
    c.receive_nothing().await;
    // The same instance with two request ids: one push per id, in subscription order.
    c.request(json!({"action": "subscribe_instance", "pk": u1.id, "request_id": "r2"}))
        .await;
    rename_user(&db, &u1, "b1").await;
    assert_eq!(c.receive_json().await["request_id"], json!(4));
    assert_eq!(c.receive_json().await["request_id"], json!("r2"));
    c.receive_nothing().await;
}

async fn multiple_changes_within_transaction(db: Db) {
    let (s, _) = serve(&db).await;
    let u1 = create_user(&db, "test1").await;
    let mut c = connect(&s, "/users/").await;
    c.request(json!({"action": "subscribe_instance", "pk": u1.id, "request_id": 4}))
        .await;
    let mut txn = db.begin().await.unwrap();
    for name in ["thenewname", "thenewname2", "thenewname3"] {
        let mut am: user::ActiveModel = u1.clone().into();
        am.username = Set(name.into());
        txn.update(am).await.unwrap();
    }
    c.receive_nothing().await;
    txn.commit().await.unwrap();
    assert_eq!(
        c.receive_json().await,
        frame(
            "update",
            json!(4),
            200,
            json!({"email": "42@example.com", "id": u1.id, "username": "thenewname3"})
        )
    );
    c.receive_nothing().await;
}

async fn rollback_publishes_nothing(db: Db) {
    let (s, _) = serve(&db).await;
    let u1 = create_user(&db, "test1").await;
    let mut c = connect(&s, "/users/").await;
    c.request(json!({"action": "subscribe_instance", "pk": u1.id, "request_id": 4}))
        .await;
    let mut w = connect(&s, "/watch/wrapper/").await;
    {
        let mut txn = db.begin().await.unwrap();
        let mut am: user::ActiveModel = u1.clone().into();
        am.username = Set("rolled back".into());
        txn.update(am).await.unwrap();
        txn.insert(user::ActiveModel {
            username: Set("ghost".into()),
            email: Set(String::new()),
            ..Default::default()
        })
        .await
        .unwrap();
        // Dropped without commit: rolled back.
    }
    c.receive_nothing().await;
    w.receive_nothing().await;
    let stored = user::Entity::find_by_id(u1.id)
        .one(db.conn())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.username, "test1");
}

async fn model_observer_wrapper(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/watch/wrapper/").await;
    let u = create_user(&db, "test").await;
    assert_eq!(
        c.receive_json().await,
        json!({"action": "create", "body": {"pk": u.id}, "type": "user.change.observer.wrapper"})
    );
    c.receive_nothing().await;
    // Writes outside the framework's transactions are not observed (see capture for those).
    common::add_user(&db, "raw", "").await;
    c.receive_nothing().await;
}

async fn model_observer_wrapper_in_transaction(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/watch/wrapper/").await;
    let mut txn = db.begin().await.unwrap();
    let u = txn
        .insert(user::ActiveModel {
            username: Set("test".into()),
            email: Set(String::new()),
            ..Default::default()
        })
        .await
        .unwrap();
    c.receive_nothing().await;
    let mut am: user::ActiveModel = u.clone().into();
    am.email = Set("new@example.com".into());
    txn.update(am).await.unwrap();
    c.receive_nothing().await;
    txn.commit().await.unwrap();
    // A create then an update in one transaction: one "create".
    assert_eq!(
        c.receive_json().await,
        json!({"action": "create", "body": {"pk": u.id}, "type": "user.change.observer.wrapper"})
    );
    c.receive_nothing().await;
    // A create then a delete in one transaction: nothing.
    let mut txn = db.begin().await.unwrap();
    let v = txn
        .insert(user::ActiveModel {
            username: Set("short-lived".into()),
            email: Set(String::new()),
            ..Default::default()
        })
        .await
        .unwrap();
    txn.delete(v).await.unwrap();
    txn.commit().await.unwrap();
    c.receive_nothing().await;
}

async fn model_observer_delete_wrapper(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/watch/wrapper/").await;
    let u = create_user(&db, "test").await;
    assert_eq!(c.receive_json().await["action"], json!("create"));
    c.receive_nothing().await;
    delete_user(&db, &u).await;
    assert_eq!(
        c.receive_json().await,
        json!({"action": "delete", "body": {"pk": u.id}, "type": "user.change.observer.wrapper"})
    );
    c.receive_nothing().await;
}

async fn model_observer_many_connections(db: Db) {
    let (s, obs) = serve(&db).await;
    let mut a = connect(&s, "/watch/wrapper/").await;
    let mut b = connect(&s, "/watch/wrapper/").await;
    let mut other = connect(&s, "/watch/class_serializer/").await;
    let u = create_user(&db, "test").await;
    let expected =
        json!({"action": "create", "body": {"pk": u.id}, "type": "user.change.observer.wrapper"});
    assert_eq!(a.receive_json().await, expected);
    assert_eq!(b.receive_json().await, expected);
    // Another observer of the same model gets its own message.
    assert_eq!(
        other.receive_json().await,
        frame(
            "create",
            Value::Null,
            200,
            json!({"id": u.id, "username": "test"})
        )
    );
    a.close().await;
    obs.left.wait_for(1, "the closed connection to end").await;
    let v = create_user(&db, "test2").await;
    assert_eq!(b.receive_json().await["body"], json!({"pk": v.id}));
}

async fn model_observer_custom_groups_and_request_ids(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/watch/none/").await;
    c.send_json(json!({"action": "subscribe", "username": "test", "request_id": 5}))
        .await;
    assert_eq!(
        c.receive_json().await,
        json!({"request_id": 5, "action": "subscribed"})
    );
    let u = create_user(&db, "test").await;
    assert_eq!(
        c.receive_json().await,
        json!({"action": "create", "body": {"pk": u.id}, "type": "user.change.custom.groups", "subscribing_request_ids": [5]})
    );
    create_user(&db, "test2").await;
    c.receive_nothing().await;
}

async fn observer_unsubscribe_behavior_with_custom_groups(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/watch/none/").await;
    let u = create_user(&db, "thenewname").await;
    delete_user(&db, &u).await;
    c.receive_nothing().await;
    c.send_json(json!({"action": "subscribe", "username": "thenewname", "request_id": 5}))
        .await;
    assert_eq!(c.receive_json().await["action"], json!("subscribed"));
    let u = create_user(&db, "thenewname").await;
    assert_eq!(
        c.receive_json().await["subscribing_request_ids"],
        json!([5])
    );
    c.send_json(json!({"action": "unsubscribe", "username": "thenewname", "request_id": 5}))
        .await;
    assert_eq!(
        c.receive_json().await,
        json!({"request_id": 5, "action": "unsubscribed"})
    );
    c.send_json(json!({"action": "subscribe", "username": "thenewname2", "request_id": 6}))
        .await;
    assert_eq!(c.receive_json().await["action"], json!("subscribed"));
    delete_user(&db, &u).await;
    create_user(&db, "thenewname").await;
    c.receive_nothing().await;
    let v = create_user(&db, "thenewname2").await;
    assert_eq!(
        c.receive_json().await,
        json!({"action": "create", "body": {"pk": v.id}, "type": "user.change.custom.groups", "subscribing_request_ids": [6]})
    );
}

async fn model_observer_with_class_serializer(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/watch/class_serializer/").await;
    let u = create_user(&db, "test").await;
    assert_eq!(
        c.receive_json().await,
        frame(
            "create",
            Value::Null,
            200,
            json!({"id": u.id, "username": "test"})
        )
    );
    let u = rename_user(&db, &u, "test2").await;
    assert_eq!(
        c.receive_json().await,
        frame(
            "update",
            Value::Null,
            200,
            json!({"id": u.id, "username": "test2"})
        )
    );
    delete_user(&db, &u).await;
    // The delete push carries the data as it was, status 200 (as DCRF).
    assert_eq!(
        c.receive_json().await,
        frame(
            "delete",
            Value::Null,
            200,
            json!({"id": u.id, "username": "test2"})
        )
    );
}

async fn subscription_create_notification_custom_pk(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/watch/none/").await;
    c.send_json(json!({"action": "subscribe_to_all_changes", "request_id": 1}))
        .await;
    assert_eq!(
        c.receive_json().await,
        json!({"action": "subscribed_to_all_changes", "request_id": 1})
    );
    let mut txn = db.begin().await.unwrap();
    let m = txn
        .insert(custom_pk::ActiveModel {
            name: Set("some_unique_name".into()),
            description: Set(None),
        })
        .await
        .unwrap();
    txn.commit().await.unwrap();
    assert_eq!(
        c.receive_json().await,
        json!({"action": "create", "request_id": 1, "data": {"name": "some_unique_name", "description": null}})
    );
    let mut txn = db.begin().await.unwrap();
    let mut am: custom_pk::ActiveModel = m.clone().into();
    am.description = Set(Some("changed".into()));
    let m = txn.update(am).await.unwrap();
    txn.commit().await.unwrap();
    assert_eq!(
        c.receive_json().await,
        json!({"action": "update", "request_id": 1, "data": {"name": "some_unique_name", "description": "changed"}})
    );
    let mut txn = db.begin().await.unwrap();
    txn.delete(m).await.unwrap();
    txn.commit().await.unwrap();
    assert_eq!(
        c.receive_json().await,
        json!({"action": "delete", "request_id": 1, "data": {"name": "some_unique_name", "description": "changed"}})
    );
}

async fn generic_observer(db: Db) {
    let (s, obs) = serve(&db).await;
    let mut c = connect(&s, "/watch/logged_in/").await;
    obs.logged_in
        .send("", "user_logged_in", &json!({}))
        .await
        .unwrap();
    assert_eq!(
        c.receive_json().await,
        json!({"message": {}, "observer": true})
    );
    // Sent to another key: not received.
    obs.logged_in
        .send("elsewhere", "x", &json!({}))
        .await
        .unwrap();
    c.receive_nothing().await;
}

async fn group_moves(db: Db) {
    let (s, _) = serve(&db).await;
    let mut x = connect(&s, "/watch/none/").await;
    let mut y = connect(&s, "/watch/none/").await;
    x.send_json(json!({"action": "subscribe", "username": "x", "request_id": "x"}))
        .await;
    x.receive_json().await;
    y.send_json(json!({"action": "subscribe", "username": "y", "request_id": "y"}))
        .await;
    y.receive_json().await;
    let u = create_user(&db, "x").await;
    assert_eq!(x.receive_json().await["action"], json!("create"));
    y.receive_nothing().await;
    // Renamed x → y: the x group sees it leave, the y group sees it arrive.
    let u = rename_user(&db, &u, "y").await;
    assert_eq!(
        x.receive_json().await,
        json!({"action": "delete", "body": {"pk": u.id}, "type": "user.change.custom.groups", "subscribing_request_ids": ["x"]})
    );
    assert_eq!(
        y.receive_json().await,
        json!({"action": "create", "body": {"pk": u.id}, "type": "user.change.custom.groups", "subscribing_request_ids": ["y"]})
    );
    // And back.
    rename_user(&db, &u, "x").await;
    assert_eq!(x.receive_json().await["action"], json!("create"));
    assert_eq!(y.receive_json().await["action"], json!("delete"));
}

async fn bulk_update_and_delete_are_observed(db: Db) {
    let (s, _) = serve(&db).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(create_user(&db, &format!("bulk{i}")).await.id);
    }
    let untouched = create_user(&db, "other").await;
    let mut c = connect(&s, "/users/").await;
    for (i, id) in ids.iter().chain([&untouched.id]).enumerate() {
        c.request(json!({"action": "subscribe_instance", "pk": id, "request_id": i}))
            .await;
    }
    let mut txn = db.begin().await.unwrap();
    let n = txn
        .update_where::<user::Entity>(
            Condition::all().add(user::Column::Id.is_in(ids.clone())),
            |u| u.col_expr(user::Column::Email, Expr::value("bulk@example.com")),
        )
        .await
        .unwrap();
    txn.commit().await.unwrap();
    assert_eq!(n, 3);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let push = c.receive_json().await;
        assert_eq!(push["action"], json!("update"));
        assert_eq!(push["data"]["email"], json!("bulk@example.com"));
        seen.push(push["request_id"].as_u64().unwrap());
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2]);
    c.receive_nothing().await;
    let mut txn = db.begin().await.unwrap();
    let n = txn
        .delete_where::<user::Entity>(Condition::all().add(user::Column::Id.is_in(ids.clone())))
        .await
        .unwrap();
    txn.commit().await.unwrap();
    assert_eq!(n, 3);
    for _ in 0..3 {
        let push = c.receive_json().await;
        assert_eq!(push["action"], json!("delete"));
        assert_eq!(push["response_status"], json!(204));
    }
    c.receive_nothing().await;
}

async fn denied_push_sends_nothing(db: Db) {
    let (s, _) = serve(&db).await;
    let u = create_user(&db, "test").await;
    let mut c = connect(&s, "/users-deny-update/").await;
    assert_eq!(
        c.request(json!({"action": "subscribe_instance", "pk": u.id, "request_id": 1}))
            .await["response_status"],
        json!(201)
    );
    rename_user(&db, &u, "changed").await;
    // DCRF sent a 403 with request_id null and then the data anyway (Q2); we send nothing.
    c.receive_nothing().await;
    delete_user(&db, &u).await;
    assert_eq!(
        c.receive_json().await,
        frame("delete", json!(1), 204, json!({"pk": u.id}))
    );
}

async fn push_outside_queryset_is_404(db: Db) {
    let (s, _) = serve(&db).await;
    let u = create_user(&db, "visible").await;
    let mut c = connect(&s, "/users-hidden/").await;
    c.request(json!({"action": "subscribe_instance", "pk": u.id, "request_id": "s"}))
        .await;
    rename_user(&db, &u, "hidden now").await;
    assert_eq!(
        c.receive_json().await,
        json!({"errors": ["Not found"], "data": null, "action": "update", "response_status": 404, "request_id": "s"})
    );
}

async fn custom_lookup_field_subscription(db: Db) {
    let (s, _) = serve(&db).await;
    let u = create_user(&db, "alice").await;
    let mut c = connect(&s, "/users-by-name/").await;
    assert_eq!(
        c.request(json!({"action": "subscribe_instance", "username": "alice", "request_id": 1}))
            .await,
        frame("subscribe_instance", json!(1), 201, Value::Null)
    );
    let mut txn = db.begin().await.unwrap();
    let mut am: user::ActiveModel = u.clone().into();
    am.email = Set("alice@example.com".into());
    txn.update(am).await.unwrap();
    txn.commit().await.unwrap();
    // DCRF crashed here (Q6); the push works.
    assert_eq!(
        c.receive_json().await,
        frame(
            "update",
            json!(1),
            200,
            json!({"id": u.id, "username": "alice", "email": "alice@example.com"})
        )
    );
}

async fn unsubscribe_before_any_event_and_idempotent_subscribe(db: Db) {
    let (s, _) = serve(&db).await;
    let u = create_user(&db, "test").await;
    let mut c = connect(&s, "/users/").await;
    for _ in 0..2 {
        assert_eq!(
            c.request(json!({"action": "subscribe_instance", "pk": u.id, "request_id": 7}))
                .await["response_status"],
            json!(201)
        );
    }
    let u = rename_user(&db, &u, "once").await;
    assert_eq!(c.receive_json().await["request_id"], json!(7));
    c.receive_nothing().await;
    // Unsubscribing without a request id before any further event works (Q4).
    let mut d = connect(&s, "/users/").await;
    d.request(json!({"action": "subscribe_instance", "pk": u.id, "request_id": 8}))
        .await;
    assert_eq!(
        d.request(json!({"action": "unsubscribe_instance", "pk": u.id}))
            .await,
        frame("unsubscribe_instance", Value::Null, 204, Value::Null)
    );
    rename_user(&db, &u, "twice").await;
    assert_eq!(c.receive_json().await["request_id"], json!(7));
    d.receive_nothing().await;
}

async fn unsubscribe_request_id_leaves_every_instance(db: Db) {
    let (s, _) = serve(&db).await;
    let u1 = create_user(&db, "u1").await;
    let u2 = create_user(&db, "u2").await;
    let mut c = connect(&s, "/users/").await;
    for (pk, rid) in [(u1.id, "A"), (u2.id, "A"), (u2.id, "B")] {
        c.request(json!({"action": "subscribe_instance", "pk": pk, "request_id": rid}))
            .await;
    }
    // As DCRF (Q3): unsubscribing (u1, "A") removes "A" from every instance.
    c.request(json!({"action": "unsubscribe_instance", "pk": u1.id, "request_id": "A"}))
        .await;
    rename_user(&db, &u2, "u2b").await;
    assert_eq!(c.receive_json().await["request_id"], json!("B"));
    c.receive_nothing().await;
    rename_user(&db, &u1, "u1b").await;
    c.receive_nothing().await;
}

async fn subscribe_instance_errors(db: Db) {
    let (s, _) = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "subscribe_instance", "pk": 999, "request_id": 1}))
            .await,
        json!({"errors": ["Not found"], "data": null, "action": "subscribe_instance", "response_status": 404, "request_id": 1})
    );
    let u = create_user(&db, "test").await;
    // DCRF closed the socket here; we answer.
    assert_eq!(
        c.request(json!({"action": "subscribe_instance", "pk": u.id}))
            .await,
        json!({"errors": ["A request_id is required: pushes carry it."], "data": null, "action": "subscribe_instance", "response_status": 400, "request_id": null})
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": u.id, "request_id": 2}))
            .await["response_status"],
        json!(200)
    );
}

/// The instance observer's id is `{table}.instance` (its groups travel between nodes under that
/// name), never a compiler-dependent type name.
async fn instance_observer_has_a_stable_name(db: Db) {
    let (s, _) = serve(&db).await;
    assert!(db.observer::<user::Model>("auth_user.instance").is_some());
    assert!(db.observer::<thing::Model>("thing.instance").is_some());
    let u = create_user(&db, "named").await;
    let mut c = connect(&s, "/users/").await;
    c.request(json!({"action": "subscribe_instance", "pk": u.id, "request_id": "n"}))
        .await;
    assert_eq!(
        db.layer()
            .local_members(&format!("auth_user.instance:{}", u.id)),
        1
    );
    drop(c);
}

/// A push whose typed object is missing (another node could not decode it) cannot be checked
/// against `has_object_permission` and `in_queryset`: it is not sent (fail closed).
async fn instance_push_without_its_object_is_not_sent(db: Db) {
    let (s, _) = serve(&db).await;
    let u = create_user(&db, "someone").await;
    let mut plain = connect(&s, "/users/").await;
    plain
        .request(json!({"action": "subscribe_instance", "pk": u.id, "request_id": 8}))
        .await;
    // The same group message a remote node sends, but without the object.
    Observer::new(db.layer(), "auth_user.instance")
        .send(
            &u.id.to_string(),
            "update",
            &json!({"id": u.id, "username": "forged"}),
        )
        .await
        .unwrap();
    plain.receive_nothing().await;
    // A real change still arrives.
    rename_user(&db, &u, "renamed").await;
    assert_eq!(
        plain.receive_json().await["data"]["username"],
        json!("renamed")
    );
}

#[tokio::test]
#[should_panic(expected = "both use the instance observer \"auth_user.instance\"")]
async fn two_consumers_of_one_table_cannot_share_the_instance_observer() {
    #[derive(Clone)]
    struct Other {
        db: Db,
    }
    impl ModelConsumer for Other {
        type Entity = user::Entity;
        type Output = user::Model;
        type Input = UserInput;
        fn db(&self) -> &Db {
            &self.db
        }
        fn actions(&self) -> ModelActions {
            ModelActions::RETRIEVE | ModelActions::SUBSCRIBE_INSTANCE
        }
    }
    #[dcrf::consumer(model)]
    impl Other {}
    impl Consumer for Other {}

    let db = Db::connect("sqlite::memory:").await.unwrap();
    let app = Dcrf::new();
    let first = UserInstances {
        db: db.clone(),
        mode: Mode::Plain,
    };
    let second = Other { db: db.clone() };
    let _ = axum::Router::<()>::new()
        .route("/a/", app.consumer(move || first.clone()))
        .route("/b/", app.consumer(move || second.clone()));
}

/// `patch` and `update` read their object before their transaction; with the default hooks
/// they then write in one statement that holds only while the row is as read. A row changed in
/// between is read again, so the push leaves and enters groups from the row as it was; a row
/// gone in between answers 404. Several rounds: the first update of a consumer type goes the
/// long way.
async fn update_of_a_row_changed_meanwhile(db: Db) {
    let (s, _) = serve(&db).await;
    let mut x = connect(&s, "/watch/none/").await;
    let mut y = connect(&s, "/watch/none/").await;
    for (client, name) in [(&mut x, "x"), (&mut y, "y")] {
        client
            .send_json(json!({"action": "subscribe", "username": name, "request_id": name}))
            .await;
        client.receive_json().await;
    }
    let group_frame = |action: &str, pk: i32, group: &str| json!({"action": action, "body": {"pk": pk}, "type": "user.change.custom.groups", "subscribing_request_ids": [group]});
    let mut c = connect(&s, "/meddled/").await;
    for round in 0..3 {
        let u = create_user(&db, "x").await;
        assert_eq!(x.receive_json().await, group_frame("create", u.id, "x"));
        for (action, data) in [
            ("patch", json!({"email": format!("p{round}@example.com")})),
            (
                "update",
                json!({"username": "x", "email": format!("u{round}@example.com")}),
            ),
        ] {
            let email = data["email"].clone();
            assert_eq!(
                c.request(json!({"action": action, "pk": u.id, "data": data, "request_id": round}))
                    .await,
                frame(
                    action,
                    json!(round),
                    200,
                    json!({"id": u.id, "username": "x", "email": email})
                ),
                "{action}, round {round}"
            );
            assert_eq!(x.receive_json().await, group_frame("update", u.id, "x"));
        }
        // Renamed to `y` between the read and the write: the rename moves it from `x` to `y`,
        // and the patch is an update within `y`.
        assert_eq!(
            c.request(json!({"action": "patch", "pk": u.id, "data": {"email": "rename@example.com"}, "request_id": round}))
                .await,
            frame(
                "patch",
                json!(round),
                200,
                json!({"id": u.id, "username": "y", "email": "rename@example.com"})
            ),
            "round {round}"
        );
        assert_eq!(x.receive_json().await, group_frame("delete", u.id, "x"));
        assert_eq!(y.receive_json().await, group_frame("create", u.id, "y"));
        assert_eq!(y.receive_json().await, group_frame("update", u.id, "y"));
        // Gone between the read and the write.
        assert_eq!(
            c.request(json!({"action": "update", "pk": u.id, "data": {"username": "z", "email": "remove@example.com"}, "request_id": round}))
                .await,
            json!({"errors": ["Not found"], "data": null, "action": "update", "response_status": 404, "request_id": round}),
            "round {round}"
        );
        assert_eq!(y.receive_json().await, group_frame("delete", u.id, "y"));
        x.receive_nothing().await;
        y.receive_nothing().await;
    }
    assert_eq!(
        user::Entity::find().count(db.conn()).await.unwrap(),
        0,
        "every round's user was removed"
    );
}

/// A subscriber's socket, once it has had pushes (from then on the reader polls the socket only
/// after it signalled), still reads every frame and notices its close: pushes and replies
/// interleave on one socket, each once, and the group is left when the socket closes.
async fn pushes_and_frames_interleave_on_one_socket(db: Db) {
    let (s, _) = serve(&db).await;
    let u1 = create_user(&db, "test1").await;
    let mut c = connect(&s, "/users/").await;
    let mut w = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "subscribe_instance", "pk": u1.id, "request_id": 1}))
            .await,
        frame("subscribe_instance", json!(1), 201, Value::Null)
    );
    let named = |name: &str| json!({"id": u1.id, "username": name, "email": u1.email});
    let rename = |name: &str, rid: i64| json!({"action": "update_username", "pk": u1.id, "username": name, "request_id": rid});
    for i in 0..20 {
        let name = format!("name{i}");
        assert_eq!(
            w.request(rename(&name, i)).await,
            frame("update_username", json!(i), 200, json!({"pk": u1.id}))
        );
        assert_eq!(
            c.receive_json().await,
            frame("update", json!(1), 200, named(&name))
        );
        assert_eq!(
            c.request(json!({"action": "retrieve", "pk": u1.id, "request_id": 100 + i}))
                .await,
            frame("retrieve", json!(100 + i), 200, named(&name))
        );
    }
    // A request sent before the push is read: the push and the reply both arrive, once each.
    w.request(rename("last", 50)).await;
    c.send_json(json!({"action": "retrieve", "pk": u1.id, "request_id": 999}))
        .await;
    let mut got = vec![c.receive_json().await, c.receive_json().await];
    got.sort_by_key(|f| f["action"].as_str().map(str::to_owned));
    assert_eq!(
        got,
        vec![
            frame("retrieve", json!(999), 200, named("last")),
            frame("update", json!(1), 200, named("last")),
        ]
    );
    c.receive_nothing().await;
    let hub = db.layer().hub().clone();
    assert_eq!(hub.groups().len(), 1, "the subscriber is in its group");
    c.close().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !hub.groups().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed subscriber is still in {:?}",
            hub.groups()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    w.receive_nothing().await;
}
