//! Request/reply scenarios (`echo`, `retrieve`, `list`, `create`, `patch`): every connection
//! sends requests, closed loop (`--window` in flight) or open loop (`--rate`), and matches
//! each reply to its request by `request_id`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::sleep_until;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::cli::{Args, Scenario};
use crate::conn::{self, Window, Ws};
use crate::proto::{ReplyHead, Rng, build_request, clock_ns};
use crate::stats::{
    Counters, LocalRecorder, Recorder, Report, cpu_seconds, latency_bound_ns, rss_kib,
};

/// The in-flight cap per connection under `--rate` when `--window` is not given.
const OPEN_LOOP_DEFAULT_CAP: usize = 1024;

/// What every connection task needs to know.
#[derive(Debug)]
struct Plan {
    scenario: Scenario,
    window: Window,
    /// Closed loop: requests in flight; open loop: the cap.
    in_flight: usize,
    /// Open loop: the interval between two sends of one connection.
    interval: Option<Duration>,
    connections: usize,
    rows: u64,
    payload: String,
    timeout: Duration,
}

/// Runs a request/reply scenario and returns its report.
pub async fn run(args: &Args, threads: usize, cores: usize) -> Result<Report, String> {
    let url: Arc<str> = Arc::from(args.url());
    let timeout = args.timeout();
    let opened = conn::open_many(args.connections, args.connect_concurrency, |_| {
        let url = Arc::clone(&url);
        async move { conn::connect(&url, timeout).await }
    })
    .await;
    let counters = Arc::new(Counters::default());
    let mut sockets = Vec::new();
    for r in opened {
        match r {
            Ok(ws) => sockets.push(ws),
            Err(_) => counters.connection_failed(),
        }
    }
    if sockets.is_empty() {
        return Err(format!("no connection to {url} could be opened"));
    }
    let open = sockets.len();

    let window = Window::starting_now(args.warmup(), args.duration());
    let in_flight = match args.rate {
        Some(_) => args.window.unwrap_or(OPEN_LOOP_DEFAULT_CAP),
        None => args.window.unwrap_or(1),
    };
    let plan = Arc::new(Plan {
        scenario: args.scenario,
        window,
        in_flight,
        interval: args.rate.map(|r| Duration::from_secs_f64(open as f64 / r)),
        connections: open,
        rows: args.rows,
        payload: "a".repeat(args.payload),
        timeout,
    });
    let recorder = Arc::new(Recorder::new(
        threads * 2,
        latency_bound_ns(args.warmup(), args.duration(), timeout),
    ));
    let cpu = tokio::spawn(cpu_over(window, args.server_pid));
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let plan = Arc::clone(&plan);
            let counters = Arc::clone(&counters);
            let recorder = Arc::clone(&recorder);
            tokio::spawn(async move {
                let mut local = recorder.local(i);
                drive(ws, i, &plan, &counters, &mut local).await;
            })
        })
        .collect();
    for t in tasks {
        if t.await.is_err() {
            counters.connection_failed();
        }
    }
    let (client_cpu, server_cpu) = cpu.await.unwrap_or_default();

    let mut report = Report {
        window: Some(in_flight),
        ..Report::for_run(args, &url, open, threads, cores)
    };
    report.set_counters(&counters);
    report.msgs_per_s = per_second(report.received, args.duration());
    report.set_latency(&recorder);
    report.set_cpu(client_cpu, server_cpu, args.duration());
    report.client_rss_kib = rss_kib(None);
    Ok(report)
}

/// `n` per `d`, rounded to one decimal.
pub fn per_second(n: u64, d: Duration) -> f64 {
    (n as f64 / d.as_secs_f64() * 10.0).round() / 10.0
}

/// CPU seconds of this process and of the server at the start and the end of the window.
pub type CpuReadings = ((Option<f64>, Option<f64>), (Option<f64>, Option<f64>));

/// Reads CPU times at the window's start and end.
pub async fn cpu_over(window: Window, server_pid: Option<u32>) -> CpuReadings {
    sleep_until(window.start.into()).await;
    let (c0, s0) = (
        cpu_seconds(None),
        server_pid.and_then(|p| cpu_seconds(Some(p))),
    );
    sleep_until(window.end.into()).await;
    let (c1, s1) = (
        cpu_seconds(None),
        server_pid.and_then(|p| cpu_seconds(Some(p))),
    );
    ((c0, c1), (s0, s1))
}

/// One connection's state and counts (added to the shared counters at the end).
struct Conn<'r, 'a> {
    window: Window,
    /// request id → (send time, or scheduled send time; sent inside the window?)
    in_flight: HashMap<u64, (Instant, bool)>,
    sent: u64,
    received: u64,
    errors: u64,
    unmatched: u64,
    broken: bool,
    recorder: &'r mut LocalRecorder<'a>,
}

impl Conn<'_, '_> {
    fn on_message(&mut self, msg: Option<Result<Message, WsError>>) {
        let now = Instant::now();
        match msg {
            Some(Ok(Message::Text(text))) => {
                let Some(head) = ReplyHead::parse(&text) else {
                    self.unmatched += 1;
                    return;
                };
                match head.numeric_id().and_then(|id| self.in_flight.remove(&id)) {
                    Some((sent_at, in_window)) => {
                        if self.window.contains(now) {
                            self.received += 1;
                        }
                        if in_window {
                            self.recorder.record(now.saturating_duration_since(sent_at));
                            if !head.is_success() {
                                self.errors += 1;
                            }
                        }
                    }
                    None => self.unmatched += 1,
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => self.broken = true,
            Some(Ok(_)) => {}
        }
    }

    /// Handles every message that is already available without waiting.
    fn drain_ready(&mut self, ws: &mut Ws) {
        while !self.broken {
            match ws.next().now_or_never() {
                Some(msg) => self.on_message(msg),
                None => break,
            }
        }
    }

    /// Queues one request (call `flush` after a batch); `at` is its (scheduled) send time.
    async fn feed(&mut self, ws: &mut Ws, id: u64, text: &str, at: Instant) {
        if ws.feed(Message::text(text)).await.is_err() {
            self.broken = true;
            return;
        }
        let in_window = self.window.contains(at);
        if in_window {
            self.sent += 1;
        }
        self.in_flight.insert(id, (at, in_window));
    }
}

async fn drive(
    mut ws: Ws,
    index: usize,
    plan: &Plan,
    counters: &Counters,
    rec: &mut LocalRecorder<'_>,
) {
    let w = plan.window;
    let mut c = Conn {
        window: w,
        in_flight: HashMap::with_capacity(plan.in_flight.min(4096)),
        sent: 0,
        received: 0,
        errors: 0,
        unmatched: 0,
        broken: false,
        recorder: rec,
    };
    let mut rng = Rng::new((index as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ clock_ns());
    let mut buf = String::with_capacity(128 + plan.payload.len());
    let mut next_id: u64 = 1;
    let end = sleep_until(w.end.into());
    tokio::pin!(end);

    match plan.interval {
        None => {
            // Closed loop: keep `in_flight` requests outstanding.
            'run: while !c.broken {
                let mut fed = false;
                let mut over = false;
                while c.in_flight.len() < plan.in_flight && !c.broken {
                    let now = Instant::now();
                    if now >= w.end {
                        over = true;
                        break;
                    }
                    build_request(
                        &mut buf,
                        plan.scenario,
                        next_id,
                        &mut rng,
                        plan.rows,
                        &plan.payload,
                    );
                    c.feed(&mut ws, next_id, &buf, now).await;
                    next_id += 1;
                    fed = true;
                }
                if fed && ws.flush().await.is_err() {
                    c.broken = true;
                    break;
                }
                if over {
                    break;
                }
                tokio::select! {
                    msg = ws.next() => c.on_message(msg),
                    _ = &mut end => break 'run,
                }
                c.drain_ready(&mut ws);
            }
        }
        Some(interval) => {
            // Open loop: send on a fixed schedule, staggered across connections.
            let offset = interval.mul_f64(index as f64 / plan.connections as f64);
            let mut due = w.begin + offset;
            while !c.broken {
                let can_send = due < w.end && c.in_flight.len() < plan.in_flight;
                tokio::select! {
                    biased;
                    msg = ws.next() => {
                        c.on_message(msg);
                        c.drain_ready(&mut ws);
                    }
                    _ = sleep_until(due.into()), if can_send => {
                        let now = Instant::now();
                        while due <= now && due < w.end && c.in_flight.len() < plan.in_flight && !c.broken {
                            build_request(&mut buf, plan.scenario, next_id, &mut rng, plan.rows, &plan.payload);
                            c.feed(&mut ws, next_id, &buf, due).await;
                            next_id += 1;
                            due += interval;
                        }
                        if ws.flush().await.is_err() {
                            c.broken = true;
                        }
                    }
                    _ = &mut end => break,
                }
            }
        }
    }

    // Wait for the replies still outstanding.
    let deadline = Instant::now().max(w.end) + plan.timeout;
    while !c.broken && !c.in_flight.is_empty() {
        tokio::select! {
            msg = ws.next() => c.on_message(msg),
            _ = sleep_until(deadline.into()) => break,
        }
    }
    // Requests of the window still unanswered: lost, and their latency is censored at the
    // time they waited.
    let now = Instant::now();
    let mut lost = 0u64;
    for (sent_at, in_window) in c.in_flight.values() {
        if *in_window {
            lost += 1;
            c.recorder
                .record_censored(now.saturating_duration_since(*sent_at));
        }
    }
    if c.broken {
        counters.connection_failed();
    } else {
        let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
    }
    Counters::add(&counters.sent, c.sent);
    Counters::add(&counters.received, c.received);
    Counters::add(&counters.errors, c.errors + lost);
    Counters::add(&counters.lost, lost);
    Counters::add(&counters.unmatched, c.unmatched);
}
