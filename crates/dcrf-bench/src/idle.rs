//! `idle`: opens many connections, holds them without sending anything, and reports how much
//! resident memory the server gained per connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Args;
use crate::conn::{self, Window, Ws};
use crate::load::{cpu_over, per_second};
use crate::stats::{Counters, Recorder, Report, latency_bound_ns, rss_kib};

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
    let (stop_tx, stop_rx) = watch::channel(false);
    let recorder = Arc::new(Recorder::new(
        threads * 2,
        latency_bound_ns(args.warmup(), args.duration(), timeout),
    ));
    let t0 = Instant::now();
    // Each connection is read from as soon as it is open, so the server's keepalive pings
    // are answered even while the others are still connecting. A handshake that timed out is
    // a censored sample (it took at least the timeout).
    let opened = conn::open_many(args.connections, args.connect_concurrency, |i| {
        let url = Arc::clone(&url);
        let stop = stop_rx.clone();
        let recorder = Arc::clone(&recorder);
        async move {
            let t = Instant::now();
            let result = conn::connect(&url, timeout).await;
            let handshake = t.elapsed();
            let mut local = recorder.local(i);
            match result {
                Ok(ws) => {
                    local.record(handshake);
                    Ok(tokio::spawn(hold(ws, stop)))
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

    // Settle, read the server's memory, then hold for the duration.
    let window = Window::starting_now(args.warmup(), args.duration());
    let cpu = tokio::spawn(cpu_over(window, pid));
    sleep(args.warmup()).await;
    let rss_after = pid.and_then(|p| rss_kib(Some(p)));
    let (client_cpu, server_cpu) = cpu.await.unwrap_or_default();
    let _ = stop_tx.send(true);
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
        server_rss_kib: rss_after,
        rss_per_conn_kib: match (rss_before, rss_after) {
            (Some(b), Some(a)) => {
                Some(((a as f64 - b as f64) / open as f64 * 100.0).round() / 100.0)
            }
            _ => None,
        },
        connects_per_s: Some(per_second(open as u64, connect_time)),
        ..Report::for_run(args, &url, open, threads, cores)
    };
    report.set_counters(&counters);
    report.set_latency(&recorder);
    report.set_cpu(client_cpu, server_cpu, args.duration());
    report.client_rss_kib = rss_kib(None);
    Ok(report)
}

/// Holds one connection open (answering pings) until told to stop; returns why it ended
/// early, if it did.
async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>) -> Option<String> {
    loop {
        let why = tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Close(frame))) => format!("closed by the server: {frame:?}"),
                Some(Err(e)) => e.to_string(),
                None => "connection ended".to_owned(),
                Some(Ok(_)) => continue,
            },
            _ = stop.changed() => break,
        };
        return Some(why);
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
    None
}
