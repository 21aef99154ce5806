//! The statement of a point read, rendered once.
//!
//! `retrieve` (and every other read of one object outside a transaction) runs
//! `get_queryset`, then `filter_queryset`, then `WHERE <lookup column> = ?`, and renders that
//! query to SQL. For a consumer that overrides neither queryset hook the SQL is the same on
//! every request, only the looked-up value changes, yet building and rendering it cost about
//! as much as the SQLite read itself. So it is rendered once per consumer type, lookup field
//! and backend, and run again with the new value.
//!
//! Whether a consumer overrides a hook is known without asking anyone: the default bodies of
//! [`ModelConsumer::get_queryset`] and [`ModelConsumer::filter_queryset`] record their
//! consumer type when they run ([`default_hooks`]). A consumer type whose defaults have not
//! been seen (an override, or simply its first request on this thread) builds its query the
//! long way, exactly as before.

use std::any::TypeId;
use std::cell::RefCell;
use std::sync::Arc;

use sea_orm::{DbBackend, QuerySelect, QueryTrait, Select, Statement, Value};

use super::ModelConsumer;
use super::default_hooks::{self, Hook};

/// The hooks whose defaults make a consumer's point read the same SQL on every request.
pub(crate) const QUERYSET_HOOKS: [Hook; 2] = [Hook::GetQueryset, Hook::FilterQueryset];

thread_local! {
    /// This thread's rendered point reads (a handful: one per consumer type and backend).
    static POINT_READS: RefCell<Vec<(Key, Arc<PointRead>)>> = const { RefCell::new(Vec::new()) };
}

/// A point read's identity: the consumer type, its lookup field, the backend.
#[derive(Clone, Copy, PartialEq)]
struct Key {
    consumer: TypeId,
    field: &'static str,
    backend: DbBackend,
}

/// The query of `SELECT … WHERE <lookup column> = ?` for one consumer type, lookup field and
/// backend, over the consumer's default queryset.
#[derive(Debug)]
pub(crate) struct PointRead {
    /// The select without `LIMIT`, for SQLite's inline reader (a bound `LIMIT` would make
    /// SQLite plan the statement again per value); its only parameter is the looked-up value.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) inline_sql: Option<String>,
    /// The select with `LIMIT 1`; its first parameter is the looked-up value.
    limited: Statement,
}

impl PointRead {
    /// The `LIMIT 1` statement with `value` looked up.
    pub(crate) fn limited_with(&self, value: Value) -> Statement {
        let mut statement = self.limited.clone();
        if let Some(values) = statement.values.as_mut() {
            values.0[0] = value;
        }
        statement
    }
}

/// The rendered point read of consumer `C` by its lookup `field` on `backend`, if there is
/// one. Without it the caller builds the query and offers it to [`remember`].
pub(crate) fn cached<C: ModelConsumer>(
    field: &'static str,
    backend: DbBackend,
) -> Option<Arc<PointRead>> {
    let key = Key {
        consumer: TypeId::of::<C>(),
        field,
        backend,
    };
    POINT_READS.with(|reads| {
        let reads = reads.borrow();
        reads
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, r)| r.clone())
    })
}

/// Renders `query`, the point read of consumer `C` that looks `value` up by `field`, just
/// built through its queryset hooks, for [`cached`] to give out from now on; but only when
/// both hooks `C` ran were the defaults, so that every later request would build the same
/// SQL. A rendering that does not take `value` as its first parameter, with only the limit
/// after it, is not kept.
pub(crate) fn remember<C: ModelConsumer>(
    field: &'static str,
    backend: DbBackend,
    query: &Select<C::Entity>,
    value: &Value,
) {
    if !default_hooks::kept::<C>(&QUERYSET_HOOKS) {
        return;
    }
    let limited = query.clone().limit(1).build(backend);
    let values = limited.values.as_ref().map_or(&[][..], |v| &v.0[..]);
    if values.len() != 2 || &values[0] != value {
        return;
    }
    let inline_sql = (backend == DbBackend::Sqlite)
        .then(|| query.build(backend))
        .filter(|s| s.values.as_ref().is_some_and(|v| v.0.len() == 1))
        .map(|s| s.sql);
    let key = Key {
        consumer: TypeId::of::<C>(),
        field,
        backend,
    };
    let read = Arc::new(PointRead {
        inline_sql,
        limited,
    });
    POINT_READS.with(|reads| {
        let mut reads = reads.borrow_mut();
        if !reads.iter().any(|(k, _)| *k == key) {
            reads.push((key, read));
        }
    });
}

#[cfg(test)]
pub(super) mod tests {
    use sea_orm::entity::prelude::*;
    use serde::Deserialize;

    use super::*;
    use crate::model::Db;

    /// A table of the unit tests of `model`.
    pub(in crate::model) mod item {
        use sea_orm::entity::prelude::*;

        #[derive(
            Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, serde::Deserialize,
        )]
        #[sea_orm(table_name = "item")]
        pub struct Model {
            #[sea_orm(primary_key)]
            pub id: i32,
            pub name: String,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    #[derive(Deserialize, garde::Validate, DeriveIntoActiveModel)]
    #[sea_orm(active_model = "item::ActiveModel")]
    struct ItemInput {
        #[garde(skip)]
        name: String,
    }

    /// Two consumer types of the same entity, so that each test sees only its own records.
    macro_rules! consumer {
        ($name:ident) => {
            struct $name {
                db: Db,
            }

            impl crate::model::ModelConsumer for $name {
                type Entity = item::Entity;
                type Output = item::Model;
                type Input = ItemInput;

                fn db(&self) -> &Db {
                    &self.db
                }
            }
        };
    }
    consumer!(Renders);
    consumer!(Waits);

    async fn db() -> Db {
        Db::connect("sqlite::memory:").await.unwrap()
    }

    /// What `read_object` does on a miss: the query the default hooks build is offered to
    /// `remember`, then the cache is asked again.
    fn offer<C: crate::model::ModelConsumer<Entity = item::Entity>>(
        field: &'static str,
        column: item::Column,
        value: &Value,
        backend: DbBackend,
    ) -> Option<Arc<PointRead>> {
        let query = item::Entity::find().filter(column.eq(value.clone()));
        remember::<C>(field, backend, &query, value);
        cached::<C>(field, backend)
    }

    #[tokio::test]
    async fn renders_once_both_defaults_were_seen() {
        let c = Renders { db: db().await };
        let backend = c.db.backend();
        let value = Value::Int(Some(7));
        assert!(offer::<Renders>("pk", item::Column::Id, &value, backend).is_none());
        default_hooks::saw::<Renders>(Hook::GetQueryset);
        default_hooks::saw::<Renders>(Hook::FilterQueryset);
        let read = offer::<Renders>("pk", item::Column::Id, &value, backend).unwrap();
        let query = item::Entity::find().filter(item::Column::Id.eq(7));
        assert_eq!(
            read.inline_sql.as_deref(),
            Some(query.clone().build(backend).sql.as_str())
        );
        let limited = read.limited_with(Value::Int(Some(9)));
        let expected = item::Entity::find()
            .filter(item::Column::Id.eq(9))
            .limit(1)
            .build(backend);
        assert_eq!(limited, expected);
        // Once rendered it is reused, and other fields and backends are rendered apart.
        let again = cached::<Renders>("pk", backend).unwrap();
        assert!(Arc::ptr_eq(&read, &again));
        let name = Value::String(Some("x".into()));
        let by_name = offer::<Renders>("name", item::Column::Name, &name, backend).unwrap();
        assert!(by_name.limited.sql.contains(r#""name" = ?"#));
        let pg = offer::<Renders>("pk", item::Column::Id, &value, DbBackend::Postgres);
        let pg = pg.unwrap();
        assert!(pg.inline_sql.is_none());
        assert!(
            pg.limited.sql.contains(r#""id" = $1"#),
            "{}",
            pg.limited.sql
        );
    }

    #[tokio::test]
    async fn one_default_is_not_enough() {
        let c = Waits { db: db().await };
        let backend = c.db.backend();
        let value = Value::Int(Some(1));
        default_hooks::saw::<Waits>(Hook::GetQueryset);
        assert!(offer::<Waits>("pk", item::Column::Id, &value, backend).is_none());
        // Another consumer type's defaults say nothing about this one.
        default_hooks::saw::<Renders>(Hook::FilterQueryset);
        assert!(offer::<Waits>("pk", item::Column::Id, &value, backend).is_none());
        default_hooks::saw::<Waits>(Hook::FilterQueryset);
        assert!(offer::<Waits>("pk", item::Column::Id, &value, backend).is_some());
    }
}
