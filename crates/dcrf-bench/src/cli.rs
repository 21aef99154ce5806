//! Command-line interface: the scenario and every flag.

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Load generator for servers speaking the DCRF JSON protocol over WebSockets.
///
/// Opens `--connections` WebSocket connections to `--url`, runs the scenario for `--warmup`
/// seconds (not measured) and then `--duration` seconds (measured), and reports throughput,
/// latency percentiles, errors and the generator's own CPU use. With `--json` the last line
/// printed on stdout is one JSON object with the results.
///
/// Replies are matched to requests by `request_id`; a reply whose `response_status` is not
/// 2xx counts as an error, and a reply whose `request_id` matches nothing in flight counts as
/// unmatched. A request sent in the measured window and still unanswered `--timeout` seconds
/// after the window (fan-out: a write × subscriber pair whose push never came) is lost, and an
/// error.
/// Fan-out counts each (write, subscriber) pair once; a second push of the same write to the
/// same subscriber is a duplicate (`duplicates`), neither a delivery nor timed.
///
/// Latency is never silently capped: a lost request is recorded as censored at the time it
/// had waited (a lower bound), and so is a sample above the histogram's bound (one hour, or
/// more for runs that can last longer: `latency_bound_s`). `censored` counts them, and every
/// percentile at or above `censored_min_us` is a lower bound, not a measurement. Warnings
/// about errors, unmatched, lost, duplicate or censored samples are printed on stderr.
#[derive(Debug, Parser)]
#[command(name = "dcrf-bench", version, about, long_about)]
#[command(after_help = "Examples:
  dcrf-bench echo --url ws://127.0.0.1:8000/ws/echo/ --connections 50 --window 16 --duration 10
  dcrf-bench retrieve --url ws://127.0.0.1:8000/ws/todos/ --connections 50 --rows 1000 --json
  dcrf-bench fanout --url ws://127.0.0.1:8000/ws/todos/ --connections 1000 --pk 1 --duration 10
  dcrf-bench idle --url ws://127.0.0.1:8000/ws/echo/ --connections 10000 --server-pid 1234
  dcrf-bench resume --url ws://127.0.0.1:8000/ws/todos/ --missed 1000 --rows 1000 --duration 10
  dcrf-bench raw-echo --bind 127.0.0.1:9000
  dcrf-bench raw-retrieve --bind 127.0.0.1:9001 --database sqlite:///tmp/todos.sqlite3
  dcrf-bench raw-fanout --bind 127.0.0.1:9002")]
pub struct Args {
    /// The scenario to run (or `raw-echo`, `raw-retrieve`, `raw-fanout` to serve a baseline
    /// server).
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// Full WebSocket URL of the endpoint, e.g. `ws://127.0.0.1:8000/ws/todos/`. Required for
    /// every scenario except the `raw-*` servers.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,

    /// Number of connections. For `fanout`: the number of subscriber connections (one more
    /// connection is the writer). For `idle`: the connections held open.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub connections: usize,

    /// Measured duration in seconds (fractions allowed). For `idle`: how long the connections
    /// are held open after the server's memory is read (after the echo round).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds of load before measuring starts (not measured). For `idle`: the settling time
    /// between opening the last connection and reading the server's memory (and again between
    /// the last echo reply and the second reading).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    pub warmup: f64,

    /// Requests in flight per connection (pipelining). Closed loop: a new request is sent as
    /// soon as a reply arrives. Default 1; with `--rate`, the cap on requests in flight per
    /// connection (default 1024). Ignored by `fanout` without `--rate`, where the writer waits
    /// for every delivery of one update before sending the next.
    #[arg(long, value_name = "W")]
    pub window: Option<usize>,

    /// Open loop: the target total rate in messages per second across all connections (for
    /// `fanout`: writes per second). Requests are sent on a fixed schedule and latency is
    /// measured from the scheduled send time, so a slow server cannot hide its queueing
    /// delay (no coordinated omission).
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// Primary keys used by `retrieve` and `patch` are drawn uniformly from 1..=N; `list`
    /// draws its offset from 0..=N-100. Match the number of rows seeded on the server.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub rows: u64,

    /// Worker threads of the generator's runtime (default: the CPUs it may run on).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Print the results as one JSON object on the last line of stdout instead of a table.
    #[arg(long)]
    pub json: bool,

    /// A label copied into the results (e.g. the server's name), for scripts.
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,

    /// `fanout` only: how subscribers subscribe. `instance` sends `subscribe_instance` for
    /// `--pk`; `all` sends `subscribe_to_all`.
    #[arg(long, value_enum, value_name = "HOW", default_value_t = Subscribe::Instance)]
    pub subscribe: Subscribe,

    /// `resume` only: the pushes a subscriber misses before it resumes.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub missed: usize,

    /// `fanout` only: the primary key of the row the writer patches (and subscribers watch).
    #[arg(long, value_name = "PK", default_value_t = 1)]
    pub pk: u64,

    /// Process id of the server under test: its CPU use over the measured window is reported
    /// (`server_cpu_pct`), and for `idle` its resident memory (VmRSS) before and after opening
    /// the connections.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// `raw-echo`, `raw-retrieve`, `raw-fanout` only: address to listen on (port 0 picks a
    /// free port; the address is printed as `dcrf-bench raw-echo listening on ADDR`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9000")]
    pub bind: String,

    /// `raw-retrieve` only: the database holding the `todo` table `dcrf-demo --seed N`
    /// created: a SQLite file (`sqlite://PATH`, `sqlite:PATH` or a path; opened read-only) or
    /// a `postgres://` URL.
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,

    /// Maximum number of WebSocket handshakes in progress at once while connecting.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub connect_concurrency: usize,

    /// `echo` and `idle`: length in bytes of the `x` string sent with every echo request.
    #[arg(long, value_name = "BYTES", default_value_t = 16)]
    pub payload: usize,

    /// `idle` only: hold the connections without the echo round (by default, once the idle
    /// memory is read, every connection sends one echo request and waits for its reply, and
    /// the memory is read again).
    #[arg(long)]
    pub no_echo: bool,

    /// Seconds to wait for outstanding replies after the run (they count as lost and as
    /// errors after that, and their latency as censored), for a handshake or subscription
    /// reply, and in closed-loop `fanout` for all deliveries of one update (and again after
    /// the run for the deliveries still due).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub timeout: f64,
}

/// What the generator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// `{"action":"echo","request_id":N,"x":"..."}` (e.g. on /ws/echo/).
    Echo,
    /// `{"action":"retrieve","pk":<random>,"request_id":N}` (on /ws/todos/).
    Retrieve,
    /// `{"action":"list","limit":100,"offset":<random>,"request_id":N}` (on /ws/todos/).
    List,
    /// `{"action":"create","data":{"title":"bench N"},"request_id":N}` (201 expected).
    Create,
    /// `{"action":"patch","pk":<random>,"data":{"done":true|false},"request_id":N}`.
    Patch,
    /// Subscribers (`--connections`) watch one row; one writer patches it; measures the
    /// delay from the write to each subscriber's push.
    Fanout,
    /// Opens `--connections` connections and holds them; reports the server's memory per
    /// connection (needs `--server-pid`); then each connection sends one `echo` request
    /// (`echoed` counts the replies) and the memory is read again.
    Idle,
    /// A subscriber misses `--missed` pushes and resumes with `since`; measures the time from
    /// the resubscribe to the last recovered push (on /ws/todos/).
    Resume,
    /// Not a load scenario: serves a bare WebSocket echo server on `--bind` (every text frame
    /// is sent back unchanged), the ceiling for `echo` and `idle`.
    RawEcho,
    /// Not a load scenario: serves `retrieve` on `--bind` from the `todo` table in
    /// `--database`, hand-written with the demo's reply bytes, the ceiling for `retrieve`.
    RawRetrieve,
    /// Not a load scenario: serves the `fanout` protocol on `--bind` (subscriptions, and a
    /// patch pushes one pre-encoded frame to every subscriber) without a database, the
    /// ceiling for `fanout`.
    RawFanout,
}

impl Scenario {
    /// The name used on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Echo => "echo",
            Scenario::Retrieve => "retrieve",
            Scenario::List => "list",
            Scenario::Create => "create",
            Scenario::Patch => "patch",
            Scenario::Fanout => "fanout",
            Scenario::Idle => "idle",
            Scenario::Resume => "resume",
            Scenario::RawEcho => "raw-echo",
            Scenario::RawRetrieve => "raw-retrieve",
            Scenario::RawFanout => "raw-fanout",
        }
    }

    /// Whether this is one of the baseline servers rather than a load scenario.
    pub fn is_server(self) -> bool {
        matches!(
            self,
            Scenario::RawEcho | Scenario::RawRetrieve | Scenario::RawFanout
        )
    }
}

/// How `fanout` subscribers subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Subscribe {
    /// `{"action":"subscribe_instance","pk":P,"request_id":"sub-i"}`, 201 expected.
    Instance,
    /// `{"action":"subscribe_to_all","request_id":"sub-i"}`, 201 expected.
    All,
}

impl Subscribe {
    /// The name used on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Subscribe::Instance => "instance",
            Subscribe::All => "all",
        }
    }
}

impl Args {
    /// Checks combinations clap cannot express; returns a message for the user.
    pub fn validate(&self) -> Result<(), String> {
        if self.scenario == Scenario::RawRetrieve && self.database.is_none() {
            return Err("--database is required for `raw-retrieve`".into());
        }
        if self.scenario.is_server() {
            return Ok(());
        }
        if self.url.is_none() {
            return Err(format!("--url is required for `{}`", self.scenario.name()));
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        for (name, v) in [("--duration", self.duration), ("--timeout", self.timeout)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{name} must be a positive number of seconds"));
            }
        }
        if !(self.warmup.is_finite() && self.warmup >= 0.0) {
            return Err("--warmup must be zero or a positive number of seconds".into());
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0)
        {
            return Err("--rate must be a positive number".into());
        }
        if self.window == Some(0) {
            return Err("--window must be at least 1".into());
        }
        if self.rows == 0 {
            return Err("--rows must be at least 1".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if self.threads == Some(0) {
            return Err("--threads must be at least 1".into());
        }
        Ok(())
    }

    /// The WebSocket URL (validated to be present for load scenarios).
    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or_default()
    }

    /// `--duration` as a [`Duration`].
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }

    /// `--warmup` as a [`Duration`].
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }

    /// `--timeout` as a [`Duration`].
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }
}
