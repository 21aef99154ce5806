//! `idle`: opens many connections, holds them, and reports how much resident memory the server
//! gained per connection; then every connection sends one echo request and waits for its
//! reply, and the memory is read again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{Args, Scenario};
use crate::conn::{self, Window, Ws};
use crate::load::{cpu_over, per_second};
use crate::proto::{ReplyHead, Rng, build_request};
use crate::stats::{Counters, LocalRecorder, Recorder, Report, latency_bound_ns, rss_kib};

/// What the held connections are told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Read (answering pings), send nothing.
    Hold,
    /// Send one echo request and wait for its reply, then hold again.
    Echo,
    /// Close and end.
    Stop,
}

/// How one connection's echo went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Echoed {
    /// A 2xx reply with the request's id.
    Ok,
    /// A reply with the request's id but another status.
    Failed,
}

/// Runs the idle scenario and returns its report.
pub async fn run(args: &Args, threads: usize, cores: usize) -> Result<Report, String> {
    let url: Arc<str> = Arc::from(args.url());
    let timeout = args.timeout();
    let pid = args.server_pid;
    if pid.is_none() {
        eprintln!("warning: without --server-pid the server's memory is not measured");
    }
    let rss_before = pid.and_then(|p| rss_kib(Some(p)));
    if let Some(p) = pid
        && rss_before.is_none()
    {
        eprintln!("warning: cannot read /proc/{p}/status; is the server running?");
    }

    let counters = Arc::new(Counters::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Hold);
    let (echo_tx, mut echo_rx) = mpsc::unbounded_channel();
    let bound = latency_bound_ns(args.warmup(), args.duration(), timeout);
    let recorder = Arc::new(Recorder::new(threads * 2, bound));
    let echo_recorder = Arc::new(Recorder::new(threads * 2, bound));
    let payload: Arc<str> = Arc::from("x".repeat(args.payload));
    let t0 = Instant::now();
    // Each connection is read from as soon as it is open, so the server's keepalive pings
    // are answered even while the others are still connecting. A handshake that timed out is
    // a censored sample (it took at least the timeout).
    let opened = conn::open_many(args.connections, args.connect_concurrency, |i| {
        let url = Arc::clone(&url);
        let phase = phase_rx.clone();
        let recorder = Arc::clone(&recorder);
        let held = Held {
            index: i,
            payload: Arc::clone(&payload),
            echo_recorder: Arc::clone(&echo_recorder),
            echoed: echo_tx.clone(),
            timeout,
        };
        async move {
            let t = Instant::now();
            let result = conn::connect(&url, timeout).await;
            let handshake = t.elapsed();
            let mut local = recorder.local(i);
            match result {
                Ok(ws) => {
                    local.record(handshake);
                    Ok(tokio::spawn(held.hold(ws, phase)))
                }
                Err(e) => {
                    if handshake >= timeout {
                        local.record_censored(handshake);
                    }
                    Err(e)
                }
            }
        }
    })
    .await;
    drop(echo_tx);
    let connect_time = t0.elapsed();

    let mut holders = Vec::new();
    for r in opened {
        match r {
            Ok(holder) => holders.push(holder),
            Err(_) => counters.connection_failed(),
        }
    }
    let open = holders.len();
    if open == 0 {
        return Err(format!("no connection to {url} could be opened"));
    }
    let per_conn = |after: Option<u64>| match (rss_before, after) {
        (Some(b), Some(a)) => Some(((a as f64 - b as f64) / open as f64 * 100.0).round() / 100.0),
        _ => None,
    };

    // Settle and read the server's memory with every connection idle.
    sleep(args.warmup()).await;
    let rss_idle = pid.and_then(|p| rss_kib(Some(p)));

    // One echo per connection; then settle and read the memory again.
    let (echoed, echo_failed, echo_time, rss_echoed) = if args.no_echo {
        (None, None, None, None)
    } else {
        let t = Instant::now();
        let _ = phase_tx.send(Phase::Echo);
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut ok, mut failed) = (0u64, 0u64);
        while ok + failed < open as u64 {
            match tokio::time::timeout_at(deadline, echo_rx.recv()).await {
                Ok(Some(Echoed::Ok)) => ok += 1,
                Ok(Some(Echoed::Failed)) => failed += 1,
                // Every connection ended, or the time is up.
                Ok(None) | Err(_) => break,
            }
        }
        let echo_time = t.elapsed();
        if ok < open as u64 {
            eprintln!(
                "warning: {ok} of {open} connection(s) answered their echo ({failed} with an \
                 error status)"
            );
        }
        sleep(args.warmup()).await;
        (
            Some(ok),
            Some(failed),
            Some(echo_time),
            pid.and_then(|p| rss_kib(Some(p))),
        )
    };
    let _ = phase_tx.send(Phase::Hold);

    // Hold for the duration, measuring CPU use.
    let window = Window::starting_now(Duration::ZERO, args.duration());
    let (client_cpu, server_cpu) = cpu_over(window, pid).await;
    let _ = phase_tx.send(Phase::Stop);
    let mut dropped: Vec<String> = Vec::new();
    for h in holders {
        match h.await {
            Ok(Some(why)) => {
                counters.connection_failed();
                dropped.push(why);
            }
            Ok(None) => {}
            Err(_) => counters.connection_failed(),
        }
    }
    if let Some(first) = dropped.first() {
        eprintln!(
            "warning: {} of {open} connection(s) ended while held open; first: {first}",
            dropped.len()
        );
    }

    let mut report = Report {
        server_rss_before_kib: rss_before,
        server_rss_kib: rss_idle,
        rss_per_conn_kib: per_conn(rss_idle),
        connects_per_s: Some(per_second(open as u64, connect_time)),
        echoed,
        echo_errors: echo_failed,
        echo_s: echo_time.map(|t| (t.as_secs_f64() * 1000.0).round() / 1000.0),
        server_rss_echoed_kib: rss_echoed,
        rss_per_conn_echoed_kib: per_conn(rss_echoed),
        ..Report::for_run(args, &url, open, threads, cores)
    };
    report.set_counters(&counters);
    if let Some(failed) = echo_failed {
        // A connection that did not answer its echo is an error (lost if no reply came).
        let missing = (open as u64).saturating_sub(echoed.unwrap_or(0) + failed);
        report.errors += failed + missing;
        report.lost += missing;
        report.sent = open as u64;
        report.received = echoed.unwrap_or(0) + failed;
    }
    report.set_latency(&recorder);
    if echoed.is_some() {
        report.set_echo_latency(&echo_recorder);
    }
    report.set_cpu(client_cpu, server_cpu, args.duration());
    report.client_rss_kib = rss_kib(None);
    Ok(report)
}

/// One held connection's part of the echo round.
struct Held {
    index: usize,
    payload: Arc<str>,
    echo_recorder: Arc<Recorder>,
    echoed: mpsc::UnboundedSender<Echoed>,
    timeout: Duration,
}

impl Held {
    /// Holds one connection open (answering pings) until told to stop, sending one echo request
    /// when told to; returns why it ended early, if it did.
    async fn hold(self, mut ws: Ws, mut phase: watch::Receiver<Phase>) -> Option<String> {
        let id = self.index as u64 + 1;
        // Send time of the echo request while its reply is awaited.
        let mut waiting: Option<Instant> = None;
        loop {
            let why = tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(sent) = waiting
                            && let Some(head) = ReplyHead::parse(&text)
                            && head.numeric_id() == Some(id)
                        {
                            waiting = None;
                            let outcome = if head.is_success() {
                                self.record(sent.elapsed(), false);
                                Echoed::Ok
                            } else {
                                Echoed::Failed
                            };
                            let _ = self.echoed.send(outcome);
                        }
                        continue;
                    }
                    Some(Ok(Message::Close(frame))) => format!("closed by the server: {frame:?}"),
                    Some(Err(e)) => e.to_string(),
                    None => "connection ended".to_owned(),
                    Some(Ok(_)) => continue,
                },
                changed = phase.changed() => {
                    let now = *phase.borrow_and_update();
                    match (changed, now) {
                        (Err(_), _) | (_, Phase::Stop) => break,
                        (Ok(()), Phase::Echo) if waiting.is_none() => {
                            let mut buf = String::new();
                            let mut rng = Rng::new(id);
                            build_request(&mut buf, Scenario::Echo, id, &mut rng, 1, &self.payload);
                            waiting = Some(Instant::now());
                            match ws.send(Message::text(buf)).await {
                                Ok(()) => continue,
                                Err(e) => e.to_string(),
                            }
                        }
                        (Ok(()), _) => {
                            // The round is over: a reply still awaited is censored.
                            if let Some(sent) = waiting.take() {
                                self.record(sent.elapsed().max(self.timeout), true);
                            }
                            continue;
                        }
                    }
                }
            };
            return Some(why);
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
        None
    }

    fn record(&self, latency: Duration, censored: bool) {
        let mut local: LocalRecorder<'_> = self.echo_recorder.local(self.index);
        if censored {
            local.record_censored(latency);
        } else {
            local.record(latency);
        }
    }
}
