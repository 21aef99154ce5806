//! Observers and subscriptions: DCRF's `@observer` and `@model_observer`.
//!
//! An [`Observer`] is a named source of events sent to groups through the [`Layer`]. A
//! connection subscribes to one of its groups with a key (DCRF's `groups_for_consumer`) and an
//! optional `request_id`; each event then reaches the consumer's
//! [`on_event`](crate::Consumer::on_event) with the request ids subscribed to the group it came
//! through. The default handler pushes
//! `{"errors": [], "data": <body>, "action": <action>, "response_status": 200, "request_id": <id>}`
//! once per request id.
//!
//! A [`ModelObserver`] turns committed database changes into events: it is registered on the
//! [`Db`](crate::model::Db), and every change made through a [`Txn`](crate::model::Txn) is
//! offered to it **after commit**, once per object per transaction, with the object's final
//! state. Its `group_by` function (DCRF's `groups_for_signal`) places an object in groups; an
//! object that moves between groups yields `delete` for the groups it left, `update` for those
//! it stayed in, and `create` for those it entered. Its body is serialized once per event, not
//! per subscriber.
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
//! // In an action: by_owner.subscribe(ctx, "alice", request_id);
//! # let _ = by_owner;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::consumer::Ctx;
use crate::error::Error;
use crate::layer::{GroupMessage, Layer, Object};

pub use crate::model::ChangeKind;

/// A named source of events (DCRF's `@observer`): send to a group, subscribe connections.
#[derive(Clone, Debug)]
pub struct Observer {
    id: Arc<str>,
    layer: Layer,
}

impl Observer {
    /// An observer on a layer. The id names its groups; keep it unique and stable across
    /// nodes.
    pub fn new(layer: &Layer, id: &str) -> Observer {
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
            .group_send(GroupMessage {
                observer: self.id.clone(),
                group: self.group(key),
                action: action.into(),
                body: body.into(),
                object: None,
                object_json: None,
            })
            .await
    }

    /// Subscribes the connection to the group of `key`, remembering `request_id` (if any) for
    /// the pushes. Subscribing twice with the same request id is a no-op.
    pub fn subscribe(&self, ctx: &Ctx, key: &str, request_id: Option<&RawValue>) {
        let group = self.group(key);
        ctx.subscriptions()
            .add(&self.id, &group, request_id.map(|r| r.get()), &self.layer);
        self.layer.group_add(&group, &ctx.member());
    }

    /// Unsubscribes: with a request id, removes that id from the group (the connection stays
    /// a member while other ids remain); without, leaves the group.
    pub fn unsubscribe(&self, ctx: &Ctx, key: &str, request_id: Option<&RawValue>) {
        let group = self.group(key);
        if ctx
            .subscriptions()
            .remove(&group, request_id.map(|r| r.get()))
        {
            self.layer.group_discard(&group, ctx.connection_id());
        }
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

    pub(crate) fn layer(&self) -> &Layer {
        &self.layer
    }
}

/// One event as a consumer's handler sees it.
#[derive(Debug)]
pub struct Event<'a> {
    /// The message (observer, group, action, body, typed object).
    pub message: &'a GroupMessage,
    /// The request ids this connection subscribed to the message's group with, in
    /// subscription order (raw JSON, echoed verbatim).
    pub request_ids: &'a [Box<RawValue>],
}

impl Event<'_> {
    /// The observer's id.
    pub fn observer(&self) -> &str {
        &self.message.observer
    }

    /// `create`, `update`, `delete`, or a custom word.
    pub fn action(&self) -> &str {
        &self.message.action
    }

    /// The serialized body.
    pub fn body(&self) -> &RawValue {
        &self.message.body
    }

    /// The typed object (a model instance), when the observer carries one.
    pub fn object<T: 'static>(&self) -> Option<&T> {
        self.message.object.as_deref()?.downcast_ref::<T>()
    }
}

/// The default push: one reply envelope per subscribing request id (or one with
/// `request_id: null` when the subscription had none), status 200, `data` = the body.
pub async fn default_push(ctx: &Ctx, event: &Event<'_>) {
    if event.request_ids.is_empty() {
        let _ = ctx.reply(event.action(), None, event.body(), 200).await;
        return;
    }
    for rid in event.request_ids {
        if ctx
            .reply(event.action(), Some(rid), event.body(), 200)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The subscriptions of one connection: group → observer and request ids.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    groups: std::sync::Mutex<HashMap<Arc<str>, Subscription>>,
}

#[derive(Debug)]
struct Subscription {
    observer: Arc<str>,
    /// Shared with every event being handled, so handling one costs no copy.
    request_ids: Arc<Vec<Box<RawValue>>>,
    layer: Layer,
}

impl Subscriptions {
    fn add(&self, observer: &Arc<str>, group: &Arc<str>, request_id: Option<&str>, layer: &Layer) {
        let Ok(mut groups) = self.groups.lock() else {
            return;
        };
        let sub = groups.entry(group.clone()).or_insert_with(|| Subscription {
            observer: observer.clone(),
            request_ids: Arc::new(Vec::new()),
            layer: layer.clone(),
        });
        if let Some(rid) = request_id
            && !sub.request_ids.iter().any(|r| r.get() == rid)
            && let Ok(raw) = RawValue::from_string(rid.to_owned())
        {
            Arc::make_mut(&mut sub.request_ids).push(raw);
        }
    }

    /// Returns true when the connection should leave the group.
    fn remove(&self, group: &str, request_id: Option<&str>) -> bool {
        let Ok(mut groups) = self.groups.lock() else {
            return false;
        };
        let Some(sub) = groups.get_mut(group) else {
            return false;
        };
        match request_id {
            Some(rid) => {
                Arc::make_mut(&mut sub.request_ids).retain(|r| r.get() != rid);
                if sub.request_ids.is_empty() {
                    groups.remove(group);
                    true
                } else {
                    false
                }
            }
            None => {
                groups.remove(group);
                true
            }
        }
    }

    /// Removes a request id from all groups of an observer; returns the groups left empty.
    fn remove_request(&self, observer: &str, request_id: &str) -> Vec<Arc<str>> {
        let Ok(mut groups) = self.groups.lock() else {
            return Vec::new();
        };
        let mut emptied = Vec::new();
        groups.retain(|group, sub| {
            if &*sub.observer != observer {
                return true;
            }
            let before = sub.request_ids.len();
            Arc::make_mut(&mut sub.request_ids).retain(|r| r.get() != request_id);
            if before != sub.request_ids.len() && sub.request_ids.is_empty() {
                emptied.push(group.clone());
                false
            } else {
                true
            }
        });
        emptied
    }

    /// The request ids of a group, if the connection is subscribed to it.
    pub(crate) fn request_ids(&self, group: &str) -> Option<Arc<Vec<Box<RawValue>>>> {
        let groups = self.groups.lock().ok()?;
        groups.get(group).map(|s| s.request_ids.clone())
    }

    /// Leaves every group (on disconnect).
    pub(crate) fn leave_all(&self, member_id: u64) {
        let all: Vec<(Arc<str>, Subscription)> = self
            .groups
            .lock()
            .map(|mut g| g.drain().collect())
            .unwrap_or_default();
        for (group, sub) in all {
            sub.layer.group_discard(&group, member_id);
        }
    }
}

/// How a [`ModelObserver`] groups and serializes objects.
type GroupFn<M> = Arc<dyn Fn(&M) -> Vec<String> + Send + Sync>;
type SerializeFn<M> =
    Arc<dyn Fn(&M, ChangeKind) -> Result<String, serde_json::Error> + Send + Sync>;

/// Observes one entity's committed changes (DCRF's `@model_observer`). Built by
/// [`Db::observe`](crate::model::Db::observe); cheap to clone.
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
    pub(crate) fn new(observer: Observer, pk: fn(&M) -> serde_json::Value) -> Self {
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
        if let Ok(mut g) = self.group_by.write() {
            *g = Arc::new(f);
        }
        self
    }

    /// The body of each event, computed and serialized once per event (DCRF's `.serializer`).
    /// Default: `{"pk": <primary key>}`. For `delete` it receives the object as it was.
    pub fn serialize<F, T>(self: Arc<Self>, f: F) -> Arc<Self>
    where
        F: Fn(&M, ChangeKind) -> T + Send + Sync + 'static,
        T: Serialize,
    {
        if let Ok(mut s) = self.serializer.write() {
            *s = Some(Arc::new(move |m: &M, kind| {
                serde_json::to_string(&f(m, kind))
            }));
        }
        self
    }

    /// The observer (id, send, subscribe).
    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Subscribes the connection to the group of `key` (see [`Observer::subscribe`]).
    pub fn subscribe(&self, ctx: &Ctx, key: &str, request_id: Option<&RawValue>) {
        self.observer.subscribe(ctx, key, request_id);
    }

    /// Unsubscribes (see [`Observer::unsubscribe`]).
    pub fn unsubscribe(&self, ctx: &Ctx, key: &str, request_id: Option<&RawValue>) {
        self.observer.unsubscribe(ctx, key, request_id);
    }

    fn groups(&self, object: &M) -> Vec<String> {
        let f = self.group_by.read().map(|g| g.clone());
        match f {
            Ok(f) => f(object),
            Err(_) => Vec::new(),
        }
    }

    fn body(&self, object: &M, kind: ChangeKind) -> Result<Arc<RawValue>, Error> {
        let serializer = self.serializer.read().ok().and_then(|s| s.clone());
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
        let mut out = Vec::new();
        let mut push = |key: &str,
                        kind: ChangeKind,
                        object: &Arc<M>,
                        body: &Arc<RawValue>|
         -> Result<(), Error> {
            let object_json = if remote {
                Some(Arc::from(RawValue::from_string(serde_json::to_string(
                    &**object,
                )?)?))
            } else {
                None
            };
            let object: Object = object.clone();
            out.push(GroupMessage {
                observer: self.observer.id.clone(),
                group: self.observer.group(key),
                action: kind.as_str().into(),
                body: body.clone(),
                object: Some(object),
                object_json,
            });
            Ok(())
        };
        if let Some(old) = &old {
            let left: Vec<&String> = old_groups
                .iter()
                .filter(|g| !new_groups.contains(g))
                .collect();
            if !left.is_empty() {
                let body = self.body(old, ChangeKind::Delete)?;
                for key in left {
                    push(key, ChangeKind::Delete, old, &body)?;
                }
            }
        }
        if let Some(new) = &new {
            let (stayed, entered): (Vec<&String>, Vec<&String>) =
                new_groups.iter().partition(|g| old_groups.contains(g));
            if !stayed.is_empty() {
                let body = self.body(new, ChangeKind::Update)?;
                for key in stayed {
                    push(key, ChangeKind::Update, new, &body)?;
                }
            }
            if !entered.is_empty() {
                let body = self.body(new, ChangeKind::Create)?;
                for key in entered {
                    push(key, ChangeKind::Create, new, &body)?;
                }
            }
        }
        Ok(out)
    }
}
