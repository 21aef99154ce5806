//! Point reads on PostgreSQL, batched: concurrent reads of one table by primary key share one
//! `SELECT … WHERE <pk> IN (…)`.
//!
//! A point read alone is a round trip, and for PostgreSQL the statement's own work (receiving
//! it, binding, executing, sending the row back) costs far more than the index lookup. Under
//! load, reads arrive while earlier ones are on the wire; here such a read joins the next
//! statement instead of paying a round trip of its own:
//!
//! - A read that finds no statement running for its table runs its own at once (so a read
//!   alone is never delayed by a timer or by other reads); otherwise it queues.
//! - When a statement ends with reads queued, a runner takes everything queued (up to
//!   [`MAX_KEYS`] keys), runs one statement for it and answers each read with its row, then
//!   takes the queue again until it finds it empty. Another runner starts beside it only when
//!   a full statement's worth is queued, up to [`MAX_IN_FLIGHT`].
//! - Every read's statement starts after the read was asked for, so it sees each write that
//!   committed before, as a statement of its own would: a client reads its own writes.
//!
//! It is used only where the statement is the same for every read: consumers that keep the
//! default queryset hooks ([`point_read`](super::point_read)) and look up by a one-column
//! primary key with an integer value. The statement lists its keys in groups of 1, 2, 4, … 64
//! (the last key repeated to fill the group), so a connection prepares at most seven of them.
//! A read whose statement fails, or whose runner went away, reads again alone, so its error
//! is the one it would have had.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sea_orm::{
    ColumnTrait, DatabaseConnection, DbBackend, EntityTrait, IdenStatic, Iterable, ModelTrait,
    QueryFilter, QueryTrait, Statement, Value,
};
use tokio::sync::oneshot;

use super::lookup::primary_key_column;
use crate::sync::lock;

/// The most statements running at once for one table. One runs while the next one's reads
/// queue; another starts beside it only when a full statement's worth ([`MAX_KEYS`]) is
/// waiting. With PostgreSQL on the same two cores as the server, one statement at a time read
/// more rows per second than two (BENCHMARKS.md, "PostgreSQL point reads"): smaller statements
/// cost the database more per row.
const MAX_IN_FLIGHT: usize = 4;

/// The most keys in one statement.
const MAX_KEYS: usize = 64;

/// The batched point reads of one database, a queue per table.
#[derive(Default)]
pub(crate) struct PointBatches {
    tables: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for PointBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointBatches").finish_non_exhaustive()
    }
}

/// One table's queue and statements.
struct Table<E: EntityTrait> {
    /// The primary key column.
    column: E::Column,
    /// The statement for 1, 2, 4, … [`MAX_KEYS`] keys.
    sql: Vec<String>,
    state: Mutex<State<E::Model>>,
    /// Statements run so far.
    #[cfg(test)]
    statements: std::sync::atomic::AtomicU64,
}

/// The reads waiting for a runner, and how many runners there are.
struct State<M> {
    queue: Vec<Waiter<M>>,
    running: usize,
}

/// A queued read.
struct Waiter<M> {
    /// The looked-up key as an integer, to find its row.
    key: i64,
    /// The looked-up key as bound.
    value: Value,
    reply: oneshot::Sender<Option<M>>,
}

impl PointBatches {
    /// Reads the row of `E` whose `column` is `value`: with the statement `alone` makes of
    /// `value` when no statement is running, else in a statement shared with the reads queued
    /// meanwhile. `Some(row or none)`, or `None` when this read cannot be batched (`column`
    /// is not `E`'s only primary key column, `value` is not an integer) or its statement
    /// failed, and the caller reads by itself.
    pub(crate) async fn read<E>(
        &self,
        conn: &DatabaseConnection,
        column: E::Column,
        value: Value,
        alone: impl FnOnce(Value) -> Statement,
    ) -> Option<Option<E::Model>>
    where
        E: EntityTrait,
        E::Model: Sync,
    {
        let key = integer(&value)?;
        let table = self.table::<E>(column)?;
        let answer = {
            let mut state = lock(&table.state);
            if state.running == 0 {
                state.running = 1;
                Turn::Alone(value)
            } else {
                let (reply, answer) = oneshot::channel();
                state.queue.push(Waiter { key, value, reply });
                let start = state.queue.len() >= MAX_KEYS && state.running < MAX_IN_FLIGHT;
                state.running += usize::from(start);
                Turn::Queued(answer, start)
            }
        };
        match answer {
            Turn::Alone(value) => {
                let _slot = Slot {
                    table: &table,
                    conn,
                };
                E::find().from_raw_sql(alone(value)).one(conn).await.ok()
            }
            Turn::Queued(answer, start) => {
                if start {
                    tokio::spawn(run(table, conn.clone()));
                }
                answer.await.ok()
            }
        }
    }

    /// The queue of `E`, when `column` is its only primary key column.
    fn table<E>(&self, column: E::Column) -> Option<Arc<Table<E>>>
    where
        E: EntityTrait,
        E::Model: Sync,
    {
        let mut tables = lock(&self.tables);
        if let Some(table) = tables.get(&TypeId::of::<E>()) {
            let table = table.clone().downcast::<Table<E>>().ok()?;
            return (table.column.as_str() == column.as_str()).then_some(table);
        }
        let single = <E::PrimaryKey as Iterable>::iter().count() == 1;
        if !single || primary_key_column::<E>().as_str() != column.as_str() {
            return None;
        }
        let sql = std::iter::successors(Some(1usize), |n| Some(n * 2))
            .take_while(|n| *n <= MAX_KEYS)
            .map(|n| {
                E::find()
                    .filter(column.is_in((0..n).map(|_| Value::BigInt(Some(0)))))
                    .build(DbBackend::Postgres)
                    .sql
            })
            .collect();
        let table = Arc::new(Table::<E> {
            column,
            sql,
            state: Mutex::new(State {
                queue: Vec::new(),
                running: 0,
            }),
            #[cfg(test)]
            statements: Default::default(),
        });
        tables.insert(TypeId::of::<E>(), table.clone());
        Some(table)
    }
}

/// What a read does.
enum Turn<M> {
    /// No statement is running: it runs its own (the caller's statement for one key), in a
    /// slot of its own.
    Alone(Value),
    /// It queued, and waits for its answer; a new runner is to start for the queue if
    /// `true`.
    Queued(oneshot::Receiver<Option<M>>, bool),
}

/// A key of an integer column as an `i64`.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::TinyInt(Some(v)) => Some(i64::from(*v)),
        Value::SmallInt(Some(v)) => Some(i64::from(*v)),
        Value::Int(Some(v)) => Some(i64::from(*v)),
        Value::BigInt(Some(v)) => Some(*v),
        Value::TinyUnsigned(Some(v)) => Some(i64::from(*v)),
        Value::SmallUnsigned(Some(v)) => Some(i64::from(*v)),
        Value::Unsigned(Some(v)) => Some(i64::from(*v)),
        Value::BigUnsigned(Some(v)) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// A runner: statements for what is queued until the queue is empty.
async fn run<E: EntityTrait>(table: Arc<Table<E>>, conn: DatabaseConnection) {
    let _slot = Slot {
        table: &table,
        conn: &conn,
    };
    loop {
        let mut batch: Vec<Waiter<E::Model>> = {
            let mut state = lock(&table.state);
            let n = state.queue.len().min(MAX_KEYS);
            state.queue.drain(..n).collect()
        };
        if batch.is_empty() {
            return;
        }
        batch.retain(|w| !w.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let values = batch.iter().map(|w| w.value.clone()).collect();
        match select(&table, &conn, values).await {
            Ok(rows) => answer(&table, batch, rows),
            // Each reads again alone, and so gets its own error.
            Err(_) => drop(batch),
        }
    }
}

/// The rows of `E` whose primary key is one of `values` (1 to [`MAX_KEYS`] of them), in one
/// statement.
async fn select<E: EntityTrait>(
    table: &Table<E>,
    conn: &DatabaseConnection,
    mut values: Vec<Value>,
) -> Result<Vec<E::Model>, sea_orm::DbErr> {
    let size = values.len().next_power_of_two();
    if let Some(last) = values.last().cloned() {
        values.resize(size, last);
    }
    let sql = &table.sql[size.trailing_zeros() as usize];
    let statement = Statement::from_sql_and_values(DbBackend::Postgres, sql, values);
    #[cfg(test)]
    table
        .statements
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    E::find().from_raw_sql(statement).all(conn).await
}

/// Gives each read of `batch` its row of `rows`, or none.
fn answer<E: EntityTrait>(table: &Table<E>, batch: Vec<Waiter<E::Model>>, rows: Vec<E::Model>) {
    let mut rows: Vec<(Option<i64>, Option<E::Model>)> = rows
        .into_iter()
        .map(|row| (integer(&row.get(table.column)), Some(row)))
        .collect();
    let keys: Vec<i64> = batch.iter().map(|w| w.key).collect();
    for (i, waiter) in batch.into_iter().enumerate() {
        let row = rows
            .iter_mut()
            .find(|(key, _)| *key == Some(waiter.key))
            .and_then(|(_, row)| {
                // The row moves to the last read of its key and is copied for the others.
                if keys[i + 1..].contains(&waiter.key) {
                    row.clone()
                } else {
                    row.take()
                }
            });
        let _ = waiter.reply.send(row);
    }
}

/// One of a table's [`MAX_IN_FLIGHT`] statement slots, held by a read running alone or by a
/// runner. When it is given up (the statement is done, or its task was cancelled or
/// panicked) with reads still queued, a new runner takes it over; so a queued read always has
/// a runner to answer it.
struct Slot<'a, E: EntityTrait> {
    table: &'a Arc<Table<E>>,
    conn: &'a DatabaseConnection,
}

impl<E: EntityTrait> Drop for Slot<'_, E> {
    fn drop(&mut self) {
        let mut state = lock(&self.table.state);
        if state.queue.is_empty() {
            state.running -= 1;
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                drop(state);
                runtime.spawn(run(self.table.clone(), self.conn.clone()));
            }
            // No runtime left to run it: the queued reads are answered with nothing, and so
            // read alone (or are dropped with it).
            Err(_) => {
                state.running -= 1;
                state.queue.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::entity::prelude::*;
    use sea_orm::{ActiveValue::Set, ConnectionTrait, DbBackend, QuerySelect};

    use super::*;
    use crate::model::point_read::tests::item;
    use crate::testing::{TestBackend, drop_test_db, test_db};

    impl PointBatches {
        fn statements<E: EntityTrait>(&self) -> u64
        where
            E::Model: Sync,
        {
            lock(&self.tables)
                .get(&TypeId::of::<E>())
                .and_then(|t| t.clone().downcast::<Table<E>>().ok())
                .map_or(0, |t| {
                    t.statements.load(std::sync::atomic::Ordering::Relaxed)
                })
        }
    }

    #[tokio::test]
    async fn postgres_reads_share_statements() {
        let db = test_db(TestBackend::Postgres).await;
        assert_eq!(db.backend(), DbBackend::Postgres);
        db.create_table(item::Entity).await.unwrap();
        for n in 1..=10 {
            item::ActiveModel {
                id: Set(n),
                name: Set(format!("item {n}")),
            }
            .insert(db.conn())
            .await
            .unwrap();
        }
        let batches = PointBatches::default();
        let conn = db.conn();
        let alone = |v: Value| {
            item::Entity::find()
                .filter(item::Column::Id.eq(v))
                .limit(1)
                .build(DbBackend::Postgres)
        };
        // Every key twice, and five that match nothing: 25 reads asked for at once.
        let keys: Vec<i32> = (1..=10).chain(1..=10).chain(100..105).collect();
        let reads = keys.iter().map(|k| {
            batches.read::<item::Entity>(conn, item::Column::Id, Value::Int(Some(*k)), alone)
        });
        let found = futures_util::future::join_all(reads).await;
        for (k, found) in keys.iter().zip(found) {
            let expected = (*k <= 10).then(|| item::Model {
                id: *k,
                name: format!("item {k}"),
            });
            assert_eq!(found, Some(expected), "key {k}");
        }
        // The first read runs its own statement; the other 24 queue behind it and share what
        // the runners run (counted here): one statement, or two if the queue was split.
        let statements = batches.statements::<item::Entity>();
        assert!((1..=2).contains(&statements), "{statements} statements");

        // A read alone still gets its row.
        let one = batches.read::<item::Entity>(conn, item::Column::Id, Value::Int(Some(3)), alone);
        assert_eq!(one.await.unwrap().unwrap().name, "item 3");
        // What cannot be batched is left to the caller: a key that is not an integer, a
        // column that is not the primary key.
        let text = Value::String(Some("3".into()));
        let by_text = batches.read::<item::Entity>(conn, item::Column::Id, text, alone);
        assert_eq!(by_text.await, None);
        let name = Value::Int(Some(3));
        let by_name = batches.read::<item::Entity>(conn, item::Column::Name, name, alone);
        assert_eq!(by_name.await, None);
        // A failed statement answers nothing, so each read runs alone and gets its own error.
        db.conn()
            .execute_unprepared("DROP TABLE item")
            .await
            .unwrap();
        let failed = (1..=3).map(|k| {
            batches.read::<item::Entity>(conn, item::Column::Id, Value::Int(Some(k)), alone)
        });
        let failed = futures_util::future::join_all(failed).await;
        assert_eq!(failed, vec![None, None, None]);
        // And the queue still works afterwards.
        db.create_table(item::Entity).await.unwrap();
        let ten = item::ActiveModel {
            id: Set(10),
            name: Set("ten".into()),
        };
        ten.insert(db.conn()).await.unwrap();
        let again =
            batches.read::<item::Entity>(conn, item::Column::Id, Value::Int(Some(10)), alone);
        assert_eq!(again.await.unwrap().unwrap().name, "ten");
        drop_test_db(db).await;
    }
}
