//! Observers and subscriptions: DCRF's `@observer` and `@model_observer`.
//!
//! An [`Observer`] is a named source of events sent to groups through the
//! [`ChannelLayer`]. A
//! connection subscribes to one of its groups with a key (DCRF's `groups_for_consumer`) and an
//! optional `request_id`; each event then reaches the consumer's
//! [`on_event`](crate::Consumer::on_event) with the request ids subscribed to the group it came
//! through. The default handler pushes
//! `{"errors": [], "data": <body>, "action": <action>, "response_status": 200, "request_id": <id>}`
//! once per request id.
//!
//! A [`ModelObserver`] turns committed database changes into events: it is registered in the
//! [`Observers`] registry (through [`Db::observe`](crate::model::Db::observe) for a sea-orm
//! entity), and every change made through a [`Txn`](crate::model::Txn) is
//! offered to it **after commit**, once per object per transaction, with the object's final
//! state. Its `group_by` function (DCRF's `groups_for_signal`) places an object in groups; an
//! object that moves between groups yields `delete` for the groups it left, `update` for those
//! it stayed in, and `create` for those it entered. Its body is serialized once per event, not
//! per subscriber.
//!
//! # Who receives a push
//!
//! One rule, the same for instance subscriptions (`subscribe_instance`) and for the groups of
//! model observers:
//!
//! - **At push time**, every event is offered to the connection's permissions as an action named
//!   after the event (`create`, `update`, `delete`, or an observer's own word) on
//!   `{"pk": <the object's primary key>}` (`{}` for events without an object), with
//!   [`Frame::reads`](crate::Frame::reads) true: a push delivers data, it changes nothing, so
//!   `IsAuthenticatedOrReadOnly` lets it through while a permission that refuses `update` by name
//!   also refuses update pushes (as DCRF did). A refused push is not sent. Instance pushes are then
//!   checked against the object: `has_object_permission(ctx, "retrieve", object)` (refused: not
//!   sent) and `in_queryset` (outside: a 404 frame).
//! - **At subscribe time**, a subscription that could never receive a push is refused with 403
//!   instead of succeeding silently: [`ModelObserver::subscribe`] when none of `create`, `update`,
//!   `delete` would pass, `subscribe_instance` when neither `update` nor `delete` would. The
//!   subscribe action itself is permission-checked like any action (as a read).
//!
//! Generic observers ([`Observer::send`]) follow the push-time rule; what they push is yours, so
//! their subscribe helper cannot tell in advance.
//!
//! ```
//! # async fn f() -> Result<(), dcrf::Error> {
//! use dcrf::model::Db;
//! # mod todo {
//! #     use sea_orm::entity::prelude::*;
//! #     #[derive(Clone, Debug, PartialEq, DeriveEntityModel, serde::Serialize, serde::Deserialize)]
//! #     #[sea_orm(table_name = "todo")]
//! #     pub struct Model { #[sea_orm(primary_key)] pub id: i32, pub owner: String }
//! #     #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
//! #     pub enum Relation {}
//! #     impl ActiveModelBehavior for ActiveModel {}
//! # }
//! let db = Db::connect("sqlite::memory:").await?;
//! // Every todo, grouped by owner; the body is the whole row.
//! let by_owner = db.observe::<todo::Entity>("todos-by-owner")
//!     .group_by(|t: &todo::Model| vec![t.owner.clone()])
//!     .serialize(|t: &todo::Model, _| t.clone());
//! // In an action: by_owner.subscribe(ctx, "alice", request_id).await?;
//! # let _ = by_owner;
//! # Ok(()) }
//! ```

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use futures_util::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

pub use crate::change::ChangeKind;
use crate::change::{Change, ChangeSink, Object};
pub(crate) use crate::channel::Decoder;
use crate::channel::{ChannelLayer, GroupMessage};
use crate::consumer::{Ctx, Joined, could_receive};
use crate::error::{ApiError, Error};
use crate::sync::{lock, read, write};

/// A named source of events (DCRF's `@observer`): send to a group, subscribe connections.
#[derive(Clone, Debug)]
pub struct Observer {
    id: Arc<str>,
    layer: ChannelLayer,
}

impl Observer {
    /// An observer on a channel layer. The id names its groups; keep it unique and stable
    /// across nodes and deploys.
    pub fn new(layer: &ChannelLayer, id: &str) -> Observer {
        Observer {
            id: id.into(),
            layer: layer.clone(),
        }
    }

    /// The observer's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The full group name of a key: `"{id}:{key}"`.
    pub fn group(&self, key: &str) -> Arc<str> {
        format!("{}:{}", self.id, key).into()
    }

    /// Sends an event to the group of `key` now (not tied to a transaction).
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        key: &str,
        action: &str,
        body: &T,
    ) -> Result<(), Error> {
        let body = RawValue::from_string(serde_json::to_string(body)?)?;
        self.layer
            .group_send(GroupMessage::new(
                self.id.clone(),
                self.group(key),
                action.into(),
                body.into(),
            ))
            .await
    }

    /// Subscribes the connection to the group of `key`, remembering `request_id` (if any) for
    /// the pushes. Subscribing twice with the same request id is a no-op. Returns once the
    /// subscription is live on every node: a change committed after this returns reaches the
    /// connection.
    ///
    /// The action's reply gets the stream's `position`. When the frame carries
    /// `"since": {"epoch": …, "offset": n}`, the reply also gets `"recovered": true` and the
    /// pushes after `n` are sent right after the reply, or `"recovered": false` when the
    /// stream's history no longer holds them (a `since` that is not a position is one it cannot
    /// hold). See [delivery guarantees](crate::channel#delivery).
    ///
    /// Refused with a 400 error when the socket already holds its cap of subscriptions
    /// ([`Dcrf::max_subscriptions`](crate::Dcrf::max_subscriptions)) and this one is new.
    pub async fn subscribe(
        &self,
        ctx: &Ctx,
        key: &str,
        request_id: Option<&RawValue>,
    ) -> Result<Joined, ApiError> {
        let group = self.group(key);
        ctx.subscriptions()
            .join(ctx, &self.id, &group, request_id, &self.layer)
            .await
    }

    /// Unsubscribes: with a request id, removes that id from the group (the connection stays
    /// a member while other ids remain); without, leaves the group. Returns whether anything was
    /// subscribed under that key (and id): an unsubscribe with a request id that never
    /// subscribed removes nothing, and an action can answer so.
    pub fn unsubscribe(&self, ctx: &Ctx, key: &str, request_id: Option<&RawValue>) -> bool {
        let group = self.group(key);
        let (removed, leave) = ctx
            .subscriptions()
            .remove(&group, request_id.map(|r| r.get()));
        if leave {
            self.layer.group_discard(&group, ctx.connection_id());
        }
        removed
    }

    /// Removes `request_id` from every group of this observer on the connection (DCRF's
    /// `unsubscribe_instance` behaviour), leaving groups that have no id left.
    pub fn unsubscribe_request(&self, ctx: &Ctx, request_id: &RawValue) {
        for group in ctx
            .subscriptions()
            .remove_request(&self.id, request_id.get())
        {
            self.layer.group_discard(&group, ctx.connection_id());
        }
    }

    /// The channel layer the observer sends through.
    pub fn layer(&self) -> &ChannelLayer {
        &self.layer
    }
}

/// How a [`ModelObserver`] groups and serializes objects.
type GroupFn<M> = Arc<dyn Fn(&M) -> Vec<String> + Send + Sync>;
type SerializeFn<M> =
    Arc<dyn Fn(&M, ChangeKind) -> Result<String, serde_json::Error> + Send + Sync>;

/// Observes one table's committed changes (DCRF's `@model_observer`). Built by
/// [`Db::observe`](crate::model::Db::observe) (or [`Observers::register`]); shared as an
/// `Arc`.
pub struct ModelObserver<M> {
    pub(crate) observer: Observer,
    group_by: std::sync::RwLock<GroupFn<M>>,
    serializer: std::sync::RwLock<Option<SerializeFn<M>>>,
    pk: fn(&M) -> serde_json::Value,
}

impl<M> std::fmt::Debug for ModelObserver<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelObserver")
            .field("id", &self.observer.id)
            .finish_non_exhaustive()
    }
}

impl<M: Send + Sync + 'static> ModelObserver<M> {
    fn new(observer: Observer, pk: fn(&M) -> serde_json::Value) -> Self {
        ModelObserver {
            observer,
            group_by: std::sync::RwLock::new(Arc::new(|_: &M| vec![String::new()])),
            serializer: std::sync::RwLock::new(None),
            pk,
        }
    }

    /// Places objects in groups by key (DCRF's `groups_for_signal`). Default: one group,
    /// key `""`.
    pub fn group_by<F>(self: Arc<Self>, f: F) -> Arc<Self>
    where
        F: Fn(&M) -> Vec<String> + Send + Sync + 'static,
    {
        *write(&self.group_by) = Arc::new(f);
        self
    }

    /// The body of each event, computed and serialized once per event (DCRF's `.serializer`).
    /// Default: `{"pk": <primary key>}`. For `delete` it receives the object as it was.
    pub fn serialize<F, T>(self: Arc<Self>, f: F) -> Arc<Self>
    where
        F: Fn(&M, ChangeKind) -> T + Send + Sync + 'static,
        T: Serialize,
    {
        *write(&self.serializer) = Some(Arc::new(move |m: &M, kind| {
            serde_json::to_string(&f(m, kind))
        }));
        self
    }

    /// The observer (id, send, subscribe).
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Subscribes the connection to the group of `key` (see [`Observer::subscribe`]: the
    /// reply gets `position`, and `recovered` when the frame asks to resume with `since`).
    ///
    /// 403 when the connection could never receive one of its pushes: its permissions allow
    /// none of `create`, `update` and `delete` as a push (see
    /// [who receives a push](crate::observer#who-receives-a-push)).
    pub async fn subscribe(
        &self,
        ctx: &Ctx,
        key: &str,
        request_id: Option<&RawValue>,
    ) -> Result<Joined, ApiError> {
        if !could_receive(ctx, None, &["create", "update", "delete"]).await {
            return Err(ApiError::permission_denied());
        }
        self.observer.subscribe(ctx, key, request_id).await
    }

    /// Unsubscribes (see [`Observer::unsubscribe`]); returns whether anything was subscribed.
    pub fn unsubscribe(&self, ctx: &Ctx, key: &str, request_id: Option<&RawValue>) -> bool {
        self.observer.unsubscribe(ctx, key, request_id)
    }

    fn groups(&self, object: &M) -> Vec<String> {
        let f = read(&self.group_by).clone();
        f(object)
    }

    fn body(&self, object: &M, kind: ChangeKind) -> Result<Arc<RawValue>, Error> {
        let serializer = read(&self.serializer).clone();
        let text = match serializer {
            Some(f) => f(object, kind)?,
            None => serde_json::to_string(&serde_json::json!({ "pk": (self.pk)(object) }))?,
        };
        Ok(RawValue::from_string(text)?.into())
    }
}

impl<M> ModelObserver<M>
where
    M: Serialize + Send + Sync + 'static,
{
    /// The messages of one committed change: per group, `delete`/`update`/`create` by how
    /// the object moved, each body serialized once.
    pub(crate) fn messages(
        &self,
        old: Option<&Object>,
        new: Option<&Object>,
    ) -> Result<Vec<GroupMessage>, Error> {
        let old = old.and_then(|o| o.clone().downcast::<M>().ok());
        let new = new.and_then(|o| o.clone().downcast::<M>().ok());
        let old_groups = old.as_deref().map(|m| self.groups(m)).unwrap_or_default();
        let new_groups = new.as_deref().map(|m| self.groups(m)).unwrap_or_default();
        let remote = self.observer.layer().is_remote();
        // What every message about one object shares, built once per object, not per group.
        let encode = |object: &Arc<M>| -> Result<Encoded, Error> {
            let json = if remote {
                Some(RawValue::from_string(serde_json::to_string(&**object)?)?.into())
            } else {
                None
            };
            let pk = RawValue::from_string(serde_json::to_string(&(self.pk)(object))?)?.into();
            let object: Object = object.clone();
            Ok(Encoded { object, json, pk })
        };
        let mut out = Vec::new();
        let mut push = |key: &str, kind: ChangeKind, object: &Encoded, body: &Arc<RawValue>| {
            out.push(
                GroupMessage::new(
                    self.observer.id.clone(),
                    self.observer.group(key),
                    kind.as_str().into(),
                    body.clone(),
                )
                .with_object(Some(object.object.clone()), object.json.clone())
                .with_pk(Some(object.pk.clone())),
            );
        };
        if let Some(old) = &old {
            let left: Vec<&String> = old_groups
                .iter()
                .filter(|g| !new_groups.contains(g))
                .collect();
            if !left.is_empty() {
                let encoded = encode(old)?;
                let body = self.body(old, ChangeKind::Delete)?;
                for key in left {
                    push(key, ChangeKind::Delete, &encoded, &body);
                }
            }
        }
        if let Some(new) = &new {
            let (stayed, entered): (Vec<&String>, Vec<&String>) =
                new_groups.iter().partition(|g| old_groups.contains(g));
            if !stayed.is_empty() || !entered.is_empty() {
                let encoded = encode(new)?;
                if !stayed.is_empty() {
                    let body = self.body(new, ChangeKind::Update)?;
                    for key in stayed {
                        push(key, ChangeKind::Update, &encoded, &body);
                    }
                }
                if !entered.is_empty() {
                    let body = self.body(new, ChangeKind::Create)?;
                    for key in entered {
                        push(key, ChangeKind::Create, &encoded, &body);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The parts of a group message that depend only on its object.
struct Encoded {
    object: Object,
    /// The object as JSON, for other nodes (remote layers only).
    json: Option<Arc<RawValue>>,
    pk: Arc<RawValue>,
}

/// A model observer without its model type, as the commit path sees it.
pub(crate) trait ErasedObserver: Send + Sync {
    /// The observer's id (its groups are `"{id}:{key}"`).
    fn id(&self) -> &str;

    fn messages(
        &self,
        old: Option<&Object>,
        new: Option<&Object>,
    ) -> Result<Vec<GroupMessage>, Error>;
}

impl<M: Serialize + Send + Sync + 'static> ErasedObserver for ModelObserver<M> {
    fn id(&self) -> &str {
        self.observer.id()
    }

    fn messages(
        &self,
        old: Option<&Object>,
        new: Option<&Object>,
    ) -> Result<Vec<GroupMessage>, Error> {
        ModelObserver::messages(self, old, new)
    }
}

/// The observer registry of one application: the model observers by table and by id, and the
/// channel layer they publish to. It is the [`ChangeSink`] of the write path: each committed
/// change is offered to the observers of its table. Cheap to clone.
#[derive(Clone)]
pub struct Observers {
    inner: Arc<Registry>,
}

struct Registry {
    layer: ChannelLayer,
    by_table: RwLock<HashMap<&'static str, Vec<Arc<dyn ErasedObserver>>>>,
    by_id: RwLock<HashMap<String, Arc<dyn Any + Send + Sync>>>,
    /// Which Rust type owns an observer id that must not be shared (instance observers).
    #[cfg_attr(not(feature = "model"), allow(dead_code))]
    owners: Mutex<HashMap<String, (TypeId, &'static str)>>,
}

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observers")
            .field("layer", &self.inner.layer)
            .field("ids", &read(&self.inner.by_id).keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Observers {
    /// An empty registry publishing through `layer`.
    pub fn new(layer: ChannelLayer) -> Observers {
        Observers {
            inner: Arc::new(Registry {
                layer,
                by_table: RwLock::new(HashMap::new()),
                by_id: RwLock::new(HashMap::new()),
                owners: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The channel layer observers publish to.
    pub fn layer(&self) -> &ChannelLayer {
        &self.inner.layer
    }

    /// The model observer registered as `id`, if any (and if its model type is `M`).
    pub fn get<M: Send + Sync + 'static>(&self, id: &str) -> Option<Arc<ModelObserver<M>>> {
        read(&self.inner.by_id)
            .get(id)
            .cloned()
            .and_then(|a| a.downcast::<ModelObserver<M>>().ok())
    }

    /// Registers (or finds) the model observer `id` of `table`, whose objects are `M` with the
    /// primary key `pk`. [`Db::observe`](crate::model::Db::observe) calls this for an entity.
    ///
    /// # Panics
    ///
    /// If `id` is already registered for another model type: two observers cannot share a
    /// name, since the name is what their groups are called on every node.
    pub fn register<M>(
        &self,
        table: &'static str,
        id: &str,
        pk: fn(&M) -> serde_json::Value,
    ) -> Arc<ModelObserver<M>>
    where
        M: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let layer = &self.inner.layer;
        self.register_erased(
            table,
            id,
            || Arc::new(ModelObserver::new(Observer::new(layer, id), pk)),
            Arc::new(|json: &str| {
                serde_json::from_str::<M>(json)
                    .ok()
                    .map(|m| Arc::new(m) as Object)
            }),
        )
    }

    /// Registers an observer of `table` (a model observer, a live list's observer), with the
    /// decoder of its objects for messages from other nodes; returns the one already
    /// registered as `id` when there is one of type `T`.
    pub(crate) fn register_erased<T: ErasedObserver + 'static>(
        &self,
        table: &'static str,
        id: &str,
        make: impl FnOnce() -> Arc<T>,
        decoder: Decoder,
    ) -> Arc<T> {
        let mut by_id = write(&self.inner.by_id);
        if let Some(existing) = by_id.get(id) {
            return existing.clone().downcast::<T>().unwrap_or_else(|_| {
                panic!("the observer id {id:?} is already registered for another model")
            });
        }
        let observer = make();
        self.inner.layer.register_decoder(id.into(), decoder);
        by_id.insert(id.to_owned(), observer.clone());
        write(&self.inner.by_table)
            .entry(table)
            .or_default()
            .push(observer.clone());
        observer
    }

    /// Claims `id` for the Rust type `owner` (named `owner_name` in the message); panics when
    /// another type claimed it first. Model consumers claim their instance observer's id when
    /// mounted, so two consumers of one table cannot silently push each other's bodies.
    #[cfg_attr(not(feature = "model"), allow(dead_code))]
    pub(crate) fn claim(&self, id: &str, owner: TypeId, owner_name: &'static str) {
        let mut owners = lock(&self.inner.owners);
        match owners.get(id) {
            Some((first, first_name)) if *first != owner => panic!(
                "the consumers {first_name} and {owner_name} both use the instance observer \
                 {id:?}: give one of them its own `ModelConsumer::instance_observer_id`"
            ),
            Some(_) => {}
            None => {
                owners.insert(id.to_owned(), (owner, owner_name));
            }
        }
    }
}

impl ChangeSink for Observers {
    fn observes(&self, table: &str) -> bool {
        read(&self.inner.by_table).contains_key(table)
    }

    fn resync<'a>(&'a self, table: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let ids: Vec<String> = read(&self.inner.by_table)
                .get(table)
                .map(|v| v.iter().map(|o| o.id().to_owned()).collect())
                .unwrap_or_default();
            for id in ids {
                if let Err(e) = self.inner.layer.restart_streams(&format!("{id}:")).await {
                    tracing::error!(error = %e, table, observer = %id, "cannot restart the streams of an observer");
                }
            }
        })
    }

    fn publish<'a>(&'a self, change: &'a Change) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let observers = read(&self.inner.by_table)
                .get(change.table)
                .cloned()
                .unwrap_or_default();
            for observer in observers {
                match observer.messages(change.old.as_ref(), change.new.as_ref()) {
                    Ok(messages) => {
                        for message in messages {
                            if let Err(e) = self.inner.layer.group_send(message).await {
                                tracing::error!(error = %e, table = change.table, "cannot publish a change");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, table = change.table, "cannot serialize a change")
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
    struct Todo {
        id: i32,
        owner: String,
    }

    fn pk(t: &Todo) -> serde_json::Value {
        t.id.into()
    }

    fn obj(id: i32, owner: &str) -> Object {
        Arc::new(Todo {
            id,
            owner: owner.into(),
        })
    }

    /// (group, action, body) of each message.
    fn run(old: Option<Object>, new: Option<Object>) -> Vec<(String, String, String)> {
        let observers = Observers::new(ChannelLayer::memory());
        let o = observers
            .register::<Todo>("todo", "by-owner", pk)
            .group_by(|t: &Todo| vec![t.owner.clone()])
            .serialize(|t: &Todo, kind| format!("{}:{}", kind.as_str(), t.id));
        o.messages(old.as_ref(), new.as_ref())
            .unwrap()
            .into_iter()
            .map(|m| {
                (
                    m.group.to_string(),
                    m.action.to_string(),
                    m.body.get().to_owned(),
                )
            })
            .collect()
    }

    fn m(group: &str, action: &str, body: &str) -> (String, String, String) {
        (group.into(), action.into(), format!("\"{body}\""))
    }

    #[test]
    fn a_create_enters_the_groups_of_the_new_object() {
        assert_eq!(
            run(None, Some(obj(1, "ann"))),
            [m("by-owner:ann", "create", "create:1")]
        );
    }

    #[test]
    fn an_update_within_a_group_is_an_update() {
        assert_eq!(
            run(Some(obj(1, "ann")), Some(obj(1, "ann"))),
            [m("by-owner:ann", "update", "update:1")]
        );
    }

    #[test]
    fn moving_between_groups_deletes_from_the_old_and_creates_in_the_new() {
        assert_eq!(
            run(Some(obj(1, "ann")), Some(obj(1, "bob"))),
            [
                m("by-owner:ann", "delete", "delete:1"),
                m("by-owner:bob", "create", "create:1")
            ]
        );
    }

    #[test]
    fn a_delete_leaves_the_groups_of_the_old_object() {
        assert_eq!(
            run(Some(obj(1, "ann")), None),
            [m("by-owner:ann", "delete", "delete:1")]
        );
    }

    #[test]
    fn the_default_body_is_the_pk_and_the_default_group_is_one() {
        let observers = Observers::new(ChannelLayer::memory());
        let o = observers.register::<Todo>("todo", "all", pk);
        let out = o.messages(None, Some(&obj(7, "x"))).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].group, "all:");
        assert_eq!(out[0].body.get(), r#"{"pk":7}"#);
        assert!(
            out[0].object_json.is_none(),
            "no JSON copy on a local layer"
        );
    }

    #[test]
    fn registering_an_id_twice_returns_the_same_observer() {
        let observers = Observers::new(ChannelLayer::memory());
        let a = observers.register::<Todo>("todo", "x", pk);
        let b = observers.register::<Todo>("todo", "x", pk);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(observers.observes("todo"));
        assert!(!observers.observes("other"));
    }

    #[test]
    #[should_panic(expected = "both use the instance observer")]
    fn two_types_cannot_claim_one_instance_observer() {
        let observers = Observers::new(ChannelLayer::memory());
        observers.claim("todo.instance", TypeId::of::<u8>(), "A");
        observers.claim("todo.instance", TypeId::of::<u8>(), "A");
        observers.claim("todo.instance", TypeId::of::<u16>(), "B");
    }
}
