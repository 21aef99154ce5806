//! Group commit on SQLite: the transactions of concurrent writers share one database
//! transaction, and so one `COMMIT` and one `fsync`.
//!
//! SQLite has one writer at a time, and a commit in WAL mode with `synchronous=FULL` (what
//! sqlx sets) waits for the disk. One commit per write caps every writer together at the
//! disk's fsync rate, however idle the CPU is. Here a [`Txn`](super::Txn) on SQLite is a
//! `SAVEPOINT` inside the current *batch*, an `IMMEDIATE` transaction opened by the first
//! writer:
//!
//! 1. [`GroupCommit::begin`] waits for the write slot (writers queue in order), opens the
//!    batch's transaction if none is open, and starts a savepoint in it.
//! 2. The writer's statements run in its savepoint; a `Txn` dropped without commit rolls
//!    back to it (and, when no other writer's work is in the batch, rolls the batch back too).
//! 3. [`Slot::join`] releases the savepoint, adds the writer's changes to the batch and gives
//!    the slot to the next writer in line, then queues for the slot again. Whoever gets the
//!    slot with a batch still pending commits it: every writer that queued meanwhile has
//!    joined it. The commit publishes each member's changes in the order they joined, then
//!    tells every member how it went.
//!
//! No writer is answered before its batch is durable, a failed `COMMIT` fails every member,
//! and one member's error (a constraint, a validation) rolls back only its own savepoint.
//! Under load a batch holds as many writers as queued during the previous commit; alone, a
//! writer commits at once, as before.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnAcquireErr, DatabaseTransaction, DbErr, TransactionTrait};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot};

use super::db::{Db, publish_in_order};
use crate::change::Change;

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
}

/// A writer whose savepoint was released into the batch.
#[derive(Debug)]
struct Member {
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), DbErr>>,
}

/// A writer's hold on the write slot, from [`GroupCommit::begin`] to [`Slot::join`] (or its
/// drop, which gives the slot up).
#[derive(Debug)]
pub(crate) struct Slot {
    batch: Option<OwnedMutexGuard<Batch>>,
    group: Arc<GroupCommit>,
}

impl GroupCommit {
    /// Takes the write slot and starts a savepoint in the current batch (opening one on `db`'s
    /// pool if none is open).
    pub(crate) async fn begin(
        self: &Arc<Self>,
        db: &Db,
    ) -> Result<(DatabaseTransaction, Slot), DbErr> {
        let mut batch = tokio::time::timeout(SLOT_TIMEOUT, self.slot.clone().lock_owned())
            .await
            .map_err(|_| DbErr::ConnectionAcquire(ConnAcquireErr::Timeout))?;
        if batch.members.len() >= MAX_MEMBERS {
            batch = self.commit(batch, db).await;
        }
        if batch.outer.is_none() {
            batch.outer = Some(db.begin_immediate().await?);
        }
        let Some(outer) = batch.outer.as_ref() else {
            unreachable!("the batch's transaction was opened above");
        };
        let savepoint = outer.begin().await;
        let slot = Slot {
            batch: Some(batch),
            group: self.clone(),
        };
        // On an error the slot is dropped: the batch goes on without this writer.
        Ok((savepoint?, slot))
    }

    /// Commits the pending batch, if any, publishes its members' changes in the order they
    /// joined and tells each member the outcome. Gives the slot back, with no batch open.
    async fn commit(&self, mut batch: OwnedMutexGuard<Batch>, db: &Db) -> OwnedMutexGuard<Batch> {
        let members = std::mem::take(&mut batch.members);
        let Some(outer) = batch.outer.take() else {
            return batch;
        };
        let changes: Vec<&Change> = members.iter().flat_map(|m| &m.changes).collect();
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

impl Slot {
    /// Adds a writer's committed savepoint (its `changes`) to the batch and waits until the
    /// batch is committed and published: by this writer, when it gets the slot back with the
    /// batch still pending, or by another member.
    pub(crate) async fn join(mut self, changes: Vec<Change>, db: &Db) -> Result<(), DbErr> {
        let (done, mut outcome) = oneshot::channel();
        let group = self.group.clone();
        if let Some(mut batch) = self.batch.take() {
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
    /// A writer that leaves without joining (its `Txn` rolled back to its savepoint): when no
    /// other writer's work is in the batch, the batch's transaction is rolled back too, so the
    /// database is not left locked.
    fn drop(&mut self) {
        if let Some(batch) = &mut self.batch
            && batch.members.is_empty()
        {
            batch.outer = None;
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
