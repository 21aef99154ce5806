//! A connection's subscriptions, and the events they deliver ([`Event`], [`default_push`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;

use super::Ctx;
use crate::channel::{ChannelLayer, GroupMessage, Position};
use crate::error::ApiError;
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

    /// Where the event sits in its stream. Every frame the handler sends carries it as the
    /// top-level `position`.
    pub fn position(&self) -> Option<&Position> {
        self.message.position.as_ref()
    }

    /// Is this a [resync notice](RESYNC): the connection could not receive some of the
    /// stream's events, and the client must reload what it shows?
    pub fn is_resync(&self) -> bool {
        &*self.message.action == RESYNC
    }
}

/// The action of a resync push: `{"errors": [], "data": {"position": P}, "action": "resync",
/// "response_status": 200, "request_id": R, "position": P}`. Sent to a subscription whose
/// stream lost events the connection did not receive (history trimmed or expired, the stream
/// restarted at a new epoch): the client reloads, then applies the pushes that follow, which
/// continue after `P`.
pub const RESYNC: &str = "resync";

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

tokio::task_local! {
    /// The frame being handled: its `since`, the extras of its reply, and the history its
    /// subscriptions recovered (sent after the reply).
    static FRAME: FrameState;
    /// The position of the event being handled: every frame sent meanwhile carries it.
    static EVENT_POSITION: Position;
}

/// What a subscribe learns from the frame it runs for, and leaves for its reply.
pub(crate) struct FrameState {
    since: Since,
    request_id: Option<Box<RawValue>>,
    extras: Mutex<Option<ReplyExtras>>,
    replays: Mutex<Vec<Replay>>,
}

/// The `since` argument of a frame.
#[derive(Debug, Clone)]
pub(crate) enum Since {
    /// No `since`: DCRF's behaviour, no `recovered` key.
    Absent,
    /// A position to resume after.
    At(Position),
    /// Not a position: nothing can be recovered from it.
    Invalid,
}

/// The keys a subscribe adds to its reply: the stream position, and `recovered` when the
/// frame asked to resume.
#[derive(Debug)]
struct ReplyExtras {
    position: Option<Position>,
    recovered: Option<bool>,
}

/// Recovered history, sent right after the subscribe's reply, to one request id.
#[derive(Debug)]
pub(crate) struct Replay {
    pub(crate) request_id: Option<Box<RawValue>>,
    pub(crate) events: Vec<Arc<GroupMessage>>,
}

/// Reads a frame's `since`: `Ok(None)` without one, 400 when it is not a position.
///
/// ```text
/// {"action": "subscribe_instance", "pk": 1, "request_id": 7,
///  "since": {"epoch": "6f1c…", "offset": 41}}
/// ```
pub fn since(frame: &Frame<'_>) -> Result<Option<Position>, ApiError> {
    match frame.field("since") {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str(raw.get()).map(Some).map_err(|_| {
            ApiError::field(
                "since",
                "Expected a position: {\"epoch\": string, \"offset\": integer}.",
            )
        }),
    }
}

/// Runs an action for `frame` with what its subscribes need; returns the action's output and
/// the recovered history to send after its reply.
pub(crate) async fn with_frame<F: std::future::Future>(
    frame: &Frame<'_>,
    fut: F,
) -> (F::Output, Vec<Replay>) {
    let since = match since(frame) {
        Ok(None) => Since::Absent,
        Ok(Some(p)) => Since::At(p),
        Err(_) => Since::Invalid,
    };
    let state = FrameState {
        since,
        request_id: frame.request_id().map(|r| r.to_owned()),
        extras: Mutex::new(None),
        replays: Mutex::new(Vec::new()),
    };
    FRAME
        .scope(state, async {
            let out = fut.await;
            let replays = FRAME.with(|f| std::mem::take(&mut *lock(&f.replays)));
            (out, replays)
        })
        .await
}

/// Runs an event handler: every frame it sends carries the event's position.
pub(crate) async fn with_event_position<F: std::future::Future>(
    position: Option<&Position>,
    fut: F,
) -> F::Output {
    match position {
        Some(p) => EVENT_POSITION.scope(p.clone(), fut).await,
        None => fut.await,
    }
}

/// Adds the subscription keys to an envelope being sent: the event's `position` in an event
/// handler; in a subscribe's reply (`reply_to`: a success reply with the frame's request id,
/// the first one), its `position` and `recovered`.
pub(crate) fn decorate(mut text: String, reply_to: Option<Option<&RawValue>>) -> String {
    if !text.ends_with('}') {
        return text;
    }
    if let Ok(()) = EVENT_POSITION.try_with(|p| {
        text.pop();
        text.push_str(",\"position\":");
        p.write_json(&mut text);
        text.push('}');
    }) {
        return text;
    }
    let Some(request_id) = reply_to else {
        return text;
    };
    let extras = FRAME
        .try_with(|f| {
            let same = f.request_id.as_deref().map(RawValue::get) == request_id.map(RawValue::get);
            if same { lock(&f.extras).take() } else { None }
        })
        .ok()
        .flatten();
    if let Some(extras) = extras {
        text.pop();
        if let Some(p) = &extras.position {
            text.push_str(",\"position\":");
            p.write_json(&mut text);
        }
        if let Some(r) = extras.recovered {
            text.push_str(if r {
                ",\"recovered\":true"
            } else {
                ",\"recovered\":false"
            });
        }
        text.push('}');
    }
    text
}

/// What a subscribe found: the stream position its pushes continue from, and whether the
/// frame's `since` was recovered (`None` without `since`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Joined {
    /// The position the subscription's pushes follow (unknown while the broker is down).
    pub position: Option<Position>,
    /// `Some(true)` when the missed pushes will be sent, `Some(false)` when they cannot be.
    pub recovered: Option<bool>,
}

/// The subscriptions of one connection: group → observer, request ids and the stream position
/// the connection has delivered up to.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    /// Looked up for every event the connection receives: hashed with foldhash rather than
    /// SipHash (a group's name is a few dozen bytes, and the map is the connection's own,
    /// capped by its budget).
    groups: Mutex<HashMap<Arc<str>, Subscription, foldhash::fast::RandomState>>,
    /// The socket's subscription cap, shared by every stream of a multiplexed socket.
    budget: Arc<SubscriptionBudget>,
}

/// How many subscriptions one socket may hold, and how many it holds. A subscription is one
/// stream + request id pair (a group joined without a request id counts once).
#[derive(Debug)]
pub(crate) struct SubscriptionBudget {
    max: usize,
    used: std::sync::atomic::AtomicUsize,
}

impl Default for SubscriptionBudget {
    fn default() -> Self {
        SubscriptionBudget::new(usize::MAX)
    }
}

impl SubscriptionBudget {
    pub(crate) fn new(max: usize) -> Self {
        SubscriptionBudget {
            max,
            used: Default::default(),
        }
    }

    /// Takes one subscription, if the socket has one left.
    fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back `n` subscriptions.
    fn give_back(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// The answer to a subscribe over the cap.
    fn exhausted(&self) -> ApiError {
        ApiError::bad_request(format!(
            "Too many subscriptions on this connection (the limit is {}); unsubscribe from some first.",
            self.max
        ))
    }
}

impl Subscription {
    /// How many subscriptions of the socket's budget this one holds.
    fn weight(&self) -> usize {
        self.request_ids.len().max(1)
    }
}

#[derive(Debug)]
struct Subscription {
    observer: Arc<str>,
    /// Shared with every event being handled, so handling one costs no copy.
    request_ids: Arc<Vec<Box<RawValue>>>,
    layer: ChannelLayer,
    /// The position of the last event delivered (or skipped as already known); `None` until
    /// the stream's position is known.
    cursor: Option<Position>,
}

/// The request ids of one subscription, shared with the events being handled.
pub(crate) type RequestIds = Arc<Vec<Box<RawValue>>>;

/// What to do with an event of a subscribed group.
#[derive(Debug)]
pub(crate) enum Accept {
    /// Deliver it to these request ids.
    Deliver(Arc<Vec<Box<RawValue>>>),
    /// Not subscribed, or already delivered.
    Skip,
    /// Events before it were not delivered: catch up from history first.
    Gap,
    /// The stream restarted at a new epoch: what came before it may be lost (resync), then
    /// deliver it.
    NewEpoch(Arc<Vec<Box<RawValue>>>),
}

impl Subscriptions {
    /// The subscriptions of one stream of a socket, counted against the socket's `budget`.
    pub(crate) fn new(budget: Arc<SubscriptionBudget>) -> Self {
        Subscriptions {
            groups: Default::default(),
            budget,
        }
    }

    /// Subscribes to `group` (with `request_id`, if any; the same id twice is kept once): joins
    /// the group on the layer, reads the stream's position and, when the frame being handled
    /// asks to resume (`since`), queues the missed events for this request id, to be sent
    /// after the reply. The reply gets `position` (and `recovered`).
    ///
    /// Refused (400) when the socket holds its cap of subscriptions and this one is new.
    pub(crate) async fn join(
        &self,
        ctx: &Ctx,
        observer: &Arc<str>,
        group: &Arc<str>,
        request_id: Option<&RawValue>,
        layer: &ChannelLayer,
    ) -> Result<Joined, ApiError> {
        self.add(observer, group, request_id, layer)?;
        layer.group_add(group, &ctx.member()).await;
        let since = FRAME.try_with(|f| f.since.clone()).unwrap_or(Since::Absent);
        let asked = match &since {
            Since::At(p) => Some(p.clone()),
            _ => None,
        };
        let state = match layer.recover(group, asked.clone()).await {
            Ok(state) => Some(state),
            Err(e) => {
                tracing::warn!(group = %group, error = %e, "cannot read the stream position");
                None
            }
        };
        let cursor = {
            let mut groups = lock(&self.groups);
            let Some(sub) = groups.get_mut(group) else {
                return Ok(Joined {
                    position: None,
                    recovered: None,
                });
            };
            if sub.cursor.is_none() {
                sub.cursor = state.as_ref().map(|s| s.head.clone());
            }
            sub.cursor.clone()
        };
        let recovered = match (&since, state) {
            (Since::Absent, _) => None,
            (Since::At(_), Some(state)) => match (state.missed, &cursor) {
                (Some(missed), Some(cursor)) => {
                    // What the connection has not delivered yet comes live, to every id.
                    let events: Vec<Arc<GroupMessage>> = missed
                        .into_iter()
                        .filter(|m| {
                            m.position.as_ref().is_some_and(|p| {
                                p.epoch == cursor.epoch && p.offset <= cursor.offset
                            })
                        })
                        .collect();
                    let queued = FRAME.try_with(|f| {
                        lock(&f.replays).push(Replay {
                            request_id: request_id.map(|r| r.to_owned()),
                            events,
                        })
                    });
                    Some(queued.is_ok())
                }
                _ => Some(false),
            },
            _ => Some(false),
        };
        let joined = Joined {
            position: cursor,
            recovered,
        };
        let _ = FRAME.try_with(|f| {
            *lock(&f.extras) = Some(ReplyExtras {
                position: joined.position.clone(),
                recovered: joined.recovered,
            })
        });
        Ok(joined)
    }

    /// Remembers a subscription to `group` (with `request_id`, if any; the same id twice is
    /// kept once), without joining the group. Refused when it is new and the socket's budget
    /// is spent.
    pub(crate) fn add(
        &self,
        observer: &Arc<str>,
        group: &Arc<str>,
        request_id: Option<&RawValue>,
        layer: &ChannelLayer,
    ) -> Result<(), ApiError> {
        let mut groups = lock(&self.groups);
        match groups.get_mut(group) {
            None => {
                if !self.budget.take() {
                    return Err(self.budget.exhausted());
                }
                groups.insert(
                    group.clone(),
                    Subscription {
                        observer: observer.clone(),
                        request_ids: Arc::new(
                            request_id.map(|r| r.to_owned()).into_iter().collect(),
                        ),
                        layer: layer.clone(),
                        cursor: None,
                    },
                );
            }
            Some(sub) => {
                if let Some(rid) = request_id
                    && !sub.request_ids.iter().any(|r| r.get() == rid.get())
                {
                    // The first id of a group joined without one takes no more.
                    if !sub.request_ids.is_empty() && !self.budget.take() {
                        return Err(self.budget.exhausted());
                    }
                    Arc::make_mut(&mut sub.request_ids).push(rid.to_owned());
                }
            }
        }
        Ok(())
    }

    /// Decides what to do with an event, advancing the group's cursor when it is delivered.
    pub(crate) fn accept(&self, message: &GroupMessage) -> Accept {
        let mut groups = lock(&self.groups);
        let Some(sub) = groups.get_mut(&*message.group) else {
            return Accept::Skip;
        };
        let Some(p) = &message.position else {
            return Accept::Deliver(sub.request_ids.clone());
        };
        match &sub.cursor {
            None => {
                sub.cursor = Some(p.clone());
                Accept::Deliver(sub.request_ids.clone())
            }
            Some(c) if c.epoch != p.epoch => {
                sub.cursor = Some(p.clone());
                Accept::NewEpoch(sub.request_ids.clone())
            }
            Some(c) if p.offset <= c.offset => Accept::Skip,
            Some(c) if p.offset == c.offset + 1 => {
                // Same epoch: only the offset moves.
                if let Some(c) = &mut sub.cursor {
                    c.offset = p.offset;
                }
                Accept::Deliver(sub.request_ids.clone())
            }
            Some(_) => Accept::Gap,
        }
    }

    /// The group's cursor and layer, for a catch-up.
    pub(crate) fn cursor(&self, group: &str) -> Option<(Option<Position>, ChannelLayer)> {
        lock(&self.groups)
            .get(group)
            .map(|s| (s.cursor.clone(), s.layer.clone()))
    }

    /// Moves a group's cursor to `head` after a resync; returns its observer and the ids to
    /// notify.
    pub(crate) fn reset_cursor(
        &self,
        group: &str,
        head: Position,
    ) -> Option<(Arc<str>, RequestIds)> {
        let mut groups = lock(&self.groups);
        let sub = groups.get_mut(group)?;
        sub.cursor = Some(head);
        Some((sub.observer.clone(), sub.request_ids.clone()))
    }

    /// Every subscribed group.
    pub(crate) fn groups(&self) -> Vec<Arc<str>> {
        lock(&self.groups).keys().cloned().collect()
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
                    self.budget.give_back(1);
                    (removed, true)
                } else {
                    self.budget.give_back(usize::from(removed));
                    (removed, false)
                }
            }
            None => {
                if let Some(sub) = groups.remove(group) {
                    self.budget.give_back(sub.weight());
                }
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
            if before == sub.request_ids.len() {
                true
            } else if sub.request_ids.is_empty() {
                self.budget.give_back(1);
                emptied.push(group.clone());
                false
            } else {
                self.budget.give_back(1);
                true
            }
        });
        emptied
    }

    /// The request ids of a group, if the connection is subscribed to it.
    #[cfg(test)]
    pub(crate) fn request_ids(&self, group: &str) -> Option<Arc<Vec<Box<RawValue>>>> {
        lock(&self.groups).get(group).map(|s| s.request_ids.clone())
    }

    /// Leaves every group (on disconnect).
    pub(crate) fn leave_all(&self, member_id: u64) {
        let all: Vec<(Arc<str>, Subscription)> = lock(&self.groups).drain().collect();
        self.budget
            .give_back(all.iter().map(|(_, sub)| sub.weight()).sum());
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
        s.add(&o, &g, Some(&rid("\"a\"")), &layer).unwrap();
        s.add(&o, &g, Some(&rid("2")), &layer).unwrap();
        s.add(&o, &g, Some(&rid("\"a\"")), &layer).unwrap();
        assert_eq!(ids(&s, "o:1"), Some(vec!["\"a\"".into(), "2".into()]));
        assert_eq!(ids(&s, "o:2"), None);
    }

    #[test]
    fn removing_the_last_request_id_leaves_the_group() {
        let s = Subscriptions::default();
        let layer = ChannelLayer::memory();
        let (o, g): (Arc<str>, Arc<str>) = ("o".into(), "o:1".into());
        s.add(&o, &g, Some(&rid("1")), &layer).unwrap();
        s.add(&o, &g, Some(&rid("2")), &layer).unwrap();
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
        s.add(&"o".into(), &"o:1".into(), Some(&rid("1")), &layer)
            .unwrap();
        assert_eq!(ids(&s, "o:1"), Some(vec!["1".into()]), "nothing dropped");
        assert_eq!(s.remove("o:1", Some("1")), (true, true));
    }

    #[test]
    fn remove_request_touches_one_observer_and_reports_emptied_groups() {
        let s = Subscriptions::default();
        let layer = ChannelLayer::memory();
        let (o, p): (Arc<str>, Arc<str>) = ("o".into(), "p".into());
        s.add(&o, &"o:1".into(), Some(&rid("1")), &layer).unwrap();
        s.add(&o, &"o:2".into(), Some(&rid("1")), &layer).unwrap();
        s.add(&o, &"o:2".into(), Some(&rid("2")), &layer).unwrap();
        s.add(&p, &"p:1".into(), Some(&rid("1")), &layer).unwrap();
        let emptied = s.remove_request("o", "1");
        assert_eq!(emptied, vec![Arc::<str>::from("o:1")]);
        assert_eq!(ids(&s, "o:2"), Some(vec!["2".into()]));
        assert_eq!(ids(&s, "p:1"), Some(vec!["1".into()]));
    }

    #[test]
    fn the_budget_counts_stream_and_request_id_pairs_across_streams() {
        let budget = Arc::new(SubscriptionBudget::new(3));
        let (a, b) = (
            Subscriptions::new(budget.clone()),
            Subscriptions::new(budget.clone()),
        );
        let layer = ChannelLayer::memory();
        let (o, g): (Arc<str>, Arc<str>) = ("o".into(), "o:1".into());
        a.add(&o, &g, None, &layer).unwrap();
        a.add(&o, &g, Some(&rid("1")), &layer).unwrap();
        a.add(&o, &g, Some(&rid("1")), &layer).unwrap();
        a.add(&o, &g, Some(&rid("2")), &layer).unwrap();
        b.add(&o, &g, Some(&rid("1")), &layer).unwrap();
        let refused = b
            .add(&o, &"o:2".into(), Some(&rid("1")), &layer)
            .unwrap_err();
        assert_eq!(refused.status().as_u16(), 400);
        assert_eq!(
            refused.errors(),
            vec![serde_json::json!(
                "Too many subscriptions on this connection (the limit is 3); unsubscribe from some first."
            )]
        );
        assert_eq!(ids(&b, "o:2"), None, "a refused subscription is not kept");
        assert_eq!(a.remove("o:1", Some("1")), (true, false));
        b.add(&o, &"o:2".into(), Some(&rid("1")), &layer).unwrap();
        a.leave_all(1);
        b.remove_request("o", "1");
        assert_eq!(budget.used.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
