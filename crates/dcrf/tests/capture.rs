//! Change capture: writes the framework did not make (raw SQL, bulk statements, other
//! connections) reach subscribers over real sockets, rolled-back writes do not, and writes
//! made through a `Txn` are published exactly once.

use std::sync::Arc;
use std::time::Duration;

use dcrf::capture::{Capture, CaptureHandle, Resync, ResyncReason, resync_observer};
use dcrf::model::Db;
use dcrf::observer::ModelObserver;
use dcrf::prelude::*;
use dcrf::testing::{TestBackend, TestClient, TestServer, drop_test_db, test_db};
use sea_orm::ActiveValue::{Set, Unchanged};
use sea_orm::entity::prelude::*;
use sea_orm::sea_query::Expr;
use sea_orm::{Condition, ConnectionTrait, DbBackend, Statement, TransactionTrait};
use serde::Deserialize;
use serde_json::{Value, json};

mod item {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize)]
    #[sea_orm(table_name = "capture_item")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub owner: String,
        pub title: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

const TABLE: &str = "capture_item";
/// Long enough for a late or duplicate event to arrive.
const QUIET: Duration = Duration::from_millis(500);

#[derive(Clone)]
struct Watch {
    db: Db,
    items: Arc<ModelObserver<item::Model>>,
}

#[derive(Deserialize)]
struct ByOwner {
    owner: String,
}

#[derive(Deserialize)]
struct ByTable {
    table: String,
}

#[dcrf::consumer]
impl Watch {
    /// Items grouped by owner.
    #[action]
    async fn subscribe(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: ByOwner,
    ) -> Result<Reply<&'static str>, ApiError> {
        self.items
            .subscribe(ctx, &args.owner, frame.request_id())
            .await?;
        Ok(Reply::ok("subscribed"))
    }

    /// The capture's resync notices of a table.
    #[action]
    async fn subscribe_resync(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: ByTable,
    ) -> Result<Reply<&'static str>, ApiError> {
        resync_observer(&self.db)
            .subscribe(ctx, &args.table, frame.request_id())
            .await?;
        Ok(Reply::ok("subscribed"))
    }
}

impl Consumer for Watch {}

/// Creates the table, registers the observer, starts the capture and a server.
async fn setup(db: &Db) -> (TestServer, CaptureHandle) {
    db.create_table(item::Entity).await.unwrap();
    let items = db
        .observe::<item::Entity>("capture.items")
        .group_by(|m: &item::Model| vec![m.owner.clone()])
        .serialize(|m: &item::Model, _| serde_json::to_value(m).unwrap());
    let capture = Capture::new(db)
        .watch::<item::Entity>()
        .start()
        .await
        .unwrap();
    let app = Dcrf::new();
    let watch = Watch {
        db: db.clone(),
        items,
    };
    let router = axum::Router::new().route("/watch/", app.consumer(move || watch.clone()));
    (TestServer::start(router, app).await, capture)
}

fn frame(action: &str, rid: i64, data: Value) -> Value {
    json!({"errors": [], "data": data, "action": action, "response_status": 200, "request_id": rid})
}

fn row(id: i32, owner: &str, title: &str) -> Value {
    json!({"id": id, "owner": owner, "title": title})
}

/// A client subscribed to the items of `owner` with request id `rid`.
async fn subscriber(s: &TestServer, owner: &str, rid: i64) -> TestClient {
    let mut c = TestClient::connect(&s.url("/watch/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        c.request(json!({"action": "subscribe", "owner": owner, "request_id": rid}))
            .await,
        frame("subscribe", rid, json!("subscribed"))
    );
    c
}

/// The stream resync a subscriber of the table's observer gets when the capture sends a
/// notice: its stream restarts at a new epoch (see the channel docs on delivery).
async fn receive_stream_resync(c: &mut TestClient, rid: i64) {
    let push = c.receive_json().await;
    assert_eq!(push["action"], "resync", "{push}");
    assert_eq!(push["request_id"], rid);
    assert_eq!(push["response_status"], 200);
    assert_eq!(push["data"]["position"]["offset"], 0, "{push}");
}

/// A client subscribed to the resync notices of the table with request id `rid`.
async fn resync_subscriber(s: &TestServer, rid: i64) -> TestClient {
    let mut c = TestClient::connect(&s.url("/watch/"))
        .await
        .unwrap()
        .dcrf_envelopes();
    assert_eq!(
        c.request(json!({"action": "subscribe_resync", "table": TABLE, "request_id": rid}))
            .await,
        frame("subscribe_resync", rid, json!("subscribed"))
    );
    c
}

/// The next `n` frames, ordered by the id of their row.
async fn receive_sorted(c: &mut TestClient, n: usize) -> Vec<Value> {
    let mut frames = Vec::new();
    for _ in 0..n {
        frames.push(c.receive_json().await);
    }
    frames.sort_by_key(|f| f["data"]["id"].as_i64());
    frames
}

async fn exec(db: &Db, sql: &str) {
    db.conn().execute_unprepared(sql).await.unwrap();
}

async fn framework_insert(db: &Db, id: i32, owner: &str, title: &str) {
    let mut txn = db.begin().await.unwrap();
    txn.insert(item::ActiveModel {
        id: Set(id),
        owner: Set(owner.into()),
        title: Set(title.into()),
    })
    .await
    .unwrap();
    txn.commit().await.unwrap();
}

async fn framework_rename(db: &Db, id: i32, title: &str) {
    let mut txn = db.begin().await.unwrap();
    txn.update(item::ActiveModel {
        id: Unchanged(id),
        title: Set(title.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    txn.commit().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// Runs a PostgreSQL scenario on a fresh schema (fails without `DATABASE_URL`; the test runner
/// filters `postgres` tests out when PostgreSQL is unavailable).
macro_rules! postgres_tests {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let db = test_db(TestBackend::Postgres).await;
            scenarios::$name(db.clone()).await;
            drop_test_db(db).await;
        }
    )*};
}

postgres_tests!(
    postgres_raw_writes_from_another_connection,
    postgres_bulk_update_gives_one_event_per_row,
    postgres_rolled_back_raw_transaction_gives_nothing,
    postgres_framework_writes_are_published_once,
    postgres_group_move_is_an_update_for_the_new_group,
    postgres_unpublishable_changes_send_resync_notices,
    postgres_reconnect_sends_resync_notices,
);

/// A second database handle on the same schema: its own pool, its own process-side state,
/// as another service would have.
async fn other_connection(db: &Db) -> Db {
    let schema: String = db
        .conn()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT current_schema()",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index(0)
        .unwrap();
    let url = std::env::var("DATABASE_URL").unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    Db::connect(&format!("{url}{sep}options=-c%20search_path%3D{schema}"))
        .await
        .unwrap()
}

mod scenarios {
    use super::*;

    pub async fn postgres_raw_writes_from_another_connection(db: Db) {
        let (s, capture) = setup(&db).await;
        let mut ann = subscriber(&s, "ann", 1).await;
        let other = other_connection(&db).await;

        exec(
            &other,
            "INSERT INTO capture_item (id, owner, title) VALUES (1, 'ann', 'first')",
        )
        .await;
        assert_eq!(
            ann.receive_json().await,
            frame("create", 1, row(1, "ann", "first"))
        );

        exec(
            &other,
            "UPDATE capture_item SET title = 'second' WHERE id = 1",
        )
        .await;
        assert_eq!(
            ann.receive_json().await,
            frame("update", 1, row(1, "ann", "second"))
        );

        exec(&other, "DELETE FROM capture_item WHERE id = 1").await;
        assert_eq!(
            ann.receive_json().await,
            frame("delete", 1, row(1, "ann", "second"))
        );
        ann.receive_nothing_for(QUIET).await;

        // Raw SQL on the framework's own pool is a write the framework did not make, too.
        exec(
            &db,
            "INSERT INTO capture_item (id, owner, title) VALUES (2, 'ann', 'mine')",
        )
        .await;
        assert_eq!(
            ann.receive_json().await,
            frame("create", 1, row(2, "ann", "mine"))
        );
        ann.receive_nothing_for(QUIET).await;
        capture.stop().await;

        // Stopped: nothing more is published.
        exec(
            &other,
            "UPDATE capture_item SET title = 'late' WHERE id = 2",
        )
        .await;
        ann.receive_nothing_for(QUIET).await;
    }

    pub async fn postgres_bulk_update_gives_one_event_per_row(db: Db) {
        let (s, _capture) = setup(&db).await;
        let mut ann = subscriber(&s, "ann", 1).await;
        let other = other_connection(&db).await;

        exec(
            &other,
            "INSERT INTO capture_item (id, owner, title) \
             VALUES (1, 'ann', 'a'), (2, 'ann', 'b'), (3, 'ann', 'c')",
        )
        .await;
        assert_eq!(
            receive_sorted(&mut ann, 3).await,
            vec![
                frame("create", 1, row(1, "ann", "a")),
                frame("create", 1, row(2, "ann", "b")),
                frame("create", 1, row(3, "ann", "c")),
            ]
        );

        exec(&other, "UPDATE capture_item SET title = 'done'").await;
        assert_eq!(
            receive_sorted(&mut ann, 3).await,
            vec![
                frame("update", 1, row(1, "ann", "done")),
                frame("update", 1, row(2, "ann", "done")),
                frame("update", 1, row(3, "ann", "done")),
            ]
        );
        ann.receive_nothing_for(QUIET).await;
    }

    pub async fn postgres_rolled_back_raw_transaction_gives_nothing(db: Db) {
        let (s, _capture) = setup(&db).await;
        let mut ann = subscriber(&s, "ann", 1).await;
        let other = other_connection(&db).await;

        let txn = other.conn().begin().await.unwrap();
        txn.execute_unprepared(
            "INSERT INTO capture_item (id, owner, title) VALUES (1, 'ann', 'never')",
        )
        .await
        .unwrap();
        txn.execute_unprepared("UPDATE capture_item SET title = 'never again'")
            .await
            .unwrap();
        txn.rollback().await.unwrap();
        ann.receive_nothing_for(QUIET).await;

        // The listener is still there: the next committed write arrives.
        exec(
            &other,
            "INSERT INTO capture_item (id, owner, title) VALUES (2, 'ann', 'kept')",
        )
        .await;
        assert_eq!(
            ann.receive_json().await,
            frame("create", 1, row(2, "ann", "kept"))
        );
        ann.receive_nothing_for(QUIET).await;
    }

    pub async fn postgres_framework_writes_are_published_once(db: Db) {
        framework_writes_are_published_once(db).await;
    }

    pub async fn postgres_group_move_is_an_update_for_the_new_group(db: Db) {
        let (s, _capture) = setup(&db).await;
        let mut ann = subscriber(&s, "ann", 1).await;
        let mut bob = subscriber(&s, "bob", 2).await;
        let other = other_connection(&db).await;
        exec(
            &other,
            "INSERT INTO capture_item (id, owner, title) VALUES (1, 'ann', 't')",
        )
        .await;
        assert_eq!(
            ann.receive_json().await,
            frame("create", 1, row(1, "ann", "t"))
        );

        // No previous state: the group it left hears nothing, the group it entered hears an
        // update (a `Txn` write would give ann a delete and bob a create).
        exec(&other, "UPDATE capture_item SET owner = 'bob' WHERE id = 1").await;
        assert_eq!(
            bob.receive_json().await,
            frame("update", 2, row(1, "bob", "t"))
        );
        ann.receive_nothing_for(QUIET).await;
        bob.receive_nothing().await;

        // A delete carries the deleted row: its group hears it.
        exec(&other, "DELETE FROM capture_item WHERE id = 1").await;
        assert_eq!(
            bob.receive_json().await,
            frame("delete", 2, row(1, "bob", "t"))
        );
        ann.receive_nothing_for(QUIET).await;
    }

    pub async fn postgres_unpublishable_changes_send_resync_notices(db: Db) {
        let (s, capture) = setup(&db).await;
        let mut ann = subscriber(&s, "ann", 1).await;
        let mut watcher = resync_subscriber(&s, 9).await;
        let mut resyncs = capture.resyncs();
        let other = other_connection(&db).await;

        // A row too large to travel in a notification: created and updated (re-read), but its
        // deletion cannot carry it.
        let big = "x".repeat(9000);
        exec(
            &other,
            &format!("INSERT INTO capture_item (id, owner, title) VALUES (1, 'ann', '{big}')"),
        )
        .await;
        assert_eq!(
            ann.receive_json().await,
            frame("create", 1, row(1, "ann", &big))
        );
        exec(&other, "DELETE FROM capture_item WHERE id = 1").await;
        assert_eq!(
            watcher.receive_json().await,
            frame("resync", 9, json!({"table": TABLE, "reason": "incomplete"}))
        );
        assert_eq!(
            resyncs.recv().await.unwrap(),
            Resync {
                table: TABLE,
                reason: ResyncReason::Incomplete
            }
        );
        receive_stream_resync(&mut ann, 1).await;
        ann.receive_nothing_for(QUIET).await;

        exec(&other, "TRUNCATE capture_item").await;
        assert_eq!(
            watcher.receive_json().await,
            frame("resync", 9, json!({"table": TABLE, "reason": "truncate"}))
        );
        watcher.receive_nothing().await;
        receive_stream_resync(&mut ann, 1).await;
        ann.receive_nothing().await;
    }

    pub async fn postgres_reconnect_sends_resync_notices(db: Db) {
        let seen: Arc<std::sync::Mutex<Vec<Resync>>> = Arc::default();
        db.create_table(item::Entity).await.unwrap();
        let seen2 = seen.clone();
        let items = db
            .observe::<item::Entity>("capture.items")
            .group_by(|m: &item::Model| vec![m.owner.clone()])
            .serialize(|m: &item::Model, _| serde_json::to_value(m).unwrap());
        let capture = Capture::postgres(&db)
            .watch::<item::Entity>()
            .on_resync(move |r| seen2.lock().unwrap().push(r.clone()))
            .start()
            .await
            .unwrap();
        let app = Dcrf::new();
        let watch = Watch {
            db: db.clone(),
            items,
        };
        let router = axum::Router::new().route("/watch/", app.consumer(move || watch.clone()));
        let s = TestServer::start(router, app).await;
        let mut ann = subscriber(&s, "ann", 1).await;
        let mut watcher = resync_subscriber(&s, 9).await;
        let other = other_connection(&db).await;

        // Kill the listener's connection (only this test's: the channel names its schema).
        let channel = capture.channel().unwrap().to_owned();
        let killed = db
            .conn()
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND query = $1",
                [format!("LISTEN \"{channel}\"").into()],
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "n")
            .unwrap();
        assert_eq!(killed, 1);

        assert_eq!(
            watcher.receive_json().await,
            frame(
                "resync",
                9,
                json!({"table": TABLE, "reason": "reconnected"})
            )
        );
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Resync {
                table: TABLE,
                reason: ResyncReason::Reconnected
            }]
        );

        receive_stream_resync(&mut ann, 1).await;
        // Listening again: changes arrive.
        exec(
            &other,
            "INSERT INTO capture_item (id, owner, title) VALUES (1, 'ann', 'after')",
        )
        .await;
        assert_eq!(
            ann.receive_json().await,
            frame("create", 1, row(1, "ann", "after"))
        );
        ann.receive_nothing().await;
        watcher.receive_nothing().await;
        capture.stop().await;
    }
}

/// Framework writes (insert, update, bulk update, delete through a `Txn`) are published by the
/// `Txn` only, once each, while the capture runs.
async fn framework_writes_are_published_once(db: Db) {
    let (s, _capture) = setup(&db).await;
    let mut ann = subscriber(&s, "ann", 1).await;

    framework_insert(&db, 1, "ann", "a").await;
    assert_eq!(
        ann.receive_json().await,
        frame("create", 1, row(1, "ann", "a"))
    );
    ann.receive_nothing_for(QUIET).await;

    framework_rename(&db, 1, "b").await;
    assert_eq!(
        ann.receive_json().await,
        frame("update", 1, row(1, "ann", "b"))
    );
    ann.receive_nothing_for(QUIET).await;

    framework_insert(&db, 2, "ann", "c").await;
    assert_eq!(
        ann.receive_json().await,
        frame("create", 1, row(2, "ann", "c"))
    );
    let mut txn = db.begin().await.unwrap();
    let n = txn
        .update_where::<item::Entity>(Condition::all().add(item::Column::Owner.eq("ann")), |u| {
            u.col_expr(item::Column::Title, Expr::value("bulk"))
        })
        .await
        .unwrap();
    txn.commit().await.unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        receive_sorted(&mut ann, 2).await,
        vec![
            frame("update", 1, row(1, "ann", "bulk")),
            frame("update", 1, row(2, "ann", "bulk")),
        ]
    );
    ann.receive_nothing_for(QUIET).await;

    let mut txn = db.begin().await.unwrap();
    let one = item::Entity::find_by_id(1)
        .one(txn.conn())
        .await
        .unwrap()
        .unwrap();
    txn.delete(one).await.unwrap();
    txn.commit().await.unwrap();
    assert_eq!(
        ann.receive_json().await,
        frame("delete", 1, row(1, "ann", "bulk"))
    );
    ann.receive_nothing_for(QUIET).await;
}

// ---------------------------------------------------------------------------------------------
// SQLite
// ---------------------------------------------------------------------------------------------

async fn sqlite_db() -> Db {
    Db::options("sqlite::memory:")
        .capture()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_raw_sql_on_the_pool_is_observed() {
    let db = sqlite_db().await;
    let (s, capture) = setup(&db).await;
    let mut ann = subscriber(&s, "ann", 1).await;

    exec(
        &db,
        "INSERT INTO capture_item (id, owner, title) VALUES (1, 'ann', 'first')",
    )
    .await;
    assert_eq!(
        ann.receive_json().await,
        frame("create", 1, row(1, "ann", "first"))
    );

    exec(&db, "UPDATE capture_item SET title = 'second' WHERE id = 1").await;
    assert_eq!(
        ann.receive_json().await,
        frame("update", 1, row(1, "ann", "second"))
    );
    ann.receive_nothing_for(QUIET).await;

    // A bulk statement of sea-orm's, outside any `Txn`: one event per row.
    exec(
        &db,
        "INSERT INTO capture_item (id, owner, title) VALUES (2, 'ann', 'b'), (3, 'ann', 'c')",
    )
    .await;
    receive_sorted(&mut ann, 2).await;
    let result = item::Entity::update_many()
        .col_expr(item::Column::Title, Expr::value("bulk"))
        .filter(item::Column::Owner.eq("ann"))
        .exec(db.conn())
        .await
        .unwrap();
    assert_eq!(result.rows_affected, 3);
    assert_eq!(
        receive_sorted(&mut ann, 3).await,
        vec![
            frame("update", 1, row(1, "ann", "bulk")),
            frame("update", 1, row(2, "ann", "bulk")),
            frame("update", 1, row(3, "ann", "bulk")),
        ]
    );
    ann.receive_nothing_for(QUIET).await;

    capture.stop().await;
    exec(&db, "UPDATE capture_item SET title = 'late' WHERE id = 1").await;
    ann.receive_nothing_for(QUIET).await;
}

#[tokio::test]
async fn sqlite_rolled_back_transaction_gives_nothing() {
    let db = sqlite_db().await;
    let (s, _capture) = setup(&db).await;
    let mut ann = subscriber(&s, "ann", 1).await;
    framework_insert(&db, 1, "ann", "a").await;
    assert_eq!(
        ann.receive_json().await,
        frame("create", 1, row(1, "ann", "a"))
    );

    let txn = db.conn().begin().await.unwrap();
    txn.execute_unprepared("UPDATE capture_item SET title = 'never' WHERE id = 1")
        .await
        .unwrap();
    txn.execute_unprepared("INSERT INTO capture_item (id, owner, title) VALUES (2, 'ann', 'x')")
        .await
        .unwrap();
    txn.rollback().await.unwrap();
    ann.receive_nothing_for(QUIET).await;

    // The same transaction, committed: one event per row, after commit.
    let txn = db.conn().begin().await.unwrap();
    txn.execute_unprepared("UPDATE capture_item SET title = 'kept' WHERE id = 1")
        .await
        .unwrap();
    txn.execute_unprepared("UPDATE capture_item SET title = 'kept twice' WHERE id = 1")
        .await
        .unwrap();
    ann.receive_nothing_for(QUIET).await;
    txn.commit().await.unwrap();
    assert_eq!(
        ann.receive_json().await,
        frame("update", 1, row(1, "ann", "kept twice"))
    );
    ann.receive_nothing_for(QUIET).await;
}

#[tokio::test]
async fn sqlite_framework_writes_are_published_once() {
    framework_writes_are_published_once(sqlite_db().await).await;
}

#[tokio::test]
async fn sqlite_raw_delete_sends_a_resync_notice() {
    let db = sqlite_db().await;
    let (s, capture) = setup(&db).await;
    let mut ann = subscriber(&s, "ann", 1).await;
    let mut watcher = resync_subscriber(&s, 9).await;
    let mut resyncs = capture.resyncs();
    framework_insert(&db, 1, "ann", "a").await;
    assert_eq!(
        ann.receive_json().await,
        frame("create", 1, row(1, "ann", "a"))
    );

    exec(&db, "DELETE FROM capture_item WHERE id = 1").await;
    assert_eq!(
        watcher.receive_json().await,
        frame("resync", 9, json!({"table": TABLE, "reason": "incomplete"}))
    );
    assert_eq!(
        resyncs.recv().await.unwrap(),
        Resync {
            table: TABLE,
            reason: ResyncReason::Incomplete
        }
    );
    receive_stream_resync(&mut ann, 1).await;
    ann.receive_nothing().await;

    // Inserted and deleted in one transaction: nothing to tell.
    let txn = db.conn().begin().await.unwrap();
    txn.execute_unprepared("INSERT INTO capture_item (id, owner, title) VALUES (2, 'ann', 'x')")
        .await
        .unwrap();
    txn.execute_unprepared("DELETE FROM capture_item WHERE id = 2")
        .await
        .unwrap();
    txn.commit().await.unwrap();
    ann.receive_nothing_for(QUIET).await;
    watcher.receive_nothing().await;
}

#[tokio::test]
async fn capture_checks_its_backend() {
    let db = sqlite_db().await;
    let err = Capture::postgres(&db)
        .watch::<item::Entity>()
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot watch"), "{err}");

    // A database not opened with `Db::options(url).capture()` has no hooks on its connections.
    let conn = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
    let wrapped = Db::from_connection(conn, dcrf::channel::ChannelLayer::memory());
    let err = Capture::sqlite(&wrapped)
        .watch::<item::Entity>()
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("Db::options(url).capture()"),
        "{err}"
    );

    // One capture per database.
    let _first = Capture::new(&db)
        .watch::<item::Entity>()
        .start()
        .await
        .unwrap();
    assert!(
        Capture::new(&db)
            .watch::<item::Entity>()
            .start()
            .await
            .is_err()
    );
}
