//! `fanout`: subscriber connections watch one row, one writer connection patches it, and each
//! push is timed from the write to its arrival at each subscriber.
//!
//! The writer puts `"SEQ:NANOS"` in the row's title (the write's sequence number and its
//! send time, or scheduled send time under `--rate`, on a clock shared by the whole
//! process), so a subscriber can time the push it receives by reading `data.title`.
//!
//! Closed loop (no `--rate`): the writer sends the next write only when the previous one has
//! been acknowledged and delivered to every subscriber (or `--timeout` passed). Open loop:
//! writes go out on a fixed schedule whatever the deliveries.
//!
//! Every (write, subscriber) pair counts once: a subscriber remembers the writes it has had a
//! push for, and a second push for the same write is a duplicate (counted apart, not timed,
//! not a delivery). `lost` is the expected pairs (successful writes of the window ×
//! subscribers) minus the distinct pairs delivered; each lost pair is a censored latency
//! sample, at least as long as the time from its write to the end of listening.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, watch};
use tokio::time::{sleep, sleep_until, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{Args, Subscribe};
use crate::conn::{self, Window, Ws};
use crate::load::{cpu_over, per_second};
use crate::proto::{
    ReplyHead, build_fanout_patch, build_subscribe, clock_ns, instant_ns, parse_fanout_title,
};
use crate::stats::{Counters, LocalRecorder, Recorder, Report, latency_bound_ns, rss_kib};

/// The writer's in-flight cap under `--rate` when `--window` is not given.
const OPEN_LOOP_DEFAULT_CAP: usize = 1024;

/// State shared by the writer and the subscribers.
#[derive(Debug)]
struct Shared {
    /// Subscribers that subscribed (set before the writer starts).
    subscribers: AtomicU64,
    /// The measured window on [`clock_ns`]'s scale (empty until the writer starts).
    start_ns: AtomicU64,
    end_ns: AtomicU64,
    /// Closed loop: `(seq << 32) | deliveries` of the write the writer waits for.
    current: AtomicU64,
    /// Signalled when `current` reaches `subscribers` deliveries.
    complete: Notify,
    /// Pushes received in the measured window.
    delivered_in_window: AtomicU64,
    /// Pushes received (any time) for writes sent in the measured window.
    delivered_for_window: AtomicU64,
    /// Successful writes sent in the measured window.
    writes_ok_in_window: AtomicU64,
    /// The highest sequence number the writer has used (pushes claiming a higher one are not
    /// ours).
    last_seq: AtomicU64,
}

impl Shared {
    fn in_window(&self, ns: u64) -> bool {
        ns >= self.start_ns.load(Ordering::Relaxed) && ns <= self.end_ns.load(Ordering::Relaxed)
    }

    fn subscribers(&self) -> u64 {
        self.subscribers.load(Ordering::Relaxed)
    }
}

/// Runs the fan-out scenario and returns its report.
pub async fn run(args: &Args, threads: usize, cores: usize) -> Result<Report, String> {
    let url: Arc<str> = Arc::from(args.url());
    let timeout = args.timeout();
    let all = args.subscribe == Subscribe::All;
    let pk = args.pk;
    let counters = Arc::new(Counters::default());

    let shared = Arc::new(Shared {
        subscribers: AtomicU64::new(0),
        start_ns: AtomicU64::new(u64::MAX),
        end_ns: AtomicU64::new(u64::MAX),
        current: AtomicU64::new(0),
        complete: Notify::new(),
        delivered_in_window: AtomicU64::new(0),
        delivered_for_window: AtomicU64::new(0),
        writes_ok_in_window: AtomicU64::new(0),
        last_seq: AtomicU64::new(0),
    });
    let recorder = Arc::new(Recorder::new(
        threads * 2,
        latency_bound_ns(args.warmup(), args.duration(), timeout),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);

    // Every subscriber listens as soon as it has subscribed, so the server's keepalive pings
    // are answered while the others are still subscribing.
    let opened = conn::open_many(args.connections, args.connect_concurrency, |i| {
        let url = Arc::clone(&url);
        let shared = Arc::clone(&shared);
        let counters = Arc::clone(&counters);
        let recorder = Arc::clone(&recorder);
        let stop = stop_rx.clone();
        async move {
            let ws = subscribe(&url, timeout, all, pk, i).await?;
            Ok(tokio::spawn(async move {
                let mut local = recorder.local(i);
                listen(ws, i, &shared, &counters, &mut local, stop).await
            }))
        }
    })
    .await;
    let mut subscriber_tasks = Vec::new();
    for r in opened {
        match r {
            Ok(task) => subscriber_tasks.push(task),
            Err(_) => counters.connection_failed(),
        }
    }
    let open = subscriber_tasks.len();
    if open == 0 {
        return Err(format!("no subscriber could subscribe at {url}"));
    }
    let writer = conn::connect(&url, timeout)
        .await
        .map_err(|e| format!("the writer could not connect: {e}"))?;

    let window = Window::starting_now(args.warmup(), args.duration());
    shared.subscribers.store(open as u64, Ordering::Relaxed);
    shared
        .start_ns
        .store(instant_ns(window.start), Ordering::Relaxed);
    shared
        .end_ns
        .store(instant_ns(window.end), Ordering::Relaxed);
    let cpu = tokio::spawn(cpu_over(window, args.server_pid));

    let writer_cfg = WriterCfg {
        pk,
        window,
        timeout,
        interval: args.rate.map(|r| Duration::from_secs_f64(1.0 / r)),
        cap: args.window.unwrap_or(OPEN_LOOP_DEFAULT_CAP),
    };
    let writer_end = {
        let shared = Arc::clone(&shared);
        let writer_counters = Arc::clone(&counters);
        let result =
            tokio::spawn(
                async move { write(writer, &writer_cfg, &shared, &writer_counters).await },
            )
            .await;
        match result {
            Ok(end) => {
                if end.broken {
                    counters.connection_failed();
                }
                end
            }
            Err(_) => {
                counters.connection_failed();
                WriterEnd::default()
            }
        }
    };
    let ok_writes = &writer_end.ok_writes;

    // Wait for the deliveries still due, then stop the subscribers.
    let deadline = Instant::now().max(window.end) + timeout;
    let expected = || shared.writes_ok_in_window.load(Ordering::Relaxed) * shared.subscribers();
    while shared.delivered_for_window.load(Ordering::Relaxed) < expected()
        && Instant::now() < deadline
    {
        sleep(Duration::from_millis(10)).await;
    }
    let stop_ns = clock_ns();
    let _ = stop_tx.send(true);
    // Distinct subscribers that had each write's push, by sequence number.
    let last_seq = shared.last_seq.load(Ordering::Relaxed);
    let mut had = vec![0u64; usize::try_from(last_seq).unwrap_or(0).saturating_add(1)];
    let mut duplicates = 0u64;
    for t in subscriber_tasks {
        match t.await {
            Ok(seen) => {
                duplicates += seen.duplicates;
                seen.for_each(|seq| {
                    if let Some(n) = usize::try_from(seq).ok().and_then(|s| had.get_mut(s)) {
                        *n += 1;
                    }
                });
            }
            Err(_) => counters.connection_failed(),
        }
    }
    let (client_cpu, server_cpu) = cpu.await.unwrap_or_default();

    // Expected pairs: successful writes of the window × subscribers; the missing ones are lost
    // and censored at the time from their write to the end of listening. The missing pairs of
    // unanswered writes (already lost as writes) are censored too: their pushes may be due.
    let subscribers = shared.subscribers();
    let got = |seq: u64| {
        usize::try_from(seq)
            .ok()
            .and_then(|s| had.get(s))
            .copied()
            .unwrap_or(0)
            .min(subscribers)
    };
    let (mut deliveries, mut lost) = (0u64, 0u64);
    {
        let mut censor = recorder.local(0);
        for &(seq, sent_ns) in ok_writes {
            let got = got(seq);
            deliveries += got;
            lost += subscribers - got;
            censor.record_censored_ns(stop_ns.saturating_sub(sent_ns), subscribers - got);
        }
        for &(seq, sent_ns) in &writer_end.unanswered_writes {
            censor.record_censored_ns(stop_ns.saturating_sub(sent_ns), subscribers - got(seq));
        }
    }
    let deliveries_expected = ok_writes.len() as u64 * subscribers;
    Counters::add(&counters.lost, lost);
    Counters::add(&counters.errors, lost);

    let mut report = Report {
        window: args.rate.map(|_| writer_cfg.cap),
        subscribe: Some(args.subscribe.name().to_owned()),
        deliveries: Some(deliveries),
        deliveries_expected: Some(deliveries_expected),
        duplicates: Some(duplicates),
        deliveries_per_s: Some(per_second(
            shared.delivered_in_window.load(Ordering::Relaxed),
            args.duration(),
        )),
        ..Report::for_run(args, &url, open, threads, cores)
    };
    report.set_counters(&counters);
    report.msgs_per_s = per_second(report.received, args.duration());
    report.set_latency(&recorder);
    report.set_cpu(client_cpu, server_cpu, args.duration());
    report.client_rss_kib = rss_kib(None);
    Ok(report)
}

/// Connects subscriber `i` and subscribes; succeeds on a 2xx reply.
async fn subscribe(
    url: &str,
    timeout: Duration,
    all: bool,
    pk: u64,
    i: usize,
) -> Result<Ws, String> {
    let deadline = Instant::now() + timeout;
    let mut ws = conn::connect(url, timeout).await?;
    ws.send(Message::text(build_subscribe(all, pk, i)))
        .await
        .map_err(|e| format!("subscriber {i}: {e}"))?;
    let rid = format!("sub-{i}");
    loop {
        match timeout_at(deadline.into(), ws.next()).await {
            Err(_) => return Err(format!("subscriber {i}: no reply to the subscription")),
            Ok(Some(Ok(Message::Text(text)))) => {
                let Some(head) = ReplyHead::parse(&text) else {
                    continue;
                };
                let is_reply = matches!(
                    head.action.as_deref(),
                    Some("subscribe_instance" | "subscribe_to_all")
                );
                if is_reply && head.string_id() == Some(rid.as_str()) {
                    if head.is_success() {
                        return Ok(ws);
                    }
                    return Err(format!(
                        "subscriber {i}: subscription refused: {}",
                        text.as_str()
                    ));
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(format!("subscriber {i}: {e}")),
            Ok(None) => return Err(format!("subscriber {i}: connection closed")),
        }
    }
}

/// The writes one subscriber has had a push for (a bit per sequence number), and the pushes
/// it received again for a write it already had.
#[derive(Debug, Default)]
struct Seen {
    bits: Vec<u64>,
    duplicates: u64,
}

impl Seen {
    /// Marks `seq` as delivered; `false` if it already was (a duplicate).
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        if !fresh {
            self.duplicates += 1;
        }
        fresh
    }

    /// Calls `f` with every delivered sequence number.
    fn for_each(&self, mut f: impl FnMut(u64)) {
        for (w, &word) in self.bits.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let bit = u64::from(rest.trailing_zeros());
                f(w as u64 * 64 + bit);
                rest &= rest - 1;
            }
        }
    }
}

/// A subscriber: times the first push of every write until told to stop; returns the writes
/// it had.
async fn listen(
    mut ws: Ws,
    i: usize,
    shared: &Shared,
    counters: &Counters,
    rec: &mut LocalRecorder<'_>,
    mut stop: watch::Receiver<bool>,
) -> Seen {
    let rid = format!("sub-{i}");
    let mut seen = Seen::default();
    let (mut errors, mut unmatched) = (0u64, 0u64);
    let mut broken = false;
    loop {
        let msg = tokio::select! {
            msg = ws.next() => msg,
            _ = stop.changed() => break,
        };
        let text = match msg {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                broken = true;
                break;
            }
            Some(Ok(_)) => continue,
        };
        let now_ns = clock_ns();
        let Some(head) = ReplyHead::parse(&text) else {
            unmatched += 1;
            continue;
        };
        if head.string_id() != Some(rid.as_str()) {
            unmatched += 1;
            continue;
        }
        let stamp = head.data_title().as_deref().and_then(parse_fanout_title);
        let Some((seq, sent_ns)) = stamp.filter(|_| head.is_success()) else {
            // A push without our stamp (e.g. an error push).
            if !head.is_success() && shared.in_window(now_ns) {
                errors += 1;
            }
            continue;
        };
        if seq == 0 || seq > shared.last_seq.load(Ordering::Acquire) {
            // Not a write of this run.
            unmatched += 1;
            continue;
        }
        if !seen.insert(seq) {
            continue;
        }
        if shared.in_window(now_ns) {
            shared.delivered_in_window.fetch_add(1, Ordering::Relaxed);
        }
        if shared.in_window(sent_ns) {
            shared.delivered_for_window.fetch_add(1, Ordering::Relaxed);
            rec.record_ns(now_ns.saturating_sub(sent_ns));
        }
        // Closed loop: count the delivery for the write the writer waits on.
        let mut cur = shared.current.load(Ordering::Acquire);
        while cur >> 32 == seq {
            match shared.current.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if (cur & 0xFFFF_FFFF) + 1 == shared.subscribers() {
                        shared.complete.notify_one();
                    }
                    break;
                }
                Err(actual) => cur = actual,
            }
        }
    }
    if broken {
        counters.connection_failed();
    } else {
        let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
    }
    Counters::add(&counters.errors, errors);
    Counters::add(&counters.unmatched, unmatched);
    seen
}

/// The writer's settings.
#[derive(Debug, Clone, Copy)]
struct WriterCfg {
    pk: u64,
    window: Window,
    timeout: Duration,
    /// Open loop: time between writes.
    interval: Option<Duration>,
    /// Open loop: writes in flight at most.
    cap: usize,
}

/// What the writer reports at the end.
#[derive(Debug, Default)]
struct WriterEnd {
    /// `(seq, sent_ns)` of every write sent in the measured window that succeeded.
    ok_writes: Vec<(u64, u64)>,
    /// `(seq, sent_ns)` of the writes sent in the window that got no reply (lost writes: their
    /// pushes may still have been due).
    unanswered_writes: Vec<(u64, u64)>,
    /// Whether its connection broke.
    broken: bool,
}

/// The writer.
async fn write(mut ws: Ws, cfg: &WriterCfg, shared: &Shared, counters: &Counters) -> WriterEnd {
    let w = cfg.window;
    let mut buf = String::with_capacity(160);
    let (mut sent, mut received, mut errors, mut unmatched) = (0u64, 0u64, 0u64, 0u64);
    let mut broken = false;
    let mut seq: u64 = 0;
    // request id (= sequence number) → (scheduled send time in ns, sent in the window?)
    let mut in_flight: std::collections::HashMap<u64, (u64, bool)> = Default::default();
    let mut ok_writes: Vec<(u64, u64)> = Vec::new();

    // Handles a reply to a write; returns whether it answered `in_flight` entry `id`.
    let mut on_reply = |text: &str, in_flight: &mut std::collections::HashMap<u64, (u64, bool)>| {
        let now_ns = clock_ns();
        let Some(head) = ReplyHead::parse(text) else {
            unmatched += 1;
            return None;
        };
        let Some((id, (sent_ns, in_window))) =
            head.numeric_id().and_then(|id| in_flight.remove_entry(&id))
        else {
            unmatched += 1;
            return None;
        };
        if shared.in_window(now_ns) {
            received += 1;
        }
        let ok = head.is_success();
        if in_window {
            if ok {
                shared.writes_ok_in_window.fetch_add(1, Ordering::Relaxed);
                ok_writes.push((id, sent_ns));
            } else {
                errors += 1;
            }
        }
        Some((id, ok))
    };

    match cfg.interval {
        None => {
            // Closed loop: one write at a time, each waited for until fully delivered.
            let mut id: u64 = 0;
            while Instant::now() < w.end && !broken {
                seq += 1;
                id += 1;
                shared.last_seq.store(seq, Ordering::Release);
                shared.current.store(seq << 32, Ordering::Release);
                let sent_ns = clock_ns();
                let in_window = shared.in_window(sent_ns);
                build_fanout_patch(&mut buf, cfg.pk, id, seq, sent_ns);
                if ws.send(Message::text(buf.as_str())).await.is_err() {
                    broken = true;
                    break;
                }
                if in_window {
                    sent += 1;
                }
                in_flight.insert(id, (sent_ns, in_window));
                let deadline = Instant::now() + cfg.timeout;
                let (mut replied, mut delivered) = (false, false);
                while !(replied && delivered) {
                    tokio::select! {
                        // Always read, so keepalive pings are answered during long waits.
                        msg = ws.next() => match msg {
                            Some(Ok(Message::Text(text))) => {
                                if let Some((rid, ok)) = on_reply(&text, &mut in_flight)
                                    && rid == id
                                {
                                    replied = true;
                                    // A failed write produces no pushes.
                                    delivered |= !ok;
                                }
                            }
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                                broken = true;
                                break;
                            }
                            Some(Ok(_)) => {}
                        },
                        _ = shared.complete.notified(), if !delivered => {
                            let cur = shared.current.load(Ordering::Acquire);
                            delivered = cur >> 32 == seq && (cur & 0xFFFF_FFFF) >= shared.subscribers();
                        }
                        _ = sleep_until(deadline.into()) => break,
                    }
                }
            }
        }
        Some(interval) => {
            // Open loop: writes on a fixed schedule; the title carries the scheduled time.
            let mut due = w.begin;
            let mut id: u64 = 0;
            let end = sleep_until(w.end.into());
            tokio::pin!(end);
            while !broken {
                let can_send = due < w.end && in_flight.len() < cfg.cap;
                tokio::select! {
                    biased;
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(text))) => {
                            on_reply(&text, &mut in_flight);
                        }
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => broken = true,
                        Some(Ok(_)) => {}
                    },
                    _ = sleep_until(due.into()), if can_send => {
                        let now = Instant::now();
                        while due <= now && due < w.end && in_flight.len() < cfg.cap && !broken {
                            seq += 1;
                            id += 1;
                            shared.last_seq.store(seq, Ordering::Release);
                            let sent_ns = instant_ns(due);
                            let in_window = shared.in_window(sent_ns);
                            build_fanout_patch(&mut buf, cfg.pk, id, seq, sent_ns);
                            if ws.feed(Message::text(buf.as_str())).await.is_err() {
                                broken = true;
                            }
                            if in_window {
                                sent += 1;
                            }
                            in_flight.insert(id, (sent_ns, in_window));
                            due += interval;
                        }
                        if ws.flush().await.is_err() {
                            broken = true;
                        }
                    }
                    _ = &mut end => break,
                }
            }
        }
    }

    // Collect the replies still outstanding.
    let deadline = Instant::now().max(w.end) + cfg.timeout;
    while !broken && !in_flight.is_empty() {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    on_reply(&text, &mut in_flight);
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => broken = true,
                Some(Ok(_)) => {}
            },
            _ = sleep_until(deadline.into()) => break,
        }
    }
    let unanswered_writes: Vec<(u64, u64)> = in_flight
        .iter()
        .filter(|(_, (_, in_window))| *in_window)
        .map(|(&id, &(sent_ns, _))| (id, sent_ns))
        .collect();
    let lost = unanswered_writes.len() as u64;
    if !broken {
        let _ = tokio::time::timeout(Duration::from_millis(500), ws.close(None)).await;
    }
    Counters::add(&counters.sent, sent);
    Counters::add(&counters.received, received);
    Counters::add(&counters.errors, errors + lost);
    Counters::add(&counters.lost, lost);
    Counters::add(&counters.unmatched, unmatched);
    WriterEnd {
        ok_writes,
        unanswered_writes,
        broken,
    }
}
