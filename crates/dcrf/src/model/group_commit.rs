//! Group commit on SQLite: the transactions of concurrent writers share one database
//! transaction, and so one `COMMIT` and one `fsync`.
//!
//! SQLite has one writer at a time, and a commit in WAL mode with `synchronous=FULL` (what
//! sqlx sets) waits for the disk. One commit per write caps every writer together at the
//! disk's fsync rate, however idle the CPU is. Here a [`Txn`](super::Txn) on SQLite is a
//! `SAVEPOINT` inside the current *batch*, an `IMMEDIATE` transaction opened by the first
//! writer:
//!
//! 1. [`GroupCommit::begin`] waits for the write slot (writers queue in order) and opens the
//!    batch's transaction if none is open. The writer's savepoint is not started yet: it is
//!    sent with the writer's first statement, in the same round trip to sqlx's connection
//!    thread (see [`TxnConn`](super::TxnConn)).
//! 2. The writer's statements run in its savepoint. A `Txn` dropped without commit leaves its
//!    savepoint to be rolled back by the next holder of the slot, before anything else runs
//!    (or, when no other writer's work is in the batch, the batch is rolled back at once).
//! 3. [`Slot::join`] adds the writer's changes to the batch and gives the slot to the next
//!    writer in line, then queues for the slot again. The savepoint stays open (a `COMMIT`
//!    releases it with the rest), so a commit costs no statement of its own. Whoever gets the
//!    slot with a batch still pending commits it: every writer that queued meanwhile has
//!    joined it. The commit publishes each member's changes in the order they joined, then
//!    tells every member how it went.
//!
//! No writer is answered before its batch is durable, a failed `COMMIT` fails every member,
//! and one member's error (a constraint, a validation) rolls back only its own savepoint.
//! Under load a batch holds as many writers as queued during the previous commit; alone, a
//! writer commits at once, as before.
//!
//! Each statement costs a round trip to sqlx's connection thread (two thread switches), so
//! the round trips are what a write costs: a `create` is one (savepoint and `INSERT ...
//! RETURNING` together), and so is a `patch` of a consumer with the default hooks (savepoint
//! and the conditional `UPDATE ... RETURNING` of `Txn::update_unchanged`); the long way, a
//! re-read and then the `UPDATE`, is two.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnAcquireErr, ConnectionTrait, DatabaseTransaction, DbErr};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot};

use super::db::{Db, publish_in_order};
use crate::change::RowChange;

/// How long a writer waits for the write slot before it fails, as SQLite's busy timeout would
/// have: a transaction that waits for another one it holds itself fails instead of hanging.
const SLOT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most writers in one batch; the next one commits the batch before it starts a new one.
const MAX_MEMBERS: usize = 64;

/// One SQLite database's write slot and the batch it is building.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    slot: Arc<Mutex<Batch>>,
    /// Batches committed so far.
    #[cfg(test)]
    commits: std::sync::atomic::AtomicU64,
}

/// The transaction that the writers of one batch share, and those of them waiting for its
/// commit.
#[derive(Debug, Default)]
struct Batch {
    /// The open `IMMEDIATE` transaction, if a batch is being built.
    outer: Option<DatabaseTransaction>,
    /// The writers whose work is in `outer`, in the order they joined.
    members: Vec<Member>,
    /// The savepoint left open by the last writer that joined, if any. The next writer's
    /// first statement releases it (into the batch) before it starts its own, so at most one
    /// savepoint is open and two names take turns.
    open: Option<Savepoint>,
    /// A writer that left without joining after its first statement went out: its savepoint
    /// is rolled back before the batch goes on.
    undo: Option<Undo>,
}

/// A writer whose work joined the batch.
#[derive(Debug)]
struct Member {
    changes: Vec<RowChange>,
    done: oneshot::Sender<Result<(), DbErr>>,
}

/// The two savepoint names, taken in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoint {
    A,
    B,
}

impl Savepoint {
    fn name(self) -> &'static str {
        match self {
            Savepoint::A => "dcrf_a",
            Savepoint::B => "dcrf_b",
        }
    }

    /// What a writer's first statement starts with: the release of the savepoint `open` (a
    /// joined writer's), then its own savepoint.
    fn prefix(self, open: Option<Savepoint>) -> &'static str {
        match (open, self) {
            (None, Savepoint::A) => "SAVEPOINT dcrf_a; ",
            (None, Savepoint::B) => "SAVEPOINT dcrf_b; ",
            (Some(Savepoint::B), Savepoint::A) => "RELEASE dcrf_b; SAVEPOINT dcrf_a; ",
            (Some(Savepoint::A), Savepoint::B) => "RELEASE dcrf_a; SAVEPOINT dcrf_b; ",
            (Some(_), _) => unreachable!("a writer's savepoint is never the open one's"),
        }
    }
}

/// A savepoint to roll back, and what else may be open.
#[derive(Debug, Clone, Copy)]
struct Undo {
    savepoint: Savepoint,
    /// False when the writer's first statement failed or was abandoned: which of its parts
    /// ran is not known.
    certain: bool,
    /// The joined writer's savepoint that the first statement was to release.
    released: Option<Savepoint>,
}

/// Where a writer's savepoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum First {
    /// No statement has gone out.
    NotSent,
    /// The first statement succeeded: the savepoint is open, the one it released is gone.
    Started,
    /// The first statement failed, or its future was dropped before it answered.
    Unsure,
}

/// A writer's first statement and the joined writer's savepoint it releases.
#[derive(Debug, Clone, Copy)]
struct Progress {
    first: First,
    releases: Option<Savepoint>,
}

/// A writer's hold on the write slot, from [`GroupCommit::begin`] to [`Slot::join`] (or its
/// drop, which gives the slot up and leaves its savepoint to be rolled back).
#[derive(Debug)]
pub(crate) struct Slot {
    batch: Option<OwnedMutexGuard<Batch>>,
    group: Arc<GroupCommit>,
    /// This writer's savepoint.
    savepoint: Savepoint,
    progress: std::sync::Mutex<Progress>,
}

impl GroupCommit {
    /// Takes the write slot, opening a batch on `db`'s pool if none is open.
    pub(crate) async fn begin(self: &Arc<Self>, db: &Db) -> Result<Slot, DbErr> {
        let mut batch = tokio::time::timeout(SLOT_TIMEOUT, self.slot.clone().lock_owned())
            .await
            .map_err(|_| DbErr::ConnectionAcquire(ConnAcquireErr::Timeout))?;
        batch.settle().await;
        if batch.members.len() >= MAX_MEMBERS {
            batch = self.commit(batch, db).await;
        }
        if batch.outer.is_none() {
            batch.outer = Some(db.begin_immediate().await?);
        }
        let releases = batch.open;
        let savepoint = match releases {
            Some(Savepoint::A) => Savepoint::B,
            _ => Savepoint::A,
        };
        Ok(Slot {
            batch: Some(batch),
            group: self.clone(),
            savepoint,
            progress: std::sync::Mutex::new(Progress {
                first: First::NotSent,
                releases,
            }),
        })
    }

    /// Commits the pending batch, if any, publishes its members' changes in the order they
    /// joined and tells each member the outcome. Gives the slot back, with no batch open.
    async fn commit(&self, mut batch: OwnedMutexGuard<Batch>, db: &Db) -> OwnedMutexGuard<Batch> {
        batch.settle().await;
        let members = std::mem::take(&mut batch.members);
        batch.open = None;
        let Some(outer) = batch.outer.take() else {
            return batch;
        };
        let changes: Vec<&RowChange> = members.iter().flat_map(|m| &m.changes).collect();
        let outcome = publish_in_order(db, &changes, outer.commit()).await;
        #[cfg(test)]
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        drop(changes);
        for member in members {
            let _ = member.done.send(outcome.clone());
        }
        batch
    }
}

impl Batch {
    /// Rolls back the savepoint of a writer that left without joining. When its first
    /// statement's fate is not known, each part is undone if it ran: its savepoint rolled
    /// back, the joined writer's savepoint it was to release released. When that fails, the
    /// batch cannot tell its members' writes from the leaver's: it is rolled back whole and
    /// every member fails.
    async fn settle(&mut self) {
        let Some(undo) = self.undo.take() else {
            return;
        };
        let Some(outer) = self.outer.as_ref() else {
            return;
        };
        let name = undo.savepoint.name();
        let mut undone = run_allowing_absent(
            outer,
            &format!("ROLLBACK TO {name}; RELEASE {name}"),
            !undo.certain,
        )
        .await;
        if let (Ok(_), false, Some(released)) = (&undone, undo.certain, undo.released) {
            undone =
                run_allowing_absent(outer, &format!("RELEASE {}", released.name()), true).await;
        }
        self.open = None;
        if let Err(e) = undone {
            self.abandon(&e);
        }
    }

    /// Rolls the batch back whole after a savepoint could not be settled (the members' writes
    /// can no longer be told from another writer's): every member fails.
    fn abandon(&mut self, e: &DbErr) {
        tracing::warn!(error = %e, "cannot settle a savepoint; the batch is rolled back");
        self.outer = None;
        self.open = None;
        for member in self.members.drain(..) {
            let _ = member.done.send(Err(DbErr::Custom(format!(
                "a transaction committed with this one could not be rolled back: {e}"
            ))));
        }
    }
}

/// Runs `sql`; with `absent_ok`, a savepoint it names that does not exist is no error.
/// Whether the savepoints it names existed.
async fn run_allowing_absent(
    outer: &DatabaseTransaction,
    sql: &str,
    absent_ok: bool,
) -> Result<bool, DbErr> {
    match outer.execute_unprepared(sql).await {
        Ok(_) => Ok(true),
        Err(e) if absent_ok && e.to_string().contains("no such savepoint") => Ok(false),
        Err(e) => Err(e),
    }
}

impl Slot {
    /// The batch's transaction, which this writer's statements run in.
    pub(crate) fn outer(&self) -> &DatabaseTransaction {
        match self.batch.as_ref().and_then(|b| b.outer.as_ref()) {
            Some(outer) => outer,
            // `begin` opens the batch before it hands out a slot, and only `join` (which
            // consumes the slot) gives it up.
            None => unreachable!("a slot holds an open batch until it joins"),
        }
    }

    /// `sql` as this writer's next statement: while its savepoint is not started, with the
    /// savepoint changes in front. A first statement that failed is settled first (see
    /// [`resolve`](Self::resolve)).
    pub(crate) async fn statement(&self, sql: String) -> Result<(String, bool), DbErr> {
        match self.progress().first {
            First::Started => return Ok((sql, false)),
            First::Unsure => {
                self.resolve().await?;
                if self.progress().first == First::Started {
                    return Ok((sql, false));
                }
            }
            First::NotSent => {}
        }
        let mut progress = crate::sync::lock(&self.progress);
        // Until it answers, its fate is not known (its future may be dropped meanwhile).
        progress.first = First::Unsure;
        let prefix = self.savepoint.prefix(progress.releases);
        Ok((format!("{prefix}{sql}"), true))
    }

    /// Records that a first statement from [`statement`](Self::statement) succeeded.
    pub(crate) fn started(&self) {
        crate::sync::lock(&self.progress).first = First::Started;
    }

    fn progress(&self) -> Progress {
        *crate::sync::lock(&self.progress)
    }

    /// Finds out what a first statement that failed left behind: when this writer's
    /// savepoint exists it is started (`ROLLBACK TO` it undoes nothing, the failed statement
    /// having undone itself); otherwise the joined writer's savepoint it was to release is
    /// released here, and the next statement starts the savepoint afresh.
    async fn resolve(&self) -> Result<(), DbErr> {
        let outer = self.outer();
        let rollback = format!("ROLLBACK TO {}", self.savepoint.name());
        match run_allowing_absent(outer, &rollback, true).await {
            Err(e) => return Err(e),
            // It exists: the `ROLLBACK TO` kept it.
            Ok(true) => {
                self.started();
                return Ok(());
            }
            Ok(false) => {}
        }
        if let Some(released) = self.progress().releases {
            run_allowing_absent(outer, &format!("RELEASE {}", released.name()), true).await?;
        }
        *crate::sync::lock(&self.progress) = Progress {
            first: First::NotSent,
            releases: None,
        };
        Ok(())
    }

    /// Adds a writer's work (its `changes`) to the batch and waits until the batch is
    /// committed and published: by this writer, when it gets the slot back with the batch
    /// still pending, or by another member.
    pub(crate) async fn join(mut self, changes: Vec<RowChange>, db: &Db) -> Result<(), DbErr> {
        if self.progress().first == First::Unsure
            && let Err(e) = self.resolve().await
        {
            if let Some(batch) = self.batch.as_mut() {
                batch.abandon(&e);
            }
            return Err(e);
        }
        let (done, mut outcome) = oneshot::channel();
        let group = self.group.clone();
        if let Some(mut batch) = self.batch.take() {
            let progress = self.progress();
            batch.open = match progress.first {
                First::Started => Some(self.savepoint),
                _ => progress.releases,
            };
            batch.members.push(Member { changes, done });
        }
        drop(self);
        tokio::select! {
            biased;
            result = &mut outcome => return result.unwrap_or_else(|_| Err(interrupted())),
            batch = group.slot.clone().lock_owned() => drop(group.commit(batch, db).await),
        }
        outcome.await.unwrap_or_else(|_| Err(interrupted()))
    }
}

impl Drop for Slot {
    /// A writer that leaves without joining (its `Txn` rolled back): when no other writer's
    /// work is in the batch, the batch's transaction is rolled back, so the database is not
    /// left locked; otherwise its savepoint is rolled back by the next holder of the slot.
    fn drop(&mut self) {
        let Some(batch) = &mut self.batch else {
            return;
        };
        if batch.members.is_empty() {
            batch.outer = None;
            batch.open = None;
            return;
        }
        let progress = *crate::sync::lock(&self.progress);
        if progress.first == First::NotSent {
            batch.open = progress.releases;
        } else {
            batch.undo = Some(Undo {
                savepoint: self.savepoint,
                certain: progress.first == First::Started,
                released: progress.releases,
            });
        }
    }
}

/// The outcome of a batch whose committer stopped before it finished (its task was
/// cancelled): whether the writes are in the database is not known.
fn interrupted() -> DbErr {
    DbErr::Custom("the group commit of this transaction was interrupted".into())
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use std::sync::atomic::Ordering;

    use sea_orm::ConnectionTrait;

    use super::*;

    async fn db(name: &str) -> (Db, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "dcrf-group-commit-{}-{name}.sqlite3",
            std::process::id()
        ));
        drop_files(&path);
        let db = Db::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        db.conn()
            .execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .await
            .unwrap();
        (db, path)
    }

    async fn insert(db: &Db, v: &str) -> super::super::Txn {
        let txn = db.begin().await.unwrap();
        txn.conn()
            .execute_unprepared(&format!("INSERT INTO t (v) VALUES ('{v}')"))
            .await
            .unwrap();
        txn
    }

    async fn values(db: &Db) -> Vec<String> {
        let rows = db
            .conn()
            .query_all_raw(sea_orm::Statement::from_string(
                db.backend(),
                "SELECT v FROM t ORDER BY id",
            ))
            .await
            .unwrap();
        rows.iter().map(|r| r.try_get("", "v").unwrap()).collect()
    }

    fn commits(db: &Db) -> u64 {
        db.group_commit().unwrap().commits.load(Ordering::Relaxed)
    }

    /// One writer holds the slot while writers `w0`, `w1`, ... queue behind it; then it
    /// commits. `keep` says which of the queued writers commit (the others roll back).
    async fn batch_behind_first(db: &Db, keep: &[bool]) {
        let first = insert(db, "first").await;
        let writers: Vec<_> = keep
            .iter()
            .enumerate()
            .map(|(i, &keep)| {
                let db = db.clone();
                tokio::spawn(async move {
                    let txn = insert(&db, &format!("w{i}")).await;
                    if keep {
                        txn.commit().await.unwrap();
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        first.commit().await.unwrap();
        for w in writers {
            w.await.unwrap();
        }
    }

    #[tokio::test]
    async fn writers_that_queue_meanwhile_share_one_commit() {
        let (db, path) = db("share").await;
        batch_behind_first(&db, &[true, true, true]).await;
        assert_eq!(commits(&db), 1);
        assert_eq!(values(&db).await, ["first", "w0", "w1", "w2"]);
        // Alone, a writer commits at once.
        insert(&db, "alone").await.commit().await.unwrap();
        assert_eq!(commits(&db), 2);
        drop_files(&path);
    }

    #[tokio::test]
    async fn a_rolled_back_member_undoes_only_its_own_writes() {
        let (db, path) = db("rollback").await;
        batch_behind_first(&db, &[true, false, true]).await;
        assert_eq!(commits(&db), 1);
        assert_eq!(values(&db).await, ["first", "w0", "w2"]);
        drop_files(&path);
    }

    /// A writer queued behind `first` whose first statement breaks the primary key (`first`
    /// holds id 1): the error is sqlx's own; `then` says what the writer does next.
    async fn failing_writer_behind_first(db: &Db, go_on: bool) {
        let first = insert(db, "first").await;
        let failing = {
            let db = db.clone();
            tokio::spawn(async move {
                let txn = db.begin().await.unwrap();
                let e = txn
                    .conn()
                    .execute_unprepared("INSERT INTO t (id, v) VALUES (1, 'dup')")
                    .await
                    .unwrap_err();
                assert!(
                    matches!(
                        e.sql_err(),
                        Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
                    ),
                    "{e}"
                );
                if go_on {
                    txn.conn()
                        .execute_unprepared("INSERT INTO t (v) VALUES ('after')")
                        .await
                        .unwrap();
                    txn.commit().await.unwrap();
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let last = {
            let db = db.clone();
            tokio::spawn(async move { insert(&db, "last").await.commit().await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.commit().await.unwrap();
        failing.await.unwrap();
        last.await.unwrap();
    }

    #[tokio::test]
    async fn a_writer_whose_first_statement_fails_leaves_the_batch_whole() {
        let (db, path) = db("first-fails").await;
        failing_writer_behind_first(&db, false).await;
        assert_eq!(commits(&db), 1);
        assert_eq!(values(&db).await, ["first", "last"]);
        // The batches after it go on as before.
        batch_behind_first(&db, &[true, false, true]).await;
        assert_eq!(values(&db).await, ["first", "last", "first", "w0", "w2"]);
        drop_files(&path);
    }

    #[tokio::test]
    async fn a_writer_can_go_on_after_its_first_statement_fails() {
        let (db, path) = db("goes-on").await;
        failing_writer_behind_first(&db, true).await;
        assert_eq!(commits(&db), 1);
        assert_eq!(values(&db).await, ["first", "after", "last"]);
        drop_files(&path);
    }

    #[tokio::test]
    async fn a_dropped_writer_after_joined_ones_undoes_only_its_own_statements() {
        let (db, path) = db("later-statements").await;
        let first = insert(&db, "first").await;
        let second = {
            let db = db.clone();
            tokio::spawn(async move {
                let txn = insert(&db, "second-a").await;
                txn.conn()
                    .execute_unprepared("INSERT INTO t (v) VALUES ('second-b')")
                    .await
                    .unwrap();
                drop(txn);
                insert(&db, "third").await.commit().await.unwrap();
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.commit().await.unwrap();
        second.await.unwrap();
        assert_eq!(values(&db).await, ["first", "third"]);
        drop_files(&path);
    }

    #[tokio::test]
    async fn a_lone_rollback_leaves_the_database_unlocked() {
        let (db, path) = db("unlocked").await;
        drop(insert(&db, "gone").await);
        // Another process can take the write lock: the batch's transaction was rolled back.
        let other = rusqlite::Connection::open(&path).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            match other
                .execute_batch("BEGIN IMMEDIATE; INSERT INTO t (v) VALUES ('other'); COMMIT;")
            {
                Ok(()) => break,
                Err(_) if std::time::Instant::now() < deadline => {
                    let _ = other.execute_batch("ROLLBACK");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("the database stayed locked: {e}"),
            }
        }
        assert_eq!(values(&db).await, ["other"]);
        assert_eq!(commits(&db), 0);
        drop_files(&path);
    }

    #[tokio::test]
    async fn a_committed_write_is_visible_to_other_connections_when_commit_returns() {
        let (db, path) = db("visible").await;
        let writers: Vec<_> = (0..20)
            .map(|i| {
                let db = db.clone();
                let path = path.clone();
                tokio::spawn(async move {
                    insert(&db, &format!("v{i}")).await.commit().await.unwrap();
                    let other = rusqlite::Connection::open(&path).unwrap();
                    let n: i64 = other
                        .query_row(
                            "SELECT count(*) FROM t WHERE v = ?1",
                            [format!("v{i}")],
                            |r| r.get(0),
                        )
                        .unwrap();
                    assert_eq!(n, 1, "v{i} is committed");
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        assert_eq!(values(&db).await.len(), 20);
        assert!(commits(&db) <= 20);
        drop_files(&path);
    }

    fn drop_files(path: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
