//! The database handle and the transactional write path.

use std::time::Duration;

use sea_orm::{
    ActiveModelBehavior, ActiveModelTrait, ConnectOptions, ConnectionTrait, Database,
    DatabaseConnection, DatabaseTransaction, DbBackend, EntityTrait, IntoActiveModel, ModelTrait,
    Schema, SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

use crate::error::Error;

/// The application's database: a sea-orm connection pool (SQLite or PostgreSQL, chosen by URL).
///
/// ```no_run
/// # async fn f() -> Result<(), dcrf::Error> {
/// let db = dcrf::model::Db::connect("sqlite::memory:").await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Db {
    conn: DatabaseConnection,
}

impl Db {
    /// Connects by URL: `sqlite://file.db?mode=rwc`, `sqlite::memory:`, or
    /// `postgres://user@host/db` (with the `postgres` feature).
    ///
    /// SQLite files get WAL journaling and a 5 s busy timeout; an in-memory SQLite database uses
    /// a single connection, so every query sees the same database.
    pub async fn connect(url: &str) -> Result<Db, Error> {
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.sqlx_logging(false);
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
        let conn = Database::connect(opts).await?;
        if conn.get_database_backend() == DbBackend::Sqlite {
            conn.execute_unprepared("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=5000;")
                .await?;
        }
        Ok(Db { conn })
    }

    /// Wraps an existing sea-orm connection.
    pub fn from_connection(conn: DatabaseConnection) -> Db {
        Db { conn }
    }

    /// The sea-orm connection, for reads and anything the framework does not wrap.
    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// SQLite or PostgreSQL.
    pub fn backend(&self) -> DbBackend {
        self.conn.get_database_backend()
    }

    /// Starts a transaction. Writes go through [`Txn`]; dropping it without
    /// [`commit`](Txn::commit) rolls back.
    ///
    /// On SQLite the transaction starts `IMMEDIATE` (it takes the write lock at once), so a
    /// read-then-write never fails with "database is locked" halfway; concurrent writers wait
    /// on the busy timeout instead.
    pub async fn begin(&self) -> Result<Txn, Error> {
        let txn = if self.backend() == DbBackend::Sqlite {
            self.conn
                .begin_with_options(TransactionOptions {
                    sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    ..Default::default()
                })
                .await?
        } else {
            self.conn.begin().await?
        };
        Ok(Txn { txn })
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
}

/// A database transaction: the one write path of model consumers and of user code.
///
/// Every write of an action runs in one `Txn`; an error drops it, which rolls back.
#[derive(Debug)]
pub struct Txn {
    txn: DatabaseTransaction,
}

impl Txn {
    /// The transaction as a sea-orm connection, for reads (and writes the framework should not
    /// observe).
    pub fn conn(&self) -> &DatabaseTransaction {
        &self.txn
    }

    /// Inserts a row and returns it as stored.
    pub async fn insert<A>(&mut self, am: A) -> Result<<A::Entity as EntityTrait>::Model, Error>
    where
        A: ActiveModelTrait + ActiveModelBehavior + Send,
        <A::Entity as EntityTrait>::Model: IntoActiveModel<A>,
    {
        Ok(am.insert(&self.txn).await?)
    }

    /// Updates the `Set` columns of a row and returns it as stored.
    pub async fn update<A>(&mut self, am: A) -> Result<<A::Entity as EntityTrait>::Model, Error>
    where
        A: ActiveModelTrait + ActiveModelBehavior + Send,
        <A::Entity as EntityTrait>::Model: IntoActiveModel<A>,
    {
        Ok(am.update(&self.txn).await?)
    }

    /// Deletes a row.
    pub async fn delete<M>(&mut self, model: M) -> Result<(), Error>
    where
        M: ModelTrait + IntoActiveModel<<M::Entity as EntityTrait>::ActiveModel> + Send,
        <M::Entity as EntityTrait>::ActiveModel: Send,
    {
        model.into_active_model().delete(&self.txn).await?;
        Ok(())
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), Error> {
        self.txn.commit().await?;
        Ok(())
    }
}
