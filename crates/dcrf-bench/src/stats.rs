//! Counting and latency recording shared by all connections, `/proc` readings, and the
//! report printed at the end.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded (larger values are clamped): one minute, in nanoseconds.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// Samples a connection buffers before taking a shard's lock.
const LOCAL_BATCH: usize = 256;

/// A latency histogram shared by many connections: a few lock-protected shards that
/// connections fill in batches, merged at the end.
#[derive(Debug)]
pub struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Recorder {
    /// A recorder with `shards` shards (at least one).
    pub fn new(shards: usize) -> Recorder {
        let shards = (0..shards.max(1))
            .map(|_| Mutex::new(new_histogram()))
            .collect();
        Recorder { shards }
    }

    /// A per-connection buffer that flushes into shard `index % shards`.
    pub fn local(&self, index: usize) -> LocalRecorder<'_> {
        LocalRecorder {
            recorder: self,
            shard: index % self.shards.len(),
            buf: Vec::with_capacity(LOCAL_BATCH),
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in &self.shards {
            let h = shard.lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds on both sides, so adding cannot fail.
            let _ = all.add(&*h);
        }
        all
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// A connection's latency buffer; flushes on drop.
#[derive(Debug)]
pub struct LocalRecorder<'a> {
    recorder: &'a Recorder,
    shard: usize,
    buf: Vec<u64>,
}

impl LocalRecorder<'_> {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        self.record_ns(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records one latency given in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        self.buf.push(ns.clamp(1, MAX_LATENCY_NS));
        if self.buf.len() >= LOCAL_BATCH {
            self.flush();
        }
    }

    /// Moves the buffered samples into the shared histogram.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut h = self.recorder.shards[self.shard]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for &v in &self.buf {
            h.saturating_record(v);
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
    /// Latency samples.
    pub samples: u64,
    /// Non-2xx replies, lost replies and failed connections.
    pub errors: u64,
    /// Replies whose `request_id` matched nothing in flight.
    pub unmatched: u64,
    /// Requests (or, for `fanout`, deliveries) that never arrived (included in `errors`).
    pub lost: u64,
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
    /// `fanout`: pushes received by subscribers per second in the measured window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_s: Option<f64>,
    /// `fanout`: pushes received for writes made in the window.
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

    /// Fills the latency fields from a histogram of nanoseconds.
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
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
    pub fn print(&self, json: bool) {
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
            "errors",
            "unmatched",
            "lost",
            "connection_errors",
            "server_rss_before_kib",
            "server_rss_kib",
            "rss_per_conn_kib",
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
        let r = Recorder::new(4);
        for i in 0..10 {
            let mut l = r.local(i);
            for v in 1..=100u64 {
                l.record_ns(v * 1000);
            }
        }
        let h = r.merged();
        assert_eq!(h.len(), 1000);
        let mut rep = Report::default();
        rep.set_latency(&h);
        assert!((49.0..=51.0).contains(&rep.p50_us), "{}", rep.p50_us);
        assert!((99.0..=101.0).contains(&rep.max_us));
    }

    #[test]
    fn proc_readings() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_kib(None).unwrap() > 0);
        assert!(cpu_seconds(Some(u32::MAX)).is_none());
    }
}
