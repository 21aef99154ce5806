//! What one socket may cost and how long it may live: the per-socket caps (request id size,
//! reply size, detached actions in flight, subscriptions), the keepalive deadline and the credential's expiry
//! (which the built-in `refresh_token` action, in `server`, moves). One [`Guard`] per socket, shared by its reader, its
//! writer and every [`Ctx`] on it (all streams of a multiplexed socket).
//!
//! The limits and what a client sees are listed in `docs/limits.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde_json::Value;
use tokio::sync::Notify;

use crate::auth::Authenticator;
use crate::consumer::subscriptions::SubscriptionBudget;
use crate::error::ApiError;
use crate::protocol::Frame;

/// The name of the built-in action that replaces a connection's credential in-band.
pub(crate) const REFRESH_ACTION: &str = "refresh_token";

/// The close code sent when the connection's credential expires (4000-4999 are for
/// applications; 4401 reads as HTTP's 401).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;

/// The close code sent to a peer that stopped answering pings (1011, as other servers do for a
/// keepalive timeout).
pub const CLOSE_KEEPALIVE_TIMEOUT: u16 = 1011;

/// [`Guard`]'s expiry of a credential that does not expire. (A watch channel would do, at
/// ten times the size, for every socket.)
const NO_EXPIRY: u64 = u64::MAX;

/// The caps of one socket, copied from [`Dcrf`](crate::Dcrf) when it opens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SocketLimits {
    pub(crate) max_request_id: usize,
    pub(crate) max_reply: usize,
    pub(crate) max_detached: usize,
    pub(crate) max_subscriptions: usize,
    /// Ping interval and pong timeout; `None` disables keepalive.
    pub(crate) keepalive: Option<(Duration, Duration)>,
    /// Inbound frames per second; `None`: not limited.
    pub(crate) rate: Option<std::num::NonZeroU32>,
}

/// The per-socket state described in the module docs.
pub(crate) struct Guard {
    limits: SocketLimits,
    detached: AtomicUsize,
    auth: Arc<dyn Authenticator>,
    /// The credential's expiry, in seconds since the Unix epoch ([`NO_EXPIRY`]: none).
    expiry: AtomicU64,
    /// Woken when a refresh moves the expiry.
    expiry_moved: Notify,
    start: Instant,
    /// When a frame last arrived, in milliseconds since `start`.
    seen_ms: AtomicU64,
    /// The inbound rate limit (a token bucket of `rate` frames, refilled at `rate` per second).
    throttle: Option<governor::DefaultDirectRateLimiter>,
    /// The subscription cap, shared by every stream of the socket.
    subscriptions: Arc<SubscriptionBudget>,
    /// The socket's metric handles.
    metrics: crate::metrics::SocketMetrics,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("limits", &self.limits)
            .field("detached", &self.detached)
            .field("expiry", &self.expiry.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl Guard {
    pub(crate) fn new(
        limits: SocketLimits,
        auth: Arc<dyn Authenticator>,
        expires_at: Option<u64>,
    ) -> Self {
        Guard {
            limits,
            detached: AtomicUsize::new(0),
            auth,
            expiry: AtomicU64::new(expires_at.unwrap_or(NO_EXPIRY)),
            expiry_moved: Notify::new(),
            start: Instant::now(),
            seen_ms: AtomicU64::new(0),
            throttle: limits
                .rate
                .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n))),
            subscriptions: Arc::new(SubscriptionBudget::new(limits.max_subscriptions)),
            metrics: crate::metrics::SocketMetrics::new(),
        }
    }

    /// The socket's metric handles.
    pub(crate) fn metrics(&self) -> &crate::metrics::SocketMetrics {
        &self.metrics
    }

    /// The answer to a frame over the socket's rate limit, if it is (DRF's throttling: 429,
    /// `Request was throttled. Expected available in N seconds.`, N rounded up).
    pub(crate) fn check_rate(&self) -> Option<ApiError> {
        use governor::clock::{Clock, DefaultClock};
        let throttle = self.throttle.as_ref()?;
        let not_until = throttle.check().err()?;
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Some(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            vec![Value::String(format!(
                "Request was throttled. Expected available in {} seconds.",
                seconds.max(1)
            ))],
        ))
    }

    /// The answer to a frame whose `request_id` is over the cap, if it is.
    pub(crate) fn check_request_id(&self, frame: &Frame<'_>) -> Option<ApiError> {
        let len = frame.request_id()?.get().len();
        (len > self.limits.max_request_id).then(|| {
            ApiError::bad_request(format!(
                "request_id is too long ({len} bytes; the limit is {} bytes).",
                self.limits.max_request_id
            ))
        })
    }

    /// The authenticator that opened the socket (for `refresh_token`).
    pub(crate) fn auth(&self) -> &dyn Authenticator {
        &*self.auth
    }

    /// Moves the credential's expiry (a refresh).
    pub(crate) fn set_expiry(&self, expires_at: Option<u64>) {
        self.expiry
            .store(expires_at.unwrap_or(NO_EXPIRY), Ordering::Release);
        self.expiry_moved.notify_waiters();
    }

    /// The socket's subscription cap, for the subscriptions of each of its streams.
    pub(crate) fn subscription_budget(&self) -> Arc<SubscriptionBudget> {
        self.subscriptions.clone()
    }

    /// The largest frame this socket sends, in bytes.
    pub(crate) fn max_reply(&self) -> usize {
        self.limits.max_reply
    }

    /// Takes one of the socket's detached-action slots, if one is free.
    pub(crate) fn try_detach(self: &Arc<Self>) -> Option<DetachSlot> {
        let max = self.limits.max_detached;
        self.detached
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| DetachSlot(self.clone()))
    }

    /// The answer to a detached action refused because every slot is taken.
    pub(crate) fn too_many_detached(&self) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            vec![Value::String(format!(
                "Too many actions in progress on this connection (the limit is {}); retry when one has answered.",
                self.limits.max_detached
            ))],
        )
    }

    /// The keepalive ping interval, if keepalive is on.
    pub(crate) fn ping_interval(&self) -> Option<Duration> {
        self.limits.keepalive.map(|(interval, _)| interval)
    }

    /// A frame (of any kind, pongs included) arrived: the peer is alive.
    pub(crate) fn seen(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.seen_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes when nothing has arrived for a ping interval plus the pong timeout; never when
    /// keepalive is off.
    pub(crate) async fn keepalive_expired(&self) {
        let Some((interval, timeout)) = self.limits.keepalive else {
            return std::future::pending().await;
        };
        loop {
            let seen = self.seen_ms.load(Ordering::Relaxed);
            let deadline = self.start + Duration::from_millis(seen) + interval + timeout;
            tokio::time::sleep_until(deadline.into()).await;
            if self.seen_ms.load(Ordering::Relaxed) == seen {
                return;
            }
        }
    }

    /// Completes when the connection must end: the peer went silent past the keepalive
    /// deadline, or the credential expired. The close code and reason to send.
    pub(crate) async fn ended(&self) -> (u16, &'static str) {
        tokio::select! {
            _ = self.keepalive_expired() => (CLOSE_KEEPALIVE_TIMEOUT, "keepalive timeout"),
            _ = self.credential_expired() => (CLOSE_TOKEN_EXPIRED, "token expired"),
        }
    }

    /// Completes when the connection's credential expires; never when it has no expiry. A
    /// refresh moves the deadline.
    pub(crate) async fn credential_expired(&self) {
        loop {
            // Registered before the expiry is read, so a refresh in between is not missed.
            let moved = self.expiry_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let exp = self.expiry.load(Ordering::Acquire);
            if exp == NO_EXPIRY {
                moved.await;
                continue;
            }
            let wait = (UNIX_EPOCH + Duration::from_secs(exp))
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            if wait.is_zero() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = moved => {}
            }
        }
    }
}

/// The writer's keepalive ticker: one tick per ping interval, none when keepalive is off.
#[derive(Debug)]
pub(crate) struct Pings(Option<tokio::time::Interval>);

impl Pings {
    pub(crate) fn new(interval: Option<Duration>) -> Self {
        Pings(interval.map(|every| {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        }))
    }

    /// Waits for the next ping time.
    pub(crate) async fn tick(&mut self) {
        match &mut self.0 {
            Some(ticks) => {
                ticks.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// One detached action in flight; its slot is given back when it is dropped (the action
/// answered, failed or was cancelled).
#[derive(Debug)]
pub(crate) struct DetachSlot(Arc<Guard>);

impl Drop for DetachSlot {
    fn drop(&mut self) {
        self.0.detached.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A `Vec<u8>` writer that fails once more than `max` bytes are written, so an oversized reply
/// is never built in full.
#[derive(Debug)]
pub(crate) struct CappedWriter {
    pub(crate) buf: Vec<u8>,
    max: usize,
    /// Set when a write went over the cap.
    pub(crate) exceeded: bool,
}

impl CappedWriter {
    pub(crate) fn new(max: usize) -> Self {
        CappedWriter {
            buf: Vec::with_capacity(128),
            max,
            exceeded: false,
        }
    }
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.max {
            self.exceeded = true;
            return Err(std::io::Error::other("reply over the size cap"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The answer sent instead of a frame over the reply cap.
pub(crate) fn reply_too_large(len: Option<usize>, max: usize) -> ApiError {
    let size = match len {
        Some(len) => format!("{len} bytes"),
        None => format!("over {max} bytes"),
    };
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        vec![Value::String(format!(
            "The reply is too large to send ({size}; the limit is {max} bytes). Ask for less data, e.g. a smaller page."
        ))],
    )
}
