//! The database handle and the transactional write path that feeds observers.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sea_orm::sea_query::value::sea_value_to_json_value;
use sea_orm::{
    ActiveModelBehavior, ActiveModelTrait, ColumnTrait, Condition, ConnectOptions, ConnectionTrait,
    Database, DatabaseConnection, DatabaseTransaction, DbBackend, EntityName, EntityTrait,
    IntoActiveModel, ModelTrait, QueryFilter, QuerySelect, Schema, SqliteTransactionMode,
    TransactionOptions, TransactionTrait, UpdateMany,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::lookup::primary_key_column;
use crate::error::Error;
use crate::layer::{GroupMessage, Layer, Object};
use crate::observer::{ModelObserver, Observer};

/// What happened to an object in a committed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// It was inserted (or it entered a group).
    Create,
    /// It was updated (and stayed in the group).
    Update,
    /// It was deleted (or it left a group).
    Delete,
}

impl ChangeKind {
    /// `"create"`, `"update"` or `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Update => "update",
            ChangeKind::Delete => "delete",
        }
    }
}

/// The application's database: a sea-orm connection pool (SQLite or PostgreSQL, chosen by URL),
/// the channel layer its observers publish to, and those observers.
///
/// ```no_run
/// # async fn f() -> Result<(), dcrf::Error> {
/// let db = dcrf::model::Db::connect("sqlite::memory:").await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Db {
    conn: DatabaseConnection,
    hub: Arc<Hub>,
}

/// Observers by table, and the layer they publish to.
struct Hub {
    layer: Layer,
    by_table: RwLock<HashMap<&'static str, Vec<Arc<dyn ErasedObserver>>>>,
    by_id: RwLock<HashMap<String, Arc<dyn Any + Send + Sync>>>,
    /// Opt-in change capture's state (see [`crate::capture`]).
    capture: crate::capture::DbHooks,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

/// A model observer without its model type, as the commit path sees it.
trait ErasedObserver: Send + Sync {
    fn messages(
        &self,
        old: Option<&Object>,
        new: Option<&Object>,
    ) -> Result<Vec<GroupMessage>, Error>;
}

impl<M: Serialize + Send + Sync + 'static> ErasedObserver for ModelObserver<M> {
    fn messages(
        &self,
        old: Option<&Object>,
        new: Option<&Object>,
    ) -> Result<Vec<GroupMessage>, Error> {
        ModelObserver::messages(self, old, new)
    }
}

impl Db {
    /// Connects by URL with the in-memory channel layer: `sqlite://file.db?mode=rwc`,
    /// `sqlite::memory:`, or `postgres://user@host/db` (with the `postgres` feature).
    ///
    /// SQLite files get WAL journaling and a 5 s busy timeout; an in-memory SQLite database uses
    /// a single connection, so every query sees the same database.
    pub async fn connect(url: &str) -> Result<Db, Error> {
        Self::connect_with_layer(url, Layer::memory()).await
    }

    /// Connects by URL; observers publish through `layer` (e.g. [`Layer::redis`]).
    pub async fn connect_with_layer(url: &str, layer: Layer) -> Result<Db, Error> {
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.sqlx_logging(false);
        let mut capture = crate::capture::DbHooks::default();
        if url.starts_with("sqlite:") {
            capture.prepare_sqlite(&mut opts);
            if url.contains(":memory:") || url.contains("mode=memory") {
                opts.max_connections(1).min_connections(1);
            } else {
                opts.max_connections(8);
            }
            opts.acquire_timeout(Duration::from_secs(10));
        } else {
            opts.max_connections(16);
        }
        let conn = Database::connect(opts).await?;
        if conn.get_database_backend() == DbBackend::Sqlite {
            conn.execute_unprepared("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;")
                .await?;
        }
        Ok(Self::with_capture(conn, layer, capture))
    }

    /// Wraps an existing sea-orm connection.
    pub fn from_connection(conn: DatabaseConnection, layer: Layer) -> Db {
        Self::with_capture(conn, layer, crate::capture::DbHooks::default())
    }

    fn with_capture(
        conn: DatabaseConnection,
        layer: Layer,
        capture: crate::capture::DbHooks,
    ) -> Db {
        Db {
            conn,
            hub: Arc::new(Hub {
                layer,
                by_table: RwLock::new(HashMap::new()),
                by_id: RwLock::new(HashMap::new()),
                capture,
            }),
        }
    }

    /// The change capture state of this database.
    pub(crate) fn capture_hooks(&self) -> &crate::capture::DbHooks {
        &self.hub.capture
    }

    /// The sea-orm connection, for reads and anything the framework does not wrap.
    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// The channel layer observers publish to.
    pub fn layer(&self) -> &Layer {
        &self.hub.layer
    }

    /// SQLite or PostgreSQL.
    pub fn backend(&self) -> DbBackend {
        self.conn.get_database_backend()
    }

    /// The model observer registered as `id`, if any.
    pub fn observer<M: Send + Sync + 'static>(&self, id: &str) -> Option<Arc<ModelObserver<M>>> {
        self.hub
            .by_id
            .read()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .and_then(|a| a.downcast::<ModelObserver<M>>().ok())
    }

    /// Registers (or finds) the model observer `id` for an entity: every change to that table
    /// committed through a [`Txn`] is offered to it. See [`observer`](crate::observer).
    ///
    /// Register observers at start-up on every node: a node publishes only the changes of the
    /// observers it knows.
    pub fn observe<E>(&self, id: &str) -> Arc<ModelObserver<E::Model>>
    where
        E: EntityTrait,
        E::Model: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        if let Some(existing) = self.observer::<E::Model>(id) {
            return existing;
        }
        let observer = Arc::new(ModelObserver::new(
            Observer::new(&self.hub.layer, id),
            pk_json::<E>,
        ));
        self.hub.layer.register_decoder(
            id.into(),
            Arc::new(|json: &str| {
                serde_json::from_str::<E::Model>(json)
                    .ok()
                    .map(|m| Arc::new(m) as Object)
            }),
        );
        if let Ok(mut by_id) = self.hub.by_id.write() {
            by_id.insert(id.to_owned(), observer.clone());
        }
        if let Ok(mut by_table) = self.hub.by_table.write() {
            by_table
                .entry(E::default().table_name())
                .or_default()
                .push(observer.clone());
        }
        observer
    }

    /// Starts a transaction. Writes go through [`Txn`]; dropping it without
    /// [`commit`](Txn::commit) rolls back and publishes nothing.
    ///
    /// On SQLite the transaction starts `IMMEDIATE` (it takes the write lock at once), so a
    /// read-then-write never fails with "database is locked" halfway; concurrent writers wait
    /// on the busy timeout instead.
    pub async fn begin(&self) -> Result<Txn, Error> {
        let txn = if self.backend() == DbBackend::Sqlite {
            self.conn
                .begin_with_options(TransactionOptions {
                    sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    ..Default::default()
                })
                .await?
        } else {
            self.conn.begin().await?
        };
        // While a change capture runs, mark the transaction so it does not publish its rows a
        // second time (this `Txn` publishes them itself).
        if let Some(sql) = self.hub.capture.begin_sql() {
            txn.execute_unprepared(sql).await?;
        }
        Ok(Txn {
            txn,
            db: self.clone(),
            changes: Vec::new(),
            index: HashMap::new(),
            pre_images: HashMap::new(),
        })
    }

    /// Creates the table of an entity if it does not exist (for demos and tests; real
    /// applications use migrations).
    pub async fn create_table<E: EntityTrait>(&self, entity: E) -> Result<(), Error> {
        let schema = Schema::new(self.backend());
        let mut stmt = schema.create_table_from_entity(entity);
        stmt.if_not_exists();
        self.conn.execute(&stmt).await?;
        Ok(())
    }

    /// Publishes committed changes to the observers of their tables.
    pub(crate) async fn publish(&self, table: &str, old: Option<&Object>, new: Option<&Object>) {
        let observers = self
            .hub
            .by_table
            .read()
            .ok()
            .and_then(|m| m.get(table).cloned())
            .unwrap_or_default();
        for observer in observers {
            match observer.messages(old, new) {
                Ok(messages) => {
                    for message in messages {
                        if let Err(e) = self.hub.layer.group_send(message).await {
                            tracing::error!(error = %e, table, "cannot publish a change");
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, table, "cannot serialize a change"),
            }
        }
    }

    /// Does any observer watch this table?
    pub(crate) fn observed(&self, table: &str) -> bool {
        self.hub
            .by_table
            .read()
            .map(|m| m.contains_key(table))
            .unwrap_or(false)
    }
}

/// The primary key of a model as JSON (DCRF's `{"pk": ...}`).
pub(crate) fn pk_json<E: EntityTrait>(model: &E::Model) -> serde_json::Value {
    sea_value_to_json_value(&model.get(primary_key_column::<E>()))
}

/// One object's pending change in a transaction.
struct Change {
    table: &'static str,
    kind: ChangeKind,
    old: Option<Object>,
    new: Option<Object>,
}

/// A database transaction: the one write path of model consumers and of user code.
///
/// Every write through it is remembered as a change of one object; on
/// [`commit`](Txn::commit) each object's change is published to the observers **once, with its
/// final state** (a create then updates publishes one `create`; a create then a delete
/// publishes nothing). Dropping the `Txn` rolls back and publishes nothing.
///
/// Writes made with [`conn`](Txn::conn) directly are not observed.
#[derive(Debug)]
pub struct Txn {
    txn: DatabaseTransaction,
    db: Db,
    changes: Vec<Option<Change>>,
    index: HashMap<(&'static str, String), usize>,
    pre_images: HashMap<(&'static str, String), Object>,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Change")
            .field("table", &self.table)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Txn {
    /// The transaction as a sea-orm connection, for reads (and writes the framework should not
    /// observe).
    pub fn conn(&self) -> &DatabaseTransaction {
        &self.txn
    }

    fn key<E: EntityTrait>(model: &E::Model) -> (&'static str, String) {
        (E::default().table_name(), pk_json::<E>(model).to_string())
    }

    /// Records a change, merging it with an earlier one of the same object.
    fn record<E: EntityTrait>(
        &mut self,
        kind: ChangeKind,
        old: Option<Object>,
        new: Option<Object>,
        key: (&'static str, String),
    ) where
        E::Model: Send + Sync + 'static,
    {
        if !self.db.observed(key.0) {
            return;
        }
        let table = key.0;
        if let Some(&i) = self.index.get(&key)
            && let Some(prev) = self.changes[i].take()
        {
            let merged = match (prev.kind, kind) {
                (ChangeKind::Create, ChangeKind::Update) => Some((ChangeKind::Create, None, new)),
                (ChangeKind::Create, ChangeKind::Delete) => None,
                (ChangeKind::Update, ChangeKind::Update) => {
                    Some((ChangeKind::Update, prev.old, new))
                }
                (ChangeKind::Update, ChangeKind::Delete) => {
                    Some((ChangeKind::Delete, prev.old, None))
                }
                (ChangeKind::Delete, ChangeKind::Create) => {
                    Some((ChangeKind::Update, prev.old, new))
                }
                (_, kind) => Some((kind, old, new)),
            };
            self.changes[i] = merged.map(|(kind, old, new)| Change {
                table,
                kind,
                old,
                new,
            });
            return;
        }
        self.index.insert(key, self.changes.len());
        self.changes.push(Some(Change {
            table,
            kind,
            old,
            new,
        }));
    }

    /// Remembers an object as read in this transaction, so an update of it needs no re-read
    /// for its previous state.
    pub fn remember<M>(&mut self, model: &M)
    where
        M: ModelTrait + Clone + Send + Sync + 'static,
        M::Entity: EntityTrait<Model = M>,
    {
        let key = Self::key::<M::Entity>(model);
        self.pre_images
            .entry(key)
            .or_insert_with(|| Arc::new(model.clone()) as Object);
    }

    /// Inserts a row and returns it as stored.
    pub async fn insert<A>(&mut self, am: A) -> Result<<A::Entity as EntityTrait>::Model, Error>
    where
        A: ActiveModelTrait + ActiveModelBehavior + Send,
        <A::Entity as EntityTrait>::Model: IntoActiveModel<A> + Send + Sync + 'static,
    {
        let model = am.insert(&self.txn).await?;
        let key = Self::key::<A::Entity>(&model);
        let new: Object = Arc::new(model.clone());
        self.record::<A::Entity>(ChangeKind::Create, None, Some(new), key);
        Ok(model)
    }

    /// Updates the `Set` columns of a row and returns it as stored.
    pub async fn update<A>(&mut self, am: A) -> Result<<A::Entity as EntityTrait>::Model, Error>
    where
        A: ActiveModelTrait + ActiveModelBehavior + Send,
        <A::Entity as EntityTrait>::Model: IntoActiveModel<A> + Send + Sync + 'static,
    {
        let old = self.pre_image(&am).await?;
        let model = am.update(&self.txn).await?;
        let key = Self::key::<A::Entity>(&model);
        let new: Object = Arc::new(model.clone());
        self.record::<A::Entity>(ChangeKind::Update, old, Some(new), key);
        Ok(model)
    }

    /// The row an active model is about to overwrite, as it is now.
    async fn pre_image<A>(&self, am: &A) -> Result<Option<Object>, Error>
    where
        A: ActiveModelTrait,
        <A::Entity as EntityTrait>::Model: Send + Sync + 'static,
    {
        let table = A::Entity::default().table_name();
        if !self.db.observed(table) {
            return Ok(None);
        }
        let column = primary_key_column::<A::Entity>();
        let Some(pk) = am.get(column).into_value() else {
            return Ok(None);
        };
        let key = (table, sea_value_to_json_value(&pk).to_string());
        if let Some(known) = self.pre_images.get(&key) {
            return Ok(Some(known.clone()));
        }
        let row = A::Entity::find()
            .filter(column.eq(pk))
            .one(&self.txn)
            .await?;
        Ok(row.map(|m| Arc::new(m) as Object))
    }

    /// Deletes a row.
    pub async fn delete<M>(&mut self, model: M) -> Result<(), Error>
    where
        M: ModelTrait
            + IntoActiveModel<<M::Entity as EntityTrait>::ActiveModel>
            + Send
            + Sync
            + 'static,
        M::Entity: EntityTrait<Model = M>,
        <M::Entity as EntityTrait>::ActiveModel: Send,
    {
        let key = Self::key::<M::Entity>(&model);
        let old: Object = Arc::new(model.clone());
        model.into_active_model().delete(&self.txn).await?;
        self.record::<M::Entity>(ChangeKind::Delete, Some(old), None, key);
        Ok(())
    }

    /// Updates every row matching `condition` in one statement (`UPDATE ... WHERE`) — and,
    /// unlike Django's `QuerySet.update()`, every changed row is observed. `set` adds the
    /// column assignments. Returns the number of rows.
    ///
    /// ```no_run
    /// # async fn f(txn: &mut dcrf::model::Txn) -> Result<(), dcrf::Error> {
    /// # mod todo { use sea_orm::entity::prelude::*;
    /// #   #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, serde::Deserialize)]
    /// #   #[sea_orm(table_name = "todo")] pub struct Model { #[sea_orm(primary_key)] pub id: i32, pub done: bool }
    /// #   #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)] pub enum Relation {}
    /// #   impl ActiveModelBehavior for ActiveModel {} }
    /// use sea_orm::{ColumnTrait, Condition, sea_query::Expr};
    /// let n = txn
    ///     .update_where::<todo::Entity>(
    ///         Condition::all().add(todo::Column::Id.is_in([1, 2, 3])),
    ///         |u| u.col_expr(todo::Column::Done, Expr::value(true)),
    ///     )
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn update_where<E>(
        &mut self,
        condition: Condition,
        set: impl FnOnce(UpdateMany<E>) -> UpdateMany<E>,
    ) -> Result<u64, Error>
    where
        E: EntityTrait,
        E::Model: Send + Sync + 'static,
    {
        let observed = self.db.observed(E::default().table_name());
        let before = self.rows_to_change::<E>(observed, &condition).await?;
        let result = set(E::update_many().filter(condition))
            .exec(&self.txn)
            .await?;
        if observed && !before.is_empty() {
            let column = primary_key_column::<E>();
            let pks: Vec<sea_orm::Value> = before.iter().map(|m| m.get(column)).collect();
            let after = E::find().filter(column.is_in(pks)).all(&self.txn).await?;
            let mut old_by_key: HashMap<String, E::Model> = before
                .into_iter()
                .map(|m| (pk_json::<E>(&m).to_string(), m))
                .collect();
            for model in after {
                let key = Self::key::<E>(&model);
                let old = old_by_key.remove(&key.1).map(|m| Arc::new(m) as Object);
                self.record::<E>(
                    ChangeKind::Update,
                    old,
                    Some(Arc::new(model) as Object),
                    key,
                );
            }
        }
        Ok(result.rows_affected)
    }

    /// The rows a bulk statement is about to change, as they are now (locked on PostgreSQL);
    /// none when nobody observes the table.
    async fn rows_to_change<E: EntityTrait>(
        &self,
        observed: bool,
        condition: &Condition,
    ) -> Result<Vec<E::Model>, Error> {
        if !observed {
            return Ok(Vec::new());
        }
        let mut query = E::find().filter(condition.clone());
        if self.txn.get_database_backend() == DbBackend::Postgres {
            query = query.lock_exclusive();
        }
        Ok(query.all(&self.txn).await?)
    }

    /// Deletes every row matching `condition` in one statement; every deleted row is observed.
    /// Returns the number of rows.
    pub async fn delete_where<E>(&mut self, condition: Condition) -> Result<u64, Error>
    where
        E: EntityTrait,
        E::Model: Send + Sync + 'static,
    {
        let observed = self.db.observed(E::default().table_name());
        let before = self.rows_to_change::<E>(observed, &condition).await?;
        let result = E::delete_many().filter(condition).exec(&self.txn).await?;
        for model in before {
            let key = Self::key::<E>(&model);
            self.record::<E>(
                ChangeKind::Delete,
                Some(Arc::new(model) as Object),
                None,
                key,
            );
        }
        Ok(result.rows_affected)
    }

    /// Commits, then publishes each changed object once to the observers of its table.
    pub async fn commit(self) -> Result<(), Error> {
        let Txn {
            txn, db, changes, ..
        } = self;
        txn.commit().await?;
        for change in changes.into_iter().flatten() {
            db.publish(change.table, change.old.as_ref(), change.new.as_ref())
                .await;
        }
        Ok(())
    }
}
