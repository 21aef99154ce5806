//! Counting and latency recording shared by all connections, `/proc` readings, and the
//! report printed at the end.
//!
//! Latencies the generator cannot measure exactly are *censored*: a request still unanswered
//! when the generator stops waiting (fan-out: a write × subscriber pair never delivered; idle:
//! a handshake that timed out) is recorded at the time it had waited, a lower bound of its
//! real latency, and a sample above the histogram's bound is recorded at the bound. Both are
//! counted in `censored`, and the smallest such lower bound is `censored_min_us`: every
//! percentile at or above it is only a lower bound.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The smallest histogram bound: one hour, in nanoseconds. [`latency_bound_ns`] raises it for
/// runs that can last longer.
const MIN_LATENCY_BOUND_NS: u64 = 3_600_000_000_000;
/// Samples a connection buffers before taking a shard's lock.
const LOCAL_BATCH: usize = 256;

/// The histogram bound for a run: longer than any latency the run can observe (warm-up,
/// duration, two timeouts (a closed-loop fan-out write may wait one timeout inside the window
/// and the final wait is another) and a minute of slack), and at least one hour. Samples above
/// it are recorded at the bound and counted as censored.
pub fn latency_bound_ns(warmup: Duration, duration: Duration, timeout: Duration) -> u64 {
    let longest = warmup
        .saturating_add(duration)
        .saturating_add(timeout.saturating_mul(2))
        .saturating_add(Duration::from_secs(60));
    crate::proto::nanos(longest).max(MIN_LATENCY_BOUND_NS)
}

/// A latency histogram shared by many connections: a few lock-protected shards that
/// connections fill in batches, merged at the end; and the count of censored samples.
#[derive(Debug)]
pub struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
    bound_ns: u64,
    /// Samples known only as a lower bound (see the module documentation).
    censored: AtomicU64,
    /// The smallest lower bound among them, ns (`u64::MAX` when there is none).
    censored_min_ns: AtomicU64,
}

impl Recorder {
    /// A recorder with `shards` shards (at least one) whose histograms hold latencies up to
    /// `bound_ns` (see [`latency_bound_ns`]).
    pub fn new(shards: usize, bound_ns: u64) -> Recorder {
        let bound_ns = bound_ns.max(2);
        let shards = (0..shards.max(1))
            .map(|_| Mutex::new(new_histogram(bound_ns)))
            .collect();
        Recorder {
            shards,
            bound_ns,
            censored: AtomicU64::new(0),
            censored_min_ns: AtomicU64::new(u64::MAX),
        }
    }

    /// A per-connection buffer that flushes into shard `index % shards`.
    pub fn local(&self, index: usize) -> LocalRecorder<'_> {
        LocalRecorder {
            recorder: self,
            shard: index % self.shards.len(),
            buf: Vec::with_capacity(LOCAL_BATCH),
            censored: 0,
            censored_min_ns: u64::MAX,
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram(self.bound_ns);
        for shard in &self.shards {
            let h = shard.lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds on both sides, so adding cannot fail.
            let _ = all.add(&*h);
        }
        all
    }

    /// The largest latency the histograms hold, ns.
    pub fn bound_ns(&self) -> u64 {
        self.bound_ns
    }

    /// Censored samples so far (flushed ones) and the smallest lower bound among them, ns.
    pub fn censored(&self) -> (u64, Option<u64>) {
        let n = self.censored.load(Ordering::Relaxed);
        let min = self.censored_min_ns.load(Ordering::Relaxed);
        (n, (n > 0 && min != u64::MAX).then_some(min))
    }
}

fn new_histogram(bound_ns: u64) -> Histogram<u64> {
    Histogram::new_with_bounds(1, bound_ns, 3).expect("valid histogram bounds")
}

/// A connection's latency buffer; flushes on drop.
#[derive(Debug)]
pub struct LocalRecorder<'a> {
    recorder: &'a Recorder,
    shard: usize,
    /// `(value, count)` samples not yet in the shared histogram.
    buf: Vec<(u64, u64)>,
    censored: u64,
    censored_min_ns: u64,
}

impl LocalRecorder<'_> {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        self.record_ns(crate::proto::nanos(latency));
    }

    /// Records one latency given in nanoseconds. A value above the bound is recorded at the
    /// bound and counted as censored.
    pub fn record_ns(&mut self, ns: u64) {
        let bound = self.recorder.bound_ns;
        if ns > bound {
            self.censor(bound, 1);
        }
        self.push(ns.clamp(1, bound), 1);
    }

    /// Records `n` observations known only to be at least `at_least_ns` long (a request still
    /// unanswered after that long): recorded at that value, counted as censored.
    pub fn record_censored_ns(&mut self, at_least_ns: u64, n: u64) {
        if n == 0 {
            return;
        }
        let v = at_least_ns.clamp(1, self.recorder.bound_ns);
        self.censor(v, n);
        self.push(v, n);
    }

    /// [`record_censored_ns`](Self::record_censored_ns) for one observation.
    pub fn record_censored(&mut self, at_least: Duration) {
        self.record_censored_ns(crate::proto::nanos(at_least), 1);
    }

    fn censor(&mut self, at_least_ns: u64, n: u64) {
        self.censored += n;
        self.censored_min_ns = self.censored_min_ns.min(at_least_ns);
    }

    fn push(&mut self, v: u64, n: u64) {
        self.buf.push((v, n));
        if self.buf.len() >= LOCAL_BATCH {
            self.flush();
        }
    }

    /// Moves the buffered samples into the shared histogram.
    pub fn flush(&mut self) {
        if self.censored > 0 {
            let r = self.recorder;
            r.censored.fetch_add(self.censored, Ordering::Relaxed);
            r.censored_min_ns
                .fetch_min(self.censored_min_ns, Ordering::Relaxed);
            self.censored = 0;
            self.censored_min_ns = u64::MAX;
        }
        if self.buf.is_empty() {
            return;
        }
        let mut h = self.recorder.shards[self.shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for &(v, n) in &self.buf {
            h.saturating_record_n(v, n);
        }
        self.buf.clear();
    }
}

impl Drop for LocalRecorder<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Counters summed over all connections.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests sent during the measured window.
    pub sent: AtomicU64,
    /// Replies (or pushes) received during the measured window.
    pub received: AtomicU64,
    /// Non-2xx replies to requests sent in the window, lost replies, failed connections.
    pub errors: AtomicU64,
    /// Replies whose `request_id` matched nothing in flight (any time).
    pub unmatched: AtomicU64,
    /// Requests sent in the window that never got a reply (also counted in `errors`).
    pub lost: AtomicU64,
    /// Connections that failed to open, or closed or failed during the run (also in `errors`).
    pub connection_errors: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts a failed connection (a connection error is also an error).
    pub fn connection_failed(&self) {
        Counters::add(&self.connection_errors, 1);
        Counters::add(&self.errors, 1);
    }
}

/// Reads CPU time (user + system) of a process from `/proc/PID/stat`, in seconds; `None`
/// if it cannot be read. `pid` `None` means this process.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name start at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Linux reports these in USER_HZ clock ticks, which is 100 on every common platform.
    Some((utime + stime) as f64 / 100.0)
}

/// Reads the resident set size (`VmRSS`) of a process in KiB; `pid` `None` means this
/// process.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The results of one run. Optional fields are left out of the JSON when they do not apply.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// `--label`, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The URL under test.
    pub url: String,
    /// Connections requested (subscribers for `fanout`).
    pub connections: usize,
    /// Connections that opened (and, for `fanout`, subscribed).
    pub connections_open: usize,
    /// Measured duration in seconds.
    pub duration_s: f64,
    /// Warm-up in seconds.
    pub warmup_s: f64,
    /// Requests in flight per connection (closed loop), or the cap with `--rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Target rate (`--rate`), messages per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_rate: Option<f64>,
    /// Generator worker threads.
    pub threads: usize,
    /// Requests sent in the measured window (writes for `fanout`).
    pub sent: u64,
    /// Replies received in the measured window (write replies for `fanout`).
    pub received: u64,
    /// Replies per second in the measured window (write replies per second for `fanout`;
    /// 0 for `idle`).
    pub msgs_per_s: f64,
    /// Latency percentiles in microseconds: request → reply; for `fanout` write → push; for
    /// `idle` the WebSocket handshake.
    pub p50_us: f64,
    /// 90th percentile latency, µs.
    pub p90_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
    /// Largest latency, µs.
    pub max_us: f64,
    /// Mean latency, µs.
    pub mean_us: f64,
    /// Latency samples, censored ones included.
    pub samples: u64,
    /// Latency samples known only as a lower bound: requests (`fanout`: write × subscriber
    /// pairs; `idle`: handshakes) still unanswered when the generator stopped waiting,
    /// recorded at the time waited, and samples above `latency_bound_s`, recorded at the
    /// bound. Included in `samples` and the percentiles.
    pub censored: u64,
    /// The smallest lower bound among the censored samples, µs: a percentile at or above it
    /// is a lower bound, not a measurement. Absent when nothing was censored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub censored_min_us: Option<f64>,
    /// The largest latency the histogram holds, seconds (larger samples are censored).
    pub latency_bound_s: f64,
    /// Non-2xx replies, lost replies and failed connections.
    pub errors: u64,
    /// Replies (`fanout`: pushes) whose `request_id` matched nothing in flight (any time).
    pub unmatched: u64,
    /// Requests (or, for `fanout`, write × subscriber pairs) that never arrived (included in
    /// `errors`).
    pub lost: u64,
    /// `fanout`: pushes received again by a subscriber that already had that write's push
    /// (any time; not counted in `deliveries`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
    /// Connections that failed to open or broke during the run (included in `errors`).
    pub connection_errors: u64,
    /// Generator CPU over the measured window, percent of one core.
    pub client_cpu_pct: f64,
    /// Cores the generator could use (the smaller of its CPU affinity and `--threads`).
    pub client_cores: usize,
    /// Whether the generator was near its CPU limit (the results may be client-bound).
    pub client_saturated: bool,
    /// Server CPU over the measured window, percent of one core (with `--server-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_pct: Option<f64>,
    /// `fanout`: how subscribers subscribed (`instance` or `all`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<String>,
    /// `fanout`: distinct (write, subscriber) pairs delivered per second in the measured
    /// window (duplicates not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_s: Option<f64>,
    /// `fanout`: distinct (write, subscriber) pairs delivered for successful writes made in
    /// the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<u64>,
    /// `fanout`: pushes expected for writes made in the window (successful writes ×
    /// subscribers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_expected: Option<u64>,
    /// `idle`: server VmRSS before opening the connections, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before_kib: Option<u64>,
    /// `idle`: server VmRSS with all connections open, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_kib: Option<u64>,
    /// `idle`: (`server_rss_kib` − `server_rss_before_kib`) / open connections, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_kib: Option<f64>,
    /// `idle`: handshakes completed per second while connecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects_per_s: Option<f64>,
    /// `idle`: connections whose one echo request (sent once all were open and the idle
    /// memory was read) got a 2xx reply. Absent with `--no-echo`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echoed: Option<u64>,
    /// `idle`: echo requests answered with another status (counted in `errors`, as are
    /// echoes never answered, which are also `lost`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo_errors: Option<u64>,
    /// `idle`: seconds from sending every connection's echo request to the last reply (or to
    /// giving up after `--timeout`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo_s: Option<f64>,
    /// `idle`: median echo latency, µs (all connections sending at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo_p50_us: Option<f64>,
    /// `idle`: 99th percentile echo latency, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo_p99_us: Option<f64>,
    /// `idle`: server VmRSS after every connection echoed once (and settled `--warmup`
    /// seconds), KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_echoed_kib: Option<u64>,
    /// `idle`: (`server_rss_echoed_kib` − `server_rss_before_kib`) / open connections, KiB:
    /// what a connection costs once it has been used (`rss_per_conn_kib` is before its echo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_echoed_kib: Option<f64>,
    /// Generator VmRSS at the end, KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_rss_kib: Option<u64>,
}

impl Report {
    /// A report with the fields every scenario fills the same way: the run's flags, the
    /// connections opened, and the generator's threads and cores.
    pub fn for_run(
        args: &crate::cli::Args,
        url: &str,
        connections_open: usize,
        threads: usize,
        client_cores: usize,
    ) -> Report {
        Report {
            scenario: args.scenario.name().to_owned(),
            label: args.label.clone(),
            url: url.to_owned(),
            connections: args.connections,
            connections_open,
            duration_s: args.duration,
            warmup_s: args.warmup,
            target_rate: args.rate,
            threads,
            client_cores,
            ..Report::default()
        }
    }

    /// Fills the latency and censoring fields from a recorder (every local recorder must
    /// have been flushed or dropped).
    pub fn set_latency(&mut self, r: &Recorder) {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        let (censored, censored_min) = r.censored();
        self.censored = censored;
        self.censored_min_us = censored_min.map(us);
        self.latency_bound_s = r.bound_ns() as f64 / 1e9;
        let h = r.merged();
        self.samples = h.len();
        if h.is_empty() {
            return;
        }
        self.p50_us = us(h.value_at_quantile(0.50));
        self.p90_us = us(h.value_at_quantile(0.90));
        self.p99_us = us(h.value_at_quantile(0.99));
        self.p999_us = us(h.value_at_quantile(0.999));
        self.max_us = us(h.max());
        self.mean_us = (h.mean() / 100.0).round() / 10.0;
    }

    /// Fills the `idle` echo latency fields from a recorder.
    pub fn set_echo_latency(&mut self, r: &Recorder) {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        let h = r.merged();
        if h.is_empty() {
            return;
        }
        self.echo_p50_us = Some(us(h.value_at_quantile(0.50)));
        self.echo_p99_us = Some(us(h.value_at_quantile(0.99)));
    }

    /// Fills the counters.
    pub fn set_counters(&mut self, c: &Counters) {
        self.sent = Counters::get(&c.sent);
        self.received = Counters::get(&c.received);
        self.errors = Counters::get(&c.errors);
        self.unmatched = Counters::get(&c.unmatched);
        self.lost = Counters::get(&c.lost);
        self.connection_errors = Counters::get(&c.connection_errors);
    }

    /// Fills the CPU fields from readings taken at the start and end of the window.
    pub fn set_cpu(
        &mut self,
        client: (Option<f64>, Option<f64>),
        server: (Option<f64>, Option<f64>),
        window: Duration,
    ) {
        let pct = |(a, b): (Option<f64>, Option<f64>)| -> Option<f64> {
            let secs = window.as_secs_f64();
            match (a, b) {
                (Some(a), Some(b)) if secs > 0.0 => Some(((b - a) / secs * 1000.0).round() / 10.0),
                _ => None,
            }
        };
        self.client_cpu_pct = pct(client).unwrap_or(0.0);
        self.server_cpu_pct = pct(server);
        self.client_saturated = self.client_cpu_pct > 90.0 * self.client_cores as f64;
    }

    /// Prints the results: a table, or with `json` one JSON object as the last line.
    /// Warnings about the results go to stderr first.
    pub fn print(&self, json: bool) {
        if self.censored > 0 {
            eprintln!(
                "warning: {} latency sample(s) are censored (unanswered when the generator \
                 stopped waiting, or above the {:.0} s bound): percentiles at or above {:.1} µs \
                 are lower bounds",
                self.censored,
                self.latency_bound_s,
                self.censored_min_us.unwrap_or(0.0)
            );
        }
        let dup = self.duplicates.unwrap_or(0);
        if self.errors > 0 || self.unmatched > 0 || self.lost > 0 || dup > 0 {
            eprintln!(
                "warning: errors {}, unmatched {}, lost {}, duplicates {}, connection errors {}",
                self.errors, self.unmatched, self.lost, dup, self.connection_errors
            );
        }
        if self.client_saturated {
            eprintln!(
                "warning: the load generator used {:.0}% CPU of {} core(s); it may be the \
                 bottleneck, so these results may understate the server",
                self.client_cpu_pct, self.client_cores
            );
        }
        if json {
            match serde_json::to_string(self) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("error: cannot serialize the results: {e}"),
            }
            return;
        }
        let value = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return,
        };
        let order = [
            "scenario",
            "label",
            "url",
            "connections",
            "connections_open",
            "duration_s",
            "warmup_s",
            "window",
            "target_rate",
            "threads",
            "subscribe",
            "sent",
            "received",
            "msgs_per_s",
            "deliveries_per_s",
            "deliveries",
            "deliveries_expected",
            "connects_per_s",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "mean_us",
            "samples",
            "censored",
            "censored_min_us",
            "latency_bound_s",
            "errors",
            "unmatched",
            "lost",
            "duplicates",
            "connection_errors",
            "server_rss_before_kib",
            "server_rss_kib",
            "rss_per_conn_kib",
            "echoed",
            "echo_errors",
            "echo_s",
            "echo_p50_us",
            "echo_p99_us",
            "server_rss_echoed_kib",
            "rss_per_conn_echoed_kib",
            "client_rss_kib",
            "client_cpu_pct",
            "client_cores",
            "client_saturated",
            "server_cpu_pct",
        ];
        println!("{:<24} value", "metric");
        println!("{:-<24} {:-<24}", "", "");
        for key in order {
            if let Some(v) = value.get(key) {
                let shown = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => match n.as_f64() {
                        Some(f) if n.is_f64() => format!("{f:.1}"),
                        _ => n.to_string(),
                    },
                    other => other.to_string(),
                };
                println!("{key:<24} {shown}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_merges_shards() {
        let r = Recorder::new(4, MIN_LATENCY_BOUND_NS);
        for i in 0..10 {
            let mut l = r.local(i);
            for v in 1..=100u64 {
                l.record_ns(v * 1000);
            }
        }
        let h = r.merged();
        assert_eq!(h.len(), 1000);
        let mut rep = Report::default();
        rep.set_latency(&r);
        assert!((49.0..=51.0).contains(&rep.p50_us), "{}", rep.p50_us);
        assert!((99.0..=101.0).contains(&rep.max_us));
        assert_eq!(rep.censored, 0);
        assert_eq!(rep.censored_min_us, None);
    }

    #[test]
    fn censoring() {
        let bound = 1_000_000; // 1 ms
        let r = Recorder::new(2, bound);
        {
            let mut l = r.local(0);
            for v in 1..=97u64 {
                l.record_ns(v * 1000 / 2);
            }
            // Above the bound: clamped and censored.
            l.record_ns(5 * bound);
            // Unanswered after 0.9 ms, twice.
            l.record_censored_ns(900_000, 2);
        }
        let mut rep = Report::default();
        rep.set_latency(&r);
        assert_eq!(rep.samples, 100);
        assert_eq!(rep.censored, 3);
        assert_eq!(rep.censored_min_us, Some(900.0));
        assert!(
            rep.max_us >= 999.0 && rep.max_us <= 1001.0,
            "{}",
            rep.max_us
        );
        assert!(rep.p50_us < 900.0);
        assert!(rep.p99_us >= 900.0);
    }

    #[test]
    fn bound_covers_the_run() {
        let s = Duration::from_secs;
        assert_eq!(latency_bound_ns(s(1), s(10), s(120)), MIN_LATENCY_BOUND_NS);
        let long = latency_bound_ns(s(0), s(7200), s(600));
        assert!(long > crate::proto::nanos(s(8400)));
    }

    #[test]
    fn proc_readings() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_kib(None).unwrap() > 0);
        assert!(cpu_seconds(Some(u32::MAX)).is_none());
    }
}
