//! The change record: what happened to one object in a committed transaction, and the narrow
//! interface through which the write path hands changes on.
//!
//! This module is the bottom of the framework: it knows nothing of databases, sockets or
//! channel layers. The write path ([`Txn`](crate::model::Txn)) and change capture produce
//! [`Change`]s; a [`ChangeSink`] (the [observer registry](crate::observer::Observers)) turns
//! them into group messages after commit.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;

/// A typed object carried in-process beside its serialized form (the model instance of a
/// change), so handlers can check permissions without a database read.
pub type Object = Arc<dyn Any + Send + Sync>;

/// What happened to an object in a committed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// It was inserted (or it entered a group).
    Create,
    /// It was updated (and stayed in the group).
    Update,
    /// It was deleted (or it left a group).
    Delete,
}

impl ChangeKind {
    /// `"create"`, `"update"` or `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Update => "update",
            ChangeKind::Delete => "delete",
        }
    }
}

/// One object's committed change: its table, what happened, and its state before and after
/// (`old` is `None` for a create, `new` is `None` for a delete).
#[derive(Clone)]
pub struct Change {
    /// The table the object lives in.
    pub table: &'static str,
    /// What happened.
    pub kind: ChangeKind,
    /// The object before the transaction, when it existed and is known.
    pub old: Option<Object>,
    /// The object after the transaction, unless it was deleted.
    pub new: Option<Object>,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Change")
            .field("table", &self.table)
            .field("kind", &self.kind)
            .field("old", &self.old.is_some())
            .field("new", &self.new.is_some())
            .finish()
    }
}

/// Where committed changes go. The observer registry implements it; the write path and
/// change capture only see this trait.
pub trait ChangeSink: Send + Sync + 'static {
    /// Does anything observe this table? Unobserved tables record no changes.
    fn observes(&self, table: &str) -> bool;

    /// Publishes one committed change to whoever observes its table.
    fn publish<'a>(&'a self, change: &'a Change) -> BoxFuture<'a, ()>;

    /// Changes of `table` may have been lost (change capture could not see or carry them):
    /// the streams of its observers restart at a new epoch, so their subscribers are told to
    /// resync.
    fn resync<'a>(&'a self, table: &'a str) -> BoxFuture<'a, ()>;
}

/// The changes of one transaction, one entry per object, merged as they are recorded so that
/// each object is published once with its final state.
///
/// | earlier | then | published |
/// |---|---|---|
/// | create | update | create (the final row) |
/// | create | delete | nothing |
/// | update | update | update (first `old`, last `new`) |
/// | update | delete | delete (first `old`) |
/// | delete | create | update (first `old`, last `new`) |
/// | any other | `k` | `k` with the later states |
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "model"), allow(dead_code))]
pub(crate) struct ChangeSet {
    changes: Vec<Option<RowChange>>,
    index: HashMap<(&'static str, String), usize>,
}

/// A change and a hash of its row's primary key: the write path keeps the publish order of
/// the changes of each row (of each table), and tells rows apart by this hash.
#[derive(Debug)]
#[cfg_attr(not(feature = "model"), allow(dead_code))]
pub(crate) struct RowChange {
    /// A hash of the primary key (as JSON text); the same for the same row in this process.
    pub(crate) row: u64,
    /// The change.
    pub(crate) change: Change,
}

#[cfg_attr(not(feature = "model"), allow(dead_code))]
impl RowChange {
    /// The change of `table`'s row whose primary key hashes to `row`.
    pub(crate) fn new(
        row: u64,
        table: &'static str,
        kind: ChangeKind,
        old: Option<Object>,
        new: Option<Object>,
    ) -> Self {
        RowChange {
            row,
            change: Change {
                table,
                kind,
                old,
                new,
            },
        }
    }
}

/// The hash of [`RowChange::row`].
#[cfg_attr(not(feature = "model"), allow(dead_code))]
fn row_hash(pk: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pk.hash(&mut hasher);
    hasher.finish()
}

#[cfg_attr(not(feature = "model"), allow(dead_code))]
impl ChangeSet {
    /// Records a change of the object `key` = (table, primary key as JSON text).
    pub(crate) fn record(
        &mut self,
        key: (&'static str, String),
        kind: ChangeKind,
        old: Option<Object>,
        new: Option<Object>,
    ) {
        let table = key.0;
        let row = row_hash(&key.1);
        if let Some(&i) = self.index.get(&key) {
            let merged = match self.changes[i].take().map(|c| c.change) {
                None => Some((kind, old, new)),
                Some(prev) => match (prev.kind, kind) {
                    (ChangeKind::Create, ChangeKind::Update) => {
                        Some((ChangeKind::Create, None, new))
                    }
                    (ChangeKind::Create, ChangeKind::Delete) => None,
                    (ChangeKind::Update, ChangeKind::Update) => {
                        Some((ChangeKind::Update, prev.old, new))
                    }
                    (ChangeKind::Update, ChangeKind::Delete) => {
                        Some((ChangeKind::Delete, prev.old, None))
                    }
                    (ChangeKind::Delete, ChangeKind::Create) => {
                        Some((ChangeKind::Update, prev.old, new))
                    }
                    (_, kind) => Some((kind, old, new)),
                },
            };
            self.changes[i] =
                merged.map(|(kind, old, new)| RowChange::new(row, table, kind, old, new));
            return;
        }
        self.index.insert(key, self.changes.len());
        self.changes
            .push(Some(RowChange::new(row, table, kind, old, new)));
    }

    /// The merged changes, in the order their objects were first changed.
    pub(crate) fn into_changes(self) -> impl Iterator<Item = RowChange> {
        self.changes.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: i32) -> Option<Object> {
        Some(Arc::new(v))
    }

    fn val(o: &Option<Object>) -> Option<i32> {
        o.as_ref().and_then(|o| o.downcast_ref::<i32>().copied())
    }

    fn key(pk: &str) -> (&'static str, String) {
        ("t", pk.to_owned())
    }

    /// (kind, old, new) of each published change.
    fn run(
        steps: &[(ChangeKind, Option<i32>, Option<i32>)],
    ) -> Vec<(ChangeKind, Option<i32>, Option<i32>)> {
        let mut set = ChangeSet::default();
        for (kind, old, new) in steps {
            set.record(key("1"), *kind, old.and_then(obj), new.and_then(obj));
        }
        set.into_changes()
            .map(|c| (c.change.kind, val(&c.change.old), val(&c.change.new)))
            .collect()
    }

    use ChangeKind::{Create, Delete, Update};

    #[test]
    fn a_single_change_is_kept() {
        assert_eq!(run(&[(Create, None, Some(1))]), [(Create, None, Some(1))]);
        assert_eq!(
            run(&[(Update, Some(1), Some(2))]),
            [(Update, Some(1), Some(2))]
        );
        assert_eq!(run(&[(Delete, Some(1), None)]), [(Delete, Some(1), None)]);
    }

    #[test]
    fn create_then_updates_is_one_create_with_the_final_row() {
        let steps = [
            (Create, None, Some(1)),
            (Update, Some(1), Some(2)),
            (Update, Some(2), Some(3)),
        ];
        assert_eq!(run(&steps), [(Create, None, Some(3))]);
    }

    #[test]
    fn create_then_delete_is_nothing() {
        assert_eq!(run(&[(Create, None, Some(1)), (Delete, Some(1), None)]), []);
    }

    #[test]
    fn create_delete_create_is_a_create() {
        let steps = [
            (Create, None, Some(1)),
            (Delete, Some(1), None),
            (Create, None, Some(5)),
        ];
        assert_eq!(run(&steps), [(Create, None, Some(5))]);
    }

    #[test]
    fn updates_keep_the_first_old_and_the_last_new() {
        let steps = [(Update, Some(1), Some(2)), (Update, Some(2), Some(3))];
        assert_eq!(run(&steps), [(Update, Some(1), Some(3))]);
    }

    #[test]
    fn update_then_delete_is_a_delete_of_the_first_state() {
        let steps = [(Update, Some(1), Some(2)), (Delete, Some(2), None)];
        assert_eq!(run(&steps), [(Delete, Some(1), None)]);
    }

    #[test]
    fn delete_then_create_is_an_update() {
        let steps = [(Delete, Some(1), None), (Create, None, Some(2))];
        assert_eq!(run(&steps), [(Update, Some(1), Some(2))]);
    }

    #[test]
    fn objects_are_kept_apart_and_in_first_change_order() {
        let mut set = ChangeSet::default();
        set.record(key("2"), Create, None, obj(20));
        set.record(key("1"), Update, obj(1), obj(10));
        set.record(("other", "2".into()), Delete, obj(99), None);
        set.record(key("2"), Update, obj(20), obj(21));
        let out: Vec<_> = set
            .into_changes()
            .map(|c| (c.change.table, c.change.kind, val(&c.change.new)))
            .collect();
        assert_eq!(
            out,
            [
                ("t", Create, Some(21)),
                ("t", Update, Some(10)),
                ("other", Delete, None)
            ]
        );
    }
}
