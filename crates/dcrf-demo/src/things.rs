//! The `things` and `things_with_id` streams of `/ws`: the surface the `dcrf-client` JS client's
//! own integration tests exercise. One `thing` table, two representations: `things` serializes
//! the key as `pk`, `things_with_id` as `id`.

use std::marker::PhantomData;
use std::sync::Arc;

use dcrf::consumer::Event;
use dcrf::model::{ChangeKind, Db, ModelActions, ModelConsumer};
use dcrf::observer::ModelObserver;
use dcrf::prelude::*;
use sea_orm::entity::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The `thing` table.
pub mod thing {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    /// `Thing(id, name ≤ 64, counter default 0)`; the `things_with_id` representation.
    /// Exported to TypeScript as `Thing`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, ts_rs::TS)]
    #[sea_orm(table_name = "thing")]
    #[ts(rename = "Thing")]
    pub struct Model {
        /// Primary key.
        #[sea_orm(primary_key)]
        pub id: i32,
        /// Up to 64 characters.
        pub name: String,
        /// Default 0.
        pub counter: i32,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// What clients may write.
#[derive(Debug, Deserialize, garde::Validate, DeriveIntoActiveModel, ts_rs::TS)]
#[sea_orm(active_model = "thing::ActiveModel")]
pub struct ThingInput {
    /// Required, not empty, up to 64 characters.
    #[garde(length(chars, min = 1, max = 64))]
    pub name: String,
    /// Default 0.
    #[garde(skip)]
    #[serde(default)]
    #[ts(as = "Option<i32>", optional)]
    pub counter: i32,
}

/// `{"pk": 1, "name": "...", "counter": 0}` (the `things` stream).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct ThingWithPk {
    /// The primary key, named `pk`.
    pub pk: i32,
    /// Name.
    pub name: String,
    /// Counter.
    pub counter: i32,
}

impl From<thing::Model> for ThingWithPk {
    fn from(m: thing::Model) -> Self {
        ThingWithPk {
            pk: m.id,
            name: m.name,
            counter: m.counter,
        }
    }
}

/// The body of a `subscribe_many` push.
#[derive(Serialize)]
#[serde(untagged)]
enum ManyBody<R> {
    Deleted(ThingWithPk),
    Changed(R),
}

/// A representation of a thing, named for its observers.
pub trait ThingRepr:
    Serialize + DeserializeOwned + From<thing::Model> + Send + Sync + 'static
{
    /// The observer id of `subscribe_many` for this representation.
    const MANY: &'static str;
    /// The observer id of `subscribe_instance` for this representation.
    const INSTANCE: &'static str;
    /// The observer id of `subscribe_list` for this representation.
    const LIST: &'static str;
}

impl ThingRepr for ThingWithPk {
    const MANY: &'static str = "things.many.pk";
    const INSTANCE: &'static str = "things.instance.pk";
    const LIST: &'static str = "things.list.pk";
}

impl ThingRepr for thing::Model {
    const MANY: &'static str = "things.many.id";
    const INSTANCE: &'static str = "things.instance.id";
    const LIST: &'static str = "things.list.id";
}

/// CRUD, instance subscriptions and `subscribe_many` over `thing`, in representation `R`.
#[derive(Debug)]
pub struct Things<R> {
    db: Db,
    many: Arc<ModelObserver<thing::Model>>,
    _repr: PhantomData<fn() -> R>,
}

impl<R> Clone for Things<R> {
    fn clone(&self) -> Self {
        Things {
            db: self.db.clone(),
            many: self.many.clone(),
            _repr: PhantomData,
        }
    }
}

/// The `things` stream.
pub type ThingsConsumer = Things<ThingWithPk>;
/// The `things_with_id` stream.
pub type ThingsWithIdConsumer = Things<thing::Model>;

impl<R: ThingRepr> Things<R> {
    /// The consumer (cloned for each socket); registers its observers.
    pub fn new(db: &Db) -> Self {
        // Every thing is in group "*" (all changes) and in its own pk's group.
        let many = db
            .observe::<thing::Entity>(R::MANY)
            .group_by(|t: &thing::Model| vec!["*".to_owned(), t.id.to_string()])
            .serialize(|t: &thing::Model, kind| {
                // As the test app: a delete carries ThingSerializer's data (key `pk`), the
                // other events the stream's own representation.
                if kind == ChangeKind::Delete {
                    ManyBody::Deleted(ThingWithPk::from(t.clone()))
                } else {
                    ManyBody::Changed(R::from(t.clone()))
                }
            });
        Things {
            db: db.clone(),
            many,
            _repr: PhantomData,
        }
    }
}

impl<R: ThingRepr> ModelConsumer for Things<R> {
    type Entity = thing::Entity;
    type Output = R;
    type Input = ThingInput;

    fn db(&self) -> &Db {
        &self.db
    }

    fn actions(&self) -> ModelActions {
        ModelActions::ALL | ModelActions::SUBSCRIBE_INSTANCE | ModelActions::SUBSCRIBE_LIST
    }

    fn instance_observer_id(&self) -> String {
        R::INSTANCE.to_owned()
    }

    fn list_observer_id(&self) -> String {
        R::LIST.to_owned()
    }
}

/// `subscribe_many` / `unsubscribe_many` arguments: no `things` means every thing.
#[derive(Debug, Deserialize)]
pub struct Many {
    /// The things to follow; absent: all of them, creates included.
    #[serde(default)]
    pub things: Option<Vec<i32>>,
}

impl Many {
    fn keys(&self) -> Vec<String> {
        match &self.things {
            None => vec!["*".to_owned()],
            Some(ids) => ids.iter().map(i32::to_string).collect(),
        }
    }
}

#[dcrf::consumer(model)]
impl<R: ThingRepr> Things<R> {
    /// Follows creates, updates and deletes of all things (or of `things`), tagged with this
    /// request's id. Replies 201, `data: null`.
    #[action]
    async fn subscribe_many(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: Many,
    ) -> Result<Reply<()>, ApiError> {
        for key in args.keys() {
            self.many.subscribe(ctx, &key, frame.request_id()).await?;
        }
        Ok(Reply::with_status((), dcrf::StatusCode::CREATED))
    }

    /// Stops `subscribe_many` for this request id. Replies 204.
    #[action]
    async fn unsubscribe_many(
        &mut self,
        ctx: &Ctx,
        frame: &Frame<'_>,
        args: Many,
    ) -> Result<Reply<()>, ApiError> {
        for key in args.keys() {
            self.many.unsubscribe(ctx, &key, frame.request_id());
        }
        Ok(Reply::no_content())
    }
}

impl<R: ThingRepr> Consumer for Things<R> {
    /// `subscribe_many` pushes: status 204 for deletes, 200 otherwise.
    async fn on_event(&mut self, ctx: &Ctx, event: &Event<'_>) {
        let status = if event.action() == "delete" {
            dcrf::StatusCode::NO_CONTENT
        } else {
            dcrf::StatusCode::OK
        };
        for rid in event.request_ids {
            let _ = ctx
                .push(event.action(), Some(rid), event.body(), status)
                .await;
        }
    }
}

/// Creates the `thing` table.
pub async fn setup(db: &Db) -> Result<(), dcrf::Error> {
    db.create_table(thing::Entity).await
}
