//! PostgreSQL capture: a row trigger that notifies, and a listener.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sea_orm::sea_query::Expr;
use sea_orm::sea_query::value::sea_value_to_json_value;
use sea_orm::sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sea_orm::{
    ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, ModelTrait, QueryFilter, Statement,
    TransactionTrait,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::engine::{BoxFut, Key, Msg, Op, RawChange, Table, TableReader, process_loop};
use super::{Backend, Capture, CaptureHandle, CaptureState, current_schema, quote};
use crate::change::Object;
use crate::error::Error;
use crate::model::{Db, primary_key_column};

/// The largest notification payload the trigger sends (PostgreSQL refuses 8 000 bytes).
const MAX_PAYLOAD: usize = 7900;

/// Marks a framework transaction on PostgreSQL: the trigger skips its rows.
const PG_SKIP_SQL: &str = "SET LOCAL dcrf.capture_skip = 'on'";

/// Quotes an SQL string literal.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The capture state of a database, installed on first use.
fn state_of(db: &Db) -> Result<&CaptureState, Error> {
    if db.txn_hooks().is_none() {
        db.set_txn_hooks(Arc::new(CaptureState::default()));
    }
    CaptureState::of(db).ok_or_else(|| {
        Error::configuration("this database carries transaction hooks other than change capture's")
    })
}

/// Installs the triggers, marks framework transactions and starts the listener.
pub(super) async fn start(capture: Capture) -> Result<CaptureHandle, Error> {
    let schema = current_schema(&capture.db).await?;
    let channel = match &capture.channel {
        Some(c) => c.clone(),
        None if schema == "public" => "dcrf_changes".to_owned(),
        None => format!("dcrf_changes.{schema}"),
    };
    if channel.is_empty() || channel.len() > 63 || channel.contains('\0') {
        return Err(Error::configuration(format!(
            "notification channel {channel:?} is not a valid PostgreSQL identifier \
             (1 to 63 bytes); choose one with Capture::channel"
        )));
    }
    let tables = capture.tables(&schema);
    let state = state_of(&capture.db)?;
    // Mark framework transactions first: a write between installing the triggers and
    // marking would be published twice.
    state.set_begin(Some(PG_SKIP_SQL));
    install(&capture.db, &schema, &channel, &tables).await?;
    let stop = CancellationToken::new();
    let (engine, resyncs) = capture.engine(tables);
    let mut handle = CaptureHandle {
        db: capture.db.clone(),
        backend: Backend::Postgres,
        stop: stop.clone(),
        tasks: Vec::new(),
        resyncs,
        channel: Some(channel.clone()),
        stopped: false,
    };
    if !capture.listen {
        handle.stopped = true;
        return Ok(handle);
    }
    if state.running.swap(true, Ordering::AcqRel) {
        handle.stopped = true;
        return Err(Error::configuration(
            "a change capture is already running on this database",
        ));
    }
    let (tx, rx) = mpsc::channel(capture.queue);
    let overflow = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = Reader {
        pool: capture.db.conn().get_postgres_connection_pool().clone(),
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
            return Err(Error::configuration(
                "the change capture listener stopped before listening",
            ));
        }
    }
    handle
        .tasks
        .push(tokio::spawn(process_loop(engine, rx, overflow, stop)));
    Ok(handle)
}

/// How an entity's rows are read back on PostgreSQL.
pub(super) fn reader<E>() -> TableReader
where
    E: EntityTrait,
    E::Model: Send + Sync + 'static,
{
    TableReader {
        read: read_rows::<E>,
        decode: Some(decode_rows::<E>),
    }
}

/// The primary key of a model as JSON text, as the trigger sends it.
fn pk_text<E: EntityTrait>(model: &E::Model) -> String {
    sea_value_to_json_value(&model.get(primary_key_column::<E>())).to_string()
}

/// Reads the current rows of some primary keys (the missing ones are gone).
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
async fn install(db: &Db, schema: &str, channel: &str, tables: &[Table]) -> Result<(), Error> {
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
struct Reader {
    pool: PgPool,
    channel: String,
    tables: Vec<(String, &'static str)>,
    tx: mpsc::Sender<Msg>,
    overflow: Arc<AtomicBool>,
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

    async fn run(
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
