//! DCRF's generic consumer and mixin scenarios (test_generic_consumer.py), replayed frame for
//! frame over real sockets, plus validation, pagination edge cases, streamed lists, ordering,
//! filters, custom lookups and object permissions. Each scenario runs on SQLite and on
//! PostgreSQL (`DATABASE_URL`).

use std::time::Duration;

use dcrf::model::{Db, LimitOffset, ModelActions, ModelConsumer, ValidationErrors, get_object};
use dcrf::prelude::*;
use dcrf::testing::{TestClient, TestServer};
use sea_orm::QueryOrder;
use sea_orm::entity::prelude::*;
use serde_json::{Value, json};

mod common;

use common::{UserInput, add_user, user};

/// Which flavour of consumer a route serves.
#[derive(Clone, Copy, PartialEq)]
enum Flavour {
    Generic,
    Plain,
    Paged,
    Edge,
    Streamed,
    ByUsername,
    Guarded,
}

#[derive(Clone)]
struct Users {
    db: Db,
    flavour: Flavour,
}

impl ModelConsumer for Users {
    type Entity = user::Entity;
    type Output = user::Model;
    type Input = UserInput;

    fn db(&self) -> &Db {
        &self.db
    }

    fn actions(&self) -> ModelActions {
        match self.flavour {
            Flavour::Generic => ModelActions::NONE,
            _ => ModelActions::ALL,
        }
    }

    fn lookup_field(&self) -> &'static str {
        if self.flavour == Flavour::ByUsername {
            "username"
        } else {
            "pk"
        }
    }

    fn pagination(&self) -> Option<LimitOffset> {
        match self.flavour {
            Flavour::Paged | Flavour::Streamed => Some(LimitOffset::new(1)),
            Flavour::Edge => Some(LimitOffset::new(2).max_limit(3)),
            _ => None,
        }
    }

    fn stream_list(&self) -> Option<Duration> {
        // The stream's own pause between pages (behaviour under test, not a wait of the test).
        (self.flavour == Flavour::Streamed).then_some(Duration::from_millis(200))
    }

    fn filter_fields(&self) -> &'static [&'static str] {
        &["email"]
    }

    fn ordering_fields(&self) -> &'static [&'static str] {
        &["username", "email"]
    }

    async fn has_object_permission(&self, _: &Ctx, _: &str, object: &user::Model) -> bool {
        self.flavour != Flavour::Guarded || !object.username.starts_with("locked")
    }

    async fn validate(
        &self,
        _: &Ctx,
        input: &UserInput,
        instance: Option<&user::Model>,
    ) -> Result<(), ApiError> {
        let taken = user::Entity::find()
            .filter(user::Column::Username.eq(input.username.as_str()))
            .one(self.db.conn())
            .await?;
        let mut errors = ValidationErrors::new();
        if let Some(other) = taken
            && Some(other.id) != instance.map(|i| i.id)
        {
            errors.add("username", "A user with that username already exists.");
        }
        if input.username == "root" && input.email.is_empty() {
            errors.add_non_field("root needs an email.");
        }
        errors.into_result()
    }
}

#[dcrf::consumer(model)]
impl Users {
    /// DCRF's `test_sync_action`: a custom action using `get_object`.
    #[action]
    async fn test_sync_action(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
    ) -> Result<Reply<user::Model>, ApiError> {
        let object = get_object(self, ctx, frame, self.db.conn(), false).await?;
        Ok(Reply::ok(object))
    }
}

impl Consumer for Users {}

/// A consumer whose `get_queryset` hides the users named `hidden…`.
#[derive(Clone)]
struct Narrowed {
    db: Db,
}

impl ModelConsumer for Narrowed {
    type Entity = user::Entity;
    type Output = user::Model;
    type Input = UserInput;

    fn db(&self) -> &Db {
        &self.db
    }

    fn actions(&self) -> ModelActions {
        ModelActions::ALL | ModelActions::SUBSCRIBE_INSTANCE
    }

    fn get_queryset(&self, _: &Ctx, _: &Frame<'_>) -> Select<user::Entity> {
        user::Entity::find().filter(user::Column::Username.not_like("hidden%"))
    }
}

#[dcrf::consumer(model)]
impl Consumer for Narrowed {}

/// A consumer whose `filter_queryset` keeps the users of the frame's `domain`, if it has one.
#[derive(Clone)]
struct ByDomain {
    db: Db,
}

impl ModelConsumer for ByDomain {
    type Entity = user::Entity;
    type Output = user::Model;
    type Input = UserInput;

    fn db(&self) -> &Db {
        &self.db
    }

    fn filter_queryset(
        &self,
        _: &Ctx,
        query: Select<user::Entity>,
        frame: &Frame<'_>,
    ) -> Result<Select<user::Entity>, ApiError> {
        Ok(match frame.field("domain") {
            Some(raw) => {
                let domain: String = serde_json::from_str(raw.get())
                    .map_err(|_| ApiError::field("domain", "Not a string."))?;
                query.filter(user::Column::Email.ends_with(format!("@{domain}")))
            }
            None => query,
        })
    }
}

#[dcrf::consumer(model)]
impl Consumer for ByDomain {}

async fn serve(db: &Db) -> TestServer {
    db.create_table(user::Entity).await.unwrap();
    let app = Dcrf::new();
    let mut router = axum::Router::new();
    for (path, flavour) in [
        ("/generic/", Flavour::Generic),
        ("/users/", Flavour::Plain),
        ("/paged/", Flavour::Paged),
        ("/edge/", Flavour::Edge),
        ("/streamed/", Flavour::Streamed),
        ("/by-username/", Flavour::ByUsername),
        ("/guarded/", Flavour::Guarded),
    ] {
        let db = db.clone();
        router = router.route(
            path,
            app.consumer(move || Users {
                db: db.clone(),
                flavour,
            }),
        );
    }
    let narrowed = Narrowed { db: db.clone() };
    let by_domain = ByDomain { db: db.clone() };
    router = router
        .route("/narrowed/", app.consumer(move || narrowed.clone()))
        .route("/by-domain/", app.consumer(move || by_domain.clone()));
    TestServer::start(router, app).await
}

async fn connect(s: &TestServer, path: &str) -> TestClient {
    TestClient::connect(&s.url(path)).await.unwrap()
}

async fn users(db: &Db) -> Vec<user::Model> {
    user::Entity::find()
        .order_by_asc(user::Column::Id)
        .all(db.conn())
        .await
        .unwrap()
}

fn ok(action: &str, rid: Value, status: u16, data: Value) -> Value {
    json!({"errors": [], "data": data, "action": action, "response_status": status, "request_id": rid})
}

fn err(action: &str, rid: Value, status: u16, errors: Value) -> Value {
    json!({"errors": errors, "data": null, "action": action, "response_status": status, "request_id": rid})
}

dcrf::backend_tests!(
    generic_consumer,
    create_mixin,
    list_mixin,
    list_mixin_with_pagination,
    stream_paginated_list,
    retrieve_mixin,
    update_mixin,
    patch_mixin,
    delete_mixin,
    validation_errors,
    malformed_model_requests,
    pagination_edge_cases,
    ordering_and_filters,
    custom_lookup_field,
    object_permissions,
    actions_not_served_are_405,
    querysets_narrow_every_object_read,
    concurrent_retrieves,
);

async fn generic_consumer(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/generic/").await;
    assert_eq!(
        c.request(json!({"action": "test_sync_action", "pk": 2, "request_id": 1}))
            .await,
        err("test_sync_action", json!(1), 404, json!(["Not found"]))
    );
    let u = add_user(&db, "test1", "test@example.com").await;
    let mut c = connect(&s, "/generic/").await;
    assert_eq!(
        c.request(json!({"action": "test_sync_action", "pk": u.id, "request_id": 1}))
            .await,
        ok(
            "test_sync_action",
            json!(1),
            200,
            json!({"email": "test@example.com", "id": u.id, "username": "test1"})
        )
    );
    // The mixin actions are not served by this consumer.
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 2})).await,
        err(
            "list",
            json!(2),
            405,
            json!(["Method \"list\" not allowed."])
        )
    );
}

async fn create_mixin(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert!(users(&db).await.is_empty());
    let reply = c
        .request(json!({"action": "create", "data": {"username": "test101", "email": "42@example.com"}, "request_id": 1}))
        .await;
    let all = users(&db).await;
    assert_eq!(all.len(), 1);
    assert_eq!(
        reply,
        ok(
            "create",
            json!(1),
            201,
            json!({"email": "42@example.com", "id": all[0].id, "username": "test101"})
        )
    );
    // Read-only fields in the input are ignored.
    let reply = c
        .request(
            json!({"action": "create", "data": {"id": 999, "username": "other"}, "request_id": 2}),
        )
        .await;
    assert_eq!(reply["response_status"], json!(201));
    assert_ne!(reply["data"]["id"], json!(999));
    assert_eq!(reply["data"]["email"], json!(""));
}

async fn list_mixin(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 1})).await,
        ok("list", json!(1), 200, json!([]))
    );
    let u1 = add_user(&db, "test1", "42@example.com").await;
    let u2 = add_user(&db, "test2", "45@example.com").await;
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 1})).await,
        ok(
            "list",
            json!(1),
            200,
            json!([
                {"email": "42@example.com", "id": u1.id, "username": "test1"},
                {"email": "45@example.com", "id": u2.id, "username": "test2"}
            ])
        )
    );
}

async fn list_mixin_with_pagination(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/paged/").await;
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 1})).await,
        ok(
            "list",
            json!(1),
            200,
            json!({"results": [], "count": 0, "limit": 1, "offset": 0})
        )
    );
    let u1 = add_user(&db, "test1", "42@example.com").await;
    let u2 = add_user(&db, "test2", "45@example.com").await;
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 1})).await,
        ok(
            "list",
            json!(1),
            200,
            json!({"count": 2, "limit": 1, "offset": 0, "results": [{"email": "42@example.com", "id": u1.id, "username": "test1"}]})
        )
    );
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 1, "offset": 1}))
            .await,
        ok(
            "list",
            json!(1),
            200,
            json!({"count": 2, "limit": 1, "offset": 1, "results": [{"email": "45@example.com", "id": u2.id, "username": "test2"}]})
        )
    );
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 1, "offset": 2}))
            .await,
        ok(
            "list",
            json!(1),
            200,
            json!({"count": 2, "limit": 1, "offset": 2, "results": []})
        )
    );
}

/// Users in the streamed-list scenario: the stream sends one page per 200 ms pause, so it runs
/// for seconds and a cancel is handled long before it would have ended by itself.
const STREAMED_USERS: usize = 30;

async fn stream_paginated_list(db: Db) {
    let s = serve(&db).await;
    let u1 = add_user(&db, "test1", "42@example.com").await;
    let u2 = add_user(&db, "test2", "45@example.com").await;
    add_user(&db, "test3", "46@example.com").await;
    for i in 4..=STREAMED_USERS {
        add_user(&db, &format!("test{i}"), &format!("{i}@example.com")).await;
    }
    let all = users(&db).await;
    let count = all.len();
    assert_eq!(count, STREAMED_USERS);
    let page = |rid: i64, offset: usize| {
        ok(
            "list",
            json!(rid),
            200,
            json!({"count": count, "limit": 1, "offset": offset, "results": [all[offset]]}),
        )
    };
    let mut c = connect(&s, "/streamed/").await;
    c.send_json(json!({"action": "list", "request_id": 1}))
        .await;
    assert_eq!(
        c.receive_json().await,
        ok(
            "list",
            json!(1),
            200,
            json!({"count": count, "limit": 1, "offset": 0, "results": [{"email": "42@example.com", "id": u1.id, "username": "test1"}]})
        )
    );
    assert_eq!(
        c.receive_json().await,
        ok(
            "list",
            json!(1),
            200,
            json!({"count": count, "limit": 1, "offset": 1, "results": [{"email": "45@example.com", "id": u2.id, "username": "test2"}]})
        )
    );
    c.send_json(json!({"action": "list_cancel", "request_id": 1}))
        .await;
    // Pages the stream sent before the cancel was read may come before its reply (how many
    // depends on how fast this machine is); each is the next page, exactly.
    let mut next = 2;
    let reply = loop {
        let frame = c.receive_json().await;
        if frame["action"] == json!("list_cancel") {
            break frame;
        }
        assert_eq!(frame, page(1, next));
        next += 1;
    };
    assert_eq!(reply, ok("list_cancel", json!(1), 200, Value::Null));
    assert!(
        next < count,
        "the stream had sent all {count} pages before the cancel was handled"
    );
    // Nothing after the reply (two and a half pauses of the stream).
    c.receive_nothing_for(Duration::from_millis(500)).await;

    // Without cancel, the stream stops by itself after the last page (offset >= count - limit).
    c.send_json(json!({"action": "list", "request_id": 2, "offset": count - 2, "limit": 2}))
        .await;
    assert_eq!(
        c.receive_json().await,
        ok(
            "list",
            json!(2),
            200,
            json!({"count": count, "limit": 2, "offset": count - 2, "results": [all[count - 2], all[count - 1]]})
        )
    );
    c.receive_nothing_for(Duration::from_millis(500)).await;

    // And the connection keeps serving other actions while a stream runs: the retrieve is
    // answered before the stream's last page, and the stream goes on after it.
    c.send_json(json!({"action": "list", "request_id": 3}))
        .await;
    c.send_json(json!({"action": "retrieve", "pk": u1.id, "request_id": 4}))
        .await;
    let mut pages = 0;
    loop {
        let frame = c.receive_json().await;
        if frame["request_id"] == json!(4) {
            assert_eq!(frame, ok("retrieve", json!(4), 200, json!(all[0])));
            break;
        }
        assert_eq!(frame, page(3, pages));
        pages += 1;
    }
    assert!(
        pages < count,
        "the retrieve was answered only after the whole stream"
    );
    assert_eq!(c.receive_json().await, page(3, pages));
    c.close().await;
}

async fn retrieve_mixin(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": 100, "request_id": 1}))
            .await,
        err("retrieve", json!(1), 404, json!(["Not found"]))
    );
    let u1 = add_user(&db, "test1", "42@example.com").await;
    add_user(&db, "test2", "45@example.com").await;
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": u1.id - 1, "request_id": 1}))
            .await,
        err("retrieve", json!(1), 404, json!(["Not found"]))
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": u1.id, "request_id": 1}))
            .await,
        ok(
            "retrieve",
            json!(1),
            200,
            json!({"email": "42@example.com", "id": u1.id, "username": "test1"})
        )
    );
    // A numeric string is a valid pk; a non-numeric one finds nothing (DCRF's 404).
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": u1.id.to_string(), "request_id": 2}))
            .await["response_status"],
        json!(200)
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": "abc", "request_id": 3}))
            .await,
        err("retrieve", json!(3), 404, json!(["Not found"]))
    );
}

async fn update_mixin(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(
            json!({"action": "update", "pk": 100, "data": {"username": "test101"}, "request_id": 1})
        )
        .await,
        err("update", json!(1), 404, json!(["Not found"]))
    );
    let u1 = add_user(&db, "test1", "42@example.com").await;
    add_user(&db, "test2", "45@example.com").await;
    assert_eq!(
        c.request(json!({"action": "update", "pk": u1.id, "data": {"username": "test101"}, "request_id": 2}))
            .await,
        ok(
            "update",
            json!(2),
            200,
            json!({"email": "42@example.com", "id": u1.id, "username": "test101"})
        )
    );
    let stored = users(&db).await;
    assert_eq!(stored[0].username, "test101");
    assert_eq!(stored[0].email, "42@example.com");
    // A full update needs the required fields.
    assert_eq!(
        c.request(json!({"action": "update", "pk": u1.id, "data": {"email": "x@example.com"}, "request_id": 3}))
            .await,
        err(
            "update",
            json!(3),
            400,
            json!([{"username": ["This field is required."]}])
        )
    );
}

async fn patch_mixin(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "patch", "pk": 100, "data": {"email": "00@example.com"}, "request_id": 1}))
            .await,
        err("patch", json!(1), 404, json!(["Not found"]))
    );
    let u1 = add_user(&db, "test1", "42@example.com").await;
    add_user(&db, "test2", "45@example.com").await;
    assert_eq!(
        c.request(json!({"action": "patch", "pk": u1.id, "data": {"email": "00@example.com"}, "request_id": 2}))
            .await,
        ok(
            "patch",
            json!(2),
            200,
            json!({"email": "00@example.com", "id": u1.id, "username": "test1"})
        )
    );
    assert_eq!(users(&db).await[0].email, "00@example.com");
    // An empty patch changes nothing and answers the object.
    assert_eq!(
        c.request(json!({"action": "patch", "pk": u1.id, "data": {}, "request_id": 3}))
            .await["data"]["email"],
        json!("00@example.com")
    );
    // The patched value is validated; the row is unchanged after a failure.
    assert_eq!(
        c.request(
            json!({"action": "patch", "pk": u1.id, "data": {"email": "nope"}, "request_id": 4})
        )
        .await,
        err(
            "patch",
            json!(4),
            400,
            json!([{"email": ["Enter a valid email address."]}])
        )
    );
    // null is a value, not an absence: it reaches validation as a type error.
    assert_eq!(
        c.request(
            json!({"action": "patch", "pk": u1.id, "data": {"email": null}, "request_id": 5})
        )
        .await,
        err(
            "patch",
            json!(5),
            400,
            json!([{"email": ["This field may not be null."]}])
        )
    );
    assert_eq!(users(&db).await[0].email, "00@example.com");
}

async fn delete_mixin(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "delete", "pk": 100, "request_id": 1}))
            .await,
        err("delete", json!(1), 404, json!(["Not found"]))
    );
    let u1 = add_user(&db, "test1", "42@example.com").await;
    add_user(&db, "test2", "45@example.com").await;
    assert_eq!(
        c.request(json!({"action": "delete", "pk": u1.id - 1, "request_id": 1}))
            .await,
        err("delete", json!(1), 404, json!(["Not found"]))
    );
    assert_eq!(
        c.request(json!({"action": "delete", "pk": u1.id, "request_id": 1}))
            .await,
        ok("delete", json!(1), 204, Value::Null)
    );
    let left = users(&db).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].username, "test2");
}

async fn validation_errors(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    // Missing required field.
    assert_eq!(
        c.request(
            json!({"action": "create", "data": {"email": "42@example.com"}, "request_id": 2})
        )
        .await,
        err(
            "create",
            json!(2),
            400,
            json!([{"username": ["This field is required."]}])
        )
    );
    // Field rules, several fields at once.
    let reply = c
        .request(
            json!({"action": "create", "data": {"username": "", "email": "bad"}, "request_id": 3}),
        )
        .await;
    assert_eq!(reply["response_status"], json!(400));
    assert_eq!(
        reply["errors"][0]["username"],
        json!(["This field may not be blank."])
    );
    assert_eq!(
        reply["errors"][0]["email"],
        json!(["Enter a valid email address."])
    );
    // Wrong type.
    assert_eq!(
        c.request(json!({"action": "create", "data": {"username": 5}, "request_id": 4}))
            .await,
        err(
            "create",
            json!(4),
            400,
            json!([{"username": ["Not a valid string."]}])
        )
    );
    // Async validation that queries the database, and non_field_errors.
    add_user(&db, "taken", "t@example.com").await;
    assert_eq!(
        c.request(json!({"action": "create", "data": {"username": "taken"}, "request_id": 5}))
            .await,
        err(
            "create",
            json!(5),
            400,
            json!([{"username": ["A user with that username already exists."]}])
        )
    );
    assert_eq!(
        c.request(json!({"action": "create", "data": {"username": "root"}, "request_id": 6}))
            .await,
        err(
            "create",
            json!(6),
            400,
            json!([{"non_field_errors": ["root needs an email."]}])
        )
    );
    // Nothing was written by the failed creates.
    assert_eq!(users(&db).await.len(), 1);
    // Updating an object keeps its own username valid.
    let taken = users(&db).await[0].clone();
    assert_eq!(
        c.request(json!({"action": "update", "pk": taken.id, "data": {"username": "taken", "email": "n@example.com"}, "request_id": 7}))
            .await["response_status"],
        json!(200)
    );
}

async fn malformed_model_requests(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "create", "request_id": 1}))
            .await,
        err(
            "create",
            json!(1),
            400,
            json!([{"data": ["This field is required."]}])
        )
    );
    assert_eq!(
        c.request(json!({"action": "create", "data": [1, 2], "request_id": 2}))
            .await,
        err(
            "create",
            json!(2),
            400,
            json!([{"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]}])
        )
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "request_id": 3}))
            .await,
        err(
            "retrieve",
            json!(3),
            400,
            json!([{"pk": ["This field is required."]}])
        )
    );
    assert_eq!(
        c.request(json!({"action": "patch", "pk": 1, "request_id": 4}))
            .await,
        err(
            "patch",
            json!(4),
            400,
            json!([{"data": ["This field is required."]}])
        )
    );
    // The connection survives all of it.
    assert_eq!(
        c.request(json!({"action": "list", "request_id": 6})).await["response_status"],
        json!(200)
    );
}

async fn pagination_edge_cases(db: Db) {
    let s = serve(&db).await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(add_user(&db, &format!("u{i}"), "").await.id);
    }
    let mut c = connect(&s, "/edge/").await;
    let mut page = async |req: Value| {
        let reply = c.request(req).await;
        assert_eq!(reply["response_status"], json!(200), "{reply}");
        let d = &reply["data"];
        let got: Vec<i64> = d["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect();
        (
            d["limit"].as_u64().unwrap(),
            d["offset"].as_u64().unwrap(),
            got,
        )
    };
    let id = |i: usize| i64::from(ids[i]);
    // Capped at max_limit.
    assert_eq!(
        page(json!({"action": "list", "limit": 10, "request_id": 1})).await,
        (3, 0, vec![id(0), id(1), id(2)])
    );
    // Numeric strings.
    assert_eq!(
        page(json!({"action": "list", "limit": "1", "offset": "4", "request_id": 1})).await,
        (1, 4, vec![id(4)])
    );
    // limit 0 → default.
    assert_eq!(
        page(json!({"action": "list", "limit": 0, "request_id": 1})).await,
        (2, 0, vec![id(0), id(1)])
    );
    // Unreadable limit → default; negative offset → 0.
    assert_eq!(
        page(json!({"action": "list", "limit": "abc", "offset": -1, "request_id": 1})).await,
        (2, 0, vec![id(0), id(1)])
    );
    // Past the end.
    assert_eq!(
        page(json!({"action": "list", "offset": 99, "request_id": 1})).await,
        (2, 99, vec![])
    );
    // Where DCRF crashes, a 400.
    assert_eq!(
        c.request(json!({"action": "list", "limit": null, "request_id": 2}))
            .await,
        err(
            "list",
            json!(2),
            400,
            json!([{"limit": ["A valid integer is required."]}])
        )
    );
    assert_eq!(
        c.request(json!({"action": "list", "offset": [1], "request_id": 3}))
            .await,
        err(
            "list",
            json!(3),
            400,
            json!([{"offset": ["A valid integer is required."]}])
        )
    );
}

async fn ordering_and_filters(db: Db) {
    let s = serve(&db).await;
    add_user(&db, "bob", "b@example.com").await;
    add_user(&db, "alice", "a@example.com").await;
    add_user(&db, "carol", "b@example.com").await;
    let mut c = connect(&s, "/users/").await;
    let names = |reply: &Value| -> Vec<String> {
        reply["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["username"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = c
        .request(json!({"action": "list", "ordering": "username", "request_id": 1}))
        .await;
    assert_eq!(names(&r), ["alice", "bob", "carol"]);
    let r = c
        .request(json!({"action": "list", "ordering": ["-email", "-username"], "request_id": 2}))
        .await;
    assert_eq!(names(&r), ["carol", "bob", "alice"]);
    let r = c
        .request(json!({"action": "list", "filters": {"email": "b@example.com"}, "request_id": 3}))
        .await;
    assert_eq!(names(&r), ["bob", "carol"]);
    assert_eq!(
        c.request(json!({"action": "list", "ordering": "id; DROP TABLE", "request_id": 4}))
            .await,
        err(
            "list",
            json!(4),
            400,
            json!([{"ordering": ["Cannot order by \"id; DROP TABLE\"."]}])
        )
    );
    assert_eq!(
        c.request(json!({"action": "list", "filters": {"username": "bob"}, "request_id": 5}))
            .await,
        err(
            "list",
            json!(5),
            400,
            json!([{"filters": ["Cannot filter by \"username\"."]}])
        )
    );
}

async fn custom_lookup_field(db: Db) {
    let s = serve(&db).await;
    let alice = add_user(&db, "alice", "a@example.com").await;
    let mut c = connect(&s, "/by-username/").await;
    assert_eq!(
        c.request(json!({"action": "retrieve", "username": "alice", "request_id": 1}))
            .await,
        ok(
            "retrieve",
            json!(1),
            200,
            json!({"id": alice.id, "username": "alice", "email": "a@example.com"})
        )
    );
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": alice.id, "request_id": 2}))
            .await,
        err(
            "retrieve",
            json!(2),
            400,
            json!([{"username": ["This field is required."]}])
        )
    );
    assert_eq!(
        c.request(json!({"action": "patch", "username": "alice", "data": {"email": "new@example.com"}, "request_id": 3}))
            .await["data"]["email"],
        json!("new@example.com")
    );
}

async fn object_permissions(db: Db) {
    let s = serve(&db).await;
    let locked = add_user(&db, "locked-1", "").await;
    let open = add_user(&db, "open", "").await;
    let mut c = connect(&s, "/guarded/").await;
    let denied = json!(["You do not have permission to perform this action."]);
    for (action, extra) in [
        ("retrieve", json!({})),
        ("update", json!({"data": {"username": "x"}})),
        ("patch", json!({"data": {"email": "x@example.com"}})),
        ("delete", json!({})),
    ] {
        let mut req = json!({"action": action, "pk": locked.id, "request_id": action});
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        assert_eq!(
            c.request(req).await,
            err(action, json!(action), 403, denied.clone())
        );
    }
    assert_eq!(users(&db).await[0], locked);
    assert_eq!(
        c.request(json!({"action": "retrieve", "pk": open.id, "request_id": 1}))
            .await["response_status"],
        json!(200)
    );
}

async fn actions_not_served_are_405(db: Db) {
    let s = serve(&db).await;
    let mut c = connect(&s, "/users/").await;
    assert_eq!(
        c.request(json!({"action": "list_cancel", "request_id": 1}))
            .await,
        err(
            "list_cancel",
            json!(1),
            405,
            json!(["Method \"list_cancel\" not allowed."])
        )
    );
}

/// Every read of one object goes through the consumer's own `get_queryset` and
/// `filter_queryset`, however many objects were read before by consumers that keep the
/// defaults (whose statement is rendered once and reused).
async fn querysets_narrow_every_object_read(db: Db) {
    let s = serve(&db).await;
    let shown = add_user(&db, "shown", "s@a.example").await;
    let hidden = add_user(&db, "hidden-1", "h@b.example").await;
    let shown_json = json!({"id": shown.id, "username": "shown", "email": "s@a.example"});
    let hidden_json = json!({"id": hidden.id, "username": "hidden-1", "email": "h@b.example"});
    let not_found = json!(["Not found"]);
    // A consumer with the default querysets reads both, again and again.
    let mut plain = connect(&s, "/users/").await;
    for round in 0..3 {
        for (user, expected) in [(&shown, &shown_json), (&hidden, &hidden_json)] {
            assert_eq!(
                plain
                    .request(json!({"action": "retrieve", "pk": user.id, "request_id": round}))
                    .await,
                ok("retrieve", json!(round), 200, expected.clone())
            );
        }
    }
    // `get_queryset` hides `hidden-1` from every object action.
    let mut narrowed = connect(&s, "/narrowed/").await;
    for round in 0..3 {
        assert_eq!(
            narrowed
                .request(json!({"action": "retrieve", "pk": shown.id, "request_id": round}))
                .await,
            ok("retrieve", json!(round), 200, shown_json.clone())
        );
        for (action, extra) in [
            ("retrieve", json!({})),
            ("patch", json!({"data": {"email": "x@b.example"}})),
            ("update", json!({"data": {"username": "hidden-2"}})),
            ("subscribe_instance", json!({})),
            ("delete", json!({})),
        ] {
            let mut req = json!({"action": action, "pk": hidden.id, "request_id": round});
            req.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            assert_eq!(
                narrowed.request(req).await,
                err(action, json!(round), 404, not_found.clone()),
                "{action}, round {round}"
            );
        }
    }
    assert_eq!(users(&db).await, [shown.clone(), hidden.clone()]);
    // `filter_queryset` narrows by the frame's own argument.
    let mut by_domain = connect(&s, "/by-domain/").await;
    for round in 0..3 {
        for (domain, user, expected) in [
            (json!("b.example"), &hidden, Some(&hidden_json)),
            (json!("a.example"), &hidden, None),
            (json!("a.example"), &shown, Some(&shown_json)),
            (json!("b.example"), &shown, None),
        ] {
            let reply = by_domain
                .request(json!({"action": "retrieve", "pk": user.id, "domain": domain, "request_id": round}))
                .await;
            let expected = match expected {
                Some(data) => ok("retrieve", json!(round), 200, data.clone()),
                None => err("retrieve", json!(round), 404, not_found.clone()),
            };
            assert_eq!(reply, expected, "{domain} {}, round {round}", user.username);
        }
        assert_eq!(
            by_domain
                .request(json!({"action": "retrieve", "pk": hidden.id, "request_id": round}))
                .await,
            ok("retrieve", json!(round), 200, hidden_json.clone())
        );
    }
}

/// Retrieves in flight at once from several connections, each sent before any reply is read
/// (on PostgreSQL such reads share statements, see `model::point_batch`): every one is
/// answered under its own request id with its own row, or 404, whatever shares its statement.
async fn concurrent_retrieves(db: Db) {
    let s = serve(&db).await;
    let mut all = Vec::new();
    for i in 0..12 {
        all.push(add_user(&db, &format!("user{i}"), &format!("{i}@example.com")).await);
    }
    let missing = all.iter().map(|u| u.id).max().unwrap() + 1_000;
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..4 {
        let mut c = connect(&s, "/users/").await;
        let all = all.clone();
        tasks.spawn(async move {
            let mut expected = Vec::new();
            for round in 0..3 {
                for (i, u) in all.iter().enumerate() {
                    let rid = json!(format!("{n}-{round}-{i}"));
                    c.send_json(json!({"action": "retrieve", "pk": u.id, "request_id": rid}))
                        .await;
                    let data = json!({"email": u.email, "id": u.id, "username": u.username});
                    expected.push(ok("retrieve", rid, 200, data));
                }
                let rid = json!(format!("{n}-{round}-missing"));
                c.send_json(json!({"action": "retrieve", "pk": missing, "request_id": rid}))
                    .await;
                expected.push(err("retrieve", rid, 404, json!(["Not found"])));
            }
            let mut got = Vec::new();
            for _ in 0..expected.len() {
                got.push(c.receive_json().await);
            }
            let by_id = |v: &Value| v["request_id"].as_str().unwrap_or_default().to_owned();
            got.sort_by_key(by_id);
            expected.sort_by_key(by_id);
            assert_eq!(got, expected);
            c.close().await;
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}
