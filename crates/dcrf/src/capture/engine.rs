//! The capture engine: turns captured row changes into published changes or resync notices,
//! whatever the backend that captured them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::{MAX_BATCH, READ_CHUNK, RESYNC_ACTION, Resync, ResyncReason};
use crate::change::{Change, ChangeKind, ChangeSink, Object};
use crate::error::Error;
use crate::model::Db;
use crate::observer::Observer;

pub(super) type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// Reads the current rows of some keys (the missing ones are gone).
pub(super) type ReadFn =
    for<'a> fn(&'a Db, &'a Table, Vec<Key>) -> BoxFut<'a, Result<Vec<(Key, Object)>, Error>>;
/// Turns deleted rows sent as JSON into models, in order.
pub(super) type DecodeFn =
    for<'a> fn(&'a Db, &'a Table, Vec<String>) -> BoxFut<'a, Result<Vec<Object>, Error>>;
pub(super) type ResyncFn = Arc<dyn Fn(&Resync) + Send + Sync>;

/// How one entity's rows are read back, for the backend chosen when the capture was built.
#[derive(Clone, Copy)]
pub(super) struct TableReader {
    pub(super) read: ReadFn,
    /// `None` where deleted rows never carry their data (SQLite).
    pub(super) decode: Option<DecodeFn>,
}

/// A watched table, resolved.
pub(super) struct Table {
    pub(super) name: &'static str,
    /// The table's schema (PostgreSQL), empty on SQLite.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) schema: String,
    /// The quoted, schema-qualified name.
    pub(super) qualified: String,
    pub(super) pk: &'static str,
    pub(super) reader: TableReader,
}

/// What a capture hands to its engine: changes, or the news that some were lost.
pub(super) enum Msg {
    Changes(Vec<RawChange>),
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Reconnected,
    Overflow,
}

/// The identity of a changed row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    /// The primary key as JSON text (PostgreSQL).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Pk(String),
    /// The rowid (SQLite).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    Rowid(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Insert,
    Update,
    Delete,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Truncate,
}

/// One captured row change.
#[derive(Debug)]
pub(super) struct RawChange {
    pub(super) table: &'static str,
    pub(super) op: Op,
    /// `None` when the row could not be identified.
    pub(super) key: Option<Key>,
    /// The deleted row as JSON (PostgreSQL `DELETE`s that fit).
    pub(super) old: Option<String>,
}

/// The merged changes of one row in a batch: did it exist before the batch, does it exist
/// after, and its data before (when a delete carried it).
#[derive(Debug, PartialEq)]
pub(super) struct Pending {
    pub(super) table: &'static str,
    pub(super) key: Key,
    pub(super) existed: bool,
    pub(super) exists: bool,
    pub(super) old: Option<String>,
}

/// Merges a batch per row, in order of first appearance; truncates and unidentified rows
/// become resync reasons.
pub(super) fn merge(changes: Vec<RawChange>) -> (Vec<Pending>, Vec<(&'static str, ResyncReason)>) {
    let mut pending: Vec<Pending> = Vec::new();
    let mut index: HashMap<(&'static str, Key), usize> = HashMap::new();
    let mut resync = Vec::new();
    for change in changes {
        if change.op == Op::Truncate {
            resync.push((change.table, ResyncReason::Truncated));
            continue;
        }
        let Some(key) = change.key else {
            resync.push((change.table, ResyncReason::Incomplete));
            continue;
        };
        let i = *index.entry((change.table, key.clone())).or_insert_with(|| {
            pending.push(Pending {
                table: change.table,
                key,
                existed: change.op != Op::Insert,
                exists: change.op != Op::Delete,
                old: None,
            });
            pending.len() - 1
        });
        let p = &mut pending[i];
        match change.op {
            Op::Insert | Op::Update => p.exists = true,
            Op::Delete => {
                p.exists = false;
                if p.existed && p.old.is_none() {
                    p.old = change.old;
                }
            }
            Op::Truncate => {}
        }
    }
    (pending, resync)
}

/// What to do with one merged row, given its state now (`new`, re-read) and before (`old`,
/// from a delete's data).
#[derive(Debug, PartialEq)]
pub(super) enum Decision<T> {
    /// Publish this change.
    Publish(ChangeKind, Option<T>, Option<T>),
    /// It cannot be published: tell subscribers to resync.
    Resync,
    /// Nothing to say (it came and went within the batch, or it is gone already).
    Nothing,
}

pub(super) fn decide<T: Clone>(p: &Pending, new: Option<&T>, old: Option<&T>) -> Decision<T> {
    match (p.existed, p.exists) {
        (false, true) => match new {
            Some(new) => Decision::Publish(ChangeKind::Create, None, Some(new.clone())),
            None => Decision::Nothing,
        },
        // Without the previous state, the row is taken to have stayed in its groups: `update`
        // to the groups it is in now.
        (true, true) => match new {
            Some(new) => Decision::Publish(
                ChangeKind::Update,
                Some(old.unwrap_or(new).clone()),
                Some(new.clone()),
            ),
            None => Decision::Nothing,
        },
        (true, false) => match old {
            Some(old) => Decision::Publish(ChangeKind::Delete, Some(old.clone()), None),
            None => Decision::Resync,
        },
        (false, false) => Decision::Nothing,
    }
}

/// Turns captured changes into published events.
pub(super) struct Engine {
    pub(super) db: Db,
    pub(super) sink: Arc<dyn ChangeSink>,
    pub(super) tables: Vec<Table>,
    pub(super) observer: Observer,
    pub(super) callbacks: Vec<ResyncFn>,
    pub(super) resyncs: broadcast::Sender<Resync>,
}

impl Engine {
    /// Merges a batch per row (in order), re-reads the rows once, publishes.
    async fn process(&self, changes: Vec<RawChange>) {
        let (pending, mut resync) = merge(changes);

        let mut news: HashMap<(&'static str, Key), Object> = HashMap::new();
        let mut olds: HashMap<(&'static str, Key), Object> = HashMap::new();
        for table in &self.tables {
            if !self.sink.observes(table.name) {
                continue;
            }
            let mine = || pending.iter().filter(|p| p.table == table.name);
            let keys: Vec<Key> = mine().filter(|p| p.exists).map(|p| p.key.clone()).collect();
            for chunk in keys.chunks(READ_CHUNK) {
                match (table.reader.read)(&self.db, table, chunk.to_vec()).await {
                    Ok(rows) => {
                        for (key, object) in rows {
                            news.insert((table.name, key), object);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, table = table.name, "change capture: cannot re-read rows");
                        resync.push((table.name, ResyncReason::Incomplete));
                    }
                }
            }
            let Some(decode) = table.reader.decode else {
                continue;
            };
            let with_old: Vec<&Pending> = mine().filter(|p| p.existed && p.old.is_some()).collect();
            for chunk in with_old.chunks(READ_CHUNK) {
                let json = chunk.iter().filter_map(|p| p.old.clone()).collect();
                match decode(&self.db, table, json).await {
                    Ok(objects) if objects.len() == chunk.len() => {
                        for (p, object) in chunk.iter().zip(objects) {
                            olds.insert((table.name, p.key.clone()), object);
                        }
                    }
                    Ok(_) => resync.push((table.name, ResyncReason::Incomplete)),
                    Err(e) => {
                        tracing::error!(error = %e, table = table.name, "change capture: cannot decode deleted rows");
                        resync.push((table.name, ResyncReason::Incomplete));
                    }
                }
            }
        }

        for p in &pending {
            if !self.sink.observes(p.table) {
                continue;
            }
            let id = (p.table, p.key.clone());
            match decide(p, news.get(&id), olds.get(&id)) {
                Decision::Publish(kind, old, new) => {
                    let change = Change {
                        table: p.table,
                        kind,
                        old,
                        new,
                    };
                    self.sink.publish(&change).await;
                }
                Decision::Resync => resync.push((p.table, ResyncReason::Incomplete)),
                Decision::Nothing => {}
            }
        }

        let mut sent: Vec<(&'static str, ResyncReason)> = Vec::new();
        for (table, reason) in resync {
            if !sent.contains(&(table, reason)) {
                sent.push((table, reason));
                self.resync(table, reason).await;
            }
        }
    }

    async fn resync_all(&self, reason: ResyncReason) {
        for table in &self.tables {
            self.resync(table.name, reason).await;
        }
    }

    async fn resync(&self, table: &'static str, reason: ResyncReason) {
        tracing::warn!(
            table,
            reason = reason.as_str(),
            "change capture: subscribers must resync"
        );
        // The table's streams restart at a new epoch: their subscribers get resync notices.
        self.sink.resync(table).await;
        let body = json!({ "table": table, "reason": reason.as_str() });
        if let Err(e) = self.observer.send(table, RESYNC_ACTION, &body).await {
            tracing::error!(error = %e, table, "change capture: cannot send a resync notice");
        }
        let event = Resync { table, reason };
        for callback in &self.callbacks {
            callback(&event);
        }
        let _ = self.resyncs.send(event);
    }
}

/// Handles messages in batches until stopped or the senders are gone.
pub(super) async fn process_loop(
    engine: Arc<Engine>,
    mut rx: mpsc::Receiver<Msg>,
    overflow: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            msg = rx.recv() => match msg {
                Some(m) => m,
                None => return,
            },
        };
        let mut changes = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Changes(c) => changes.extend(c),
                Msg::Reconnected => {
                    engine.process(std::mem::take(&mut changes)).await;
                    engine.resync_all(ResyncReason::Reconnected).await;
                }
                Msg::Overflow => {
                    engine.process(std::mem::take(&mut changes)).await;
                    engine.resync_all(ResyncReason::Overflow).await;
                }
            }
            if changes.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !changes.is_empty() {
            engine.process(changes).await;
        }
        if overflow.swap(false, Ordering::AcqRel) {
            engine.resync_all(ResyncReason::Overflow).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(op: Op, id: i64) -> RawChange {
        RawChange {
            table: "t",
            op,
            key: Some(Key::Rowid(id)),
            old: None,
        }
    }

    fn deleted(pk: &str, old: &str) -> RawChange {
        RawChange {
            table: "t",
            op: Op::Delete,
            key: Some(Key::Pk(pk.into())),
            old: Some(old.into()),
        }
    }

    fn pending(existed: bool, exists: bool) -> Pending {
        Pending {
            table: "t",
            key: Key::Rowid(1),
            existed,
            exists,
            old: None,
        }
    }

    #[test]
    fn a_batch_is_merged_per_row_in_first_seen_order() {
        let (p, resync) = merge(vec![
            raw(Op::Insert, 2),
            raw(Op::Update, 1),
            raw(Op::Update, 2),
            raw(Op::Delete, 1),
        ]);
        assert!(resync.is_empty());
        assert_eq!(
            p.iter()
                .map(|p| (p.key.clone(), p.existed, p.exists))
                .collect::<Vec<_>>(),
            [(Key::Rowid(2), false, true), (Key::Rowid(1), true, false)]
        );
    }

    #[test]
    fn insert_then_delete_neither_existed_nor_exists() {
        let (p, _) = merge(vec![raw(Op::Insert, 1), raw(Op::Delete, 1)]);
        assert_eq!((p[0].existed, p[0].exists), (false, false));
        assert_eq!(decide::<i32>(&p[0], None, None), Decision::Nothing);
    }

    #[test]
    fn delete_then_insert_is_an_update() {
        let (p, _) = merge(vec![raw(Op::Delete, 1), raw(Op::Insert, 1)]);
        assert_eq!((p[0].existed, p[0].exists), (true, true));
    }

    #[test]
    fn the_first_deleted_data_of_a_row_is_kept() {
        let (p, _) = merge(vec![deleted("1", "first"), deleted("1", "second")]);
        assert_eq!(p[0].old.as_deref(), Some("first"));
    }

    #[test]
    fn truncates_and_unidentified_rows_ask_for_a_resync() {
        let mut unknown = raw(Op::Update, 1);
        unknown.key = None;
        let truncate = RawChange {
            table: "u",
            op: Op::Truncate,
            key: None,
            old: None,
        };
        let (p, resync) = merge(vec![unknown, truncate]);
        assert!(p.is_empty());
        assert_eq!(
            resync,
            [
                ("t", ResyncReason::Incomplete),
                ("u", ResyncReason::Truncated)
            ]
        );
    }

    #[test]
    fn decisions() {
        use ChangeKind::*;
        // Inserted: create with the row as read now; gone again by the time it is read: nothing.
        assert_eq!(
            decide(&pending(false, true), Some(&5), None),
            Decision::Publish(Create, None, Some(5))
        );
        assert_eq!(
            decide::<i32>(&pending(false, true), None, None),
            Decision::Nothing
        );
        // Updated without a previous state: update, old = new (it stays in its groups).
        assert_eq!(
            decide(&pending(true, true), Some(&5), None),
            Decision::Publish(Update, Some(5), Some(5))
        );
        // Deleted: delete with its data, or a resync when the data is not there.
        assert_eq!(
            decide(&pending(true, false), None, Some(&4)),
            Decision::Publish(Delete, Some(4), None)
        );
        assert_eq!(
            decide::<i32>(&pending(true, false), None, None),
            Decision::Resync
        );
        assert_eq!(
            decide(&pending(false, false), Some(&1), Some(&1)),
            Decision::Nothing
        );
    }
}
