//! The [`Broker`] trait: how messages travel between nodes.

use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;

use super::{GroupMessage, Hub};
use crate::error::Error;

/// Carries group messages between the nodes of a deployment. A broker only moves messages;
/// which local connection gets what is the [`Hub`]'s business.
///
/// Two implementations ship: [`MemoryBroker`](super::MemoryBroker) (one process) and
/// [`RedisBroker`](super::RedisBroker) (feature `redis`). The trait is deliberately small so
/// that stream history (append with a position, read since a position) can be added as
/// further methods with defaults, without touching its callers.
pub trait Broker: Send + Sync + 'static {
    /// Starts the broker for this node: from now on, messages of the groups it was asked to
    /// [`subscribe`](Self::subscribe) go to `hub` ([`Hub::deliver`]). Called once, by
    /// [`ChannelLayer::new`](super::ChannelLayer::new). The broker must not keep the hub alive.
    fn start(&self, hub: Weak<Hub>);

    /// Sends a message to every node that has members of its group, this one included.
    fn publish(&self, message: GroupMessage) -> BoxFuture<'_, Result<(), Error>>;

    /// This node now has members of `group`: deliver its messages here. The future resolves
    /// once they will be (for Redis: once `SUBSCRIBE` is acknowledged). If the broker is
    /// unavailable it keeps the group and subscribes when it is back.
    fn subscribe(&self, group: Arc<str>) -> BoxFuture<'static, ()>;

    /// This node no longer has members of `group`.
    fn unsubscribe(&self, group: Arc<str>);

    /// Does this broker reach other nodes (so messages must carry their objects as JSON)?
    fn is_remote(&self) -> bool;
}
