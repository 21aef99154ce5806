//! The connection of a [`Txn`](super::Txn): what its statements, and sea-orm calls made with
//! [`Txn::conn`](super::Txn::conn), run on.

use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, ExecResult, QueryResult, Statement,
};

use super::group_commit::Slot;

/// The connection of a [`Txn`](super::Txn), as a sea-orm [`ConnectionTrait`]: pass it to any
/// sea-orm query (`.one(txn.conn())`, `.exec(txn.conn())`) to run it inside the transaction.
///
/// On PostgreSQL it is the transaction itself. On SQLite it is the transaction's savepoint in
/// the batch of the group commit (see [`Db::begin`](super::Db::begin)): the `SAVEPOINT` goes
/// out with the first statement, in the same round trip, so a transaction costs no statement
/// of its own.
///
/// ```no_run
/// # async fn f(db: &dcrf::model::Db) -> Result<(), dcrf::Error> {
/// use sea_orm::ConnectionTrait;
/// let txn = db.begin().await?;
/// txn.conn().execute_unprepared("DELETE FROM todo WHERE done").await?;
/// txn.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TxnConn {
    scope: Scope,
}

#[derive(Debug)]
pub(super) enum Scope {
    /// A transaction of its own (PostgreSQL).
    Own(DatabaseTransaction),
    /// A savepoint in the group commit's batch (SQLite).
    Batch(Slot),
}

impl TxnConn {
    pub(super) fn new(scope: Scope) -> TxnConn {
        TxnConn { scope }
    }

    pub(super) fn into_scope(self) -> Scope {
        self.scope
    }

    /// The sea-orm transaction the statements run on.
    fn inner(&self) -> &DatabaseTransaction {
        match &self.scope {
            Scope::Own(txn) => txn,
            Scope::Batch(slot) => slot.outer(),
        }
    }

    /// Runs `run` with `sql` as the statement to send: in a batch whose savepoint is not
    /// started yet, with the `SAVEPOINT` in front.
    async fn run<T, F>(&self, sql: String, run: impl FnOnce(String) -> F) -> Result<T, DbErr>
    where
        F: std::future::Future<Output = Result<T, DbErr>>,
    {
        let Scope::Batch(slot) = &self.scope else {
            return run(sql).await;
        };
        let (sql, first) = slot.statement(sql).await?;
        let result = run(sql).await;
        if first && result.is_ok() {
            slot.started();
        }
        result
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for TxnConn {
    fn get_database_backend(&self) -> DbBackend {
        self.inner().get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let Statement {
            sql,
            values,
            db_backend,
        } = stmt;
        self.run(sql, |sql| {
            self.inner().execute_raw(Statement {
                sql,
                values,
                db_backend,
            })
        })
        .await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.run(sql.to_owned(), |sql| async move {
            self.inner().execute_unprepared(&sql).await
        })
        .await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        let Statement {
            sql,
            values,
            db_backend,
        } = stmt;
        self.run(sql, |sql| {
            self.inner().query_one_raw(Statement {
                sql,
                values,
                db_backend,
            })
        })
        .await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let Statement {
            sql,
            values,
            db_backend,
        } = stmt;
        self.run(sql, |sql| {
            self.inner().query_all_raw(Statement {
                sql,
                values,
                db_backend,
            })
        })
        .await
    }

    fn support_returning(&self) -> bool {
        self.inner().support_returning()
    }
}
