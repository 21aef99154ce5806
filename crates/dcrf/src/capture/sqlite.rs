//! SQLite capture: update, commit and rollback hooks on every connection of the pool.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sea_orm::sqlx::sqlite::{LockedSqliteHandle, SqliteOperation, UpdateHookResult};
use sea_orm::{ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, Statement};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::engine::{BoxFut, Key, Msg, Op, RawChange, Table, TableReader, process_loop};
use super::{Backend, Capture, CaptureHandle, CaptureState};
use crate::change::Object;
use crate::error::Error;
use crate::model::{Db, DbOptions};
use crate::sync::{lock, read, write};

/// Marks a framework transaction on SQLite: the update hook sees this table written.
const SQLITE_MARK_TABLE: &str = "dcrf_capture_mark";
const SQLITE_MARK_SQL: &str = "CREATE TEMP TABLE IF NOT EXISTS dcrf_capture_mark \
     (id INTEGER PRIMARY KEY); REPLACE INTO temp.dcrf_capture_mark (id) VALUES (1)";

impl DbOptions {
    /// Prepares an SQLite database for [change capture](crate::capture): installs the
    /// (inactive) capture hooks on every connection the pool opens. A capture started later
    /// with [`Capture::sqlite`] activates them. Does nothing on PostgreSQL, whose capture
    /// needs no preparation.
    #[cfg_attr(docsrs, doc(cfg(all(feature = "capture", feature = "sqlite"))))]
    pub fn capture(self) -> Self {
        if !self.url().starts_with("sqlite:") {
            return self;
        }
        let shared = Arc::new(SqliteShared::default());
        let state = CaptureState {
            sqlite: Some(shared.clone()),
            ..CaptureState::default()
        };
        self.txn_hooks(Arc::new(state)).configure(move |opts| {
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
        })
    }
}

/// Activates the hooks of a database prepared with [`DbOptions::capture`].
pub(super) fn start(capture: Capture) -> Result<CaptureHandle, Error> {
    let prepared = CaptureState::of(&capture.db).and_then(|s| Some((s, s.sqlite.clone()?)));
    let Some((state, shared)) = prepared else {
        return Err(Error::configuration(
            "SQLite change capture needs a database opened with Db::options(url).capture()",
        ));
    };
    if state.running.swap(true, Ordering::AcqRel) {
        return Err(Error::configuration(
            "a change capture is already running on this database",
        ));
    }
    let tables = capture.tables("");
    let names: Vec<&'static str> = tables.iter().map(|t| t.name).collect();
    let (engine, resyncs) = capture.engine(tables);
    let (tx, rx) = mpsc::channel(capture.queue);
    let overflow = Arc::new(AtomicBool::new(false));
    *write(&shared.watched) = names;
    *lock(&shared.sink) = Some(Sink {
        tx,
        overflow: overflow.clone(),
    });
    shared.limit.store(capture.queue, Ordering::Release);
    // Mark framework transactions before any write can be captured.
    state.set_begin(Some(SQLITE_MARK_SQL));
    shared.active.store(true, Ordering::Release);
    let stop = CancellationToken::new();
    let task = tokio::spawn(process_loop(engine, rx, overflow, stop.clone()));
    Ok(CaptureHandle {
        db: capture.db,
        backend: Backend::Sqlite,
        stop,
        tasks: vec![task],
        resyncs,
        channel: None,
        stopped: false,
    })
}

/// Turns the hooks off again (the capture stopped).
pub(super) fn deactivate(state: &CaptureState) {
    if let Some(shared) = &state.sqlite {
        shared.active.store(false, Ordering::Release);
        *lock(&shared.sink) = None;
        write(&shared.watched).clear();
        state.set_begin(None);
    }
}

/// How an entity's rows are read back on SQLite (deleted rows carry no data).
pub(super) fn reader<E>() -> TableReader
where
    E: EntityTrait,
    E::Model: Send + Sync + 'static,
{
    TableReader {
        read: read_rows::<E>,
        decode: None,
    }
}

/// Reads the current rows of some rowids (the missing ones are gone).
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
        let txn = db.begin_immediate().await?;
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
    })
}

/// Where an SQLite connection's committed changes go.
struct Sink {
    tx: mpsc::Sender<Msg>,
    overflow: Arc<AtomicBool>,
}

/// The state every SQLite connection's hooks share.
#[derive(Default)]
pub(super) struct SqliteShared {
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
            let mut b = lock(&buffer);
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
            let table = read(&shared.watched)
                .iter()
                .copied()
                .find(|t| *t == change.table);
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
            let b = std::mem::take(&mut *lock(&buffer));
            if b.framework || (!b.overflowed && b.changes.is_empty()) {
                return true;
            }
            if let Some(sink) = lock(&shared.sink).as_ref() {
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
        *lock(&buffer) = ConnBuffer::default();
    });
}
