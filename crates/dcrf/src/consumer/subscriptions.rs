//! A connection's subscriptions, and the events they deliver ([`Event`], [`default_push`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;

use super::Ctx;
use crate::channel::{ChannelLayer, GroupMessage};
use crate::protocol::Frame;
use crate::sync::lock;

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

/// May this connection receive a push of `action` about the object `pk`? The consumer's
/// permissions are asked as for an action of that name on `{"pk": pk}` (`{}` without a pk),
/// with [`Frame::reads`] true: a push delivers data, it changes nothing. See
/// [who receives a push](crate::observer#who-receives-a-push).
pub async fn may_receive(ctx: &Ctx, action: &str, pk: Option<&RawValue>) -> bool {
    if ctx.permissions().allows_everything() {
        return true;
    }
    let text = match pk {
        Some(pk) => format!("{{\"pk\":{}}}", pk.get()),
        None => "{}".to_owned(),
    };
    let Ok(mut frame) = Frame::parse(&text) else {
        return false;
    };
    frame.set_reads(true);
    ctx.permissions()
        .has_permission(ctx.scope(), action, &frame)
        .await
}

/// Could this connection ever receive a push about `pk`: is any of `actions` allowed (see
/// [`may_receive`])? Subscriptions that could not are refused (403).
pub async fn could_receive(ctx: &Ctx, pk: Option<&RawValue>, actions: &[&str]) -> bool {
    for &action in actions {
        if may_receive(ctx, action, pk).await {
            return true;
        }
    }
    false
}

/// The default push: one reply envelope per subscribing request id (or one with
/// `request_id: null` when the subscription had none), status 200, `data` = the body.
pub async fn default_push(ctx: &Ctx, event: &Event<'_>) {
    let ok = axum::http::StatusCode::OK;
    if event.request_ids.is_empty() {
        let _ = ctx.push(event.action(), None, event.body(), ok).await;
        return;
    }
    for rid in event.request_ids {
        if ctx
            .push(event.action(), Some(rid), event.body(), ok)
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
    groups: Mutex<HashMap<Arc<str>, Subscription>>,
}

#[derive(Debug)]
struct Subscription {
    observer: Arc<str>,
    /// Shared with every event being handled, so handling one costs no copy.
    request_ids: Arc<Vec<Box<RawValue>>>,
    layer: ChannelLayer,
}

impl Subscriptions {
    /// Remembers a subscription to `group` (with `request_id`, if any; the same id twice is
    /// kept once).
    pub(crate) fn add(
        &self,
        observer: &Arc<str>,
        group: &Arc<str>,
        request_id: Option<&RawValue>,
        layer: &ChannelLayer,
    ) {
        let mut groups = lock(&self.groups);
        let sub = groups.entry(group.clone()).or_insert_with(|| Subscription {
            observer: observer.clone(),
            request_ids: Arc::new(Vec::new()),
            layer: layer.clone(),
        });
        if let Some(rid) = request_id
            && !sub.request_ids.iter().any(|r| r.get() == rid.get())
        {
            Arc::make_mut(&mut sub.request_ids).push(rid.to_owned());
        }
    }

    /// Forgets `request_id` in `group` (or the whole group without one). Returns (was anything
    /// removed, should the connection leave the group).
    pub(crate) fn remove(&self, group: &str, request_id: Option<&str>) -> (bool, bool) {
        let mut groups = lock(&self.groups);
        let Some(sub) = groups.get_mut(group) else {
            return (false, false);
        };
        match request_id {
            Some(rid) => {
                let before = sub.request_ids.len();
                Arc::make_mut(&mut sub.request_ids).retain(|r| r.get() != rid);
                let removed = sub.request_ids.len() != before;
                if sub.request_ids.is_empty() {
                    groups.remove(group);
                    (removed, true)
                } else {
                    (removed, false)
                }
            }
            None => {
                groups.remove(group);
                (true, true)
            }
        }
    }

    /// Removes a request id from all groups of an observer; returns the groups left empty.
    pub(crate) fn remove_request(&self, observer: &str, request_id: &str) -> Vec<Arc<str>> {
        let mut groups = lock(&self.groups);
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
        lock(&self.groups).get(group).map(|s| s.request_ids.clone())
    }

    /// Leaves every group (on disconnect).
    pub(crate) fn leave_all(&self, member_id: u64) {
        let all: Vec<(Arc<str>, Subscription)> = lock(&self.groups).drain().collect();
        for (group, sub) in all {
            sub.layer.group_discard(&group, member_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn ids(s: &Subscriptions, group: &str) -> Option<Vec<String>> {
        s.request_ids(group)
            .map(|v| v.iter().map(|r| r.get().to_owned()).collect())
    }

    #[test]
    fn request_ids_are_kept_once_in_order() {
        let s = Subscriptions::default();
        let layer = ChannelLayer::memory();
        let (o, g): (Arc<str>, Arc<str>) = ("o".into(), "o:1".into());
        s.add(&o, &g, Some(&rid("\"a\"")), &layer);
        s.add(&o, &g, Some(&rid("2")), &layer);
        s.add(&o, &g, Some(&rid("\"a\"")), &layer);
        assert_eq!(ids(&s, "o:1"), Some(vec!["\"a\"".into(), "2".into()]));
        assert_eq!(ids(&s, "o:2"), None);
    }

    #[test]
    fn removing_the_last_request_id_leaves_the_group() {
        let s = Subscriptions::default();
        let layer = ChannelLayer::memory();
        let (o, g): (Arc<str>, Arc<str>) = ("o".into(), "o:1".into());
        s.add(&o, &g, Some(&rid("1")), &layer);
        s.add(&o, &g, Some(&rid("2")), &layer);
        assert_eq!(s.remove("o:1", Some("1")), (true, false));
        assert_eq!(
            s.remove("o:1", Some("9")),
            (false, false),
            "an unknown id removes nothing"
        );
        assert_eq!(s.remove("o:1", Some("2")), (true, true));
        assert_eq!(ids(&s, "o:1"), None);
        assert_eq!(s.remove("o:1", None), (false, false));
    }

    #[test]
    fn a_poisoned_lock_still_subscribes() {
        let s = Subscriptions::default();
        let layer = ChannelLayer::memory();
        let poisoned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = s.groups.lock().unwrap();
            panic!("a handler panicked while holding the lock");
        }));
        assert!(poisoned.is_err() && s.groups.is_poisoned());
        s.add(&"o".into(), &"o:1".into(), Some(&rid("1")), &layer);
        assert_eq!(ids(&s, "o:1"), Some(vec!["1".into()]), "nothing dropped");
        assert_eq!(s.remove("o:1", Some("1")), (true, true));
    }

    #[test]
    fn remove_request_touches_one_observer_and_reports_emptied_groups() {
        let s = Subscriptions::default();
        let layer = ChannelLayer::memory();
        let (o, p): (Arc<str>, Arc<str>) = ("o".into(), "p".into());
        s.add(&o, &"o:1".into(), Some(&rid("1")), &layer);
        s.add(&o, &"o:2".into(), Some(&rid("1")), &layer);
        s.add(&o, &"o:2".into(), Some(&rid("2")), &layer);
        s.add(&p, &"p:1".into(), Some(&rid("1")), &layer);
        let emptied = s.remove_request("o", "1");
        assert_eq!(emptied, vec![Arc::<str>::from("o:1")]);
        assert_eq!(ids(&s, "o:2"), Some(vec!["2".into()]));
        assert_eq!(ids(&s, "p:1"), Some(vec!["1".into()]));
    }
}
