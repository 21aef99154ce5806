//! `resume`: how long a client that missed `--missed` pushes takes to get them back by
//! resuming with `since`.
//!
//! Each round: a subscriber subscribes (`subscribe_to_all`), notes the reply's `position` and
//! disconnects; the writer makes `--missed` patches (pipelined, every reply awaited); a new
//! connection resubscribes with `since` and the time from sending that frame to receiving the
//! last recovered push is one sample. Rounds repeat for `--duration` seconds after `--warmup`.
//! A reply without `"recovered": true`, or a recovered push missing or out of order, is an
//! error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Args;
use crate::conn::{self, Ws};
use crate::stats::{Counters, Recorder, Report, latency_bound_ns};

/// Runs the resume scenario and returns its report.
pub async fn run(args: &Args, threads: usize, cores: usize) -> Result<Report, String> {
    let url: Arc<str> = Arc::from(args.url());
    let timeout = args.timeout();
    let counters = Arc::new(Counters::default());
    let recorder = Recorder::new(1, latency_bound_ns(args.warmup(), args.duration(), timeout));
    let mut writer = conn::connect(&url, timeout).await?;
    let start = Instant::now();
    let measure_from = start + args.warmup();
    let end = measure_from + args.duration();
    let mut round = 0u64;
    while Instant::now() < end {
        round += 1;
        let measured = Instant::now() >= measure_from;
        let mut sub = conn::connect(&url, timeout).await?;
        let reply = request(
            &mut sub,
            json!({"action": "subscribe_to_all", "request_id": "r"}),
            timeout,
        )
        .await?;
        let since = reply["position"].clone();
        let base = since["offset"]
            .as_u64()
            .ok_or("no position in the subscribe reply")?;
        let _ = sub.close(None).await;
        write_missed(&mut writer, args.missed, args.rows, round, timeout).await?;
        let mut back = conn::connect(&url, timeout).await?;
        let t = Instant::now();
        let reply = request(
            &mut back,
            json!({"action": "subscribe_to_all", "request_id": "r", "since": since}),
            timeout,
        )
        .await?;
        let mut ok = reply["recovered"] == true;
        let mut expected = base + 1;
        while ok && expected <= base + args.missed as u64 {
            let push = next_json(&mut back, timeout).await?;
            ok = push["position"]["offset"].as_u64() == Some(expected);
            expected += 1;
        }
        let took = t.elapsed();
        if measured {
            Counters::add(&counters.sent, 1);
            if ok {
                Counters::add(&counters.received, 1);
                recorder.local(0).record(took);
            } else {
                Counters::add(&counters.errors, 1);
            }
        }
        let _ = back.close(None).await;
    }
    let mut report = Report::for_run(args, &url, 1, threads, cores);
    report.set_counters(&counters);
    report.set_latency(&recorder);
    Ok(report)
}

/// `missed` patches of rows 1..=rows, pipelined up to 64 in flight; waits for every reply.
async fn write_missed(
    ws: &mut Ws,
    missed: usize,
    rows: u64,
    round: u64,
    timeout: Duration,
) -> Result<(), String> {
    let (mut sent, mut answered) = (0usize, 0usize);
    while answered < missed {
        while sent < missed && sent - answered < 64 {
            let pk = sent as u64 % rows.max(1) + 1;
            let frame = json!({"action": "patch", "pk": pk,
                               "data": {"done": (round + sent as u64).is_multiple_of(2)}, "request_id": sent});
            ws.send(Message::text(frame.to_string()))
                .await
                .map_err(|e| format!("write: {e}"))?;
            sent += 1;
        }
        let reply = next_json(ws, timeout).await?;
        if reply["response_status"] != 200 {
            return Err(format!("a patch failed: {reply}"));
        }
        answered += 1;
    }
    Ok(())
}

async fn request(ws: &mut Ws, frame: Value, timeout: Duration) -> Result<Value, String> {
    ws.send(Message::text(frame.to_string()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    next_json(ws, timeout).await
}

async fn next_json(ws: &mut Ws, timeout: Duration) -> Result<Value, String> {
    loop {
        match tokio::time::timeout(timeout, ws.next()).await {
            Err(_) => return Err("timed out waiting for a frame".into()),
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(&t).map_err(|e| format!("not JSON: {e}"));
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => return Err(format!("connection ended: {other:?}")),
        }
    }
}
