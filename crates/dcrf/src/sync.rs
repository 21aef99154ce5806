//! Lock helpers: a poisoned lock (a panic while it was held) is recovered, never skipped.
//!
//! Every critical section in the framework leaves its data consistent at each step, so the
//! state behind a poisoned lock is still valid; silently skipping the work instead (as
//! `if let Ok(guard) = lock.lock()` does) would drop subscriptions or events without a trace.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks a mutex, recovering it if poisoned.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks, recovering the lock if poisoned.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks, recovering the lock if poisoned.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
