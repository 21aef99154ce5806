//! The database handle and the transactional write path that feeds observers.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sea_orm::sea_query::value::sea_value_to_json_value;
use sea_orm::{
    ActiveModelBehavior, ActiveModelTrait, ColumnTrait, Condition, ConnectOptions, ConnectionTrait,
    Database, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityName, EntityTrait,
    IntoActiveModel, Iterable, ModelTrait, PrimaryKeyToColumn, QueryFilter, QuerySelect, Schema,
    SqliteTransactionMode, TransactionOptions, TransactionTrait, UpdateMany,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::group_commit::GroupCommit;
use super::lookup::primary_key_column;
use super::txn_conn::{Scope, TxnConn};
use crate::change::{ChangeKind, ChangeSet, ChangeSink, Object, RowChange};
use crate::channel::ChannelLayer;
use crate::error::Error;
use crate::observer::{ModelObserver, Observers};

/// What a plug-in (change capture) adds to the write path: [`Db::begin`] runs
/// [`begin_sql`](Self::begin_sql) first in every transaction, so the plug-in can tell the
/// framework's own transactions apart. Installed once per database.
pub trait TxnHooks: Send + Sync + 'static {
    /// SQL run first in every framework transaction, while the plug-in needs it.
    fn begin_sql(&self) -> Option<&'static str>;

    /// The hooks as `Any`, so their owner can find its own state again.
    fn as_any(&self) -> &(dyn Any + Send + Sync);
}

/// The application's database: a sea-orm connection pool (SQLite or PostgreSQL, chosen by
/// URL) and the [observer registry](Observers) its transactions publish to.
///
/// ```no_run
/// # async fn f() -> Result<(), dcrf::Error> {
/// let db = dcrf::model::Db::connect("sqlite::memory:").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Db {
    conn: DatabaseConnection,
    observers: Observers,
    hooks: Arc<OnceLock<Arc<dyn TxnHooks>>>,
    order: Arc<CommitOrder>,
    /// SQLite: the write slot and the batch its transactions commit in.
    group: Option<Arc<GroupCommit>>,
    /// Inline point reads, for a SQLite database file.
    #[cfg(feature = "sqlite")]
    sqlite_reads: Option<Arc<super::sqlite_reads::SqliteReads>>,
    /// Batched point reads, for PostgreSQL.
    #[cfg(feature = "postgres")]
    point_batches: Option<Arc<super::point_batch::PointBatches>>,
}

/// Publishes each row's changes in commit order: a transaction with observed changes holds
/// the locks of its rows from just before `COMMIT` until its changes are published, so two
/// transactions that change the same row publish in the order they committed (their pushes
/// never overtake each other), while transactions of other rows commit and publish side by
/// side. A row's lock is one of [`ROW_STRIPES`] per table, chosen by a hash of its primary key.
///
/// On PostgreSQL with a remote channel layer the order must hold across nodes: there the lock
/// is the table's, and also a session advisory lock
/// (`pg_advisory_lock(hashtext('dcrf.publish:<table>'))`) held on one dedicated connection per
/// table.
#[derive(Default)]
struct CommitOrder {
    tables: std::sync::Mutex<HashMap<&'static str, Arc<TableOrder>>>,
}

/// How many row locks each table has. Two rows of one table share a lock with a chance of
/// 1 in this many; a transaction that shares one waits for the other's publish.
const ROW_STRIPES: usize = 256;

/// A pooled connection idle for at least this long is pinged before it is handed out; one in
/// use more recently is not. sqlx's default pings on every checkout, a round trip to the
/// database (to PostgreSQL's backend, or to SQLite's connection thread) before each statement
/// or transaction, whatever just happened on that connection. Connections that sit idle are
/// the ones a restart, a proxy or a firewall may have dropped; one that failed while in use is
/// closed when it is given back (sqlx tests every connection it takes back).
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The publish-order locks of one table.
struct TableOrder {
    /// The table's lock across nodes, with its dedicated PostgreSQL connection once opened.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    cluster: Arc<tokio::sync::Mutex<TableLock>>,
    /// The row locks on this node.
    rows: Vec<Arc<tokio::sync::Mutex<()>>>,
}

impl Default for TableOrder {
    fn default() -> Self {
        TableOrder {
            cluster: Arc::default(),
            rows: (0..ROW_STRIPES).map(|_| Arc::default()).collect(),
        }
    }
}

/// The dedicated PostgreSQL connection of a table's lock across nodes, once opened.
#[derive(Default)]
struct TableLock {
    #[cfg(feature = "postgres")]
    conn: Option<sea_orm::sqlx::PgConnection>,
}

impl CommitOrder {
    fn table(&self, table: &'static str) -> Arc<TableOrder> {
        crate::sync::lock(&self.tables)
            .entry(table)
            .or_default()
            .clone()
    }
}

#[cfg(feature = "postgres")]
impl TableLock {
    /// Takes the table's advisory lock; without it (the connection failed) the order holds on
    /// this node only, and a warning says so.
    async fn lock_cluster(&mut self, db: &Db, table: &str) {
        use sea_orm::sqlx::Connection;
        if self.conn.is_none() {
            let options = db.conn.get_postgres_connection_pool().connect_options();
            match sea_orm::sqlx::PgConnection::connect_with(&options).await {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, table, "cannot open the publish-order connection");
                    return;
                }
            }
        }
        if let Some(conn) = self.conn.as_mut() {
            let locked = sea_orm::sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
                .bind(format!("dcrf.publish:{table}"))
                .execute(conn)
                .await;
            if let Err(e) = locked {
                tracing::warn!(error = %e, table, "cannot take the publish-order lock");
                self.conn = None;
            }
        }
    }

    async fn unlock_cluster(&mut self, table: &str) {
        if let Some(conn) = self.conn.as_mut() {
            let unlocked = sea_orm::sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
                .bind(format!("dcrf.publish:{table}"))
                .execute(conn)
                .await;
            if unlocked.is_err() {
                // Closing the session releases its locks.
                self.conn = None;
            }
        }
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.backend())
            .field("observers", &self.observers)
            .finish_non_exhaustive()
    }
}

/// A change to sea-orm's connection options, applied before connecting.
type Configure = Box<dyn FnOnce(&mut ConnectOptions) + Send>;

/// How to open a [`Db`]: its URL, the channel layer of its observers, and what plug-ins need
/// of the pool. Built by [`Db::options`].
pub struct DbOptions {
    url: String,
    layer: ChannelLayer,
    configure: Vec<Configure>,
    hooks: Option<Arc<dyn TxnHooks>>,
}

impl std::fmt::Debug for DbOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbOptions")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl DbOptions {
    /// Observers publish through `layer` (e.g. [`ChannelLayer::redis`]). Default: memory.
    pub fn layer(mut self, layer: ChannelLayer) -> Self {
        self.layer = layer;
        self
    }

    /// Adjusts sea-orm's connection options (pool size, timeouts, logging) after the
    /// framework's defaults.
    pub fn configure(mut self, f: impl FnOnce(&mut ConnectOptions) + Send + 'static) -> Self {
        self.configure.push(Box::new(f));
        self
    }

    /// Installs transaction hooks at connect time (change capture does).
    #[cfg_attr(not(feature = "capture"), allow(dead_code))]
    pub(crate) fn txn_hooks(mut self, hooks: Arc<dyn TxnHooks>) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// The URL.
    #[cfg_attr(not(feature = "capture"), allow(dead_code))]
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Connects. SQLite files get WAL journaling and a 5 s busy timeout; an in-memory SQLite
    /// database uses a single connection, so every query sees the same database. A pooled
    /// connection is pinged before it is handed out only when it has been idle for a second
    /// or more (sqlx would ping on every checkout); `configure(|o| { o.test_before_acquire(true); })`
    /// pings on every checkout again.
    pub async fn connect(self) -> Result<Db, Error> {
        let DbOptions {
            url,
            layer,
            configure,
            hooks,
        } = self;
        let mut opts = ConnectOptions::new(url.clone());
        opts.sqlx_logging(false)
            .test_before_acquire_if_idle_for(PING_AFTER_IDLE);
        if url.starts_with("sqlite:") {
            if url.contains(":memory:") || url.contains("mode=memory") {
                opts.max_connections(1).min_connections(1);
            } else {
                opts.max_connections(8);
            }
            opts.acquire_timeout(Duration::from_secs(10));
        } else {
            opts.max_connections(16);
        }
        for f in configure {
            f(&mut opts);
        }
        let conn = Database::connect(opts).await?;
        if conn.get_database_backend() == DbBackend::Sqlite {
            conn.execute_unprepared("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;")
                .await?;
        }
        #[allow(unused_mut)]
        let mut db = Db::from_connection(conn, layer);
        #[cfg(feature = "sqlite")]
        if db.backend() == DbBackend::Sqlite && !sqlite_in_memory(&url) {
            let options = db.conn.get_sqlite_connection_pool().connect_options();
            db.sqlite_reads = Some(super::sqlite_reads::SqliteReads::new(
                options.get_filename(),
            ));
        }
        if let Some(hooks) = hooks {
            let _ = db.hooks.set(hooks);
        }
        Ok(db)
    }
}

/// Does a SQLite URL name an in-memory database (which other connections cannot open)?
#[cfg(feature = "sqlite")]
fn sqlite_in_memory(url: &str) -> bool {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, params) = rest.split_once('?').unwrap_or((rest, ""));
    path.is_empty() || path == ":memory:" || params.split('&').any(|p| p == "mode=memory")
}

impl Db {
    /// Connects by URL with the in-memory channel layer: `sqlite://file.db?mode=rwc`,
    /// `sqlite::memory:`, or `postgres://user@host/db` (with the `postgres` feature).
    pub async fn connect(url: &str) -> Result<Db, Error> {
        Self::options(url).connect().await
    }

    /// Connects by URL; observers publish through `layer` (e.g. [`ChannelLayer::redis`]).
    pub async fn connect_with_layer(url: &str, layer: ChannelLayer) -> Result<Db, Error> {
        Self::options(url).layer(layer).connect().await
    }

    /// Options for connecting to `url`, for what [`connect`](Self::connect) does not cover.
    pub fn options(url: &str) -> DbOptions {
        DbOptions {
            url: url.to_owned(),
            layer: ChannelLayer::memory(),
            configure: Vec::new(),
            hooks: None,
        }
    }

    /// Wraps an existing sea-orm connection.
    pub fn from_connection(conn: DatabaseConnection, layer: ChannelLayer) -> Db {
        let group = (conn.get_database_backend() == DbBackend::Sqlite).then(Arc::default);
        #[cfg(feature = "postgres")]
        let point_batches = (conn.get_database_backend() == DbBackend::Postgres).then(Arc::default);
        Db {
            group,
            conn,
            observers: Observers::new(layer),
            hooks: Arc::new(OnceLock::new()),
            order: Arc::default(),
            #[cfg(feature = "sqlite")]
            sqlite_reads: None,
            #[cfg(feature = "postgres")]
            point_batches,
        }
    }

    /// A SQLite transaction that takes the write lock at once (`BEGIN IMMEDIATE`), on the pool,
    /// outside the group commit.
    pub(crate) async fn begin_immediate(&self) -> Result<DatabaseTransaction, DbErr> {
        self.conn
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await
    }

    /// The group commit of a SQLite database.
    #[cfg(test)]
    pub(super) fn group_commit(&self) -> Option<&Arc<GroupCommit>> {
        self.group.as_ref()
    }

    /// The inline readers of a SQLite file database.
    #[cfg(feature = "sqlite")]
    pub(crate) fn sqlite_reads(&self) -> Option<&Arc<super::sqlite_reads::SqliteReads>> {
        self.sqlite_reads.as_ref()
    }

    /// The first row of `query` (with `LIMIT 1`), as [`Select::one`](sea_orm::Select::one) on
    /// [`conn`](Self::conn) would return it. On a SQLite database file opened by [`connect`](Self::connect) it runs
    /// inline on this thread's read-only connection, with its statement prepared once (no
    /// hop to sqlx's connection thread, no pool checkout); any other database, and any query
    /// that path cannot read (a column type it does not decode, a busy file), goes through
    /// sea-orm. Use it for short point reads: the inline read holds the calling thread.
    pub async fn read_one<E>(&self, query: sea_orm::Select<E>) -> Result<Option<E::Model>, Error>
    where
        E: EntityTrait,
        E::ActiveModel: sea_orm::TryIntoModel<E::Model>,
    {
        #[cfg(feature = "sqlite")]
        if let Some(reads) = &self.sqlite_reads {
            // Without `LIMIT ?` (the first row is all it reads anyway): SQLite plans a bound
            // `LIMIT` per value and would prepare the statement again on every run.
            let statement = sea_orm::QueryTrait::build(&query, DbBackend::Sqlite);
            if let Ok(found) = reads.one::<E>(&statement) {
                return Ok(found);
            }
        }
        Ok(query.limit(1).one(&self.conn).await?)
    }

    /// A point read rendered once ([`super::point_read`]) with `value` of `column` looked
    /// up: inline on a SQLite file as [`read_one`](Self::read_one) runs it; on PostgreSQL
    /// batched with the reads of the same table running meanwhile, when `column` is the
    /// primary key ([`super::point_batch`]); else its `LIMIT 1` statement through sea-orm.
    pub(super) async fn read_point<E>(
        &self,
        read: &super::point_read::PointRead,
        column: E::Column,
        value: sea_orm::Value,
    ) -> Result<Option<E::Model>, Error>
    where
        E: EntityTrait,
        E::Model: Sync,
        E::ActiveModel: sea_orm::TryIntoModel<E::Model>,
    {
        #[cfg(feature = "sqlite")]
        if let (Some(reads), Some(sql)) = (&self.sqlite_reads, &read.inline_sql)
            && let Ok(found) = reads.one_sql::<E>(sql, std::slice::from_ref(&value))
        {
            return Ok(found);
        }
        #[cfg(feature = "postgres")]
        if let Some(batches) = &self.point_batches
            && let Some(found) = batches
                .read::<E>(&self.conn, column, value.clone(), |v| read.limited_with(v))
                .await
        {
            return Ok(found);
        }
        #[cfg(not(feature = "postgres"))]
        let _ = column;
        Ok(E::find()
            .from_raw_sql(read.limited_with(value))
            .one(&self.conn)
            .await?)
    }

    /// The number of rows `query` selects, as [`PaginatorTrait::count`](sea_orm::PaginatorTrait::count)
    /// on [`conn`](Self::conn) counts them; inline on a SQLite file, like
    /// [`read_one`](Self::read_one). The query's ordering is left out (it changes no count):
    /// SQLite does not flatten an ordered subquery under `COUNT(*)`, and so would read every
    /// column of every row instead of counting them.
    pub async fn count<E>(&self, mut query: sea_orm::Select<E>) -> Result<u64, Error>
    where
        E: EntityTrait,
        E::Model: Sync,
    {
        sea_orm::QueryTrait::query(&mut query).clear_order_by();
        #[cfg(feature = "sqlite")]
        if let Some(reads) = &self.sqlite_reads {
            let statement = sea_orm::QueryTrait::build(&query, DbBackend::Sqlite);
            if let Ok(n) = reads.count(&statement) {
                return Ok(n);
            }
        }
        Ok(sea_orm::PaginatorTrait::count(query, &self.conn).await?)
    }

    /// The transaction hooks installed on this database, if any.
    #[cfg_attr(not(feature = "capture"), allow(dead_code))]
    pub(crate) fn txn_hooks(&self) -> Option<&Arc<dyn TxnHooks>> {
        self.hooks.get()
    }

    /// Installs transaction hooks; false when some are installed already.
    #[cfg_attr(not(feature = "capture"), allow(dead_code))]
    pub(crate) fn set_txn_hooks(&self, hooks: Arc<dyn TxnHooks>) -> bool {
        self.hooks.set(hooks).is_ok()
    }

    /// The observer registry this database's transactions publish to.
    pub fn observers(&self) -> &Observers {
        &self.observers
    }

    /// The sea-orm connection, for reads and anything the framework does not wrap.
    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// The channel layer observers publish to.
    pub fn layer(&self) -> &ChannelLayer {
        self.observers.layer()
    }

    /// SQLite or PostgreSQL.
    pub fn backend(&self) -> DbBackend {
        self.conn.get_database_backend()
    }

    /// The model observer registered as `id`, if any.
    pub fn observer<M: Send + Sync + 'static>(&self, id: &str) -> Option<Arc<ModelObserver<M>>> {
        self.observers.get(id)
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
        self.observers
            .register::<E::Model>(E::default().table_name(), id, pk_json::<E>)
    }

    /// Starts a transaction. Writes go through [`Txn`]; dropping it without
    /// [`commit`](Txn::commit) rolls back and publishes nothing.
    ///
    /// On SQLite, concurrent transactions are committed together (group commit): each is a
    /// savepoint in a shared `IMMEDIATE` transaction (which takes the write lock at once, so a
    /// read-then-write never fails with "database is locked" halfway), writers queue for it in
    /// order, and one `COMMIT` makes a whole batch durable before any of its writers is
    /// answered; a rolled-back transaction undoes only its own savepoint. A writer that waits
    /// more than 5 s for its turn fails, as SQLite's busy timeout would.
    pub async fn begin(&self) -> Result<Txn, Error> {
        let scope = match &self.group {
            Some(group) => Scope::Batch(group.begin(self).await?),
            None => Scope::Own(self.conn.begin().await?),
        };
        let txn = TxnConn::new(scope);
        // While a change capture runs, mark the transaction so it does not publish its rows a
        // second time (this `Txn` publishes them itself).
        if let Some(sql) = self.hooks.get().and_then(|h| h.begin_sql()) {
            txn.execute_unprepared(sql).await?;
        }
        Ok(Txn {
            txn,
            db: self.clone(),
            changes: ChangeSet::default(),
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

    /// Does any observer watch this table?
    pub(crate) fn observed(&self, table: &str) -> bool {
        self.observers.observes(table)
    }
}

/// Does a column's type compare exactly (`=`, on every backend), so that a row read and then
/// compared with its own values matches? JSON (no `=` on PostgreSQL's `json`, and text that
/// need not come back the same), arrays, enums and custom types do not qualify.
fn compares_exactly<C: ColumnTrait>(column: C) -> bool {
    use sea_orm::sea_query::ColumnType as T;
    matches!(
        column.def().get_column_type(),
        T::Char(_)
            | T::String(_)
            | T::Text
            | T::Blob
            | T::Binary(_)
            | T::VarBinary(_)
            | T::TinyInteger
            | T::SmallInteger
            | T::Integer
            | T::BigInteger
            | T::TinyUnsigned
            | T::SmallUnsigned
            | T::Unsigned
            | T::BigUnsigned
            | T::Float
            | T::Double
            | T::Decimal(_)
            | T::DateTime
            | T::Timestamp
            | T::TimestampWithTimeZone
            | T::Time
            | T::Date
            | T::Boolean
            | T::Uuid
    )
}

/// The primary key of a model as JSON (DCRF's `{"pk": ...}`).
pub(crate) fn pk_json<E: EntityTrait>(model: &E::Model) -> serde_json::Value {
    sea_value_to_json_value(&model.get(primary_key_column::<E>()))
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
    txn: TxnConn,
    db: Db,
    changes: ChangeSet,
    pre_images: HashMap<(&'static str, String), Object>,
}

impl Txn {
    /// The transaction as a sea-orm connection, for reads (and writes the framework should not
    /// observe).
    pub fn conn(&self) -> &TxnConn {
        &self.txn
    }

    fn key<E: EntityTrait>(model: &E::Model) -> (&'static str, String) {
        (E::default().table_name(), pk_json::<E>(model).to_string())
    }

    /// Records a change, merging it with an earlier one of the same object (see
    /// [`ChangeSet`]); nothing is recorded for a table nobody observes.
    fn record(
        &mut self,
        kind: ChangeKind,
        old: Option<Object>,
        new: Option<Object>,
        key: (&'static str, String),
    ) {
        if self.db.observed(key.0) {
            self.changes.record(key, kind, old, new);
        }
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
        self.record(ChangeKind::Create, None, Some(new), key);
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
        self.record(ChangeKind::Update, old, Some(new), key);
        Ok(model)
    }

    /// Updates the `Set` columns of `am`, whose row was read as `presumed` before this
    /// transaction, in one statement while the row still holds exactly `presumed`: the
    /// `UPDATE` is conditional on every column's value, so a hit proves `presumed` is the
    /// change's previous state. When the row changed meanwhile, it is read again (locked on
    /// PostgreSQL) and updated with that as its previous state. `None`, with nothing written,
    /// when the row is gone, when a column has a type without an exact comparison (JSON, say),
    /// or when nothing but the key is set: the caller then goes the long way.
    ///
    /// Like [`update`](Self::update), it runs the active model's `before_save` (once) and
    /// `after_save`.
    pub(super) async fn update_unchanged<A>(
        &mut self,
        presumed: &<A::Entity as EntityTrait>::Model,
        am: A,
    ) -> Result<Option<<A::Entity as EntityTrait>::Model>, Error>
    where
        A: ActiveModelTrait + ActiveModelBehavior + Send,
        <A::Entity as EntityTrait>::Model: IntoActiveModel<A> + Send + Sync + 'static,
    {
        type ColumnOf<A> = <<A as ActiveModelTrait>::Entity as EntityTrait>::Column;
        type KeyOf<A> = <<A as ActiveModelTrait>::Entity as EntityTrait>::PrimaryKey;
        if !ColumnOf::<A>::iter().all(compares_exactly) {
            return Ok(None);
        }
        let sets_a_value = ColumnOf::<A>::iter()
            .any(|c| KeyOf::<A>::from_column(c).is_none() && am.get(c).is_set());
        if !sets_a_value {
            return Ok(None);
        }
        let am = A::before_save(am, &self.txn, false).await?;
        let mut unchanged = Condition::all();
        for column in ColumnOf::<A>::iter() {
            let value = presumed.get(column);
            unchanged = unchanged.add(if value == value.as_null() {
                column.is_null()
            } else {
                column.eq(value)
            });
        }
        let key = Self::key::<A::Entity>(presumed);
        let conditional = A::Entity::update(am.clone())
            .validate()?
            .filter(unchanged)
            .exec(&self.txn)
            .await;
        let (old, model) = match conditional {
            Ok(model) => (Arc::new(presumed.clone()) as Object, model),
            Err(DbErr::RecordNotUpdated) => {
                let column = primary_key_column::<A::Entity>();
                let mut query = A::Entity::find().filter(column.eq(presumed.get(column)));
                if self.db.backend() == DbBackend::Postgres {
                    query = query.lock_exclusive();
                }
                let Some(now) = query.one(&self.txn).await? else {
                    return Ok(None);
                };
                let model = A::Entity::update(am).exec(&self.txn).await?;
                (Arc::new(now) as Object, model)
            }
            Err(e) => return Err(e.into()),
        };
        let model = A::after_save(model, &self.txn, false).await?;
        let new: Object = Arc::new(model.clone());
        let old = self.db.observed(key.0).then_some(old);
        self.record(ChangeKind::Update, old, Some(new), key);
        Ok(Some(model))
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
        self.record(ChangeKind::Delete, Some(old), None, key);
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
                self.record(
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
        if self.db.backend() == DbBackend::Postgres {
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
            self.record(
                ChangeKind::Delete,
                Some(Arc::new(model) as Object),
                None,
                key,
            );
        }
        Ok(result.rows_affected)
    }

    /// Commits, then publishes each changed object once to the observers of its table, in
    /// commit order per row (see `CommitOrder`).
    pub async fn commit(self) -> Result<(), Error> {
        let Txn {
            txn, db, changes, ..
        } = self;
        let changes: Vec<_> = changes.into_changes().collect();
        match txn.into_scope() {
            Scope::Batch(slot) => Ok(slot.join(changes, &db).await?),
            Scope::Own(txn) => {
                let changes: Vec<&RowChange> = changes.iter().collect();
                Ok(publish_in_order(&db, &changes, txn.commit()).await?)
            }
        }
    }
}

/// Runs `commit` and, when it succeeds, publishes `changes` in order, holding the
/// publish-order locks of their rows from before the commit until they are published (see
/// [`CommitOrder`]).
pub(super) async fn publish_in_order(
    db: &Db,
    changes: &[&RowChange],
    commit: impl std::future::Future<Output = Result<(), DbErr>>,
) -> Result<(), DbErr> {
    if changes.is_empty() {
        return commit.await;
    }
    #[cfg(feature = "postgres")]
    if db.backend() == DbBackend::Postgres && db.layer().is_remote() {
        return publish_in_cluster_order(db, changes, commit).await;
    }
    // Always in the same (sorted) order: no two commits wait for each other's rows.
    let mut rows: Vec<(&'static str, usize)> = changes
        .iter()
        .map(|c| (c.change.table, (c.row % ROW_STRIPES as u64) as usize))
        .collect();
    rows.sort_unstable();
    rows.dedup();
    let mut guards = Vec::with_capacity(rows.len());
    for (table, stripe) in rows {
        let lock = db.order.table(table).rows[stripe].clone();
        guards.push(lock.lock_owned().await);
    }
    let committed = commit.await;
    if committed.is_ok() {
        publish(db, changes).await;
    }
    drop(guards);
    committed
}

/// [`publish_in_order`] across the nodes of a cluster: the tables' locks, each with its
/// advisory lock.
#[cfg(feature = "postgres")]
async fn publish_in_cluster_order(
    db: &Db,
    changes: &[&RowChange],
    commit: impl std::future::Future<Output = Result<(), DbErr>>,
) -> Result<(), DbErr> {
    let mut tables: Vec<&'static str> = changes.iter().map(|c| c.change.table).collect();
    tables.sort_unstable();
    tables.dedup();
    let mut guards = Vec::with_capacity(tables.len());
    for table in &tables {
        let mut guard = db.order.table(table).cluster.clone().lock_owned().await;
        guard.lock_cluster(db, table).await;
        guards.push(guard);
    }
    let committed = commit.await;
    if committed.is_ok() {
        publish(db, changes).await;
    }
    for (table, guard) in tables.iter().zip(guards.iter_mut()).rev() {
        guard.unlock_cluster(table).await;
    }
    committed
}

/// Hands committed changes to the observers, in order.
async fn publish(db: &Db, changes: &[&RowChange]) {
    let sink: &dyn ChangeSink = &db.observers;
    for change in changes {
        sink.publish(&change.change).await;
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn change_of_row(row: u64) -> RowChange {
        RowChange::new(row, "t", ChangeKind::Update, None, None)
    }

    #[tokio::test]
    async fn commits_of_other_rows_do_not_wait_for_each_other() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        let (a, b) = (change_of_row(1), change_of_row(2));
        let (a, b) = ([&a], [&b]);
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        // The first commit finishes only after the second: one lock per table would deadlock.
        let first = publish_in_order(&db, &a, async {
            finished.await.unwrap();
            Ok(())
        });
        let second = async {
            publish_in_order(&db, &b, async { Ok(()) }).await.unwrap();
            done.send(()).unwrap();
        };
        let both = async { tokio::join!(first, second) };
        let (first, ()) = tokio::time::timeout(Duration::from_secs(5), both)
            .await
            .expect("the second row's commit waited for the first's");
        first.unwrap();
    }

    #[tokio::test]
    async fn commits_of_one_row_publish_in_commit_order() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        let (a, again) = (change_of_row(7), change_of_row(7));
        let (a, again) = ([&a], [&again]);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let second_committed = AtomicBool::new(false);
        let first = publish_in_order(&db, &a, async {
            released.await.unwrap();
            Ok(())
        });
        let second = publish_in_order(&db, &again, async {
            second_committed.store(true, Ordering::SeqCst);
            Ok(())
        });
        let watch = async {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            let early = second_committed.load(Ordering::SeqCst);
            release.send(()).unwrap();
            early
        };
        let (first, second, early) = tokio::join!(first, second, watch);
        first.unwrap();
        second.unwrap();
        assert!(
            !early,
            "the second commit of the row ran before the first was published"
        );
        assert!(second_committed.load(Ordering::SeqCst));
    }
}

#[cfg(all(test, feature = "postgres"))]
mod postgres_pool_tests {
    use super::*;

    /// The pid of the PostgreSQL backend serving `db`'s (one) pooled connection.
    async fn backend_pid(db: &Db) -> Result<i32, DbErr> {
        let row = db
            .conn()
            .query_one_raw(sea_orm::Statement::from_string(
                DbBackend::Postgres,
                "SELECT pg_backend_pid() AS pid",
            ))
            .await?
            .expect("a row");
        row.try_get::<i32>("", "pid")
    }

    /// Terminates backend `pid` once `db`'s connection is back in its pool (sqlx tests a
    /// connection it takes back, and a backend killed during that test is simply replaced).
    async fn terminate(db: &Db, admin: &Db, pid: i32) {
        let pool = db.conn().get_postgres_connection_pool();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while pool.num_idle() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the connection never went back to the pool"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        admin
            .conn()
            .execute_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_terminate_backend($1)",
                [pid.into()],
            ))
            .await
            .unwrap();
    }

    /// A pooled connection is pinged before use only after a second idle: one the server
    /// dropped while it sat idle is replaced unseen; one dropped just after use fails the next
    /// statement, and the pool then replaces it.
    #[tokio::test]
    async fn postgres_pool_pings_connections_that_sat_idle() {
        let url = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL must name a PostgreSQL server for the postgres tests");
        let db = Db::options(&url)
            .configure(|o| {
                o.max_connections(1).min_connections(0);
            })
            .connect()
            .await
            .unwrap();
        let admin = Db::connect(&url).await.unwrap();
        let pool = db.conn().get_postgres_connection_pool();
        assert!(!pool.options().get_test_before_acquire());

        let first = backend_pid(&db).await.unwrap();
        terminate(&db, &admin, first).await;
        tokio::time::sleep(PING_AFTER_IDLE + Duration::from_millis(300)).await;
        let second = backend_pid(&db)
            .await
            .expect("the idle connection was replaced");
        assert_ne!(first, second);

        terminate(&db, &admin, second).await;
        assert!(
            backend_pid(&db).await.is_err(),
            "a connection used a moment ago is not pinged"
        );
        let third = backend_pid(&db)
            .await
            .expect("the broken connection was replaced");
        assert_ne!(third, second);
    }
}
