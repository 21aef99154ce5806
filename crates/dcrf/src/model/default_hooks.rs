//! Which hooks of a consumer type are the trait's defaults, learned by watching them run.
//!
//! The default bodies of a few [`ModelConsumer`](super::ModelConsumer) hooks record their
//! consumer type when they run. An override can never run them (Rust has no `super` call to a
//! trait's default body), so a type seen running a default keeps it. The model path takes a
//! shorter way for such a type once it has been seen, and the long way until then (its first
//! request on each thread, or always, for a type that overrides the hook):
//! - both queryset hooks kept: its point reads are rendered once ([`point_read`](super::point_read));
//! - the queryset hooks and the update hook kept: an update of one object is one conditional
//!   statement ([`Txn::update_unchanged`](super::Txn)).

use std::any::TypeId;
use std::cell::RefCell;

/// A hook whose default body records its consumer type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    /// `get_queryset`: all rows.
    GetQueryset,
    /// `filter_queryset`: the queryset unchanged.
    FilterQueryset,
    /// `perform_update`: `txn.update(object)`.
    PerformUpdate,
    /// `perform_patch`: `txn.update(object)`.
    PerformPatch,
}

thread_local! {
    /// The (consumer type, hook) pairs seen running the default body on this thread.
    static SEEN: RefCell<Vec<(TypeId, Hook)>> = const { RefCell::new(Vec::new()) };
}

/// Records that consumer type `C` runs the default body of `hook`.
pub(crate) fn saw<C: 'static>(hook: Hook) {
    let entry = (TypeId::of::<C>(), hook);
    SEEN.with(|seen| {
        if let Ok(mut seen) = seen.try_borrow_mut()
            && !seen.contains(&entry)
        {
            seen.push(entry);
        }
    });
}

/// Has consumer type `C` been seen running the default body of every one of `hooks`?
pub(crate) fn kept<C: 'static>(hooks: &[Hook]) -> bool {
    let consumer = TypeId::of::<C>();
    SEEN.with(|seen| {
        seen.try_borrow()
            .is_ok_and(|seen| hooks.iter().all(|hook| seen.contains(&(consumer, *hook))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;
    struct Other;

    #[test]
    fn kept_once_every_hook_was_seen_for_that_type() {
        let both = [Hook::GetQueryset, Hook::FilterQueryset];
        assert!(!kept::<One>(&both));
        saw::<One>(Hook::GetQueryset);
        assert!(!kept::<One>(&both));
        assert!(kept::<One>(&[Hook::GetQueryset]));
        // Another type's defaults say nothing about this one.
        saw::<Other>(Hook::FilterQueryset);
        assert!(!kept::<One>(&both));
        saw::<One>(Hook::FilterQueryset);
        saw::<One>(Hook::FilterQueryset);
        assert!(kept::<One>(&both));
        assert!(!kept::<Other>(&both));
        assert!(!kept::<One>(&[Hook::PerformPatch]));
    }
}
