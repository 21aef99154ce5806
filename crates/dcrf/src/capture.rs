//! Change capture: observing the writes the framework did not make (opt-in, per table).
//!
//! Observers are fed by the framework's write path: every change committed through a
//! [`Txn`](crate::model::Txn) reaches the [model observers](crate::observer) of its table. Raw
//! SQL, bulk statements run on [`Db::conn`], migrations, cron jobs and other processes bypass
//! that path. A [`Capture`] watches chosen tables in the database itself and publishes what it
//! sees through the same observers, so subscribers receive the same `create` / `update` /
//! `delete` frames whoever wrote the row.
//!
//! ```no_run
//! # async fn f(db: dcrf::model::Db) -> Result<(), dcrf::Error> {
//! # mod todo {
//! #     use sea_orm::entity::prelude::*;
//! #     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, serde::Deserialize)]
//! #     #[sea_orm(table_name = "todo")]
//! #     pub struct Model { #[sea_orm(primary_key)] pub id: i32, pub owner: String }
//! #     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
//! #     pub enum Relation {}
//! #     impl ActiveModelBehavior for ActiveModel {}
//! # }
//! use dcrf::capture::Capture;
//!
//! let by_owner = db
//!     .observe::<todo::Entity>("todos")
//!     .group_by(|t: &todo::Model| vec![t.owner.clone()]);
//! // PostgreSQL: installs a trigger on `todo` and listens; SQLite: update hooks.
//! let capture = Capture::new(&db).watch::<todo::Entity>().start().await?;
//! // ... serve; capture stops when `capture` is dropped (keep it in your state).
//! # let _ = (by_owner, capture);
//! # Ok(()) }
//! ```
//!
//! # Which writes are observed
//!
//! **Writes through a [`Txn`](crate::model::Txn)** — always, with or without capture: after
//! commit, one event per object per transaction, with the object's previous state (so an
//! object that moves between groups yields `delete` / `update` / `create` per group). Capture
//! never publishes these a second time: while a capture is active, [`Db::begin`] marks its
//! transactions (`SET LOCAL dcrf.capture_skip = 'on'` on PostgreSQL, a row in a per-connection
//! temporary table on SQLite) and the capture skips marked transactions. Writes made on
//! [`Txn::conn`](crate::model::Txn::conn) belong to the marked transaction and are therefore
//! observed by neither path.
//!
//! **PostgreSQL capture** ([`Capture::postgres`]) — every committed `INSERT`, `UPDATE` and
//! `DELETE` on a watched table, from any connection of any process (psql, migrations, another
//! service, this process's [`Db::conn`]):
//! - a row-level `AFTER` trigger sends `pg_notify(channel, {"schema", "table", "op", "pk"})`;
//!   notifications are delivered at commit, so rolled-back writes are never seen, and a bulk
//!   statement yields one event per row;
//! - the listener re-reads the row **once per event**, through the entity, and publishes its
//!   state at that moment (several notifications already queued for a row are merged into one
//!   event; the state may be newer than the change that was notified);
//! - there is **no previous state** for `INSERT` and `UPDATE`: an update is published as
//!   `update` to the groups the row is in *now*; groups it left receive nothing and a group it
//!   entered receives `update`, not `create`;
//! - a `DELETE` carries the deleted row (`to_jsonb(OLD)`) when the notification stays under
//!   7 900 bytes, and is published as `delete` to the groups that row was in; a larger row
//!   cannot be carried and yields a [resync notice](#resync-notices) for its table instead;
//!   `TRUNCATE` yields a resync notice too;
//! - limits: a transaction that sent a notification takes a database-wide lock at commit, so
//!   capturing writes on watched tables serializes their commits (expect hundreds to a few
//!   thousand such commits per second, not more); notifications sent while the listener is
//!   disconnected are lost, so after every reconnection a resync notice is sent for every
//!   watched table; if events arrive faster than they are handled, the backlog beyond
//!   [`Capture::queue`] is dropped and a resync notice is sent.
//! - The trigger function (`dcrf_capture_notify`) and the triggers (`dcrf_capture`,
//!   `dcrf_capture_truncate`) live in the connection's current schema (its `search_path`); the
//!   channel is `dcrf_changes` for the `public` schema and `dcrf_changes.<schema>` otherwise,
//!   so databases split by schema do not hear each other. Installing is idempotent;
//!   [`Capture::uninstall`] drops the triggers.
//! - Run one listener per database: with a [Redis layer](crate::layer::Layer::redis) every
//!   node would publish every event to every node. Start it on one node and call
//!   `.listen(false)` on the others, which only installs the triggers and marks the node's own
//!   transactions.
//!
//! **SQLite capture** ([`Capture::sqlite`]) — writes made **in this process, on the
//! connections of this [`Db`]** (opened with [`Db::connect`]), outside a `Txn`: raw SQL on
//! [`Db::conn`], `Entity::update_many().exec(db.conn())`, `insert_many`, `delete_many`, ...
//! Other processes, the `sqlite3` shell and other pools on the same file are not seen.
//! - SQLite's update hook reports `(operation, table, rowid)` for each row; the reports are
//!   buffered per connection, dropped on rollback and handed over on commit (never touching
//!   the database inside the hook); the rows are then re-read by rowid (inside a
//!   `BEGIN IMMEDIATE` transaction, so the read waits until the writer's commit is complete)
//!   and published: `INSERT` as `create`, `UPDATE` as `update` to the groups the row is in
//!   now (no previous state, as on PostgreSQL);
//! - a `DELETE` cannot be published as `delete`: the update hook only gives the rowid of a row
//!   that no longer exists (the pre-update hook needs an SQLite built with
//!   `SQLITE_ENABLE_PREUPDATE_HOOK`). It yields a resync notice for its table. Delete through a
//!   `Txn` to publish deletions.
//! - Tables declared `WITHOUT ROWID` are not reported by SQLite; a statement that fails or a
//!   `ROLLBACK TO` a savepoint inside a transaction that then commits may report rows that did
//!   not change (published as an `update` with the unchanged row); more than
//!   [`Capture::queue`] rows in one transaction yield a resync notice instead of events.
//!
//! # Resync notices
//!
//! When events may have been lost, or could not be published, the capture tells subscribers to
//! reload: it sends an event from the observer [`RESYNC_OBSERVER`] (`"dcrf.capture"`) to the
//! group keyed by the table name, with action [`RESYNC_ACTION`] (`"resync"`) and body
//! `{"table": "todo", "reason": "reconnected"}` (reasons: [`ResyncReason`]). A consumer
//! subscribes a connection with
//! `dcrf::capture::resync_observer(&db).subscribe(ctx, "todo", request_id)`; the default push
//! then sends `{"errors": [], "data": {"table": "todo", "reason": "reconnected"},
//! "action": "resync", "response_status": 200, "request_id": ...}`. In the process,
//! [`Capture::on_resync`] and [`CaptureHandle::resyncs`] receive the same [`Resync`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sea_orm::sea_query::Expr;
use sea_orm::sea_query::value::sea_value_to_json_value;
use sea_orm::sqlx::sqlite::{LockedSqliteHandle, SqliteOperation, UpdateHookResult};
use sea_orm::{
    ConnectOptions, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, IdenStatic,
    ModelTrait, QueryFilter, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionTrait,
};
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::layer::Object;
use crate::model::{Db, primary_key_column};
use crate::observer::Observer;

/// The id of the observer that sends [resync notices](self#resync-notices); its group keys are
/// table names.
pub const RESYNC_OBSERVER: &str = "dcrf.capture";

/// The action of a resync notice.
pub const RESYNC_ACTION: &str = "resync";

/// The largest notification payload the trigger sends (PostgreSQL refuses 8 000 bytes).
#[cfg(feature = "postgres")]
const MAX_PAYLOAD: usize = 7900;
/// The most keys read in one query.
const READ_CHUNK: usize = 500;
/// The most changes handled in one batch.
const MAX_BATCH: usize = 4096;
/// The default bound of the event queue (see [`Capture::queue`]).
const DEFAULT_QUEUE: usize = 65_536;

/// Marks a framework transaction on PostgreSQL: the trigger skips its rows.
#[cfg(feature = "postgres")]
const PG_SKIP_SQL: &str = "SET LOCAL dcrf.capture_skip = 'on'";
/// Marks a framework transaction on SQLite: the update hook sees this table written.
const SQLITE_MARK_TABLE: &str = "dcrf_capture_mark";
const SQLITE_MARK_SQL: &str = "CREATE TEMP TABLE IF NOT EXISTS dcrf_capture_mark \
     (id INTEGER PRIMARY KEY); REPLACE INTO temp.dcrf_capture_mark (id) VALUES (1)";

/// The observer of [resync notices](self#resync-notices) on the database's layer: subscribe a
/// connection to a table's notices with `resync_observer(&db).subscribe(ctx, "todo", rid)`.
pub fn resync_observer(db: &Db) -> Observer {
    Observer::new(db.layer(), RESYNC_OBSERVER)
}

/// Subscribers of a table must reload: events may have been lost or could not be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    /// The table.
    pub table: &'static str,
    /// Why.
    pub reason: ResyncReason,
}

/// Why a [`Resync`] was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResyncReason {
    /// The listener lost its connection and is listening again: changes committed meanwhile
    /// were not seen (`"reconnected"`).
    Reconnected,
    /// Changes arrived faster than they were handled and some were dropped (`"overflow"`).
    Overflow,
    /// A change was seen but cannot be published: a deleted row that is not available (always
    /// on SQLite; on PostgreSQL when it does not fit in a notification), a row too large to be
    /// identified, or a re-read that failed (`"incomplete"`).
    Incomplete,
    /// The table was truncated (`"truncate"`).
    Truncated,
}

impl ResyncReason {
    /// The word sent in the notice's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Reconnected => "reconnected",
            ResyncReason::Overflow => "overflow",
            ResyncReason::Incomplete => "incomplete",
            ResyncReason::Truncated => "truncate",
        }
    }
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type ReadFn =
    for<'a> fn(&'a Db, &'a Table, Vec<Key>) -> BoxFut<'a, Result<Vec<(Key, Object)>, Error>>;
type DecodeFn =
    for<'a> fn(&'a Db, &'a Table, Vec<String>) -> BoxFut<'a, Result<Vec<Object>, Error>>;
type ResyncFn = Arc<dyn Fn(&Resync) + Send + Sync>;

/// A watched entity, before its schema is known.
#[derive(Clone)]
struct Watch {
    table: &'static str,
    schema: Option<String>,
    pk: &'static str,
    read: ReadFn,
    decode: DecodeFn,
}

/// A watched table, resolved.
struct Table {
    name: &'static str,
    /// The table's schema (PostgreSQL), empty on SQLite.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    schema: String,
    /// The quoted, schema-qualified name.
    qualified: String,
    pk: &'static str,
    read: ReadFn,
    decode: DecodeFn,
}

/// Which mode a builder was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    Postgres,
    Sqlite,
}

/// Builds and starts a change capture. See the [module docs](self) for what is observed.
pub struct Capture {
    db: Db,
    mode: Mode,
    watches: Vec<Watch>,
    listen: bool,
    channel: Option<String>,
    queue: usize,
    on_resync: Vec<ResyncFn>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("mode", &self.mode)
            .field(
                "tables",
                &self.watches.iter().map(|w| w.table).collect::<Vec<_>>(),
            )
            .field("listen", &self.listen)
            .field("channel", &self.channel)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// A capture for the database's backend (PostgreSQL triggers or SQLite hooks).
    pub fn new(db: &Db) -> Capture {
        Self::with_mode(db, Mode::Auto)
    }

    /// A PostgreSQL capture (trigger + `LISTEN`); [`start`](Self::start) fails on another
    /// backend or without the `postgres` feature.
    pub fn postgres(db: &Db) -> Capture {
        Self::with_mode(db, Mode::Postgres)
    }

    /// An SQLite capture (connection hooks); [`start`](Self::start) fails on another backend or
    /// when the database was not opened with [`Db::connect`].
    pub fn sqlite(db: &Db) -> Capture {
        Self::with_mode(db, Mode::Sqlite)
    }

    fn with_mode(db: &Db, mode: Mode) -> Capture {
        Capture {
            db: db.clone(),
            mode,
            watches: Vec::new(),
            listen: true,
            channel: None,
            queue: DEFAULT_QUEUE,
            on_resync: Vec::new(),
        }
    }

    /// Watches an entity's table. Its changes reach the model observers registered for it with
    /// [`Db::observe`] (registered before or after the capture starts).
    pub fn watch<E>(mut self) -> Self
    where
        E: EntityTrait,
        E::Model: Send + Sync + 'static,
    {
        let entity = E::default();
        let table = entity.table_name();
        if !self.watches.iter().any(|w| w.table == table) {
            self.watches.push(Watch {
                table,
                schema: entity.schema_name().map(str::to_owned),
                pk: primary_key_column::<E>().as_str(),
                read: read_rows::<E>,
                decode: decode_rows::<E>,
            });
        }
        self
    }

    /// PostgreSQL: `false` installs the triggers and marks this node's framework transactions,
    /// but starts no listener (for every node but one when the layer is shared). Default
    /// `true`.
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }

    /// PostgreSQL: the notification channel (default `dcrf_changes`, or
    /// `dcrf_changes.<schema>` outside `public`). At most 63 bytes.
    pub fn channel(mut self, name: impl Into<String>) -> Self {
        self.channel = Some(name.into());
        self
    }

    /// How many captured changes may wait to be handled before the excess is dropped and a
    /// resync notice sent (also the most rows one SQLite transaction may report). Default
    /// 65 536.
    pub fn queue(mut self, capacity: usize) -> Self {
        self.queue = capacity.max(1);
        self
    }

    /// Calls `f` with every [`Resync`] (in the capture's task: keep it quick), besides sending
    /// the notice through the layer.
    pub fn on_resync(mut self, f: impl Fn(&Resync) + Send + Sync + 'static) -> Self {
        self.on_resync.push(Arc::new(f));
        self
    }

    fn backend(&self) -> Result<DbBackend, Error> {
        let actual = self.db.backend();
        let wanted = match self.mode {
            Mode::Auto => actual,
            Mode::Postgres => DbBackend::Postgres,
            Mode::Sqlite => DbBackend::Sqlite,
        };
        if wanted != actual {
            return Err(Error::Configuration(format!(
                "a {wanted:?} change capture cannot watch a {actual:?} database"
            )));
        }
        Ok(actual)
    }

    /// Starts capturing. On PostgreSQL this installs the trigger function and the triggers
    /// (idempotently) and returns once the listener is listening; on SQLite it activates the
    /// connection hooks. The capture runs until the handle is dropped or
    /// [stopped](CaptureHandle::stop).
    ///
    /// Start it before serving: a framework transaction begun before `start` is not marked and
    /// its writes may be published twice.
    pub async fn start(self) -> Result<CaptureHandle, Error> {
        match self.backend()? {
            DbBackend::Postgres => self.start_postgres().await,
            DbBackend::Sqlite => self.start_sqlite(),
            other => Err(Error::Configuration(format!(
                "change capture does not support {other:?}"
            ))),
        }
    }

    /// PostgreSQL: drops the capture triggers of the watched tables (the trigger function
    /// stays for other tables). Running listeners see no more changes of these tables. Does
    /// nothing on SQLite.
    pub async fn uninstall(self) -> Result<(), Error> {
        if self.backend()? != DbBackend::Postgres {
            return Ok(());
        }
        let schema = current_schema(&self.db).await?;
        for table in self.tables(&schema) {
            for trigger in ["dcrf_capture", "dcrf_capture_truncate"] {
                self.db
                    .conn()
                    .execute_unprepared(&format!(
                        "DROP TRIGGER IF EXISTS {trigger} ON {}",
                        table.qualified
                    ))
                    .await?;
            }
        }
        Ok(())
    }

    fn tables(&self, schema: &str) -> Vec<Table> {
        self.watches
            .iter()
            .map(|w| {
                let schema = w.schema.clone().unwrap_or_else(|| schema.to_owned());
                let qualified = if schema.is_empty() {
                    quote(w.table)
                } else {
                    format!("{}.{}", quote(&schema), quote(w.table))
                };
                Table {
                    name: w.table,
                    schema,
                    qualified,
                    pk: w.pk,
                    read: w.read,
                    decode: w.decode,
                }
            })
            .collect()
    }

    fn engine(&self, tables: Vec<Table>) -> (Arc<Engine>, broadcast::Sender<Resync>) {
        let (resyncs, _) = broadcast::channel(256);
        let engine = Arc::new(Engine {
            db: self.db.clone(),
            tables,
            observer: resync_observer(&self.db),
            callbacks: self.on_resync.clone(),
            resyncs: resyncs.clone(),
        });
        (engine, resyncs)
    }

    fn start_sqlite(self) -> Result<CaptureHandle, Error> {
        let hooks = self.db.capture_hooks();
        let Some(shared) = hooks.sqlite.clone() else {
            return Err(Error::Configuration(
                "SQLite change capture needs a database opened with Db::connect".into(),
            ));
        };
        if hooks.running.swap(true, Ordering::AcqRel) {
            return Err(Error::Configuration(
                "a change capture is already running on this database".into(),
            ));
        }
        let tables = self.tables("");
        let names: Vec<&'static str> = tables.iter().map(|t| t.name).collect();
        let (engine, resyncs) = self.engine(tables);
        let (tx, rx) = mpsc::channel(self.queue);
        let overflow = Arc::new(AtomicBool::new(false));
        if let Ok(mut w) = shared.watched.write() {
            *w = names;
        }
        if let Ok(mut s) = shared.sink.lock() {
            *s = Some(Sink {
                tx,
                overflow: overflow.clone(),
            });
        }
        shared.limit.store(self.queue, Ordering::Release);
        // Mark framework transactions before any write can be captured.
        hooks.set_begin(Some(SQLITE_MARK_SQL));
        shared.active.store(true, Ordering::Release);
        let stop = CancellationToken::new();
        let task = tokio::spawn(process_loop(engine, rx, overflow, stop.clone()));
        Ok(CaptureHandle {
            db: self.db,
            backend: DbBackend::Sqlite,
            stop,
            tasks: vec![task],
            resyncs,
            channel: None,
            stopped: false,
        })
    }

    #[cfg(not(feature = "postgres"))]
    async fn start_postgres(self) -> Result<CaptureHandle, Error> {
        Err(Error::Configuration(
            "PostgreSQL change capture needs the `postgres` feature".into(),
        ))
    }

    #[cfg(feature = "postgres")]
    async fn start_postgres(self) -> Result<CaptureHandle, Error> {
        let schema = current_schema(&self.db).await?;
        let channel = match &self.channel {
            Some(c) => c.clone(),
            None if schema == "public" => "dcrf_changes".to_owned(),
            None => format!("dcrf_changes.{schema}"),
        };
        if channel.is_empty() || channel.len() > 63 || channel.contains('\0') {
            return Err(Error::Configuration(format!(
                "notification channel {channel:?} is not a valid PostgreSQL identifier \
                 (1 to 63 bytes); choose one with Capture::channel"
            )));
        }
        let tables = self.tables(&schema);
        let hooks = self.db.capture_hooks();
        // Mark framework transactions first: a write between installing the triggers and
        // marking would be published twice.
        hooks.set_begin(Some(PG_SKIP_SQL));
        postgres::install(&self.db, &schema, &channel, &tables).await?;
        let stop = CancellationToken::new();
        let (engine, resyncs) = self.engine(tables);
        let mut handle = CaptureHandle {
            db: self.db.clone(),
            backend: DbBackend::Postgres,
            stop: stop.clone(),
            tasks: Vec::new(),
            resyncs,
            channel: Some(channel.clone()),
            stopped: false,
        };
        if !self.listen {
            handle.stopped = true;
            return Ok(handle);
        }
        if hooks.running.swap(true, Ordering::AcqRel) {
            handle.stopped = true;
            return Err(Error::Configuration(
                "a change capture is already running on this database".into(),
            ));
        }
        let (tx, rx) = mpsc::channel(self.queue);
        let overflow = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let reader = postgres::Reader {
            pool: self.db.conn().get_postgres_connection_pool().clone(),
            channel,
            tables: engine
                .tables
                .iter()
                .map(|t| (t.schema.clone(), t.name))
                .collect(),
            tx,
            overflow: overflow.clone(),
        };
        handle
            .tasks
            .push(tokio::spawn(reader.run(stop.clone(), ready_tx)));
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::Configuration(
                    "the change capture listener stopped before listening".into(),
                ));
            }
        }
        handle
            .tasks
            .push(tokio::spawn(process_loop(engine, rx, overflow, stop)));
        Ok(handle)
    }
}

/// A running capture. Dropping it stops the capture (so does [`stop`](Self::stop)); keep it
/// for as long as changes should be published.
///
/// On PostgreSQL the triggers stay installed after the capture stops (see
/// [`Capture::uninstall`]), and the database's framework transactions stay marked.
#[must_use = "the capture stops when its handle is dropped"]
#[derive(Debug)]
pub struct CaptureHandle {
    db: Db,
    backend: DbBackend,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    resyncs: broadcast::Sender<Resync>,
    channel: Option<String>,
    stopped: bool,
}

impl CaptureHandle {
    /// Receives every [`Resync`] sent from now on.
    pub fn resyncs(&self) -> broadcast::Receiver<Resync> {
        self.resyncs.subscribe()
    }

    /// The PostgreSQL notification channel, if any.
    pub fn channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    /// Stops the capture and waits for its tasks to end. Changes committed afterwards are not
    /// published (a batch being handled is finished first).
    pub async fn stop(mut self) {
        self.shutdown();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }

    fn shutdown(&mut self) {
        self.stop.cancel();
        if self.stopped {
            return;
        }
        self.stopped = true;
        let hooks = self.db.capture_hooks();
        if self.backend == DbBackend::Sqlite
            && let Some(shared) = &hooks.sqlite
        {
            shared.active.store(false, Ordering::Release);
            if let Ok(mut s) = shared.sink.lock() {
                *s = None;
            }
            if let Ok(mut w) = shared.watched.write() {
                w.clear();
            }
            hooks.set_begin(None);
        }
        hooks.running.store(false, Ordering::Release);
    }
}

impl Drop for CaptureHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The capture state a [`Db`] carries: how its transactions mark themselves, and the SQLite
/// hooks' shared state.
#[derive(Default)]
pub(crate) struct DbHooks {
    /// SQL run first in every framework transaction while a capture is active.
    begin: RwLock<Option<&'static str>>,
    /// Is a capture (listener or hooks) running on this database?
    running: AtomicBool,
    /// Present when the SQLite pool was built with the capture hooks.
    sqlite: Option<Arc<SqliteShared>>,
}

impl DbHooks {
    /// The statement that marks a framework transaction, while a capture needs it.
    pub(crate) fn begin_sql(&self) -> Option<&'static str> {
        self.begin.read().ok().and_then(|b| *b)
    }

    fn set_begin(&self, sql: Option<&'static str>) {
        if let Ok(mut b) = self.begin.write() {
            *b = sql;
        }
    }

    /// Installs the (inactive) capture hooks on every connection the SQLite pool opens.
    pub(crate) fn prepare_sqlite(&mut self, opts: &mut ConnectOptions) {
        let shared = Arc::new(SqliteShared::default());
        self.sqlite = Some(shared.clone());
        opts.map_sqlx_sqlite_pool_opts(move |pool| {
            let shared = shared.clone();
            pool.after_connect(move |conn, _meta| {
                let shared = shared.clone();
                Box::pin(async move {
                    let mut handle = conn.lock_handle().await?;
                    install_sqlite_hooks(&mut handle, shared);
                    Ok(())
                })
            })
        });
    }
}

/// What a capture hands to its handler: changes, or the news that some were lost.
enum Msg {
    Changes(Vec<RawChange>),
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Reconnected,
    Overflow,
}

/// The identity of a changed row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// The primary key as JSON text (PostgreSQL).
    Pk(String),
    /// The rowid (SQLite).
    Rowid(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

/// One captured row change.
#[derive(Debug)]
struct RawChange {
    table: &'static str,
    op: Op,
    /// `None` when the row could not be identified.
    key: Option<Key>,
    /// The deleted row as JSON (PostgreSQL `DELETE`s that fit).
    old: Option<String>,
}

/// The merged changes of one row in a batch.
struct Pending {
    table: &'static str,
    key: Key,
    existed: bool,
    exists: bool,
    old: Option<String>,
}

/// Turns captured changes into published events.
struct Engine {
    db: Db,
    tables: Vec<Table>,
    observer: Observer,
    callbacks: Vec<ResyncFn>,
    resyncs: broadcast::Sender<Resync>,
}

impl Engine {
    /// Merges a batch per row (in order), re-reads the rows once, publishes.
    async fn process(&self, changes: Vec<RawChange>) {
        let mut pending: Vec<Pending> = Vec::new();
        let mut index: HashMap<(&'static str, Key), usize> = HashMap::new();
        let mut resync: Vec<(&'static str, ResyncReason)> = Vec::new();
        for change in changes {
            if change.op == Op::Truncate {
                resync.push((change.table, ResyncReason::Truncated));
                continue;
            }
            let Some(key) = change.key else {
                resync.push((change.table, ResyncReason::Incomplete));
                continue;
            };
            let i = *index.entry((change.table, key.clone())).or_insert_with(|| {
                pending.push(Pending {
                    table: change.table,
                    key,
                    existed: change.op != Op::Insert,
                    exists: change.op != Op::Delete,
                    old: None,
                });
                pending.len() - 1
            });
            let p = &mut pending[i];
            match change.op {
                Op::Insert | Op::Update => p.exists = true,
                Op::Delete => {
                    p.exists = false;
                    if p.existed && p.old.is_none() {
                        p.old = change.old;
                    }
                }
                Op::Truncate => {}
            }
        }

        let mut news: HashMap<(&'static str, Key), Object> = HashMap::new();
        let mut olds: HashMap<(&'static str, Key), Object> = HashMap::new();
        for table in &self.tables {
            if !self.db.observed(table.name) {
                continue;
            }
            let mine = || pending.iter().filter(|p| p.table == table.name);
            let keys: Vec<Key> = mine().filter(|p| p.exists).map(|p| p.key.clone()).collect();
            for chunk in keys.chunks(READ_CHUNK) {
                match (table.read)(&self.db, table, chunk.to_vec()).await {
                    Ok(rows) => {
                        for (key, object) in rows {
                            news.insert((table.name, key), object);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, table = table.name, "change capture: cannot re-read rows");
                        resync.push((table.name, ResyncReason::Incomplete));
                    }
                }
            }
            let with_old: Vec<&Pending> = mine().filter(|p| p.existed && p.old.is_some()).collect();
            for chunk in with_old.chunks(READ_CHUNK) {
                let json = chunk.iter().filter_map(|p| p.old.clone()).collect();
                match (table.decode)(&self.db, table, json).await {
                    Ok(objects) if objects.len() == chunk.len() => {
                        for (p, object) in chunk.iter().zip(objects) {
                            olds.insert((table.name, p.key.clone()), object);
                        }
                    }
                    Ok(_) => resync.push((table.name, ResyncReason::Incomplete)),
                    Err(e) => {
                        tracing::error!(error = %e, table = table.name, "change capture: cannot decode deleted rows");
                        resync.push((table.name, ResyncReason::Incomplete));
                    }
                }
            }
        }

        for p in &pending {
            if !self.db.observed(p.table) {
                continue;
            }
            let id = (p.table, p.key.clone());
            match (p.existed, p.exists) {
                (false, true) => {
                    if let Some(new) = news.get(&id) {
                        self.db.publish(p.table, None, Some(new)).await;
                    }
                }
                (true, true) => {
                    // Without the previous state, the row is taken to have stayed in its
                    // groups: `update` to the groups it is in now.
                    if let Some(new) = news.get(&id) {
                        let old = olds.get(&id).unwrap_or(new);
                        self.db.publish(p.table, Some(old), Some(new)).await;
                    }
                }
                (true, false) => match olds.get(&id) {
                    Some(old) => self.db.publish(p.table, Some(old), None).await,
                    None => resync.push((p.table, ResyncReason::Incomplete)),
                },
                (false, false) => {}
            }
        }

        let mut sent: Vec<(&'static str, ResyncReason)> = Vec::new();
        for (table, reason) in resync {
            if !sent.contains(&(table, reason)) {
                sent.push((table, reason));
                self.resync(table, reason).await;
            }
        }
    }

    async fn resync_all(&self, reason: ResyncReason) {
        for table in &self.tables {
            self.resync(table.name, reason).await;
        }
    }

    async fn resync(&self, table: &'static str, reason: ResyncReason) {
        tracing::warn!(
            table,
            reason = reason.as_str(),
            "change capture: subscribers must resync"
        );
        let body = json!({ "table": table, "reason": reason.as_str() });
        if let Err(e) = self.observer.send(table, RESYNC_ACTION, &body).await {
            tracing::error!(error = %e, table, "change capture: cannot send a resync notice");
        }
        let event = Resync { table, reason };
        for callback in &self.callbacks {
            callback(&event);
        }
        let _ = self.resyncs.send(event);
    }
}

/// Handles messages in batches until stopped or the senders are gone.
async fn process_loop(
    engine: Arc<Engine>,
    mut rx: mpsc::Receiver<Msg>,
    overflow: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            msg = rx.recv() => match msg {
                Some(m) => m,
                None => return,
            },
        };
        let mut changes = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Changes(c) => changes.extend(c),
                Msg::Reconnected => {
                    engine.process(std::mem::take(&mut changes)).await;
                    engine.resync_all(ResyncReason::Reconnected).await;
                }
                Msg::Overflow => {
                    engine.process(std::mem::take(&mut changes)).await;
                    engine.resync_all(ResyncReason::Overflow).await;
                }
            }
            if changes.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !changes.is_empty() {
            engine.process(changes).await;
        }
        if overflow.swap(false, Ordering::AcqRel) {
            engine.resync_all(ResyncReason::Overflow).await;
        }
    }
}

/// Quotes an SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
#[cfg(feature = "postgres")]
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

async fn current_schema(db: &Db) -> Result<String, Error> {
    let row = db
        .conn()
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT current_schema()",
        ))
        .await?;
    row.and_then(|r| r.try_get_by_index::<Option<String>>(0).ok().flatten())
        .ok_or_else(|| {
            Error::Configuration(
                "the connection has no current schema (check its search_path)".into(),
            )
        })
}

/// The primary key of a model as JSON text, as the trigger sends it.
fn pk_text<E: EntityTrait>(model: &E::Model) -> String {
    sea_value_to_json_value(&model.get(primary_key_column::<E>())).to_string()
}

/// Reads the current rows of some keys (the missing ones are gone).
fn read_rows<'a, E>(
    db: &'a Db,
    table: &'a Table,
    keys: Vec<Key>,
) -> BoxFut<'a, Result<Vec<(Key, Object)>, Error>>
where
    E: EntityTrait,
    E::Model: Send + Sync + 'static,
{
    Box::pin(async move {
        if db.backend() == DbBackend::Postgres {
            let records: Vec<serde_json::Value> = keys
                .iter()
                .filter_map(|k| match k {
                    Key::Pk(text) => serde_json::from_str::<serde_json::Value>(text).ok(),
                    Key::Rowid(_) => None,
                })
                .map(|pk| {
                    let mut record = serde_json::Map::new();
                    record.insert(table.pk.to_owned(), pk);
                    serde_json::Value::Object(record)
                })
                .collect();
            // The keys go through the table's row type, so they compare with the primary key's
            // own type (and its index), whatever it is.
            let pk = quote(table.pk);
            let filter = Expr::cust_with_values(
                format!(
                    "{table_name}.{pk} IN (SELECT r.{pk} FROM \
                     json_populate_recordset(NULL::{qualified}, $1::json) AS r)",
                    table_name = quote(table.name),
                    qualified = table.qualified,
                ),
                [serde_json::to_string(&records)?],
            );
            let rows = E::find().filter(filter).all(db.conn()).await?;
            Ok(rows
                .into_iter()
                .map(|m| (Key::Pk(pk_text::<E>(&m)), Arc::new(m) as Object))
                .collect())
        } else {
            let ids: Vec<String> = keys
                .iter()
                .filter_map(|k| match k {
                    Key::Rowid(id) => Some(id.to_string()),
                    Key::Pk(_) => None,
                })
                .collect();
            let sql = format!(
                "SELECT rowid AS dcrf_capture_rowid, * FROM {} WHERE rowid IN ({})",
                table.qualified,
                ids.join(", ")
            );
            // IMMEDIATE waits for the write lock, i.e. until the writer's commit is complete.
            let txn = db
                .conn()
                .begin_with_options(TransactionOptions {
                    sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    ..Default::default()
                })
                .await?;
            let rows = txn
                .query_all_raw(Statement::from_string(DbBackend::Sqlite, sql))
                .await?;
            txn.commit().await?;
            rows.iter()
                .map(|row| {
                    let rowid: i64 = row.try_get("", "dcrf_capture_rowid")?;
                    let model = <E::Model as FromQueryResult>::from_query_result(row, "")?;
                    Ok((Key::Rowid(rowid), Arc::new(model) as Object))
                })
                .collect()
        }
    })
}

/// Turns deleted rows sent as JSON into models, in order (PostgreSQL).
fn decode_rows<'a, E>(
    db: &'a Db,
    table: &'a Table,
    rows: Vec<String>,
) -> BoxFut<'a, Result<Vec<Object>, Error>>
where
    E: EntityTrait,
    E::Model: Send + Sync + 'static,
{
    Box::pin(async move {
        if db.backend() != DbBackend::Postgres {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT r.* FROM json_populate_recordset(NULL::{}, $1::json) WITH ORDINALITY AS r \
             ORDER BY r.ordinality",
            table.qualified
        );
        let array = format!("[{}]", rows.join(","));
        let rows = db
            .conn()
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                [array.into()],
            ))
            .await?;
        rows.iter()
            .map(|row| {
                let model = <E::Model as FromQueryResult>::from_query_result(row, "")?;
                Ok(Arc::new(model) as Object)
            })
            .collect()
    })
}

/// Where an SQLite connection's committed changes go.
struct Sink {
    tx: mpsc::Sender<Msg>,
    overflow: Arc<AtomicBool>,
}

/// The state every SQLite connection's hooks share.
#[derive(Default)]
pub(crate) struct SqliteShared {
    active: AtomicBool,
    watched: RwLock<Vec<&'static str>>,
    sink: Mutex<Option<Sink>>,
    /// The most changes one transaction may report.
    limit: AtomicUsize,
}

/// One connection's changes in its current transaction.
#[derive(Default)]
struct ConnBuffer {
    /// A framework transaction: its changes are published by the `Txn`.
    framework: bool,
    /// More changes than the queue allows: report an overflow instead.
    overflowed: bool,
    changes: Vec<RawChange>,
}

/// Sets the update, commit and rollback hooks of one connection. The hooks run on the
/// connection's worker thread and never touch the database.
fn install_sqlite_hooks(handle: &mut LockedSqliteHandle<'_>, shared: Arc<SqliteShared>) {
    let buffer = Arc::new(Mutex::new(ConnBuffer::default()));
    {
        let shared = shared.clone();
        let buffer = buffer.clone();
        handle.set_update_hook(move |change: UpdateHookResult<'_>| {
            if !shared.active.load(Ordering::Acquire) {
                return;
            }
            let Ok(mut b) = buffer.lock() else { return };
            if change.database == "temp" && change.table == SQLITE_MARK_TABLE {
                b.framework = true;
                b.changes.clear();
                return;
            }
            if b.framework || b.overflowed || change.database != "main" {
                return;
            }
            let op = match change.operation {
                SqliteOperation::Insert => Op::Insert,
                SqliteOperation::Update => Op::Update,
                SqliteOperation::Delete => Op::Delete,
                SqliteOperation::Unknown(_) => return,
            };
            let table = shared
                .watched
                .read()
                .ok()
                .and_then(|w| w.iter().copied().find(|t| *t == change.table));
            let Some(table) = table else { return };
            if b.changes.len() >= shared.limit.load(Ordering::Acquire) {
                b.overflowed = true;
                b.changes = Vec::new();
                return;
            }
            b.changes.push(RawChange {
                table,
                op,
                key: Some(Key::Rowid(change.rowid)),
                old: None,
            });
        });
    }
    {
        let shared = shared.clone();
        let buffer = buffer.clone();
        handle.set_commit_hook(move || {
            let Ok(mut b) = buffer.lock() else {
                return true;
            };
            let b = std::mem::take(&mut *b);
            if b.framework || (!b.overflowed && b.changes.is_empty()) {
                return true;
            }
            if let Ok(sink) = shared.sink.lock()
                && let Some(sink) = sink.as_ref()
            {
                let msg = if b.overflowed {
                    Msg::Overflow
                } else {
                    Msg::Changes(b.changes)
                };
                if sink.tx.try_send(msg).is_err() {
                    sink.overflow.store(true, Ordering::Release);
                }
            }
            true
        });
    }
    handle.set_rollback_hook(move || {
        if let Ok(mut b) = buffer.lock() {
            *b = ConnBuffer::default();
        }
    });
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use sea_orm::sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
    use std::time::Duration;

    /// The trigger function: one notification per row, `{"schema", "table", "op", "pk"}`, plus
    /// `"old"` (the deleted row) for a `DELETE` when it fits. Skips framework transactions.
    fn function_sql(schema: &str) -> String {
        format!(
            r#"CREATE OR REPLACE FUNCTION {schema}.dcrf_capture_notify() RETURNS trigger
LANGUAGE plpgsql AS $dcrf$
DECLARE
    row_json jsonb;
    payload text;
    full_payload text;
BEGIN
    IF current_setting('dcrf.capture_skip', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify(TG_ARGV[1], json_build_object('schema', TG_TABLE_SCHEMA,
            'table', TG_TABLE_NAME, 'op', TG_OP, 'pk', NULL)::text);
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        row_json := to_jsonb(OLD);
    ELSE
        row_json := to_jsonb(NEW);
    END IF;
    payload := json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
        'op', TG_OP, 'pk', row_json -> TG_ARGV[0])::text;
    IF TG_OP = 'DELETE' THEN
        full_payload := json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
            'op', TG_OP, 'pk', row_json -> TG_ARGV[0], 'old', row_json)::text;
        IF octet_length(full_payload) <= {max} THEN
            payload := full_payload;
        END IF;
    END IF;
    IF octet_length(payload) > {max} THEN
        payload := json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME,
            'op', TG_OP, 'pk', NULL)::text;
    END IF;
    PERFORM pg_notify(TG_ARGV[1], payload);
    RETURN NULL;
END
$dcrf$"#,
            schema = quote(schema),
            max = MAX_PAYLOAD,
        )
    }

    /// Installs the function and the triggers, idempotently, in one transaction.
    pub(super) async fn install(
        db: &Db,
        schema: &str,
        channel: &str,
        tables: &[Table],
    ) -> Result<(), Error> {
        let txn = db.conn().begin().await?;
        // Concurrent `CREATE OR REPLACE FUNCTION`s of the same function fail; take turns.
        txn.execute_unprepared("SELECT pg_advisory_xact_lock(hashtext('dcrf_capture_install'))")
            .await?;
        txn.execute_unprepared(&function_sql(schema)).await?;
        let function = format!("{}.dcrf_capture_notify", quote(schema));
        for table in tables {
            let args = format!("{}, {}", literal(table.pk), literal(channel));
            for sql in [
                format!("DROP TRIGGER IF EXISTS dcrf_capture ON {}", table.qualified),
                format!(
                    "CREATE TRIGGER dcrf_capture AFTER INSERT OR UPDATE OR DELETE ON {} \
                     FOR EACH ROW EXECUTE FUNCTION {function}({args})",
                    table.qualified
                ),
                format!(
                    "DROP TRIGGER IF EXISTS dcrf_capture_truncate ON {}",
                    table.qualified
                ),
                format!(
                    "CREATE TRIGGER dcrf_capture_truncate AFTER TRUNCATE ON {} \
                     FOR EACH STATEMENT EXECUTE FUNCTION {function}({args})",
                    table.qualified
                ),
            ] {
                txn.execute_unprepared(&sql).await?;
            }
        }
        txn.commit().await?;
        Ok(())
    }

    #[derive(serde::Deserialize)]
    struct Payload<'a> {
        #[serde(borrow)]
        schema: &'a str,
        #[serde(borrow)]
        table: &'a str,
        #[serde(borrow)]
        op: &'a str,
        pk: Option<serde_json::Value>,
        #[serde(borrow)]
        old: Option<&'a serde_json::value::RawValue>,
    }

    /// Listens on its own connection and forwards notifications; reconnects with backoff and
    /// reports every reconnection.
    pub(super) struct Reader {
        pub(super) pool: PgPool,
        pub(super) channel: String,
        pub(super) tables: Vec<(String, &'static str)>,
        pub(super) tx: mpsc::Sender<Msg>,
        pub(super) overflow: Arc<AtomicBool>,
    }

    fn sqlx_err(e: sea_orm::sqlx::Error) -> Error {
        Error::Database(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(
            Arc::new(e),
        )))
    }

    impl Reader {
        async fn connect(&self, pool: &PgPool) -> Result<PgListener, Error> {
            let mut listener = PgListener::connect_with(pool).await.map_err(sqlx_err)?;
            // A lost connection is reported to us (`Ok(None)`), and we reconnect ourselves.
            listener.eager_reconnect(false);
            listener.listen(&self.channel).await.map_err(sqlx_err)?;
            Ok(listener)
        }

        fn parse(&self, payload: &str) -> Option<RawChange> {
            let p: Payload<'_> = match serde_json::from_str(payload) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "change capture: ignoring a malformed notification");
                    return None;
                }
            };
            let table = self
                .tables
                .iter()
                .find(|(schema, name)| schema == p.schema && *name == p.table)?
                .1;
            let op = match p.op {
                "INSERT" => Op::Insert,
                "UPDATE" => Op::Update,
                "DELETE" => Op::Delete,
                "TRUNCATE" => Op::Truncate,
                _ => return None,
            };
            Some(RawChange {
                table,
                op,
                key: p
                    .pk
                    .filter(|v| !v.is_null())
                    .map(|v| Key::Pk(v.to_string())),
                old: p.old.map(|o| o.get().to_owned()),
            })
        }

        fn forward(&self, msg: Msg) {
            if self.tx.try_send(msg).is_err() {
                self.overflow.store(true, Ordering::Release);
            }
        }

        pub(super) async fn run(
            self,
            stop: CancellationToken,
            ready: tokio::sync::oneshot::Sender<Result<(), Error>>,
        ) {
            // A pool of its own (same settings as the database's), so that listening never
            // holds one of the application's connections.
            let options = (*self.pool.connect_options()).clone();
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .max_lifetime(None)
                .idle_timeout(None)
                .acquire_timeout(Duration::from_secs(10))
                .connect_lazy_with(options);
            let mut ready = Some(ready);
            let mut backoff = Duration::from_millis(100);
            loop {
                let connected = tokio::select! {
                    _ = stop.cancelled() => return,
                    c = self.connect(&pool) => c,
                };
                let mut listener = match connected {
                    Ok(l) => l,
                    Err(e) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Err(e));
                            return;
                        }
                        tracing::warn!(error = %e, "change capture: cannot listen; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                backoff = Duration::from_millis(100);
                match ready.take() {
                    Some(ready) => {
                        let _ = ready.send(Ok(()));
                    }
                    None => {
                        tracing::info!(channel = %self.channel, "change capture: listening again");
                        self.forward(Msg::Reconnected);
                    }
                }
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        n = listener.try_recv() => n,
                    };
                    match next {
                        Ok(Some(n)) => {
                            if let Some(change) = self.parse(n.payload()) {
                                self.forward(Msg::Changes(vec![change]));
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("change capture: listener connection lost");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "change capture: listener failed");
                            break;
                        }
                    }
                }
            }
        }
    }
}
