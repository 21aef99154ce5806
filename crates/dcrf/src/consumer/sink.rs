//! The socket's write half, shared by the connection's writer task and its read loop.
//!
//! A frame that the connection's own task sends (a reply, a push it delivers) while the
//! writer is idle and nothing is queued goes straight into the socket's buffer: no hand-off to
//! the writer task, no wake-up, no queue. The buffer is flushed whenever that task is about to
//! wait (its action awaits something, or it has no more input), so what it wrote in one go
//! leaves in one write, as the writer would have batched it. Anything else (another task's
//! frame, a busy writer, queued frames, a socket that cannot take the frame now) goes through
//! the outbound queue as before, so frames keep the order they were sent in and a client that
//! does not read still backs the queue up (see [`Outbox`](super::Outbox)).
//!
//! The sink sits in a mutex that is only ever held for one synchronous poll, never across an
//! `await`. Every frame that goes through the queue holds a [`Ticket`] until the writer has
//! flushed it (or it is dropped unsent), and a direct write is only made while no ticket is
//! out, so it can never overtake a queued frame. While the writer polls the sink itself (a
//! batch, a ping, the close), direct writes wait too: the sink keeps one waker.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures_util::Sink;
use futures_util::stream::SplitSink;

use super::Outbound;

/// The write half of a socket.
pub(crate) type SocketSink = SplitSink<WebSocket, Message>;

/// The most direct writes left unflushed at once: a read loop with input always ready still
/// flushes this often.
const MAX_UNFLUSHED: u32 = 32;

/// The most bytes of direct writes left unflushed at once. A socket that does not take them
/// then hands its frames to the writer and the byte-bounded queue, so a client that stops
/// reading holds at most this (and one frame) beyond the outbound budget.
const MAX_UNFLUSHED_BYTES: usize = 64 << 10;

/// A connection's socket sink, once the socket is open, and what keeps direct writes in order.
#[derive(Debug)]
pub(crate) struct SharedSink {
    state: Mutex<SinkState>,
    /// Frames queued or in the writer's hands, not yet flushed (the tickets out).
    queued: Arc<AtomicUsize>,
    /// The outbound queue, to hand the writer a flush the read loop could not finish (weak:
    /// the queue still closes when the last outbox goes).
    queue: flume::WeakSender<Outbound>,
}

#[derive(Debug, Default)]
struct SinkState {
    sink: Option<SocketSink>,
    /// The writer is polling the sink (its waker is the one registered).
    writing: bool,
    /// Direct writes waiting in the socket's buffer for the read loop's next flush, and their
    /// bytes.
    unflushed: u32,
    unflushed_bytes: usize,
    /// Frames written, for the connection's `dcrf_messages_sent_total`.
    sent: Option<::metrics::Counter>,
}

/// A frame on its way through the queue (or a flush handed to the writer); direct writes
/// wait while any is out.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

thread_local! {
    /// The sink of the read loop being polled on this thread (its address), if any.
    static READING: Cell<usize> = const { Cell::new(0) };
}

impl SharedSink {
    /// The sink of the connection whose writer drains `queue`, until a socket is installed.
    pub(crate) fn new(queue: &flume::Sender<Outbound>) -> SharedSink {
        SharedSink {
            state: Mutex::default(),
            queued: Arc::default(),
            queue: queue.downgrade(),
        }
    }

    /// Installs the socket's sink; frames written through it count on `sent`.
    pub(crate) fn install(&self, sink: SocketSink, sent: ::metrics::Counter) {
        let mut state = crate::sync::lock(&self.state);
        state.sink = Some(sink);
        state.sent = Some(sent);
    }

    /// A ticket for a frame about to be queued.
    pub(crate) fn ticket(&self) -> Ticket {
        self.queued.fetch_add(1, Ordering::AcqRel);
        Ticket(self.queued.clone())
    }

    /// Writes `text` into the socket's buffer now if this is the connection's read loop,
    /// nothing is queued or being written and the socket takes it; otherwise gives it back
    /// with a ticket, for the queue. The read loop flushes it before it next waits.
    pub(crate) fn write_now(&self, text: Utf8Bytes) -> Result<(), (Utf8Bytes, Ticket)> {
        let own = READING.with(Cell::get) == self as *const SharedSink as usize;
        let mut guard = crate::sync::lock(&self.state);
        let state = &mut *guard;
        let idle = own && !state.writing && self.queued.load(Ordering::Acquire) == 0;
        let sink = match state.sink.as_mut() {
            Some(sink) if idle => sink,
            _ => return Err((text, self.ticket())),
        };
        let mut cx = Context::from_waker(Waker::noop());
        if !matches!(
            Pin::new(&mut *sink).poll_ready(&mut cx),
            Poll::Ready(Ok(()))
        ) {
            return Err((text, self.ticket()));
        }
        let bytes = text.len();
        if Pin::new(&mut *sink).start_send(Message::Text(text)).is_ok() {
            state.unflushed += 1;
            state.unflushed_bytes += bytes;
            if let Some(sent) = &state.sent {
                sent.increment(1);
            }
        }
        // Else the socket is gone; the reader sees it end.
        if state.unflushed >= MAX_UNFLUSHED || state.unflushed_bytes >= MAX_UNFLUSHED_BYTES {
            self.flush_direct(state);
        }
        Ok(())
    }

    /// Flushes what direct writes left in the socket's buffer; what the socket cannot take now
    /// is handed to the writer, and direct writes wait until it has flushed.
    fn flush_direct(&self, state: &mut SinkState) {
        state.unflushed_bytes = 0;
        if std::mem::take(&mut state.unflushed) == 0 || state.writing {
            // Nothing to flush, or the writer is flushing.
            return;
        }
        let Some(sink) = state.sink.as_mut() else {
            return;
        };
        let mut cx = Context::from_waker(Waker::noop());
        if Pin::new(sink).poll_flush(&mut cx).is_pending()
            && let Some(queue) = self.queue.upgrade()
        {
            // A full queue has frames for the writer anyway: it flushes after them.
            let _ = queue.try_send(Outbound::Flush(self.ticket()));
        }
    }

    /// `future` as the connection's read loop: frames it sends are written directly, and
    /// flushed whenever it is about to wait.
    pub(crate) fn reading<'a, F: Future>(&'a self, future: Pin<&'a mut F>) -> Reading<'a, F> {
        Reading { sink: self, future }
    }

    /// Polls the sink with `f` (for the writer); `None` when no socket is installed.
    pub(crate) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut SocketSink>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<Option<T>> {
        let mut state = crate::sync::lock(&self.state);
        match state.sink.as_mut() {
            Some(sink) => f(Pin::new(sink), cx).map(Some),
            None => Poll::Ready(None),
        }
    }

    /// Marks whether the writer is polling the sink.
    pub(crate) fn set_writing(&self, writing: bool) {
        let mut state = crate::sync::lock(&self.state);
        state.writing = writing;
        if writing {
            // Whatever direct writes left in the buffer, the writer's flush takes.
            state.unflushed = 0;
            state.unflushed_bytes = 0;
        }
    }

    /// Takes the sink out (the connection is over).
    pub(crate) fn take(&self) -> Option<SocketSink> {
        crate::sync::lock(&self.state).sink.take()
    }
}

/// A connection's read loop (see [`SharedSink::reading`]).
pub(crate) struct Reading<'a, F> {
    sink: &'a SharedSink,
    future: Pin<&'a mut F>,
}

impl<F: Future> Future for Reading<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let me = self.sink as *const SharedSink as usize;
        let outer = READING.with(|r| r.replace(me));
        let polled = self.future.as_mut().poll(cx);
        READING.with(|r| r.set(outer));
        if polled.is_pending() {
            self.sink
                .flush_direct(&mut crate::sync::lock(&self.sink.state));
        }
        polled
    }
}
