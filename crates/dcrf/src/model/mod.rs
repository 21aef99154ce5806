//! Model consumers: DCRF's `GenericAsyncAPIConsumer` and its mixins over a sea-orm entity.
//!
//! A [`ModelConsumer`] names an entity, the representation sent to clients (`Output`), the
//! validated input (`Input`) and the database; `#[dcrf::consumer(model)]` then serves its
//! actions:
//!
//! | action | request fields | success |
//! |---|---|---|
//! | `list` | optional `limit`, `offset`, `ordering`, `filters` | 200, array (or a page, see [`LimitOffset`]) |
//! | `retrieve` | the lookup field (`pk`) | 200, the object |
//! | `create` | `data` | 201, the object |
//! | `update` | lookup, `data` (required fields required; absent fields keep their value) | 200 |
//! | `patch` | lookup, `data` (any subset; `null` sets null, absent keeps) | 200 |
//! | `delete` | lookup | 204, `data: null` |
//! | `list_cancel` | — (streamed lists only) | 200, `data: null` |
//!
//! Errors are DCRF's: 404 `["Not found"]`, 400 `[{"field": ["message"]}]` for validation (with
//! `non_field_errors` for object-level errors), 403 when
//! [`has_object_permission`](ModelConsumer::has_object_permission) refuses. Every write runs in
//! one transaction; any failure rolls it back and answers with an error frame.
//!
//! ```
//! use dcrf::model::{Db, ModelConsumer};
//! use dcrf::prelude::*;
//! use sea_orm::entity::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! mod todo {
//!     use sea_orm::entity::prelude::*;
//!     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, serde::Deserialize)]
//!     #[sea_orm(table_name = "todo")]
//!     pub struct Model {
//!         #[sea_orm(primary_key)]
//!         pub id: i32,
//!         pub title: String,
//!         pub done: bool,
//!     }
//!     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
//!     pub enum Relation {}
//!     impl ActiveModelBehavior for ActiveModel {}
//! }
//!
//! /// What clients may write: validated, then turned into an active model.
//! #[derive(Deserialize, garde::Validate, DeriveIntoActiveModel)]
//! #[sea_orm(active_model = "todo::ActiveModel")]
//! struct TodoInput {
//!     #[garde(length(min = 1, max = 200))]
//!     title: String,
//!     #[garde(skip)]
//!     #[serde(default)]
//!     done: bool,
//! }
//!
//! struct Todos { db: Db }
//!
//! impl ModelConsumer for Todos {
//!     type Entity = todo::Entity;
//!     type Output = todo::Model;
//!     type Input = TodoInput;
//!     fn db(&self) -> &Db { &self.db }
//! }
//!
//! #[dcrf::consumer(model)]
//! impl Consumer for Todos {}
//! ```

mod db;
mod default_hooks;
mod group_commit;
mod live;
mod lookup;
mod pagination;
#[cfg(feature = "postgres")]
mod point_batch;
mod point_read;
#[cfg(feature = "sqlite")]
mod sqlite_reads;
mod txn_conn;
mod validation;
pub mod validators;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use sea_orm::{
    ActiveModelBehavior, ActiveModelTrait, ColumnTrait, ConnectionTrait, DbBackend, EntityName,
    EntityTrait, IntoActiveModel, Iterable, Order, PrimaryKeyToColumn, QueryFilter, QueryOrder,
    QuerySelect, Select, TryIntoModel,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use crate::change::ChangeKind;
pub use db::{Db, DbOptions, Txn, TxnHooks};
pub use live::DEFAULT_LIVE_LIST_MAX;
#[doc(hidden)]
pub use live::handle_list_event;
#[doc(hidden)]
pub use lookup::json_to_value;
pub use lookup::{column_named, primary_key_column};
pub use pagination::{LimitOffset, Page};
pub use txn_conn::TxnConn;
pub use validation::{ValidationErrors, parse_input};

use crate::consumer::{Ctx, Dispatched, Reply};
use crate::error::ApiError;
use crate::observer::ModelObserver;
use crate::protocol::Frame;
use default_hooks::Hook;

/// The model of a consumer's entity.
pub type ModelOf<C> = <<C as ModelConsumer>::Entity as EntityTrait>::Model;
/// The active model of a consumer's entity.
pub type ActiveModelOf<C> = <<C as ModelConsumer>::Entity as EntityTrait>::ActiveModel;
/// A column of a consumer's entity.
type ColumnOf<C> = <<C as ModelConsumer>::Entity as EntityTrait>::Column;

/// A sea-orm entity the framework can serve: its model serializes, and its active model can be
/// sent between tasks. Implemented for every entity that qualifies.
pub trait ModelEntity:
    EntityTrait<
        Model: Serialize
                   + DeserializeOwned
                   + Send
                   + Sync
                   + 'static
                   + IntoActiveModel<<Self as EntityTrait>::ActiveModel>,
        ActiveModel: ActiveModelBehavior + Send + Sync + TryIntoModel<<Self as EntityTrait>::Model>,
    >
{
}

impl<E> ModelEntity for E where
    E: EntityTrait<
            Model: Serialize
                       + DeserializeOwned
                       + Send
                       + Sync
                       + 'static
                       + IntoActiveModel<<E as EntityTrait>::ActiveModel>,
            ActiveModel: ActiveModelBehavior
                             + Send
                             + Sync
                             + TryIntoModel<<E as EntityTrait>::Model>,
        >
{
}

/// Which of the model actions a consumer serves (DCRF's mixins).
///
/// ```
/// use dcrf::model::ModelActions;
/// let read_only = ModelActions::LIST | ModelActions::RETRIEVE;
/// assert!(read_only.contains(ModelActions::LIST));
/// assert!(!read_only.contains(ModelActions::DELETE));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelActions(u8);

impl ModelActions {
    /// `list` (DCRF's `ListModelMixin`).
    pub const LIST: Self = Self(1);
    /// `retrieve`.
    pub const RETRIEVE: Self = Self(2);
    /// `create`.
    pub const CREATE: Self = Self(4);
    /// `update`.
    pub const UPDATE: Self = Self(8);
    /// `patch`.
    pub const PATCH: Self = Self(16);
    /// `delete`.
    pub const DELETE: Self = Self(32);
    /// `subscribe_instance` and `unsubscribe_instance` (DCRF's `ObserverModelInstanceMixin`).
    pub const SUBSCRIBE_INSTANCE: Self = Self(64);
    /// `subscribe_list` and `unsubscribe_list`: live lists (see [`handle_list_event`] and
    /// the module docs).
    pub const SUBSCRIBE_LIST: Self = Self(128);
    /// `list` and `retrieve`.
    pub const READ_ONLY: Self = Self(1 | 2);
    /// The six CRUD actions.
    pub const ALL: Self = Self(63);
    /// None (a consumer of custom actions over a model).
    pub const NONE: Self = Self(0);

    /// Are all of `other`'s actions in `self`?
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for ModelActions {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// A consumer over one sea-orm entity. Every hook has a default; override what you need.
pub trait ModelConsumer: Send + Sync + Sized + 'static {
    /// The entity (table).
    type Entity: ModelEntity;
    /// What clients receive (DRF's serializer output). Often the model itself.
    type Output: Serialize + From<ModelOf<Self>> + Send + Sync;
    /// What clients may write: deserialized from `data`, validated by garde, then converted
    /// into an active model (derive sea-orm's `DeriveIntoActiveModel`). Field names match the
    /// model's; fields the input does not have are read-only.
    type Input: DeserializeOwned
        + garde::Validate<Context = ()>
        + IntoActiveModel<ActiveModelOf<Self>>
        + Send;

    /// The database.
    fn db(&self) -> &Db;

    /// The actions served. Default: all six.
    fn actions(&self) -> ModelActions {
        ModelActions::ALL
    }

    /// The message key that identifies one object, and the column it is looked up in: `"pk"`
    /// (the default) means the primary key; any other name is a column name.
    fn lookup_field(&self) -> &'static str {
        "pk"
    }

    /// Paginates `list` (DCRF's `PaginatedModelListMixin`). Default: no pagination.
    fn pagination(&self) -> Option<LimitOffset> {
        None
    }

    /// Streams `list` one page per frame, with this pause before each page (DCRF's
    /// `StreamedPaginatedListMixin`); needs [`pagination`](Self::pagination). Enables
    /// `list_cancel`. Default: not streamed.
    fn stream_list(&self) -> Option<Duration> {
        None
    }

    /// Fields clients may filter `list` on: `{"filters": {"done": true}}`. Default: none.
    fn filter_fields(&self) -> &'static [&'static str] {
        &[]
    }

    /// Fields clients may order `list` by: `{"ordering": "-title"}` or `["done", "-id"]`.
    /// Default: none (ordered by primary key).
    fn ordering_fields(&self) -> &'static [&'static str] {
        &[]
    }

    /// The objects this connection may see (DCRF's `get_queryset`). Default: all rows.
    ///
    /// While a consumer keeps this default and the default
    /// [`filter_queryset`](Self::filter_queryset), the SQL of its point reads (`retrieve`,
    /// the first read of `patch`, `subscribe_instance`) is the same for every request, so it is
    /// rendered once and only the looked-up value changes.
    fn get_queryset(&self, ctx: &Ctx, frame: &Frame<'_>) -> Select<Self::Entity> {
        let _ = (ctx, frame);
        default_hooks::saw::<Self>(Hook::GetQueryset);
        Self::Entity::find()
    }

    /// Narrows the queryset from message arguments (DCRF's `filter_queryset`). Default:
    /// unchanged.
    fn filter_queryset(
        &self,
        ctx: &Ctx,
        query: Select<Self::Entity>,
        frame: &Frame<'_>,
    ) -> Result<Select<Self::Entity>, ApiError> {
        let _ = (ctx, frame);
        default_hooks::saw::<Self>(Hook::FilterQueryset);
        Ok(query)
    }

    /// Is this object in this connection's queryset? Instance pushes for objects outside it are
    /// 404 frames, as in DCRF. Keep it consistent with [`get_queryset`](Self::get_queryset);
    /// it runs in memory on the changed object, so a push costs no database read. Default: yes.
    fn in_queryset(&self, ctx: &Ctx, object: &ModelOf<Self>) -> impl Future<Output = bool> + Send {
        let _ = (ctx, object);
        async { true }
    }

    /// May this connection run `action` on this object? Checked by retrieve, update, patch,
    /// delete and subscribe_instance after the object is found (`false` answers 403), and
    /// before each instance push (`false` sends nothing). Default: yes.
    fn has_object_permission(
        &self,
        ctx: &Ctx,
        action: &str,
        object: &ModelOf<Self>,
    ) -> impl Future<Output = bool> + Send {
        let _ = (ctx, action, object);
        async { true }
    }

    /// Object-level validation after field rules passed (DRF's `validate`): may query the
    /// database (uniqueness, cross-field checks). `instance` is the object being updated, `None`
    /// on create. Return [`ValidationErrors`] converted into an [`ApiError`].
    fn validate(
        &self,
        ctx: &Ctx,
        input: &Self::Input,
        instance: Option<&ModelOf<Self>>,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        let _ = (ctx, input, instance);
        async { Ok(()) }
    }

    /// Saves a new object (DCRF's `perform_create`).
    fn perform_create(
        &self,
        ctx: &Ctx,
        txn: &mut Txn,
        object: ActiveModelOf<Self>,
    ) -> impl Future<Output = Result<ModelOf<Self>, ApiError>> + Send {
        let _ = ctx;
        async move { Ok(txn.insert(object).await?) }
    }

    /// Saves a full update (DCRF's `perform_update`).
    ///
    /// While a consumer keeps this default and the default queryset hooks, an update is one
    /// statement: `UPDATE … WHERE` the row still holds every value `update` read before its
    /// transaction. When the row changed or went meanwhile, it is read again in the
    /// transaction and updated the long way, as it would be after an override.
    fn perform_update(
        &self,
        ctx: &Ctx,
        txn: &mut Txn,
        object: ActiveModelOf<Self>,
    ) -> impl Future<Output = Result<ModelOf<Self>, ApiError>> + Send {
        let _ = ctx;
        async move {
            default_hooks::saw::<Self>(Hook::PerformUpdate);
            Ok(txn.update(object).await?)
        }
    }

    /// Saves a partial update (DCRF's `perform_patch`). Keeping this default makes a patch one
    /// statement, as [`perform_update`](Self::perform_update) says.
    fn perform_patch(
        &self,
        ctx: &Ctx,
        txn: &mut Txn,
        object: ActiveModelOf<Self>,
    ) -> impl Future<Output = Result<ModelOf<Self>, ApiError>> + Send {
        let _ = ctx;
        async move {
            default_hooks::saw::<Self>(Hook::PerformPatch);
            Ok(txn.update(object).await?)
        }
    }

    /// The id of this consumer's instance observer (`subscribe_instance` pushes): its groups
    /// are named after it on every node, so it must be the same on every node and across
    /// deploys, and unique among the consumers of its table. Default: `"{table}.instance"`.
    /// Two consumers of one table that both serve `subscribe_instance` must give at least one
    /// of them its own id (mounting both with the same id panics, naming them).
    fn instance_observer_id(&self) -> String {
        format!(
            "{}.instance",
            <Self::Entity as Default>::default().table_name()
        )
    }

    /// The id of this consumer's list observer (`subscribe_list` pushes), with the same rules as
    /// [`instance_observer_id`](Self::instance_observer_id). Default: `"{table}.list"`.
    fn list_observer_id(&self) -> String {
        format!("{}.list", <Self::Entity as Default>::default().table_name())
    }

    /// Deletes an object (DCRF's `perform_delete`).
    fn perform_delete(
        &self,
        ctx: &Ctx,
        txn: &mut Txn,
        object: ModelOf<Self>,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        let _ = ctx;
        async move { Ok(txn.delete(object).await?) }
    }
}

/// Runs a model action; the fallback of `#[dcrf::consumer(model)]`.
#[doc(hidden)]
pub async fn dispatch_model<C: ModelConsumer>(
    consumer: &mut C,
    ctx: &Ctx,
    action: &str,
    frame: &Frame<'_>,
) -> Dispatched {
    let c: &C = consumer;
    let actions = c.actions();
    let rid = frame.request_id();
    let streamed = c.stream_list().is_some() && c.pagination().is_some();
    match action {
        "list" if actions.contains(ModelActions::LIST) => {
            if streamed {
                if let Err(e) = start_stream(c, ctx, frame) {
                    let _ = ctx.send_error(&e, Some(action), rid).await;
                }
            } else {
                ctx.finish(action, rid, list(c, ctx, frame).await).await;
            }
        }
        "list_cancel" if actions.contains(ModelActions::LIST) && streamed => {
            if let Some(streams) = ctx.extension::<ListStreams>() {
                let running = std::mem::take(&mut *crate::sync::lock(&streams.0));
                for stream in &running {
                    stream.cancel.cancel();
                }
                // Reply only once every stream has stopped, so no page follows the reply. A
                // cancelled stream stops at its next poll, even while waiting to send.
                for stream in running {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(5),
                        stream.stopped.cancelled_owned(),
                    )
                    .await;
                }
            }
            ctx.finish(action, rid, Ok::<_, ApiError>(Reply::ok(())))
                .await;
        }
        "retrieve" if actions.contains(ModelActions::RETRIEVE) => {
            ctx.finish(action, rid, retrieve(c, ctx, frame).await).await;
        }
        "create" if actions.contains(ModelActions::CREATE) => {
            ctx.finish(action, rid, create(c, ctx, frame).await).await;
        }
        "update" if actions.contains(ModelActions::UPDATE) => {
            ctx.finish(action, rid, update(c, ctx, frame, false).await)
                .await;
        }
        "patch" if actions.contains(ModelActions::PATCH) => {
            ctx.finish(action, rid, update(c, ctx, frame, true).await)
                .await;
        }
        "delete" if actions.contains(ModelActions::DELETE) => {
            ctx.finish(action, rid, delete(c, ctx, frame).await).await;
        }
        "subscribe_instance" if actions.contains(ModelActions::SUBSCRIBE_INSTANCE) => {
            ctx.finish(action, rid, subscribe_instance(c, ctx, frame).await)
                .await;
        }
        "unsubscribe_instance" if actions.contains(ModelActions::SUBSCRIBE_INSTANCE) => {
            ctx.finish(action, rid, unsubscribe_instance(c, ctx, frame).await)
                .await;
        }
        "subscribe_list" if actions.contains(ModelActions::SUBSCRIBE_LIST) => {
            ctx.finish(action, rid, live::subscribe_list(c, ctx, frame).await)
                .await;
        }
        "unsubscribe_list" if actions.contains(ModelActions::SUBSCRIBE_LIST) => {
            ctx.finish(action, rid, live::unsubscribe_list(c, ctx, frame).await)
                .await;
        }
        _ => return Dispatched::Unknown,
    }
    Dispatched::Handled
}

/// Does a model action only read (`list`, `retrieve`, `list_cancel`, the subscriptions)? The
/// model half of [`Frame::reads`] for `#[dcrf::consumer(model)]`.
#[doc(hidden)]
pub fn model_action_reads<C: ModelConsumer>(consumer: &C, action: &str) -> bool {
    let actions = consumer.actions();
    match action {
        "list" | "list_cancel" => actions.contains(ModelActions::LIST),
        "retrieve" => actions.contains(ModelActions::RETRIEVE),
        "subscribe_instance" | "unsubscribe_instance" => {
            actions.contains(ModelActions::SUBSCRIBE_INSTANCE)
        }
        "subscribe_list" | "unsubscribe_list" => actions.contains(ModelActions::SUBSCRIBE_LIST),
        _ => false,
    }
}

/// DCRF's `get_object`: the queryset, narrowed, then the lookup field; 404 when absent.
///
/// Runs on `conn` (pass a transaction to read what you are about to write; on PostgreSQL the
/// row is then locked `FOR UPDATE`).
pub async fn get_object<C: ModelConsumer, Conn: ConnectionTrait>(
    consumer: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
    conn: &Conn,
    lock: bool,
) -> Result<ModelOf<C>, ApiError> {
    let mut query = object_query(consumer, ctx, frame)?;
    if lock && conn.get_database_backend() == DbBackend::Postgres {
        query = query.lock_exclusive();
    }
    query.one(conn).await?.ok_or_else(ApiError::not_found)
}

/// The frame's object outside a transaction, inline on a SQLite file (see
/// [`Db::read_one`]); 404 when the queryset does not hold it. A consumer with the default
/// queryset hooks runs a statement rendered once ([`point_read`]).
async fn read_object<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<ModelOf<C>, ApiError> {
    let (field, column, value) = lookup(c, frame)?;
    let db = c.db();
    let found = match point_read::cached::<C>(field, db.backend()) {
        Some(read) => db.read_point::<C::Entity>(&read, column, value).await?,
        None => {
            let query = queryset_lookup(c, ctx, frame, column, value.clone())?;
            point_read::remember::<C>(field, db.backend(), &query, &value);
            db.read_one(query).await?
        }
    };
    found.ok_or_else(ApiError::not_found)
}

/// The query of [`get_object`]: the queryset, narrowed, then the lookup field.
fn object_query<C: ModelConsumer>(
    consumer: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Select<C::Entity>, ApiError> {
    let (_, column, value) = lookup(consumer, frame)?;
    queryset_lookup(consumer, ctx, frame, column, value)
}

/// The frame's lookup: the field, its column and the value it looks up. The field missing is
/// a 400 on that field; a value that cannot be a key of the column finds nothing (DCRF's 404
/// for `"abc"`).
fn lookup<C: ModelConsumer>(
    consumer: &C,
    frame: &Frame<'_>,
) -> Result<(&'static str, ColumnOf<C>, sea_orm::Value), ApiError> {
    let field = consumer.lookup_field();
    let raw = frame
        .field(field)
        .ok_or_else(|| ApiError::field(field, "This field is required."))?;
    let column = if field == "pk" {
        primary_key_column::<C::Entity>()
    } else {
        column_named::<C::Entity>(field)
            .ok_or_else(|| ApiError::internal(format!("lookup field {field:?} is not a column")))?
    };
    let Some(value) = json_to_value(column, raw.get()) else {
        return Err(ApiError::not_found());
    };
    Ok((field, column, value))
}

/// The queryset, narrowed by `filter_queryset`, then `column = value`.
fn queryset_lookup<C: ModelConsumer>(
    consumer: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
    column: ColumnOf<C>,
    value: sea_orm::Value,
) -> Result<Select<C::Entity>, ApiError> {
    let query = consumer.filter_queryset(ctx, consumer.get_queryset(ctx, frame), frame)?;
    Ok(query.filter(column.eq(value)))
}

async fn check_object<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    action: &str,
    object: &ModelOf<C>,
) -> Result<(), ApiError> {
    if c.has_object_permission(ctx, action, object).await {
        Ok(())
    } else {
        Err(ApiError::permission_denied())
    }
}

async fn retrieve<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Reply<C::Output>, ApiError> {
    let object = read_object(c, ctx, frame).await?;
    check_object(c, ctx, "retrieve", &object).await?;
    Ok(Reply::ok(C::Output::from(object)))
}

/// The list query: queryset, `filter_queryset`, then allowed filters and ordering, then the
/// primary key as the last ordering.
fn list_query<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Select<C::Entity>, ApiError> {
    let mut query = c.filter_queryset(ctx, c.get_queryset(ctx, frame), frame)?;
    query = pagination::apply_filters::<C::Entity>(query, frame, c.filter_fields())?;
    query = pagination::apply_ordering::<C::Entity>(query, frame, c.ordering_fields())?;
    for key in <C::Entity as EntityTrait>::PrimaryKey::iter() {
        query = query.order_by(key.into_column(), Order::Asc);
    }
    Ok(query)
}

/// A list reply: a plain array, or a page.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ListData<T> {
    /// Unpaginated.
    All(Vec<T>),
    /// One page.
    Page(Page<T>),
}

async fn list<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Reply<ListData<Box<serde_json::value::RawValue>>>, ApiError> {
    let query = list_query(c, ctx, frame)?;
    let max_bytes = ctx.guard().max_reply();
    match c.pagination() {
        None => {
            let rows = pagination::fetch_rows::<C>(c.db(), query, None, max_bytes).await?;
            Ok(Reply::ok(ListData::All(rows)))
        }
        Some(p) => {
            let (limit, offset) = p.limit_offset(frame)?;
            let page = pagination::fetch_page::<C>(c.db(), query, limit, offset, max_bytes).await?;
            Ok(Reply::ok(ListData::Page(page)))
        }
    }
}

/// The streams of a connection, for `list_cancel`.
#[derive(Clone, Default)]
struct ListStreams(Arc<Mutex<Vec<ListStream>>>);

/// One streamed list: how to stop it, and the sign that it has.
struct ListStream {
    cancel: CancellationToken,
    stopped: CancellationToken,
}

fn start_stream<C: ModelConsumer>(c: &C, ctx: &Ctx, frame: &Frame<'_>) -> Result<(), ApiError> {
    let (Some(p), Some(pause)) = (c.pagination(), c.stream_list()) else {
        return Err(ApiError::internal("streamed list without pagination"));
    };
    let query = list_query(c, ctx, frame)?;
    let (limit, mut offset) = p.limit_offset(frame)?;
    let streams = match ctx.extension::<ListStreams>() {
        Some(s) => s,
        None => {
            let s = ListStreams::default();
            ctx.insert_extension(s.clone());
            s
        }
    };
    let token = CancellationToken::new();
    let stopped = CancellationToken::new();
    {
        let mut v = crate::sync::lock(&streams.0);
        v.retain(|s| !s.stopped.is_cancelled());
        v.push(ListStream {
            cancel: token.clone(),
            stopped: stopped.clone(),
        });
    }
    let db = c.db().clone();
    let task_ctx = ctx.clone();
    let rid: Option<Box<serde_json::value::RawValue>> = frame.request_id().map(|r| r.to_owned());
    ctx.spawn(async move {
        // Whatever ends the task (its last page, a cancel, the connection), it says so.
        let _stopped = stopped.drop_guard();
        let run = async {
            loop {
                tokio::time::sleep(pause).await;
                let max_bytes = task_ctx.guard().max_reply();
                let page =
                    pagination::fetch_page::<C>(&db, query.clone(), limit, offset, max_bytes).await;
                match page {
                    Ok(page) => {
                        let (count, limit) = (page.count as i64, page.limit as i64);
                        if task_ctx
                            .reply("list", rid.as_deref(), &page, StatusCode::OK)
                            .await
                            .is_err()
                        {
                            return;
                        }
                        // DCRF's stop rule, on the values just sent.
                        if offset as i64 >= count - limit {
                            return;
                        }
                        offset += page.limit;
                    }
                    Err(e) => {
                        let _ = task_ctx.send_error(&e, Some("list"), rid.as_deref()).await;
                        return;
                    }
                }
            }
        };
        tokio::select! {
            biased;
            _ = token.cancelled() => {}
            _ = run => {}
        }
    });
    Ok(())
}

fn data_field<'a>(frame: &Frame<'a>) -> Result<&'a serde_json::value::RawValue, ApiError> {
    frame
        .field("data")
        .ok_or_else(|| ApiError::field("data", "This field is required."))
}

async fn create<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Reply<C::Output>, ApiError> {
    let data = data_field(frame)?;
    let input: C::Input = parse_input(data.get(), None)?;
    c.validate(ctx, &input, None).await?;
    let mut txn = c.db().begin().await?;
    let object = c
        .perform_create(ctx, &mut txn, input.into_active_model())
        .await?;
    txn.commit().await?;
    Ok(Reply::created(C::Output::from(object)))
}

async fn update<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
    partial: bool,
) -> Result<Reply<C::Output>, ApiError> {
    let action = if partial { "patch" } else { "update" };
    let data = data_field(frame)?;
    // Validation runs before the transaction: it may read the database through the pool.
    let current = read_object(c, ctx, frame).await?;
    check_object(c, ctx, action, &current).await?;
    // A partial update validates the object as it will be: current values, then `data`.
    let base = if partial {
        Some(serde_json::to_value(&current).map_err(ApiError::internal)?)
    } else {
        None
    };
    let input: C::Input = parse_input(data.get(), base)?;
    c.validate(ctx, &input, Some(&current)).await?;
    let present: Vec<String> =
        match serde_json::from_str::<serde_json::Map<String, Value>>(data.get()) {
            Ok(map) => map.into_iter().map(|(k, _)| k).collect(),
            Err(_) => Vec::new(),
        };
    let changes: ActiveModelOf<C> = input.into_active_model();
    let mut txn = c.db().begin().await?;
    // The default hooks would re-read the row, then update it: when the row still holds what
    // was just read, one conditional statement does both (see `perform_update`).
    let hooks = if partial {
        [Hook::GetQueryset, Hook::FilterQueryset, Hook::PerformPatch]
    } else {
        [Hook::GetQueryset, Hook::FilterQueryset, Hook::PerformUpdate]
    };
    if c.lookup_field() == "pk" && default_hooks::kept::<C>(&hooks) {
        let target = apply_changes::<C>(&current, &changes, &present);
        if target.is_changed()
            && let Some(saved) = txn.update_unchanged(&current, target).await?
        {
            txn.commit().await?;
            return Ok(Reply::ok(C::Output::from(saved)));
        }
    }
    // Re-read inside the transaction (locked on PostgreSQL): the row may have changed or gone.
    // It is the update's previous state too: remembered, the update need not read it again.
    let object = get_object(c, ctx, frame, txn.conn(), true).await?;
    txn.remember(&object);
    let target = apply_changes::<C>(&object, &changes, &present);
    let saved = if !target.is_changed() {
        object
    } else if partial {
        c.perform_patch(ctx, &mut txn, target).await?
    } else {
        c.perform_update(ctx, &mut txn, target).await?
    };
    txn.commit().await?;
    Ok(Reply::ok(C::Output::from(saved)))
}

/// `object` with the columns named in the frame's `data` (`present`) set from `changes`.
fn apply_changes<C: ModelConsumer>(
    object: &ModelOf<C>,
    changes: &ActiveModelOf<C>,
    present: &[String],
) -> ActiveModelOf<C> {
    let mut target: ActiveModelOf<C> = object.clone().into_active_model();
    for column in <C::Entity as EntityTrait>::Column::iter() {
        if !present.iter().any(|k| k == column.json_key()) {
            continue;
        }
        if let sea_orm::ActiveValue::Set(v) = changes.get(column) {
            target.set(column, v);
        }
    }
    target
}

async fn delete<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Reply<()>, ApiError> {
    let mut txn = c.db().begin().await?;
    let object = get_object(c, ctx, frame, txn.conn(), true).await?;
    check_object(c, ctx, "delete", &object).await?;
    c.perform_delete(ctx, &mut txn, object).await?;
    txn.commit().await?;
    Ok(Reply::no_content())
}

/// The instance observer of a model consumer: one group per object (keyed by primary key),
/// body = the consumer's `Output` (create, update) or `{"pk": pk}` (delete), serialized once
/// per event.
fn instance_observer<C: ModelConsumer>(c: &C) -> Arc<ModelObserver<ModelOf<C>>> {
    let id = c.instance_observer_id();
    if let Some(existing) = c.db().observer::<ModelOf<C>>(&id) {
        return existing;
    }
    c.db()
        .observe::<C::Entity>(&id)
        .group_by(|m: &ModelOf<C>| vec![db::pk_json::<C::Entity>(m).to_string()])
        .serialize(|m: &ModelOf<C>, kind| {
            if kind == ChangeKind::Delete {
                InstanceBody::Deleted {
                    pk: db::pk_json::<C::Entity>(m),
                }
            } else {
                InstanceBody::Object(C::Output::from(m.clone()))
            }
        })
}

/// The body of an instance push: the object, or `{"pk": pk}` for a delete.
#[derive(Serialize)]
#[serde(untagged)]
enum InstanceBody<O> {
    Deleted { pk: Value },
    Object(O),
}

/// Registers a model consumer's observers on its database (called when it is mounted).
///
/// # Panics
///
/// When another consumer type already uses the same instance observer id (see
/// [`ModelConsumer::instance_observer_id`]).
#[doc(hidden)]
pub fn register_observers<C: ModelConsumer>(c: &C) {
    if c.actions().contains(ModelActions::SUBSCRIBE_INSTANCE) {
        c.db().observers().claim(
            &c.instance_observer_id(),
            std::any::TypeId::of::<C>(),
            std::any::type_name::<C>(),
        );
        instance_observer(c);
    }
    if c.actions().contains(ModelActions::SUBSCRIBE_LIST) {
        c.db().observers().claim(
            &c.list_observer_id(),
            std::any::TypeId::of::<C>(),
            std::any::type_name::<C>(),
        );
        live::list_observer(c);
    }
}

fn subscription_request_id<'a>(
    frame: &Frame<'a>,
) -> Result<&'a serde_json::value::RawValue, ApiError> {
    frame
        .request_id()
        .filter(|r| r.get() != "null")
        .ok_or_else(|| ApiError::bad_request("A request_id is required: pushes carry it."))
}

async fn subscribe_instance<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Reply<()>, ApiError> {
    let rid = subscription_request_id(frame)?;
    crate::consumer::since(frame)?;
    let object = read_object(c, ctx, frame).await?;
    check_object(c, ctx, "subscribe_instance", &object).await?;
    let key = db::pk_json::<C::Entity>(&object).to_string();
    let pk = serde_json::value::RawValue::from_string(key.clone()).map_err(ApiError::internal)?;
    // An existing object's pushes are updates and its delete.
    if !crate::consumer::could_receive(ctx, Some(&pk), &["update", "delete"]).await {
        // It could never receive a push of this object: say so now, not by silence.
        return Err(ApiError::permission_denied());
    }
    instance_observer(c)
        .observer()
        .subscribe(ctx, &key, Some(rid))
        .await?;
    Ok(Reply::with_status((), StatusCode::CREATED))
}

async fn unsubscribe_instance<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Reply<()>, ApiError> {
    let observer = instance_observer(c);
    match frame.request_id().filter(|r| r.get() != "null") {
        // As DCRF: the id leaves every instance group of this consumer.
        Some(rid) => observer.observer().unsubscribe_request(ctx, rid),
        None => {
            let object = read_object(c, ctx, frame).await?;
            let key = db::pk_json::<C::Entity>(&object).to_string();
            observer.unsubscribe(ctx, &key, None);
        }
    }
    Ok(Reply::no_content())
}

/// Pushes a model consumer's instance events (DCRF's `handle_instance_change`); returns false
/// for events of other observers.
///
/// Per subscribing request id: `update`/`create` with the serialized object (200), `delete`
/// with `{"pk": pk}` (204). A push the consumer's permissions deny (checked before, for every
/// push), or [`has_object_permission`](ModelConsumer::has_object_permission) refuses, sends
/// nothing
/// (DCRF sent a 403 and then the data anyway); an object no longer
/// [`in_queryset`](ModelConsumer::in_queryset) is a 404 frame. An update whose typed object is
/// missing (it could not be decoded on this node) cannot be checked and is not pushed.
#[doc(hidden)]
pub async fn handle_instance_event<C: ModelConsumer>(
    c: &mut C,
    ctx: &Ctx,
    event: &crate::consumer::Event<'_>,
) -> bool {
    let c: &C = c;
    if live::handle_list_event(c, ctx, event).await {
        return true;
    }
    if !c.actions().contains(ModelActions::SUBSCRIBE_INSTANCE)
        || event.observer() != c.instance_observer_id()
    {
        return false;
    }
    // The consumer's permissions were asked already, as for every push (`may_receive`).
    let action = event.action();
    if event.is_resync() {
        crate::consumer::default_push(ctx, event).await;
        return true;
    }
    if action == ChangeKind::Delete.as_str() {
        for rid in event.request_ids {
            let _ = ctx
                .push(action, Some(rid), event.body(), StatusCode::NO_CONTENT)
                .await;
        }
        return true;
    }
    // Fail closed: without the object, neither its permission nor its queryset can be checked.
    let Some(object) = event.object::<ModelOf<C>>() else {
        tracing::warn!(
            connection = ctx.connection_id(),
            observer = event.observer(),
            group = %event.message.group,
            "instance push without its object (not decodable on this node): not sent"
        );
        return true;
    };
    if !c.has_object_permission(ctx, "retrieve", object).await {
        return true;
    }
    if !c.in_queryset(ctx, object).await {
        for rid in event.request_ids {
            let _ = ctx
                .send_error(&ApiError::not_found(), Some(action), Some(rid))
                .await;
        }
        return true;
    }
    for rid in event.request_ids {
        let _ = ctx
            .push(action, Some(rid), event.body(), StatusCode::OK)
            .await;
    }
    true
}
