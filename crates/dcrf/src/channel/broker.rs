//! The [`Broker`] trait: how messages travel between nodes.

use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;

use super::{GroupMessage, Hub, Position, StreamState};
use crate::error::Error;

/// Carries group messages between the nodes of a deployment. A broker only moves messages;
/// which local connection gets what is the [`Hub`]'s business.
///
/// Two implementations ship: [`MemoryBroker`](super::MemoryBroker) (one process) and
/// [`RedisBroker`](super::RedisBroker) (feature `redis`).
///
/// A broker also owns the streams' positions and history: [`publish`](Self::publish) numbers
/// each message in its group's stream ([`GroupMessage::position`]) and keeps it in the stream's
/// history; [`recover`](Self::recover) answers where a stream is and what a client missed since
/// a position. Per group, messages reach the hub in offset order.
pub trait Broker: Send + Sync + 'static {
    /// Starts the broker for this node: from now on, messages of the groups it was asked to
    /// [`subscribe`](Self::subscribe) go to `hub` ([`Hub::deliver`]). Called once, by
    /// [`ChannelLayer::new`](super::ChannelLayer::new). The broker must not keep the hub alive.
    fn start(&self, hub: Weak<Hub>);

    /// Numbers a message in its group's stream, keeps it in the stream's history, and sends it
    /// to every node that has members of its group, this one included. Resolves once the
    /// message has its position (or could not be published: then the stream's epoch changes
    /// before its next message, so no subscriber misses it silently).
    fn publish(&self, message: GroupMessage) -> BoxFuture<'_, Result<(), Error>>;

    /// The stream of `group`: its current position and, with `since`, the events after it
    /// when the history still holds every one of them.
    fn recover(
        &self,
        group: Arc<str>,
        since: Option<Position>,
    ) -> BoxFuture<'_, Result<StreamState, Error>>;

    /// Restarts at a new epoch every stream whose group starts with `prefix` (their history is
    /// dropped); their subscribers, on every node, are told to check and get resync notices.
    fn restart(&self, prefix: Arc<str>) -> BoxFuture<'_, Result<(), Error>>;

    /// This node now has members of `group`: deliver its messages here. The future resolves
    /// once they will be (for Redis: once `SUBSCRIBE` is acknowledged). If the broker is
    /// unavailable it keeps the group and subscribes when it is back.
    fn subscribe(&self, group: Arc<str>) -> BoxFuture<'static, ()>;

    /// This node no longer has members of `group`.
    fn unsubscribe(&self, group: Arc<str>);

    /// Does this broker reach other nodes (so messages must carry their objects as JSON)?
    fn is_remote(&self) -> bool;
}
