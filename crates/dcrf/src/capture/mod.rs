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
//! // On SQLite, open the database with `Db::options(url).capture().connect()`.
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
//! - Run one listener per database: with a [Redis layer](crate::channel::ChannelLayer::redis) every
//!   node would publish every event to every node. Start it on one node and call
//!   `.listen(false)` on the others, which only installs the triggers and marks the node's own
//!   transactions.
//!
//! **SQLite capture** ([`Capture::sqlite`]) — writes made **in this process, on the
//! connections of this [`Db`]** (opened with `Db::options(url).capture()`, which installs the
//! hooks on every connection of the pool; a `Db` opened otherwise has none and pays nothing),
//! outside a `Txn`: raw SQL on
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
//!
//! The same notice reaches every subscription of the table's observers through their streams
//! (see [delivery guarantees](crate::channel#delivery)): the streams restart at a new epoch, so
//! each subscriber gets a `resync` push (a live list, a fresh snapshot) and a client resuming
//! with an older position is answered `recovered: false`. A client needs to handle only that.

mod engine;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, Statement};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::model::{Db, TxnHooks, primary_key_column};
use crate::observer::Observer;
use crate::sync::{read, write};
use engine::{Engine, ResyncFn, Table, TableReader};

/// The id of the observer that sends [resync notices](self#resync-notices); its group keys are
/// table names.
pub const RESYNC_OBSERVER: &str = "dcrf.capture";

/// The action of a resync notice.
pub const RESYNC_ACTION: &str = "resync";

/// The most keys read in one query.
pub(crate) const READ_CHUNK: usize = 500;
/// The most changes handled in one batch.
pub(crate) const MAX_BATCH: usize = 4096;
/// The default bound of the event queue (see [`Capture::queue`]).
const DEFAULT_QUEUE: usize = 65_536;

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

/// The backend a capture runs on, chosen once when it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Postgres,
    Sqlite,
}

/// Which backend a database needs, or why it cannot be captured (with the features built in).
fn resolve(db: &Db, wanted: Option<DbBackend>) -> Result<Backend, String> {
    let actual = db.backend();
    if let Some(wanted) = wanted
        && wanted != actual
    {
        return Err(format!(
            "a {wanted:?} change capture cannot watch a {actual:?} database"
        ));
    }
    match actual {
        DbBackend::Postgres if cfg!(feature = "postgres") => Ok(Backend::Postgres),
        DbBackend::Postgres => {
            Err("PostgreSQL change capture needs the `postgres` feature".to_owned())
        }
        DbBackend::Sqlite if cfg!(feature = "sqlite") => Ok(Backend::Sqlite),
        DbBackend::Sqlite => Err("SQLite change capture needs the `sqlite` feature".to_owned()),
        other => Err(format!("change capture does not support {other:?}")),
    }
}

/// A watched entity, before its schema is known.
#[derive(Clone)]
struct Watch {
    table: &'static str,
    schema: Option<String>,
    pk: &'static str,
    reader: TableReader,
}

/// Builds and starts a change capture. See the [module docs](self) for what is observed.
pub struct Capture {
    db: Db,
    backend: Result<Backend, String>,
    watches: Vec<Watch>,
    listen: bool,
    channel: Option<String>,
    queue: usize,
    on_resync: Vec<ResyncFn>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("backend", &self.backend)
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
        Self::with_backend(db, None)
    }

    /// A PostgreSQL capture (trigger + `LISTEN`); [`start`](Self::start) fails on another
    /// backend or without the `postgres` feature.
    pub fn postgres(db: &Db) -> Capture {
        Self::with_backend(db, Some(DbBackend::Postgres))
    }

    /// An SQLite capture (connection hooks); [`start`](Self::start) fails on another backend or
    /// when the database was not opened with `Db::options(url).capture()`.
    pub fn sqlite(db: &Db) -> Capture {
        Self::with_backend(db, Some(DbBackend::Sqlite))
    }

    fn with_backend(db: &Db, wanted: Option<DbBackend>) -> Capture {
        Capture {
            db: db.clone(),
            backend: resolve(db, wanted),
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
        let reader = match self.backend {
            #[cfg(feature = "postgres")]
            Ok(Backend::Postgres) => postgres::reader::<E>(),
            #[cfg(feature = "sqlite")]
            Ok(Backend::Sqlite) => sqlite::reader::<E>(),
            // `start` reports why this capture cannot run.
            _ => return self,
        };
        let entity = E::default();
        let table = entity.table_name();
        if !self.watches.iter().any(|w| w.table == table) {
            self.watches.push(Watch {
                table,
                schema: entity.schema_name().map(str::to_owned),
                pk: sea_orm::IdenStatic::as_str(&primary_key_column::<E>()),
                reader,
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

    /// Starts capturing. On PostgreSQL this installs the trigger function and the triggers
    /// (idempotently) and returns once the listener is listening; on SQLite it activates the
    /// connection hooks. The capture runs until the handle is dropped or
    /// [stopped](CaptureHandle::stop).
    ///
    /// Start it before serving: a framework transaction begun before `start` is not marked and
    /// its writes may be published twice.
    pub async fn start(self) -> Result<CaptureHandle, Error> {
        match self.backend {
            Err(ref why) => Err(Error::configuration(why.clone())),
            #[cfg(feature = "postgres")]
            Ok(Backend::Postgres) => postgres::start(self).await,
            #[cfg(feature = "sqlite")]
            Ok(Backend::Sqlite) => sqlite::start(self),
            #[allow(unreachable_patterns)]
            Ok(_) => unreachable!("`resolve` only returns backends that are built in"),
        }
    }

    /// PostgreSQL: drops the capture triggers of the watched tables (the trigger function
    /// stays for other tables). Running listeners see no more changes of these tables. Does
    /// nothing on SQLite.
    pub async fn uninstall(self) -> Result<(), Error> {
        match self.backend {
            Err(why) => Err(Error::configuration(why)),
            Ok(Backend::Sqlite) => Ok(()),
            Ok(Backend::Postgres) => {
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
        }
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
                    reader: w.reader,
                }
            })
            .collect()
    }

    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    fn engine(&self, tables: Vec<Table>) -> (Arc<Engine>, broadcast::Sender<Resync>) {
        let (resyncs, _) = broadcast::channel(256);
        let engine = Arc::new(Engine {
            db: self.db.clone(),
            sink: Arc::new(self.db.observers().clone()),
            tables,
            observer: resync_observer(&self.db),
            callbacks: self.on_resync.clone(),
            resyncs: resyncs.clone(),
        });
        (engine, resyncs)
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
    backend: Backend,
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
        let Some(state) = CaptureState::of(&self.db) else {
            return;
        };
        #[cfg(feature = "sqlite")]
        if self.backend == Backend::Sqlite {
            sqlite::deactivate(state);
        }
        let _ = self.backend;
        state.running.store(false, Ordering::Release);
    }
}

impl Drop for CaptureHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The capture state a [`Db`] carries as its [`TxnHooks`]: how its transactions mark
/// themselves, whether a capture runs, and the SQLite hooks' shared state.
#[derive(Default)]
struct CaptureState {
    /// SQL run first in every framework transaction while a capture is active.
    begin: RwLock<Option<&'static str>>,
    /// Is a capture (listener or hooks) running on this database?
    running: AtomicBool,
    /// Present when the SQLite pool was built with the capture hooks.
    #[cfg(feature = "sqlite")]
    sqlite: Option<Arc<sqlite::SqliteShared>>,
}

impl TxnHooks for CaptureState {
    fn begin_sql(&self) -> Option<&'static str> {
        *read(&self.begin)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }
}

impl CaptureState {
    /// The capture state of a database, if it has one.
    fn of(db: &Db) -> Option<&CaptureState> {
        db.txn_hooks()?.as_any().downcast_ref::<CaptureState>()
    }

    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    fn set_begin(&self, sql: Option<&'static str>) {
        *write(&self.begin) = sql;
    }
}

/// Quotes an SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
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
            Error::configuration("the connection has no current schema (check its search_path)")
        })
}
