//! Point reads on a SQLite file without leaving the calling thread.
//!
//! sqlx runs every SQLite connection on a thread of its own: a query is a message to that
//! thread and a message back, plus a pool checkout, which costs far more than the point query
//! itself (a primary-key read on a cached page takes a few microseconds). For a database file,
//! [`Db`](super::Db) therefore also keeps a read-only rusqlite connection per thread that
//! reads (the tokio workers), with its prepared statements cached, and runs the reads of
//! `retrieve` on it inline. WAL journaling (which [`Db::connect`](super::Db::connect) turns
//! on) lets those readers see every committed write without ever waiting for a writer.
//!
//! The statement is the one sea-orm builds for the queryset, so filters and
//! `get_queryset` narrowing apply unchanged; its row becomes a model through the entity's
//! active model (`try_set` of each column, then `try_into_model`), which checks every value
//! against its field's type as sea-orm's own row decoding does. Anything this path does not handle gives [`Declined`], and the caller
//! runs the query through sea-orm and sqlx as before: a value type it does not bind or read
//! (JSON, dates, UUIDs, decimals), a column that is not one of the entity's, a locked or
//! damaged file. Every answer is the same either way.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags};
use sea_orm::sea_query::ColumnType;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, Statement, TryIntoModel, Value};

use super::lookup::column_named;

/// Prepared statements each thread's connection keeps (rusqlite's LRU cache).
const STATEMENT_CACHE: usize = 64;

/// The most rows a query may ask for (its `LIMIT`) to be read inline: a page of a list, a live
/// list's snapshot. Longer reads go through the pool, so that no read holds a runtime thread
/// for long.
pub(crate) const INLINE_ROWS: u64 = 1000;

/// The inline readers of one database file. Shared by the clones of its [`Db`](super::Db);
/// each thread opens its own connection on first use and closes it when the database is gone.
#[derive(Debug)]
pub(crate) struct SqliteReads {
    path: PathBuf,
    /// Set when a reader cannot be opened on this file: every read then declines at once.
    broken: AtomicBool,
}

/// The query was not run inline; run it through sea-orm.
#[derive(Debug)]
pub(crate) struct Declined;

/// One thread's connection to one database.
struct Reader {
    owner: Weak<SqliteReads>,
    conn: Connection,
}

thread_local! {
    /// This thread's readers, one per live database it has read.
    static READERS: RefCell<Vec<Reader>> = const { RefCell::new(Vec::new()) };
}

impl SqliteReads {
    /// Readers for the database file at `path`.
    pub(crate) fn new(path: &Path) -> Arc<SqliteReads> {
        Arc::new(SqliteReads {
            path: path.to_owned(),
            broken: AtomicBool::new(false),
        })
    }

    /// Runs `statement` (a select of entity `E`, built for SQLite) on this thread's reader
    /// and returns its first row as a model.
    pub(crate) fn one<E>(
        self: &Arc<Self>,
        statement: &Statement,
    ) -> Result<Option<E::Model>, Declined>
    where
        E: EntityTrait,
        E::ActiveModel: TryIntoModel<E::Model>,
    {
        self.one_sql::<E>(&statement.sql, statement_values(statement))
    }

    /// [`one`](Self::one) of a select's SQL and its parameters, kept apart (a statement
    /// rendered once and run with new values).
    pub(crate) fn one_sql<E>(
        self: &Arc<Self>,
        sql: &str,
        values: &[Value],
    ) -> Result<Option<E::Model>, Declined>
    where
        E: EntityTrait,
        E::ActiveModel: TryIntoModel<E::Model>,
    {
        let mut first = None;
        self.each_sql::<E>(sql, values, |model| {
            first = Some(model);
            ControlFlow::Break(())
        })?;
        Ok(first)
    }

    /// Runs `statement` (a select of entity `E`, built for SQLite) on this thread's reader and
    /// hands its rows to `f` as models, until `f` breaks or the rows end. A decline can come
    /// after some rows were handed over: the caller then starts again on the pool.
    pub(crate) fn each<E>(
        self: &Arc<Self>,
        statement: &Statement,
        f: impl FnMut(E::Model) -> ControlFlow<()>,
    ) -> Result<(), Declined>
    where
        E: EntityTrait,
        E::ActiveModel: TryIntoModel<E::Model>,
    {
        self.each_sql::<E>(&statement.sql, statement_values(statement), f)
    }

    /// [`each`](Self::each) of a select's SQL and its parameters.
    fn each_sql<E>(
        self: &Arc<Self>,
        sql: &str,
        values: &[Value],
        mut f: impl FnMut(E::Model) -> ControlFlow<()>,
    ) -> Result<(), Declined>
    where
        E: EntityTrait,
        E::ActiveModel: TryIntoModel<E::Model>,
    {
        let params = self.params(values)?;
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(sql).map_err(|_| Declined)?;
            let columns = stmt
                .column_names()
                .into_iter()
                .map(|name| column_named::<E>(name).ok_or(Declined))
                .collect::<Result<Vec<_>, Declined>>()?;
            let mut rows = stmt
                .query(rusqlite::params_from_iter(params.iter()))
                .map_err(|_| Declined)?;
            while let Some(row) = rows.next().map_err(|_| Declined)? {
                // Each value goes through the active model's checked setter (the field's exact
                // type, as sea-orm's own row decoding demands), then into the model.
                let mut active = <E::ActiveModel as ActiveModelTrait>::default();
                for (i, column) in columns.iter().enumerate() {
                    let raw = row.get_ref(i).map_err(|_| Declined)?;
                    let value = read(column.def().get_column_type(), raw).ok_or(Declined)?;
                    active.try_set(*column, value).map_err(|_| Declined)?;
                }
                let model = active.try_into_model().map_err(|_| Declined)?;
                if f(model).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }

    /// The number of rows `statement` selects.
    pub(crate) fn count(self: &Arc<Self>, statement: &Statement) -> Result<u64, Declined> {
        let params = self.params(statement_values(statement))?;
        let sql = format!("SELECT COUNT(*) FROM ({})", statement.sql);
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(|_| Declined)?;
            let n: i64 = stmt
                .query_row(rusqlite::params_from_iter(params.iter()), |row| row.get(0))
                .map_err(|_| Declined)?;
            u64::try_from(n).map_err(|_| Declined)
        })
    }

    /// A statement's parameters, bound as sqlx would bind them; declined when this
    /// database's readers are broken or a value has a type this path leaves to sqlx.
    fn params<'s>(&self, values: &'s [Value]) -> Result<Vec<ToSqlOutput<'s>>, Declined> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(Declined);
        }
        values
            .iter()
            .map(bind)
            .collect::<Option<Vec<_>>>()
            .ok_or(Declined)
    }

    /// Calls `f` with this thread's reader of this database, opening it first if needed.
    fn with_reader<T>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> Result<T, Declined>,
    ) -> Result<T, Declined> {
        READERS.with(|cell| {
            let Ok(mut readers) = cell.try_borrow_mut() else {
                // Only a read made from inside a read could get here; it takes the long way.
                return Err(Declined);
            };
            let me = Arc::as_ptr(self);
            if let Some(reader) = readers.iter().find(|r| r.owner.as_ptr() == me) {
                return f(&reader.conn);
            }
            // Close the readers of databases that are gone before opening another.
            readers.retain(|r| r.owner.strong_count() > 0);
            let conn = match open(&self.path) {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        path = %self.path.display(),
                        "cannot open an inline SQLite reader; reads go through the pool"
                    );
                    self.broken.store(true, Ordering::Relaxed);
                    return Err(Declined);
                }
            };
            readers.push(Reader {
                owner: Arc::downgrade(self),
                conn,
            });
            let reader = readers.last().expect("just pushed");
            f(&reader.conn)
        })
    }
}

/// A statement's parameter values, in order.
fn statement_values(statement: &Statement) -> &[Value] {
    statement.values.as_ref().map_or(&[][..], |v| &v.0[..])
}

/// A read-only connection that never waits: a busy database declines instead of blocking
/// the thread (WAL readers are not blocked by writers, so this is rare).
fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(std::time::Duration::ZERO)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// A bound parameter as sqlx would bind it, or `None` for a type this path leaves to sqlx.
fn bind(value: &Value) -> Option<ToSqlOutput<'_>> {
    use rusqlite::types::Value as Sql;
    let owned = |v: Sql| Some(ToSqlOutput::Owned(v));
    let int = |v: Option<i64>| owned(v.map_or(Sql::Null, Sql::Integer));
    match value {
        Value::Bool(v) => int(v.map(i64::from)),
        Value::TinyInt(v) => int(v.map(i64::from)),
        Value::SmallInt(v) => int(v.map(i64::from)),
        Value::Int(v) => int(v.map(i64::from)),
        Value::BigInt(v) => int(*v),
        Value::TinyUnsigned(v) => int(v.map(i64::from)),
        Value::SmallUnsigned(v) => int(v.map(i64::from)),
        Value::Unsigned(v) => int(v.map(i64::from)),
        Value::BigUnsigned(v) => match v {
            Some(v) => int(Some(i64::try_from(*v).ok()?)),
            None => int(None),
        },
        Value::Float(v) => owned(v.map_or(Sql::Null, |f| Sql::Real(f64::from(f)))),
        Value::Double(v) => owned(v.map_or(Sql::Null, Sql::Real)),
        Value::String(Some(s)) => Some(ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))),
        Value::String(None) => owned(Sql::Null),
        Value::Char(v) => owned(v.map_or(Sql::Null, |c| Sql::Text(c.to_string()))),
        Value::Bytes(Some(b)) => Some(ToSqlOutput::Borrowed(ValueRef::Blob(b))),
        Value::Bytes(None) => owned(Sql::Null),
        _ => None,
    }
}

/// A stored value as the sea-orm value of its column's type (what sqlx would have decoded),
/// or `None` when this path leaves the column to sqlx.
fn read(ty: &ColumnType, raw: ValueRef<'_>) -> Option<Value> {
    let integer = || match raw {
        ValueRef::Integer(i) => Some(Some(i)),
        ValueRef::Null => Some(None),
        _ => None,
    };
    let narrow = |i: Option<i64>| -> Option<Option<i32>> { i.map(i32::try_from).transpose().ok() };
    Some(match ty {
        ColumnType::TinyInteger => Value::TinyInt(integer()?.map(i8::try_from).transpose().ok()?),
        ColumnType::SmallInteger => {
            Value::SmallInt(integer()?.map(i16::try_from).transpose().ok()?)
        }
        ColumnType::Integer => Value::Int(narrow(integer()?)?),
        ColumnType::BigInteger => Value::BigInt(integer()?),
        ColumnType::TinyUnsigned => {
            Value::TinyUnsigned(integer()?.map(u8::try_from).transpose().ok()?)
        }
        ColumnType::SmallUnsigned => {
            Value::SmallUnsigned(integer()?.map(u16::try_from).transpose().ok()?)
        }
        ColumnType::Unsigned => Value::Unsigned(integer()?.map(u32::try_from).transpose().ok()?),
        ColumnType::BigUnsigned => {
            Value::BigUnsigned(integer()?.map(u64::try_from).transpose().ok()?)
        }
        ColumnType::Boolean => Value::Bool(integer()?.map(|i| i != 0)),
        ColumnType::Float | ColumnType::Double => {
            let real = match raw {
                ValueRef::Real(f) => Some(f),
                // A REAL column keeps integral values it was given as integers.
                ValueRef::Integer(i) => Some(i as f64),
                ValueRef::Null => None,
                _ => return None,
            };
            if matches!(ty, ColumnType::Float) {
                Value::Float(real.map(|f| f as f32))
            } else {
                Value::Double(real)
            }
        }
        ColumnType::String(_) | ColumnType::Text | ColumnType::Char(_) => match raw {
            ValueRef::Text(t) => Value::String(Some(std::str::from_utf8(t).ok()?.to_owned())),
            ValueRef::Null => Value::String(None),
            _ => return None,
        },
        ColumnType::Binary(_) | ColumnType::VarBinary(_) | ColumnType::Blob => match raw {
            ValueRef::Blob(b) => Value::Bytes(Some(b.to_vec())),
            ValueRef::Null => Value::Bytes(None),
            _ => return None,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use sea_orm::entity::prelude::*;
    use sea_orm::{ActiveValue::Set, DbBackend, QueryOrder, QuerySelect, QueryTrait};

    use super::*;
    use crate::model::Db;

    /// Every column type the inline path reads, nullable and not.
    mod sample {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
        #[sea_orm(table_name = "sample")]
        pub struct Model {
            #[sea_orm(primary_key)]
            pub id: i32,
            pub name: String,
            pub note: Option<String>,
            pub flag: bool,
            pub score: f64,
            pub ratio: Option<f32>,
            pub big: i64,
            pub small: i16,
            pub data: Vec<u8>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    /// A JSON column, which the inline path leaves to sqlx.
    mod doc {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
        #[sea_orm(table_name = "doc")]
        pub struct Model {
            #[sea_orm(primary_key)]
            pub id: i32,
            pub body: Json,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    async fn file_db() -> (Db, Arc<SqliteReads>) {
        let db = crate::testing::test_db(crate::testing::TestBackend::SqliteFile).await;
        let reads = db
            .sqlite_reads()
            .cloned()
            .expect("a file database reads inline");
        (db, reads)
    }

    fn statement<E: EntityTrait>(query: sea_orm::Select<E>) -> Statement {
        query.limit(1).build(DbBackend::Sqlite)
    }

    #[tokio::test]
    async fn reads_every_supported_type_as_sqlx_does() {
        let (db, reads) = file_db().await;
        db.create_table(sample::Entity).await.unwrap();
        let rows = [
            sample::ActiveModel {
                name: Set("ünïcode ✓".into()),
                note: Set(Some("a note".into())),
                flag: Set(true),
                score: Set(2.5),
                ratio: Set(Some(0.25)),
                big: Set(i64::MAX),
                small: Set(-7),
                data: Set(vec![0, 1, 255]),
                ..Default::default()
            },
            sample::ActiveModel {
                name: Set(String::new()),
                note: Set(None),
                flag: Set(false),
                score: Set(3.0),
                ratio: Set(None),
                big: Set(i64::MIN),
                small: Set(0),
                data: Set(Vec::new()),
                ..Default::default()
            },
        ];
        for row in rows {
            let written = row.insert(db.conn()).await.unwrap();
            let query = sample::Entity::find_by_id(written.id);
            let via_sqlx = query.clone().one(db.conn()).await.unwrap();
            let inline = reads.one::<sample::Entity>(&statement(query)).unwrap();
            assert_eq!(inline, via_sqlx);
            assert_eq!(inline, Some(written));
        }
        // Absent rows and filters on other columns.
        let missing = sample::Entity::find_by_id(99);
        assert_eq!(
            reads.one::<sample::Entity>(&statement(missing)).unwrap(),
            None
        );
        let by_name = sample::Entity::find().filter(sample::Column::Name.eq("ünïcode ✓"));
        let found = reads.one::<sample::Entity>(&statement(by_name)).unwrap();
        assert_eq!(found.map(|m| m.id), Some(1));
        crate::testing::drop_test_db(db).await;
    }

    #[tokio::test]
    async fn declines_what_it_does_not_read() {
        let (db, reads) = file_db().await;
        db.create_table(doc::Entity).await.unwrap();
        let written = doc::ActiveModel {
            body: Set(serde_json::json!({"k": [1, 2]})),
            ..Default::default()
        }
        .insert(db.conn())
        .await
        .unwrap();
        let query = doc::Entity::find_by_id(written.id);
        assert!(reads.one::<doc::Entity>(&statement(query.clone())).is_err());
        // The database's own read falls back to sea-orm and gives the same model.
        assert_eq!(db.read_one(query).await.unwrap(), Some(written));
        // A column that is not one of the entity's (an expression) declines too.
        let expr = sample_expression();
        assert!(reads.one::<doc::Entity>(&expr).is_err());
        crate::testing::drop_test_db(db).await;
    }

    fn sample_expression() -> Statement {
        doc::Entity::find()
            .select_only()
            .column_as(doc::Column::Id.count(), "n")
            .limit(1)
            .build(DbBackend::Sqlite)
    }

    #[tokio::test]
    async fn sees_every_committed_write_at_once() {
        let (db, reads) = file_db().await;
        db.create_table(doc::Entity).await.unwrap();
        db.create_table(sample::Entity).await.unwrap();
        for i in 0..50 {
            let written = sample::ActiveModel {
                name: Set(format!("n{i}")),
                note: Set(None),
                flag: Set(i % 2 == 0),
                score: Set(f64::from(i)),
                ratio: Set(None),
                big: Set(i64::from(i)),
                small: Set(1),
                data: Set(vec![1]),
                ..Default::default()
            }
            .insert(db.conn())
            .await
            .unwrap();
            let query = sample::Entity::find_by_id(written.id);
            assert_eq!(
                reads.one::<sample::Entity>(&statement(query)).unwrap(),
                Some(written)
            );
        }
        crate::testing::drop_test_db(db).await;
    }

    #[tokio::test]
    async fn lists_and_counts_as_the_pool_does() {
        let (db, reads) = file_db().await;
        db.create_table(doc::Entity).await.unwrap();
        db.create_table(sample::Entity).await.unwrap();
        for i in 0..10 {
            sample::ActiveModel {
                name: Set(format!("n{}", i % 3)),
                note: Set((i % 2 == 0).then(|| format!("note {i}"))),
                flag: Set(i % 2 == 0),
                score: Set(f64::from(i) / 4.0),
                ratio: Set(None),
                big: Set(i64::from(i)),
                small: Set(1),
                data: Set(vec![i as u8]),
                ..Default::default()
            }
            .insert(db.conn())
            .await
            .unwrap();
        }
        let query = sample::Entity::find()
            .filter(sample::Column::Name.eq("n1"))
            .order_by_desc(sample::Column::Id)
            .limit(2)
            .offset(1);
        let mut inline = Vec::new();
        reads
            .each::<sample::Entity>(&query.clone().build(DbBackend::Sqlite), |m| {
                inline.push(m);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(inline, query.clone().all(db.conn()).await.unwrap());
        assert_eq!(inline.iter().map(|m| m.id).collect::<Vec<_>>(), [5, 2]);
        // Breaking stops the rows.
        let mut seen = 0;
        reads
            .each::<sample::Entity>(&statement(sample::Entity::find()), |_| {
                seen += 1;
                ControlFlow::Break(())
            })
            .unwrap();
        assert_eq!(seen, 1);
        let filtered = sample::Entity::find().filter(sample::Column::Flag.eq(true));
        assert_eq!(
            reads
                .count(&filtered.clone().build(DbBackend::Sqlite))
                .unwrap(),
            5
        );
        assert_eq!(db.count(filtered.clone()).await.unwrap(), 5);
        // Ordered, limited: the ordering changes no count, the limit does.
        let ordered = filtered.order_by_desc(sample::Column::Id);
        assert_eq!(db.count(ordered.clone()).await.unwrap(), 5);
        assert_eq!(db.count(ordered.limit(3)).await.unwrap(), 3);
        crate::testing::drop_test_db(db).await;
    }

    #[tokio::test]
    async fn in_memory_databases_read_through_the_pool() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        assert!(db.sqlite_reads().is_none());
        db.create_table(doc::Entity).await.unwrap();
        assert_eq!(db.read_one(doc::Entity::find_by_id(1)).await.unwrap(), None);
    }
}
