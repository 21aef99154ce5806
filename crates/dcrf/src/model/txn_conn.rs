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

    /// Runs `run` with `stmt` as it is to be sent: in a batch whose savepoint is not started
    /// yet, with the `SAVEPOINT` in front.
    async fn run<T, F>(&self, stmt: Statement, run: impl FnOnce(Statement) -> F) -> Result<T, DbErr>
    where
        F: std::future::Future<Output = Result<T, DbErr>>,
    {
        let Scope::Batch(slot) = &self.scope else {
            return run(stmt).await;
        };
        let Statement {
            sql,
            values,
            db_backend,
        } = stmt;
        let (sql, first) = slot.statement(sql).await?;
        let result = run(Statement {
            sql,
            values,
            db_backend,
        })
        .await;
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
        self.run(stmt, |stmt| self.inner().execute_raw(stmt)).await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        let stmt = Statement::from_string(self.get_database_backend(), sql);
        self.run(stmt, |stmt| async move {
            self.inner().execute_unprepared(&stmt.sql).await
        })
        .await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.run(stmt, |stmt| self.inner().query_one_raw(stmt))
            .await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.run(stmt, |stmt| self.inner().query_all_raw(stmt))
            .await
    }

    fn support_returning(&self) -> bool {
        self.inner().support_returning()
    }
}
