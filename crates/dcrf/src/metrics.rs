//! Metrics: what the framework counts, and (feature `prometheus`, on by default) a Prometheus
//! scrape endpoint.
//!
//! The framework records through the [`metrics`](https://docs.rs/metrics) facade. Without an
//! installed recorder every update is a no-op; [`install`] installs a Prometheus recorder
//! (once per process) and [`router`] serves it as `GET /metrics` in the text exposition format:
//!
//! ```no_run
//! # fn run() -> Result<(), dcrf::metrics::InstallError> {
//! let handle = dcrf::metrics::install()?;
//! let router: axum::Router = axum::Router::new().merge(dcrf::metrics::router(handle));
//! # Ok(()) }
//! ```
//!
//! Any other `metrics` recorder (StatsD, OpenTelemetry, ...) installed with
//! [`::metrics::set_global_recorder`] receives the same series.
//!
//! | metric | type | labels | what it counts |
//! |---|---|---|---|
//! | [`dcrf_connections`](CONNECTIONS) | gauge | | WebSockets open now |
//! | [`dcrf_connections_total`](CONNECTIONS_TOTAL) | counter | | WebSockets opened (after the handshake) |
//! | [`dcrf_messages_received_total`](MESSAGES_RECEIVED_TOTAL) | counter | | inbound text and binary frames |
//! | [`dcrf_messages_sent_total`](MESSAGES_SENT_TOTAL) | counter | | outbound text frames written to sockets (replies, errors, pushes) |
//! | [`dcrf_actions_total`](ACTIONS_TOTAL) | counter | `action`, `status` | actions run, by name and reply status |
//! | [`dcrf_action_duration_seconds`](ACTION_DURATION_SECONDS) | histogram | `action` | time from dispatch to the action's end |
//! | [`dcrf_pushes_total`](PUSHES_TOTAL) | counter | | subscription push frames sent |
//! | [`dcrf_slow_client_closes_total`](SLOW_CLIENT_CLOSES_TOTAL) | counter | | sockets closed with 1013 for staying behind |
//! | [`dcrf_throttled_total`](THROTTLED_TOTAL) | counter | | frames answered 429 by the rate limit |
//! | [`dcrf_layer_reconnects_total`](LAYER_RECONNECTS_TOTAL) | counter | | Redis pub/sub reconnections |
//!
//! The `action` label is the action's name when the consumer has it, [`UNKNOWN_ACTION`]
//! (`"<unknown>"`) when it does not (answered 405), and [`DENIED_ACTION`] (`"<denied>"`) for a
//! frame the permissions refused before it ran (403): client-chosen names never become labels.
//! The `status` label is the `response_status` of the action's first reply (`"200"`, `"404"`,
//! ...), or `"none"` for an action that sent none. A detached action is counted and timed when
//! it finishes.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::metrics::{Counter, Histogram};

/// Gauge: WebSockets open now.
pub const CONNECTIONS: &str = "dcrf_connections";
/// Counter: WebSockets opened (counted once the upgrade is done).
pub const CONNECTIONS_TOTAL: &str = "dcrf_connections_total";
/// Counter: inbound text and binary frames (pings, pongs and close frames are not counted).
pub const MESSAGES_RECEIVED_TOTAL: &str = "dcrf_messages_received_total";
/// Counter: outbound text frames written to sockets: replies, error frames and pushes (pings
/// and close frames are not counted).
pub const MESSAGES_SENT_TOTAL: &str = "dcrf_messages_sent_total";
/// Counter, labels `action` and `status`: actions run. See the module docs for the labels.
pub const ACTIONS_TOTAL: &str = "dcrf_actions_total";
/// Histogram, label `action`: seconds from an action's dispatch to its end (a detached
/// action's: to its reply).
pub const ACTION_DURATION_SECONDS: &str = "dcrf_action_duration_seconds";
/// Counter: push frames sent to subscribers (one per subscription request id an event
/// reaches).
pub const PUSHES_TOTAL: &str = "dcrf_pushes_total";
/// Counter: sockets closed with 1013 (Try Again Later) because they stayed behind their
/// subscriptions (see [`Dcrf::slow_client_timeout`](crate::Dcrf::slow_client_timeout)).
pub const SLOW_CLIENT_CLOSES_TOTAL: &str = "dcrf_slow_client_closes_total";
/// Counter: frames answered 429 by the rate limit
/// ([`Dcrf::rate_limit`](crate::Dcrf::rate_limit)).
pub const THROTTLED_TOTAL: &str = "dcrf_throttled_total";
/// Counter: times the Redis broker re-established its pub/sub connection after losing it.
pub const LAYER_RECONNECTS_TOTAL: &str = "dcrf_layer_reconnects_total";

/// The `action` label of an action the consumer does not have.
pub const UNKNOWN_ACTION: &str = "<unknown>";
/// The `action` label of a frame its permissions refused before it ran.
pub const DENIED_ACTION: &str = "<denied>";

/// The buckets of [`ACTION_DURATION_SECONDS`], in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Increments a counter without labels.
pub(crate) fn count(name: &'static str) {
    ::metrics::counter!(name).increment(1);
}

/// A WebSocket opened: counted now, and as open until the returned guard is dropped.
pub(crate) fn connection_opened() -> OpenConnection {
    count(CONNECTIONS_TOTAL);
    ::metrics::gauge!(CONNECTIONS).increment(1.0);
    OpenConnection(())
}

/// Holds one open connection in [`CONNECTIONS`].
#[derive(Debug)]
pub(crate) struct OpenConnection(());

impl Drop for OpenConnection {
    fn drop(&mut self) {
        ::metrics::gauge!(CONNECTIONS).decrement(1.0);
    }
}

/// One socket's metric handles (shared by every stream of a multiplexed socket), registered
/// when the socket opens: the per-frame updates are one atomic add each, with no lookup in the
/// recorder's registry.
pub(crate) struct SocketMetrics {
    /// [`MESSAGES_RECEIVED_TOTAL`].
    pub(crate) received: Counter,
    /// [`MESSAGES_SENT_TOTAL`].
    pub(crate) sent: Counter,
    /// [`PUSHES_TOTAL`].
    pub(crate) pushes: Counter,
    /// The action series this socket used, by action label.
    actions: Mutex<HashMap<Box<str>, ActionSeries>>,
}

/// The series of one action label: its histogram, and its counter per status.
struct ActionSeries {
    duration: Histogram,
    by_status: Vec<(u16, Counter)>,
}

impl std::fmt::Debug for SocketMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketMetrics").finish_non_exhaustive()
    }
}

impl SocketMetrics {
    /// Registers the socket's handles with the recorder installed now.
    pub(crate) fn new() -> Self {
        SocketMetrics {
            received: ::metrics::counter!(MESSAGES_RECEIVED_TOTAL),
            sent: ::metrics::counter!(MESSAGES_SENT_TOTAL),
            pushes: ::metrics::counter!(PUSHES_TOTAL),
            actions: Mutex::default(),
        }
    }

    /// Counts and times one action under `action` with `status` (0: no reply).
    fn action(&self, action: &str, status: u16, elapsed: Duration) {
        let mut actions = crate::sync::lock(&self.actions);
        let series = match actions.get_mut(action) {
            Some(series) => series,
            None => actions.entry(action.into()).or_insert_with(|| ActionSeries {
                duration: ::metrics::histogram!(ACTION_DURATION_SECONDS, "action" => label(action)),
                by_status: Vec::new(),
            }),
        };
        series.duration.record(elapsed.as_secs_f64());
        match series.by_status.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => counter.increment(1),
            None => {
                let counter = ::metrics::counter!(
                    ACTIONS_TOTAL,
                    "action" => label(action),
                    "status" => status_label(status)
                );
                counter.increment(1);
                series.by_status.push((status, counter));
            }
        }
    }
}

tokio::task_local! {
    /// The action being run: the status of its first reply, and whether it went detached.
    static ACTION: ActionState;
}

struct ActionState {
    status: Cell<u16>,
    detached: Cell<bool>,
}

/// Notes the status of a reply sent by the action being run (the first one counts).
pub(crate) fn note_status(status: u16) {
    let _ = ACTION.try_with(|a| {
        if a.status.get() == 0 {
            a.status.set(status);
        }
    });
}

/// Notes that the action being run continues as a detached task, which counts it itself.
pub(crate) fn note_detached() {
    let _ = ACTION.try_with(|a| a.detached.set(true));
}

/// How an action ended, for [`Outcome::record`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    /// The status of its first reply, 0 for none.
    pub(crate) status: u16,
    /// It continues detached (counted when that task ends).
    pub(crate) detached: bool,
    /// Time from the start to the end.
    pub(crate) elapsed: Duration,
}

/// Runs an action, noting the status of its first reply and timing it.
pub(crate) async fn observe<F: Future>(fut: F) -> (F::Output, Outcome) {
    let start = Instant::now();
    let state = ActionState {
        status: Cell::new(0),
        detached: Cell::new(false),
    };
    ACTION
        .scope(state, async move {
            let out = fut.await;
            let outcome = ACTION.with(|a| Outcome {
                status: a.status.get(),
                detached: a.detached.get(),
                elapsed: start.elapsed(),
            });
            (out, outcome)
        })
        .await
}

impl Outcome {
    /// Counts and times the action under `action` (unless it went detached), and records the
    /// status in the current span.
    pub(crate) fn record(&self, socket: &SocketMetrics, action: &str, span: &tracing::Span) {
        if self.detached {
            return;
        }
        if self.status != 0 {
            span.record("status", self.status);
        }
        socket.action(action, self.status, self.elapsed);
    }
}

/// The action label: the fixed ones without allocating.
fn label(action: &str) -> ::metrics::SharedString {
    match action {
        UNKNOWN_ACTION => UNKNOWN_ACTION.into(),
        DENIED_ACTION => DENIED_ACTION.into(),
        other => other.to_owned().into(),
    }
}

/// The status label: `"200"`, ..., `"none"` for 0.
fn status_label(status: u16) -> ::metrics::SharedString {
    let fixed = match status {
        0 => "none",
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        other => return other.to_string().into(),
    };
    fixed.into()
}

#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use prometheus::*;

#[cfg(feature = "prometheus")]
mod prometheus {
    use std::sync::OnceLock;
    use std::time::Duration;

    use axum::Router;
    use axum::http::header;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

    pub use metrics_exporter_prometheus::PrometheusHandle;

    use super::*;

    /// The content type of the text exposition format.
    pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

    /// How often the installed recorder's upkeep runs (it drains histogram samples).
    const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

    /// [`install`] could not install the Prometheus recorder: another `metrics` recorder is
    /// already installed in this process.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot install the Prometheus recorder: {0}")]
    pub struct InstallError(#[from] metrics_exporter_prometheus::BuildError);

    impl From<InstallError> for crate::Error {
        fn from(e: InstallError) -> Self {
            crate::Error::configuration_caused_by("cannot install the metrics recorder", e)
        }
    }

    /// Installs a Prometheus recorder as the process's `metrics` recorder, once, and returns its
    /// handle (the same handle on every call). The dcrf metrics are described (their `# HELP`
    /// lines) and the unlabelled ones start at zero; [`ACTION_DURATION_SECONDS`] is a histogram
    /// with [`DURATION_BUCKETS`]. A thread runs the recorder's upkeep every 5 s.
    pub fn install() -> Result<PrometheusHandle, InstallError> {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _once = crate::sync::lock(&LOCK);
        if let Some(handle) = HANDLE.get() {
            return Ok(handle.clone());
        }
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(ACTION_DURATION_SECONDS.to_owned()),
                DURATION_BUCKETS,
            )?
            .install_recorder()?;
        describe();
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("dcrf-metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        Ok(HANDLE.get_or_init(|| handle).clone())
    }

    /// The handle of the recorder [`install`] installed, if it has.
    pub fn handle() -> Option<PrometheusHandle> {
        HANDLE.get().cloned()
    }

    /// A router serving `GET /metrics`: the recorder's metrics in Prometheus' text exposition
    /// format. Merge it into your application's router (it is plain HTTP; protect or bind it as
    /// you would any admin endpoint).
    pub fn router<S>(handle: PrometheusHandle) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], handle.render()) }
            }),
        )
    }

    /// Describes every dcrf metric and registers the unlabelled ones at zero, so a scrape
    /// shows them before anything happened.
    fn describe() {
        use ::metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_gauge!(CONNECTIONS, "WebSockets open now.");
        describe_counter!(CONNECTIONS_TOTAL, "WebSockets opened.");
        describe_counter!(
            MESSAGES_RECEIVED_TOTAL,
            "Inbound text and binary WebSocket frames."
        );
        describe_counter!(MESSAGES_SENT_TOTAL, "Outbound text frames written.");
        describe_counter!(ACTIONS_TOTAL, "Actions run, by action and reply status.");
        describe_histogram!(
            ACTION_DURATION_SECONDS,
            ::metrics::Unit::Seconds,
            "Time from an action's dispatch to its end."
        );
        describe_counter!(PUSHES_TOTAL, "Subscription push frames sent.");
        describe_counter!(
            SLOW_CLIENT_CLOSES_TOTAL,
            "Sockets closed with 1013 for staying behind their subscriptions."
        );
        describe_counter!(THROTTLED_TOTAL, "Frames answered 429 by the rate limit.");
        describe_counter!(
            LAYER_RECONNECTS_TOTAL,
            "Redis pub/sub reconnections of the channel layer."
        );
        ::metrics::gauge!(CONNECTIONS).increment(0.0);
        for name in [
            CONNECTIONS_TOTAL,
            MESSAGES_RECEIVED_TOTAL,
            MESSAGES_SENT_TOTAL,
            PUSHES_TOTAL,
            SLOW_CLIENT_CLOSES_TOTAL,
            THROTTLED_TOTAL,
            LAYER_RECONNECTS_TOTAL,
        ] {
            ::metrics::counter!(name).increment(0);
        }
    }
}
