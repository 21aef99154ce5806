//! Polling only what may have moved: a connection's read loop waits on its socket and its
//! event inbox, and also on signals that almost never fire (the server's shutdown, a kick from
//! the layer, its keepalive and credential deadlines, being stuck behind, a catch-up). Polling
//! all of those each time a frame or an event wakes the task costs a lock each, to find out
//! that nothing happened.
//!
//! A [`WakeGate`] stands between the task and such futures: they are polled with the gate's own
//! waker, which marks the gate before it wakes the task. The task asks [`WakeGate::open`]
//! before polling them and skips them while the gate is closed: none of their wakers fired
//! since they last returned `Pending`, so by the `Future` contract they would again.
//!
//! The read loop keeps a second gate for its socket once the socket has had an event: a
//! subscriber's task is woken by pushes far more often than by frames, and without the gate
//! every push also tried to read a frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Remembers whether the futures behind it were woken since they were last polled.
#[derive(Debug)]
pub(crate) struct WakeGate(Arc<Mark>);

/// Set by the gated futures' wake-ups, taken by the task.
#[derive(Debug)]
struct Mark {
    woken: AtomicBool,
    /// The task to wake.
    task: AtomicWaker,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl WakeGate {
    /// An open gate: the futures behind it are polled at least once.
    pub(crate) fn new() -> WakeGate {
        WakeGate(Arc::new(Mark {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }))
    }

    /// Registers the task of `cx` to be woken through the gate; true when the futures behind it
    /// are due a poll. The gate then stays closed until they wake it again.
    pub(crate) fn open(&self, cx: &Context<'_>) -> bool {
        // Registered before the mark is taken: a wake-up in between is not lost.
        self.0.task.register(cx.waker());
        self.0.woken.swap(false, Ordering::AcqRel)
    }

    /// The waker to poll the futures behind the gate with (made when needed: an idle
    /// connection does not keep it).
    pub(crate) fn waker(&self) -> Waker {
        Waker::from(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Poll;

    use super::*;

    #[test]
    fn a_gate_opens_once_then_again_after_a_wake_up() {
        let gate = WakeGate::new();
        let cx = Context::from_waker(Waker::noop());
        assert!(gate.open(&cx), "a new gate is open");
        assert!(!gate.open(&cx), "then closed");
        gate.waker().wake_by_ref();
        assert!(gate.open(&cx), "a wake-up opens it");
        assert!(!gate.open(&cx));
    }

    #[test]
    fn a_future_behind_the_gate_wakes_the_task_and_opens_the_gate() {
        let gate = WakeGate::new();
        let notify = tokio::sync::Notify::new();
        let mut notified = pin!(notify.notified());
        let task = Arc::new(Counter::default());
        let task_waker = Waker::from(task.clone());
        let cx = Context::from_waker(&task_waker);
        assert!(gate.open(&cx));
        let waker = gate.waker();
        let mut gated = Context::from_waker(&waker);
        assert!(notified.as_mut().poll(&mut gated).is_pending());
        assert!(!gate.open(&cx), "nothing moved");
        notify.notify_waiters();
        assert_eq!(task.0.load(Ordering::Acquire), 1, "the task was woken");
        assert!(gate.open(&cx), "and the gate is open");
        assert_eq!(notified.as_mut().poll(&mut gated), Poll::Ready(()));
    }

    #[derive(Default)]
    struct Counter(std::sync::atomic::AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::AcqRel);
        }
    }
}
