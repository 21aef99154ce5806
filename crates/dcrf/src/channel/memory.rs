//! [`MemoryBroker`]: one process, no network.

use std::sync::{Arc, OnceLock, Weak};

use futures_util::future::BoxFuture;

use super::{Broker, GroupMessage, Hub};
use crate::error::Error;

/// The in-memory broker: a published message goes straight to this node's hub. The default.
#[derive(Debug, Default)]
pub struct MemoryBroker {
    hub: OnceLock<Weak<Hub>>,
}

impl Broker for MemoryBroker {
    fn start(&self, hub: Weak<Hub>) {
        let _ = self.hub.set(hub);
    }

    fn publish(&self, message: GroupMessage) -> BoxFuture<'_, Result<(), Error>> {
        if let Some(hub) = self.hub.get().and_then(Weak::upgrade) {
            hub.deliver(Arc::new(message));
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn subscribe(&self, _group: Arc<str>) -> BoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    fn unsubscribe(&self, _group: Arc<str>) {}

    fn is_remote(&self) -> bool {
        false
    }
}
