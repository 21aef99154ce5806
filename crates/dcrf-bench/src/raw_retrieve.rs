//! `raw-retrieve`: a hand-written axum WebSocket server (no framework) that answers DCRF
//! `retrieve` frames on the `todo` table that `dcrf-demo --seed N` creates, with the same
//! bytes as the demo: the ceiling for the `retrieve` scenario.
//!
//! Each request is parsed (serde_json, borrowing), its row read with one point query, and the
//! reply written by hand in DCRF's key order:
//!
//! ```text
//! → {"action":"retrieve","pk":1,"request_id":7}
//! ← {"errors":[],"data":{"id":1,"title":"…","done":false,"owner":""},"action":"retrieve","response_status":200,"request_id":7}
//! ← {"errors":["Not found"],"data":null,"action":"retrieve","response_status":404,"request_id":7}
//! ```
//!
//! SQLite: rusqlite on a read-only connection per worker thread, with its prepared statement
//! cached, queried inline on that thread (a point query on a cached page takes microseconds;
//! handing it to another thread would cost more than the query). PostgreSQL: a sqlx pool, whose
//! connections cache the prepared statement, with the reads that arrive while others are on
//! the wire batched into one `WHERE id = ANY($1)`, as dcrf does: a read that finds no
//! statement running runs its own at once, the others queue for the next one.
//!
//! It answers `retrieve` with an integer `pk` only (as the bench sends); a frame that is not
//! JSON or not a `retrieve` gets no reply, and a `pk` that is not an integer, the 404 frame.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::serve::ListenerExt;
use futures_util::{FutureExt, SinkExt};
use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// The point query on SQLite.
const SQLITE_QUERY: &str = "SELECT id, title, done, owner FROM todo WHERE id = ?1";
/// The point query on PostgreSQL, for any number of keys.
const PG_BATCH_QUERY: &str = "SELECT id, title, done, owner FROM todo WHERE id = ANY($1)";

/// The most batched statements running at once (a second one starts only when a full
/// statement's worth is queued), and the most keys in one: as dcrf's batched point reads.
const PG_MAX_IN_FLIGHT: usize = 4;
const PG_MAX_KEYS: usize = 64;

/// Connections of the PostgreSQL pool (a point query holds one for a round trip).
const PG_POOL_SIZE: u32 = 16;

/// Where the rows are read.
#[derive(Debug, Clone)]
enum Backend {
    /// The SQLite file's path; each worker thread opens its own connection to it.
    Sqlite(Arc<str>),
    /// A PostgreSQL pool and its queue of reads.
    Postgres(Arc<PgReads>),
}

/// A row of the demo's `todo` table.
#[derive(Debug, Clone)]
struct TodoRow {
    id: i32,
    title: String,
    done: bool,
    owner: String,
}

/// The PostgreSQL pool and the reads waiting for a statement.
#[derive(Debug)]
struct PgReads {
    pool: PgPool,
    state: Mutex<PgQueue>,
}

/// The queued reads, and how many statements are running.
#[derive(Debug, Default)]
struct PgQueue {
    waiting: Vec<(i32, tokio::sync::oneshot::Sender<Option<TodoRow>>)>,
    running: usize,
}

impl PgReads {
    /// Row `pk`: read at once when no statement is running, else in the next statement,
    /// shared with the reads queued meanwhile.
    async fn read(self: &Arc<Self>, pk: i32) -> Option<TodoRow> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut queue = self.queue();
            if queue.running == 0 {
                queue.running = 1;
                None
            } else {
                queue.waiting.push((pk, reply));
                let start = queue.waiting.len() >= PG_MAX_KEYS && queue.running < PG_MAX_IN_FLIGHT;
                queue.running += usize::from(start);
                Some(start)
            }
        };
        match start {
            None => {
                let row = self.select(&[pk]).await.into_iter().next();
                self.hand_off();
                row
            }
            Some(start) => {
                if start {
                    tokio::spawn(self.clone().run());
                }
                answer.await.ok().flatten()
            }
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, PgQueue> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A statement is done: a runner takes over its slot if reads are queued.
    fn hand_off(self: &Arc<Self>) {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.running -= 1;
        } else {
            drop(queue);
            tokio::spawn(self.clone().run());
        }
    }

    /// Statements for what is queued, until the queue is empty.
    async fn run(self: Arc<Self>) {
        loop {
            let batch: Vec<_> = {
                let mut queue = self.queue();
                let n = queue.waiting.len().min(PG_MAX_KEYS);
                queue.waiting.drain(..n).collect()
            };
            if batch.is_empty() {
                self.hand_off();
                return;
            }
            let keys: Vec<i32> = batch.iter().map(|(pk, _)| *pk).collect();
            let rows = self.select(&keys).await;
            for (pk, reply) in batch {
                let _ = reply.send(rows.iter().find(|r| r.id == pk).cloned());
            }
        }
    }

    /// The rows of `keys`, in one statement (none if it failed).
    async fn select(&self, keys: &[i32]) -> Vec<TodoRow> {
        let rows = sqlx::query(PG_BATCH_QUERY)
            .bind(keys)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
        rows.iter()
            .filter_map(|row| {
                Some(TodoRow {
                    id: row.try_get(0).ok()?,
                    title: row.try_get(1).ok()?,
                    done: row.try_get(2).ok()?,
                    owner: row.try_get(3).ok()?,
                })
            })
            .collect()
    }
}

thread_local! {
    /// This worker thread's SQLite connection (opened on first use).
    static SQLITE: RefCell<Option<Connection>> = const { RefCell::new(None) };
}

/// Serves raw-retrieve on `bind` (on any path) over `database` (a `sqlite:` URL or path, or a
/// `postgres://` URL) until the process is stopped.
pub async fn serve(bind: &str, database: &str) -> Result<(), String> {
    let backend = connect(database).await?;
    let listener = crate::raw_echo::listen(bind)
        .await
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("dcrf-bench raw-retrieve listening on {addr}");
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = Router::new().fallback(upgrade).with_state(backend);
    axum::serve(listener, app)
        .await
        .map_err(|e| format!("serving on {addr}: {e}"))
}

/// Opens the database named by `url` and checks that the `todo` table can be read.
async fn connect(url: &str) -> Result<Backend, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = PgPoolOptions::new()
            .max_connections(PG_POOL_SIZE)
            .connect(url)
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        sqlx::query(PG_BATCH_QUERY)
            .bind([0i32].as_slice())
            .fetch_optional(&pool)
            .await
            .map_err(|e| format!("cannot read the todo table: {e}"))?;
        return Ok(Backend::Postgres(Arc::new(PgReads {
            pool,
            state: Mutex::default(),
        })));
    }
    let path = sqlite_path(url)?;
    // Open once here so that a wrong path fails at start, not on the first request.
    let conn = open_sqlite(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    conn.prepare(SQLITE_QUERY)
        .map_err(|e| format!("cannot read the todo table in {path}: {e}"))?;
    Ok(Backend::Sqlite(Arc::from(path)))
}

/// The file path of a SQLite database URL as sqlx spells it (`sqlite://PATH?…`,
/// `sqlite:PATH`) or a plain path; an in-memory database is refused (it cannot be shared
/// with the server that seeded it).
fn sqlite_path(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split_once('?').map_or(rest, |(p, _)| p);
    if path.is_empty() || path == ":memory:" {
        return Err(format!(
            "{url}: raw-retrieve needs the SQLite file (or postgres:// database) the demo seeded"
        ));
    }
    Ok(path.to_owned())
}

fn open_sqlite(path: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

async fn upgrade(State(backend): State<Backend>, ws: WebSocketUpgrade) -> Response {
    crate::raw_echo::sized(ws).on_upgrade(move |socket| serve_socket(socket, backend))
}

/// The fields of a request that matter.
#[derive(Debug, Deserialize)]
struct Request<'a> {
    #[serde(default, borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pk: Option<&'a RawValue>,
    #[serde(default, borrow)]
    request_id: Option<&'a RawValue>,
}

/// Answers retrieve frames; the replies to whatever is already received go out with one
/// flush.
async fn serve_socket(mut socket: WebSocket, backend: Backend) {
    let mut buf = String::with_capacity(256);
    while let Some(Ok(msg)) = socket.recv().await {
        let mut next = Some(msg);
        while let Some(msg) = next.take() {
            match msg {
                Message::Text(text) => {
                    let failed = reply(&backend, &text, &mut buf).await
                        && socket.feed(Message::text(buf.as_str())).await.is_err();
                    if failed {
                        return;
                    }
                }
                Message::Close(_) => {
                    let _ = socket.flush().await;
                    return;
                }
                _ => {}
            }
            next = match socket.recv().now_or_never() {
                Some(Some(Ok(m))) => Some(m),
                Some(_) => {
                    let _ = socket.flush().await;
                    return;
                }
                None => None,
            };
        }
        if socket.flush().await.is_err() {
            return;
        }
    }
}

/// Writes the reply to `text` into `buf`; `false` if it gets none.
async fn reply(backend: &Backend, text: &str, buf: &mut String) -> bool {
    let Ok(req) = serde_json::from_str::<Request<'_>>(text) else {
        return false;
    };
    if req.action.as_deref() != Some("retrieve") {
        return false;
    }
    let request_id = req.request_id.map_or("null", RawValue::get);
    let pk = req.pk.and_then(|p| p.get().parse::<i64>().ok());
    buf.clear();
    buf.push_str(r#"{"errors":[],"data":"#);
    let found = match (pk, backend) {
        (None, _) => false,
        (Some(pk), Backend::Sqlite(path)) => sqlite_row(path, pk, buf),
        (Some(pk), Backend::Postgres(reads)) => postgres_row(reads, pk, buf).await,
    };
    if found {
        buf.push_str(r#","action":"retrieve","response_status":200,"request_id":"#);
    } else {
        buf.clear();
        buf.push_str(
            r#"{"errors":["Not found"],"data":null,"action":"retrieve","response_status":404,"request_id":"#,
        );
    }
    buf.push_str(request_id);
    buf.push('}');
    true
}

/// Appends row `pk` as the demo's JSON object to `buf`; `false` if there is none (or the
/// query failed).
fn sqlite_row(path: &str, pk: i64, buf: &mut String) -> bool {
    SQLITE.with_borrow_mut(|slot| {
        if slot.is_none() {
            match open_sqlite(path) {
                Ok(conn) => *slot = Some(conn),
                Err(e) => {
                    eprintln!("raw-retrieve: cannot open {path}: {e}");
                    return false;
                }
            }
        }
        let Some(conn) = slot.as_ref() else {
            return false;
        };
        let Ok(mut stmt) = conn.prepare_cached(SQLITE_QUERY) else {
            return false;
        };
        let Ok(mut rows) = stmt.query([pk]) else {
            return false;
        };
        match rows.next() {
            Ok(Some(row)) => {
                let text = |i: usize| row.get_ref(i).ok().and_then(|v| v.as_str().ok());
                let (Ok(id), Some(title), Ok(done), Some(owner)) =
                    (row.get::<_, i64>(0), text(1), row.get::<_, i64>(2), text(3))
                else {
                    return false;
                };
                write_row(buf, id, title, done != 0, owner);
                true
            }
            _ => false,
        }
    })
}

/// Appends row `pk` read from PostgreSQL to `buf`; `false` if there is none (or the query
/// failed).
async fn postgres_row(reads: &Arc<PgReads>, pk: i64, buf: &mut String) -> bool {
    // The demo's `id` is an `integer` (int4): a larger pk matches nothing.
    let Ok(pk) = i32::try_from(pk) else {
        return false;
    };
    let Some(row) = reads.read(pk).await else {
        return false;
    };
    write_row(buf, i64::from(row.id), &row.title, row.done, &row.owner);
    true
}

/// Appends `{"id":…,"title":…,"done":…,"owner":…}` (the demo's field order) to `buf`.
pub fn write_row(buf: &mut String, id: i64, title: &str, done: bool, owner: &str) {
    let _ = write!(buf, r#"{{"id":{id},"title":"#);
    push_json_str(buf, title);
    buf.push_str(if done {
        r#","done":true,"owner":"#
    } else {
        r#","done":false,"owner":"#
    });
    push_json_str(buf, owner);
    buf.push('}');
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
pub fn push_json_str(buf: &mut String, s: &str) {
    buf.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0C => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1F => "",
            _ => continue,
        };
        // Every byte escaped is ASCII, so `start..i` is on character boundaries.
        buf.push_str(&s[start..i]);
        if esc.is_empty() {
            let _ = write!(buf, "\\u{b:04x}");
        } else {
            buf.push_str(esc);
        }
        start = i + 1;
    }
    buf.push_str(&s[start..]);
    buf.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_serde_json() {
        for s in [
            "",
            "plain",
            "quote \" backslash \\ slash /",
            "\u{0}\u{1}\u{8}\u{9}\u{a}\u{b}\u{c}\u{d}\u{1f}\u{7f}",
            "é ü 😀 \u{2028}",
        ] {
            let mut buf = String::new();
            push_json_str(&mut buf, s);
            assert_eq!(buf, serde_json::to_string(s).unwrap());
        }
    }

    #[test]
    fn rows_like_serde_json() {
        #[derive(serde::Serialize)]
        struct Todo<'a> {
            id: i64,
            title: &'a str,
            done: bool,
            owner: &'a str,
        }
        let mut buf = String::new();
        write_row(&mut buf, -3, "t\"x", true, "ada");
        let todo = Todo {
            id: -3,
            title: "t\"x",
            done: true,
            owner: "ada",
        };
        assert_eq!(buf, serde_json::to_string(&todo).unwrap());
    }

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite:///tmp/a.db?mode=rwc").unwrap(),
            "/tmp/a.db"
        );
        assert_eq!(sqlite_path("sqlite://a.db").unwrap(), "a.db");
        assert_eq!(sqlite_path("sqlite:a.db").unwrap(), "a.db");
        assert_eq!(sqlite_path("/tmp/a.db").unwrap(), "/tmp/a.db");
        assert!(sqlite_path("sqlite::memory:").is_err());
    }
}
