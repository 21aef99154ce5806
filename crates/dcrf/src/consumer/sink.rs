//! The socket's write half, shared by the connection's writer task and direct writes.
//!
//! A frame sent while the writer is idle and nothing is queued is written by the sender
//! itself, at once: no hand-off to the writer task, no wake-up, no queue. Anything else (a
//! busy writer, queued frames, a socket that cannot take the frame now) goes through the
//! outbound queue as before, so frames keep the order they were sent in and a client that
//! does not read still backs the queue up (see [`Outbox`](super::Outbox)).
//!
//! The sink sits in a mutex that is only ever held for one synchronous poll, never across an
//! `await`. Every frame that goes through the queue holds a [`Ticket`] until the writer has
//! flushed it (or it is dropped unsent), and a direct write waits for none: it is only made
//! while no ticket is out, so it can never overtake a queued frame. While the writer polls the
//! sink itself (a batch, a ping, the close), direct writes wait too: the sink keeps one waker.

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

/// A connection's socket sink, once the socket is open, and what keeps direct writes in order.
#[derive(Debug, Default)]
pub(crate) struct SharedSink {
    state: Mutex<SinkState>,
    /// Frames queued or in the writer's hands, not yet flushed (the tickets out).
    queued: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct SinkState {
    sink: Option<SocketSink>,
    /// The writer is polling the sink (its waker is the one registered).
    writing: bool,
    /// Frames written, for the connection's `dcrf_messages_sent_total`.
    sent: Option<::metrics::Counter>,
}

/// A frame on its way through the queue; direct writes wait while any is out.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SharedSink {
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

    /// Writes `text` now if nothing is queued or being written and the socket takes it;
    /// otherwise gives it back with a ticket, for the queue. A frame the socket took but could
    /// not flush at once is left to the writer (woken by a flush request on `queue`).
    pub(crate) fn write_now(
        &self,
        text: Utf8Bytes,
        queue: &flume::Sender<Outbound>,
    ) -> Result<(), (Utf8Bytes, Ticket)> {
        let mut guard = crate::sync::lock(&self.state);
        let state = &mut *guard;
        let idle =
            !state.writing && self.queued.load(Ordering::Acquire) == 0 && !queue.is_disconnected();
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
        if Pin::new(&mut *sink)
            .start_send(Message::Text(text))
            .is_err()
        {
            // The socket is gone; the reader sees it end.
            return Ok(());
        }
        if let Some(sent) = &state.sent {
            sent.increment(1);
        }
        if Pin::new(&mut *sink).poll_flush(&mut cx).is_pending() {
            // The rest is the writer's; direct writes wait until it has flushed.
            let _ = queue.try_send(Outbound::Flush(self.ticket()));
        }
        Ok(())
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
        crate::sync::lock(&self.state).writing = writing;
    }

    /// Takes the sink out (the connection is over).
    pub(crate) fn take(&self) -> Option<SocketSink> {
        crate::sync::lock(&self.state).sink.take()
    }
}
