//! `/ws/todos/`: a model consumer over the `todo` table.

use std::sync::Arc;

use dcrf::model::validators::not_blank;
use dcrf::model::{Db, LimitOffset, ModelActions, ModelConsumer};
use dcrf::observer::ModelObserver;
use dcrf::prelude::*;
use sea_orm::entity::prelude::*;
use sea_orm::{Condition, sea_query::Expr};
use serde::{Deserialize, Serialize};

/// The `todo` table.
pub mod todo {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// One todo: `{"id": 1, "title": "...", "done": false, "owner": ""}`. Exported to
    /// TypeScript as `Todo`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, ts_rs::TS)]
    #[sea_orm(table_name = "todo")]
    #[ts(rename = "Todo")]
    pub struct Model {
        /// Primary key.
        #[sea_orm(primary_key)]
        pub id: i32,
        /// Up to 200 characters, required.
        pub title: String,
        /// Default false.
        pub done: bool,
        /// Default "".
        pub owner: String,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What clients may write.
#[derive(Debug, Deserialize, Serialize, garde::Validate, DeriveIntoActiveModel, ts_rs::TS)]
#[sea_orm(active_model = "todo::ActiveModel")]
pub struct TodoInput {
    /// Required, not blank, at most 200 characters (DRF's `CharField(max_length=200)`).
    #[garde(custom(not_blank), length(chars, max = 200))]
    pub title: String,
    /// Default false.
    #[garde(skip)]
    #[serde(default)]
    #[ts(as = "Option<bool>", optional)]
    pub done: bool,
    /// Default "".
    #[garde(skip)]
    #[serde(default)]
    #[ts(as = "Option<String>", optional)]
    pub owner: String,
}

/// list / retrieve / create / update / patch / delete over `todo`, instance subscriptions,
/// live lists (`subscribe_list`), subscriptions to every change, and a bulk update; open to
/// anyone. Every push carries its stream `position`; every subscribe accepts `since`.
#[derive(Debug, Clone)]
pub struct Todos {
    /// The database.
    pub db: Db,
    /// Every todo change, body = the todo.
    pub all: Arc<ModelObserver<todo::Model>>,
}

impl Todos {
    /// The consumer (cloned for each connection); registers its observers.
    pub fn new(db: &Db) -> Todos {
        Todos {
            db: db.clone(),
            all: all_todos(db),
        }
    }
}

/// The observer behind `subscribe_to_all`: one group, the whole todo as the body (for a
/// delete, the todo as it was).
pub fn all_todos(db: &Db) -> Arc<ModelObserver<todo::Model>> {
    db.observe::<todo::Entity>("todos.all")
        .serialize(|t: &todo::Model, _| t.clone())
}

/// Ids per statement of `bulk_set_done`.
const BULK_CHUNK: usize = 10_000;

/// `bulk_set_done` arguments.
#[derive(Debug, Deserialize, ts_rs::TS)]
pub struct BulkSetDone {
    /// The todos to change.
    pub ids: Vec<i32>,
    /// The new value of `done`.
    pub done: bool,
}

/// `{"updated": n}`.
#[derive(Debug, Serialize, ts_rs::TS)]
pub struct Updated {
    /// Rows changed.
    #[ts(type = "number")]
    pub updated: u64,
}

/// `{"subscribed": bool}`.
#[derive(Debug, Serialize, ts_rs::TS)]
pub struct Subscribed {
    /// Whether the connection now receives every change.
    pub subscribed: bool,
}

impl ModelConsumer for Todos {
    type Entity = todo::Entity;
    type Output = todo::Model;
    type Input = TodoInput;

    fn db(&self) -> &Db {
        &self.db
    }

    fn actions(&self) -> ModelActions {
        ModelActions::ALL | ModelActions::SUBSCRIBE_INSTANCE | ModelActions::SUBSCRIBE_LIST
    }

    fn pagination(&self) -> Option<LimitOffset> {
        Some(LimitOffset::new(100).max_limit(1000))
    }

    fn filter_fields(&self) -> &'static [&'static str] {
        &["done", "owner"]
    }

    fn ordering_fields(&self) -> &'static [&'static str] {
        &["id", "title", "done", "owner"]
    }
}

#[dcrf::consumer(model)]
impl Todos {
    /// Every create, update and delete of any todo is pushed with this request's id:
    /// `{"action": "create"|"update"|"delete", "request_id": <id>, "data": <todo>, ...}`.
    #[action]
    async fn subscribe_to_all(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
    ) -> Result<Reply<Subscribed>, ApiError> {
        self.all.subscribe(ctx, "", frame.request_id()).await?;
        Ok(Reply::created(Subscribed { subscribed: true }))
    }

    /// Stops the pushes of `subscribe_to_all` (for this request id, or all without one).
    #[action]
    async fn unsubscribe_from_all(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
    ) -> Result<Reply<Subscribed>, ApiError> {
        self.all.unsubscribe(ctx, "", frame.request_id());
        Ok(Reply::with_status(
            Subscribed { subscribed: false },
            dcrf::StatusCode::NO_CONTENT,
        ))
    }

    /// Sets `done` on many todos in one SQL statement; every changed todo is pushed.
    #[action]
    async fn bulk_set_done(&mut self, args: BulkSetDone) -> Result<Reply<Updated>, ApiError> {
        let mut txn = self.db.begin().await?;
        let mut updated = 0;
        // SQLite binds at most 32,766 parameters per statement: one transaction, several
        // statements, so any list that fits in a message works.
        for ids in args.ids.chunks(BULK_CHUNK) {
            updated += txn
                .update_where::<todo::Entity>(
                    Condition::all().add(todo::Column::Id.is_in(ids.iter().copied())),
                    |u| u.col_expr(todo::Column::Done, Expr::value(args.done)),
                )
                .await?;
        }
        txn.commit().await?;
        Ok(Reply::ok(Updated { updated }))
    }
}

impl Consumer for Todos {
    fn permissions(&self) -> Option<Permissions> {
        Some(Permissions::new(AllowAny))
    }
}

/// Creates the table and inserts `n` todos titled `Todo 1`, `Todo 2`, ...
pub async fn setup(db: &Db, seed: u64) -> Result<(), dcrf::Error> {
    db.create_table(todo::Entity).await?;
    let mut next = 1;
    while next <= seed {
        let end = (next + 499).min(seed);
        let rows = (next..=end).map(|i| todo::ActiveModel {
            title: sea_orm::Set(format!("Todo {i}")),
            done: sea_orm::Set(false),
            owner: sea_orm::Set(String::new()),
            ..Default::default()
        });
        todo::Entity::insert_many(rows).exec(db.conn()).await?;
        next = end + 1;
    }
    Ok(())
}
