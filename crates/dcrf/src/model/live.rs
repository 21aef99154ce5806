//! Live lists: `subscribe_list` / `unsubscribe_list` (DCRF's oldest request: a filtered list
//! that stays current).
//!
//! ```text
//! → {"action": "subscribe_list", "filters": {"done": false}, "ordering": "-id", "request_id": 7}
//! ← {"errors": [], "data": {"results": [...], "position": P}, "action": "subscribe_list",
//!    "response_status": 201, "request_id": 7, "position": P}
//! ← {"data": <row>, "action": "create", "response_status": 200, "request_id": 7, "position": …}
//! ← {"data": <row>, "action": "update", "response_status": 200, "request_id": 7, "position": …}
//! ← {"data": {"pk": 3, "id": 3}, "action": "delete", "response_status": 204, "request_id": 7, …}
//! ```
//!
//! The stream of a live list is its consumer's list observer (`"{table}.list"`, one group):
//! every committed change of the table, with the row before and after. Each subscription
//! decides per change, in memory, from its `filters` and
//! [`in_queryset`](super::ModelConsumer::in_queryset): a row that enters the filtered set is a
//! `create`, one that changes inside it an `update`, one that leaves it (deleted, or updated
//! out of it) a `delete` whose data holds its primary key (under `pk`, under its column name,
//! and under the lookup field). Changes outside the set send nothing. A change whose previous
//! state is unknown (change capture) is an `update` when the row is in the set now, and a
//! `delete` otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use sea_orm::sea_query::value::sea_value_to_json_value;
use sea_orm::{EntityName, QuerySelect};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ModelActions, ModelConsumer, ModelOf, db, list_query, pagination};
use crate::change::Object;
use crate::channel::{GroupMessage, Position};
use crate::consumer::{Ctx, Event, Reply, could_receive, may_receive};
use crate::error::{ApiError, Error};
use crate::observer::{ErasedObserver, Observer};
use crate::protocol::Frame;
use crate::sync::lock;

/// The most rows a live list's snapshot holds when the consumer's pagination sets no
/// `max_limit`.
pub const DEFAULT_LIVE_LIST_MAX: u64 = 1000;

/// One change as a live list sees it: the row before and after (either may be absent).
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound(
    serialize = "M: Serialize",
    deserialize = "M: serde::de::DeserializeOwned"
))]
pub(crate) struct ListChange<M> {
    old: Option<M>,
    new: Option<M>,
}

/// The list observer of a model consumer: one message per committed change of its table, to
/// one group, with the row before and after and the row as the consumer's `Output`.
pub(crate) struct ListObserver<C: ModelConsumer> {
    observer: Observer,
    _consumer: std::marker::PhantomData<fn() -> C>,
}

impl<C: ModelConsumer> ErasedObserver for ListObserver<C> {
    fn id(&self) -> &str {
        self.observer.id()
    }

    fn messages(
        &self,
        old: Option<&Object>,
        new: Option<&Object>,
    ) -> Result<Vec<GroupMessage>, Error> {
        let old = old.and_then(|o| o.downcast_ref::<ModelOf<C>>()).cloned();
        let new = new.and_then(|o| o.downcast_ref::<ModelOf<C>>()).cloned();
        let Some(any) = new.as_ref().or(old.as_ref()) else {
            return Ok(Vec::new());
        };
        let pk = db::pk_json::<C::Entity>(any);
        let action = match (&old, &new) {
            (_, None) => "delete",
            (None, Some(_)) => "create",
            (Some(_), Some(_)) => "update",
        };
        let body = match &new {
            Some(m) => serde_json::to_string(&C::Output::from(m.clone()))?,
            None => "null".to_owned(),
        };
        let change = ListChange { old, new };
        let json = if self.observer.layer().is_remote() {
            Some(RawValue::from_string(serde_json::to_string(&change)?)?.into())
        } else {
            None
        };
        let pk = RawValue::from_string(pk.to_string())?;
        Ok(vec![
            GroupMessage::new(
                self.observer.id().into(),
                self.observer.group(""),
                action.into(),
                RawValue::from_string(body)?.into(),
            )
            .with_object(Some(Arc::new(change) as Object), json)
            .with_pk(Some(pk.into())),
        ])
    }
}

/// The list observer of a consumer, registered on its database.
pub(crate) fn list_observer<C: ModelConsumer>(c: &C) -> Arc<ListObserver<C>> {
    let id = c.list_observer_id();
    let db = c.db();
    let table = <C::Entity as Default>::default().table_name();
    db.observers().register_erased(
        table,
        &id,
        || {
            Arc::new(ListObserver {
                observer: Observer::new(db.layer(), &id),
                _consumer: std::marker::PhantomData,
            })
        },
        Arc::new(|json: &str| {
            serde_json::from_str::<ListChange<ModelOf<C>>>(json)
                .ok()
                .map(|c| Arc::new(c) as Object)
        }),
    )
}

/// One live list of a connection: its filters, and its frame (to take a new snapshot).
struct Spec<C: ModelConsumer> {
    filters: pagination::Filters<C::Entity>,
    frame: String,
}

/// The live lists of a connection, by request id.
struct LiveLists<C: ModelConsumer>(Arc<Mutex<HashMap<String, Arc<Spec<C>>>>>);

impl<C: ModelConsumer> Clone for LiveLists<C> {
    fn clone(&self) -> Self {
        LiveLists(self.0.clone())
    }
}

fn lists<C: ModelConsumer>(ctx: &Ctx) -> LiveLists<C> {
    match ctx.extension::<LiveLists<C>>() {
        Some(l) => l,
        None => {
            let l = LiveLists(Arc::new(Mutex::new(HashMap::new())));
            ctx.insert_extension(l.clone());
            l
        }
    }
}

impl<C: ModelConsumer> Spec<C> {
    fn matches(&self, row: &ModelOf<C>) -> bool {
        use sea_orm::ModelTrait;
        self.filters.iter().all(|(column, value)| {
            let actual = row.get(*column);
            match value {
                None => sea_value_to_json_value(&actual).is_null(),
                Some(v) => &actual == v,
            }
        })
    }
}

/// The most rows a consumer's live list may hold in its snapshot.
fn max_rows<C: ModelConsumer>(c: &C) -> u64 {
    c.pagination()
        .and_then(|p| p.max_limit)
        .unwrap_or(DEFAULT_LIVE_LIST_MAX)
}

/// `{"results": [...], "position": P}` (or only the position when history was recovered).
#[derive(Serialize)]
struct Snapshot<T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    results: Option<Vec<T>>,
    position: Option<Position>,
}

/// The rows of a live list now (capped: a larger set is a 400).
async fn snapshot<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Vec<Box<RawValue>>, ApiError> {
    let max = max_rows(c);
    let query = list_query(c, ctx, frame)?.limit(max + 1);
    let rows =
        pagination::fetch_rows::<C>(c.db(), query, Some(max + 1), ctx.guard().max_reply()).await?;
    if rows.len() as u64 > max {
        return Err(ApiError::bad_request(format!(
            "This list has more than {max} rows; a live list holds at most {max}. \
             Narrow it with filters."
        )));
    }
    Ok(rows)
}

/// `subscribe_list`: the snapshot and its position, then a push per change of the set.
pub(crate) async fn subscribe_list<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Reply<Box<RawValue>>, ApiError> {
    let rid = super::subscription_request_id(frame)?;
    crate::consumer::since(frame)?;
    // The same rules as `list`: checked before subscribing.
    list_query(c, ctx, frame)?;
    let filters = pagination::parse_filters::<C::Entity>(frame, c.filter_fields())?;
    if !could_receive(ctx, None, &["create", "update", "delete"]).await {
        return Err(ApiError::permission_denied());
    }
    let spec = Arc::new(Spec::<C> {
        filters,
        frame: frame_text(frame),
    });
    lock(&lists::<C>(ctx).0).insert(rid.get().to_owned(), spec);
    let observer = list_observer(c);
    // The position first, then the snapshot: every change after the position is pushed.
    let joined = match observer.observer.subscribe(ctx, "", Some(rid)).await {
        Ok(joined) => joined,
        Err(e) => {
            forget(c, ctx, rid);
            return Err(e);
        }
    };
    let results = if joined.recovered == Some(true) {
        None
    } else {
        match snapshot(c, ctx, frame).await {
            Ok(rows) => Some(rows),
            Err(e) => {
                forget(c, ctx, rid);
                return Err(e);
            }
        }
    };
    let data = serde_json::value::to_raw_value(&Snapshot {
        results,
        position: joined.position,
    })
    .map_err(ApiError::internal)?;
    Ok(Reply::with_status(data, StatusCode::CREATED))
}

/// The frame again as JSON text (kept to take the list's snapshot again on a resync).
fn frame_text(frame: &Frame<'_>) -> String {
    let mut map = serde_json::Map::new();
    for (name, value) in frame.fields() {
        if let Ok(v) = serde_json::from_str(value.get()) {
            map.insert(name.to_owned(), v);
        }
    }
    serde_json::Value::Object(map).to_string()
}

fn forget<C: ModelConsumer>(c: &C, ctx: &Ctx, rid: &RawValue) {
    lock(&lists::<C>(ctx).0).remove(rid.get());
    list_observer(c).observer.unsubscribe(ctx, "", Some(rid));
}

/// `unsubscribe_list`: stops the live list of this request id (all of them without one).
pub(crate) async fn unsubscribe_list<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    frame: &Frame<'_>,
) -> Result<Reply<()>, ApiError> {
    match frame.request_id().filter(|r| r.get() != "null") {
        Some(rid) => forget(c, ctx, rid),
        None => {
            lock(&lists::<C>(ctx).0).clear();
            list_observer(c).observer.unsubscribe(ctx, "", None);
        }
    }
    Ok(Reply::no_content())
}

/// Is the row in this live list (filters, then the connection's queryset)?
async fn in_list<C: ModelConsumer>(c: &C, ctx: &Ctx, spec: &Spec<C>, row: &ModelOf<C>) -> bool {
    spec.matches(row) && c.in_queryset(ctx, row).await
}

/// `{"pk": 3, "id": 3}` (and the lookup field, when it is another column).
fn delete_body<C: ModelConsumer>(c: &C, row: &ModelOf<C>) -> Option<Box<RawValue>> {
    use sea_orm::{IdenStatic, ModelTrait};
    let pk = db::pk_json::<C::Entity>(row);
    let mut map = serde_json::Map::new();
    map.insert("pk".into(), pk.clone());
    let column = super::primary_key_column::<C::Entity>();
    map.insert(column.as_str().to_owned(), pk);
    let lookup = c.lookup_field();
    if lookup != "pk"
        && let Some(col) = super::column_named::<C::Entity>(lookup)
    {
        map.insert(lookup.to_owned(), sea_value_to_json_value(&row.get(col)));
    }
    RawValue::from_string(serde_json::Value::Object(map).to_string()).ok()
}

/// Pushes a live-list event to each list it concerns; false for events of other observers.
#[doc(hidden)]
pub async fn handle_list_event<C: ModelConsumer>(c: &C, ctx: &Ctx, event: &Event<'_>) -> bool {
    if !c.actions().contains(ModelActions::SUBSCRIBE_LIST)
        || event.observer() != c.list_observer_id()
    {
        return false;
    }
    let specs: Vec<(&RawValue, Option<Arc<Spec<C>>>)> = {
        let lists = lists::<C>(ctx);
        let lists = lock(&lists.0);
        event
            .request_ids
            .iter()
            .map(|rid| (&**rid, lists.get(rid.get()).cloned()))
            .collect()
    };
    if event.is_resync() {
        for (rid, spec) in specs {
            let Some(spec) = spec else { continue };
            resync_list(c, ctx, rid, &spec, event).await;
        }
        return true;
    }
    let Some(change) = event.object::<ListChange<ModelOf<C>>>() else {
        tracing::warn!(
            connection = ctx.connection_id(),
            observer = event.observer(),
            "live-list push without its rows (not decodable on this node): not sent"
        );
        return true;
    };
    for (rid, spec) in specs {
        let Some(spec) = spec else { continue };
        let was = match &change.old {
            Some(old) => Some(in_list(c, ctx, &spec, old).await),
            None if event.action() == "create" => Some(false),
            None => None,
        };
        let is = match &change.new {
            Some(new) => in_list(c, ctx, &spec, new).await,
            None => false,
        };
        let action = match (was, is) {
            (Some(true), true) | (None, true) => "update",
            (Some(false), true) => "create",
            (Some(true), false) | (None, false) => "delete",
            (Some(false), false) => continue,
        };
        if action != event.action() && !may_receive(ctx, action, event.message.pk.as_deref()).await
        {
            continue;
        }
        if action == "delete" {
            let Some(row) = change.old.as_ref().or(change.new.as_ref()) else {
                continue;
            };
            if let Some(body) = delete_body(c, row) {
                let _ = ctx
                    .push(action, Some(rid), &body, StatusCode::NO_CONTENT)
                    .await;
            }
        } else {
            let _ = ctx
                .push(action, Some(rid), event.body(), StatusCode::OK)
                .await;
        }
    }
    true
}

/// A live list missed changes: a new snapshot, as a `resync` push.
async fn resync_list<C: ModelConsumer>(
    c: &C,
    ctx: &Ctx,
    rid: &RawValue,
    spec: &Spec<C>,
    event: &Event<'_>,
) {
    let Ok(frame) = Frame::parse(&spec.frame) else {
        return;
    };
    match snapshot(c, ctx, &frame).await {
        Ok(rows) => {
            let data = Snapshot {
                results: Some(rows),
                position: event.position().cloned(),
            };
            let _ = ctx
                .reply(event.action(), Some(rid), &data, StatusCode::OK)
                .await;
        }
        Err(e) => {
            let _ = ctx.send_error(&e, Some(event.action()), Some(rid)).await;
        }
    }
}
