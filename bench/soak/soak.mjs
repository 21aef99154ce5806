// The load and the checks of bench/soak.sh (which sets the environment below and starts the
// servers): request/reply workers, writers whose acknowledged creates are all checked at the
// end, subscribers (subscribe_to_all, subscribe_list), connection churn and slow readers that
// never read, against two dcrf-demo nodes sharing PostgreSQL and Redis; faults on a timer.
// Every 10 s one line: elapsed, each node's RSS and open fds, requests ok / errors, lost
// acknowledged writes so far.

import { execFile } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { promisify } from "node:util";
import WebSocket from "ws";

const run = promisify(execFile);
const env = process.env;
const NODES = env.SOAK_NODES.split(","); // ws://host:port, one per node
const PIDS = env.SOAK_PIDS.split(",").map(Number);
const DURATION = Number(env.SOAK_SECONDS ?? 600) * 1000;
const FAULT_EVERY = Number(env.SOAK_FAULT_SECONDS ?? 75) * 1000;
const SEED = Number(env.SOAK_SEED ?? 100);
const WORKERS = Number(env.SOAK_WORKERS ?? 6);
const WRITERS = Number(env.SOAK_WRITERS ?? 4);
const SUBSCRIBERS = Number(env.SOAK_SUBSCRIBERS ?? 4);
const SLOW = Number(env.SOAK_SLOW_READERS ?? 4);
const PAUSE_MS = Number(env.SOAK_PAUSE_MS ?? 2); // between a worker's requests
const TIMEOUT = 10_000;
const REDIS_RESTART = env.SOAK_REDIS_RESTART; // shell commands of the faults
const PG_TERMINATE = env.SOAK_PG_TERMINATE;
const PG_IDS = env.SOAK_PG_IDS; // prints the ids in the todo table above $1

const stats = {
  ok: 0, errors: 0, timeouts: 0, disconnects: 0, churned: 0, acked: 0,
  pushes: 0, resyncs: 0, slowClosed: 0, faults: [], errorKinds: new Map(),
};
const acked = new Map(); // id -> { title, at }
const present = new Set();
let checkedAbove = 0;
let stopping = false;
const started = Date.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const node = (i) => NODES[i % NODES.length];

function noteError(reply) {
  stats.errors++;
  const key = `${reply.action}:${reply.response_status}:${JSON.stringify(reply.errors).slice(0, 80)}`;
  stats.errorKinds.set(key, (stats.errorKinds.get(key) ?? 0) + 1);
}

/** A connection with request/reply by request_id, pushes to a handler. */
class Conn {
  constructor(url, { onPush = () => {}, onClose = () => {} } = {}) {
    this.pending = new Map();
    this.next = 0;
    this.onPush = onPush;
    this.closed = false;
    this.ws = new WebSocket(url, { perMessageDeflate: false });
    this.open = new Promise((resolve, reject) => {
      this.ws.once("open", resolve);
      this.ws.once("error", reject);
    });
    this.ws.on("error", () => {});
    this.ws.on("message", (data) => {
      const msg = JSON.parse(data.toString());
      const p = this.pending.get(msg.request_id);
      if (p && msg.action === p.action) {
        this.pending.delete(msg.request_id);
        clearTimeout(p.timer);
        p.resolve(msg);
      } else {
        this.onPush(msg);
      }
    });
    this.ws.on("close", (code) => {
      this.closed = true;
      for (const p of this.pending.values()) {
        clearTimeout(p.timer);
        p.resolve(null);
      }
      this.pending.clear();
      onClose(code);
    });
  }
  request(action, fields = {}, requestId) {
    const request_id = requestId ?? `r${this.next++}`;
    return new Promise((resolve) => {
      if (this.closed) return resolve(null);
      const timer = setTimeout(() => {
        this.pending.delete(request_id);
        stats.timeouts++;
        resolve(null);
      }, TIMEOUT);
      this.pending.set(request_id, { resolve, timer, action });
      this.ws.send(JSON.stringify({ action, request_id, ...fields }));
    });
  }
  close() {
    this.ws.close();
  }
}

async function connect(url, opts) {
  for (;;) {
    const c = new Conn(url, opts);
    try {
      await c.open;
      return c;
    } catch {
      stats.disconnects++;
      await sleep(200);
    }
  }
}

/** Reads, lists and patches of the seeded rows. */
async function worker(i) {
  while (!stopping) {
    const c = await connect(`${node(i)}/ws/todos/`);
    while (!stopping && !c.closed) {
      const pk = 1 + Math.floor(Math.random() * SEED);
      const r = Math.random();
      const reply =
        r < 0.5 ? await c.request("retrieve", { pk })
        : r < 0.8 ? await c.request("list", { limit: 10, offset: pk % 50 })
        : await c.request("patch", { pk, data: { title: `seed ${pk} w${i} ${Date.now()}` } });
      if (reply === null) continue;
      if (reply.response_status < 300) stats.ok++;
      else noteError(reply);
      if (PAUSE_MS) await sleep(PAUSE_MS);
    }
    if (!stopping) stats.disconnects++;
  }
}

/** Creates; every acknowledged one must exist at the end and reach the subscribers. */
async function writer(i) {
  let n = 0;
  while (!stopping) {
    const c = await connect(`${node(i + 1)}/ws/todos/`);
    while (!stopping && !c.closed) {
      const title = `soak w${i} #${n++}`;
      const reply = await c.request("create", { data: { title, owner: `w${i}`, done: true } });
      if (reply === null) continue;
      if (reply.response_status === 201) {
        stats.ok++;
        stats.acked++;
        acked.set(reply.data.id, { title, at: Date.now() });
      } else noteError(reply);
      if (PAUSE_MS) await sleep(PAUSE_MS);
    }
    if (!stopping) stats.disconnects++;
  }
}

/** A subscriber of every change (and, every other one, a live list): what it saw. */
const subscribers = [];
async function subscriber(i) {
  while (!stopping) {
    const sub = { i, seen: new Set(), resyncs: 0, since: 0, stayed: true, listPushes: 0 };
    const c = await connect(`${node(i)}/ws/todos/`, {
      onPush(msg) {
        stats.pushes++;
        if (msg.action === "resync") {
          stats.resyncs++;
          sub.resyncs++;
        } else if (msg.request_id === "all" && msg.action === "create") sub.seen.add(msg.data.id);
        else if (msg.request_id === "live") sub.listPushes++;
      },
      onClose() {
        sub.stayed = false;
      },
    });
    const reply = await c.request("subscribe_to_all", {}, "all");
    if (reply === null || reply.response_status >= 300) {
      if (reply) noteError(reply);
      c.close();
      await sleep(500);
      continue;
    }
    if (i % 2 === 1) {
      // The seeded rows (not done; the writers' rows are created done), patched by the workers.
      const list = await c.request("subscribe_list", { filters: { done: false } }, "live");
      if (list && list.response_status >= 300) noteError(list);
    }
    sub.since = Date.now();
    subscribers.push(sub);
    while (!stopping && !c.closed) await sleep(200);
    if (stopping) {
      sub.conn = c;
      return;
    }
    stats.disconnects++;
  }
}

/** Opens a socket, asks one thing, closes: over and over. */
async function churn(i) {
  while (!stopping) {
    const c = await connect(`${node(i)}/ws/todos/`);
    const reply = await c.request("retrieve", { pk: 1 + (stats.churned % SEED) });
    if (reply && reply.response_status < 300) stats.ok++;
    else if (reply) noteError(reply);
    c.close();
    stats.churned++;
    await sleep(20);
  }
}

/** Subscribes to every change and stops reading for 30 s: the server must shed it (close
 * 1013) or hold it within its bounds, not grow. Then it reads again to see which. */
async function slowReader(i) {
  while (!stopping) {
    let code = 0;
    const c = await connect(`${node(i)}/ws/todos/`, { onClose: (c) => (code = c) });
    await c.request("subscribe_to_all", {}, "all");
    c.ws._socket.pause();
    for (let t = 0; t < 60 && !stopping; t++) await sleep(500);
    c.ws._socket.resume();
    await sleep(2000);
    if (c.closed && code === 1013) stats.slowClosed++;
    if (!c.closed) c.ws.terminate();
  }
}

function proc(pid) {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const rss = Number(/VmRSS:\s+(\d+)/.exec(status)[1]) / 1024;
    const fds = readdirSync(`/proc/${pid}/fd`).length;
    return { rss, fds };
  } catch {
    return { rss: NaN, fds: NaN };
  }
}

async function checkPresent() {
  // Rows commit out of id order across writers: look back a little.
  const above = Math.max(0, checkedAbove - 1000);
  const { stdout } = await run("bash", ["-c", PG_IDS, "ids", String(above)], { maxBuffer: 1 << 26 });
  for (const line of stdout.split("\n")) {
    if (line) {
      const id = Number(line);
      present.add(id);
      if (id > checkedAbove) checkedAbove = id;
    }
  }
}

function lostSoFar(olderThan) {
  let lost = 0;
  for (const [id, w] of acked) if (w.at < olderThan && !present.has(id)) lost++;
  return lost;
}

const lines = [];
async function report() {
  try {
    await checkPresent();
  } catch (e) {
    console.error(`database check failed: ${e.message}`);
  }
  const el = Math.round((Date.now() - started) / 1000);
  const nodes = PIDS.map(proc);
  const line = {
    t: el,
    rss: nodes.map((n) => n.rss.toFixed(1)),
    fds: nodes.map((n) => n.fds),
    ok: stats.ok,
    errors: stats.errors,
    timeouts: stats.timeouts,
    acked: stats.acked,
    lost: lostSoFar(Date.now() - 2000),
    pushes: stats.pushes,
    resyncs: stats.resyncs,
    churned: stats.churned,
    slowClosed: stats.slowClosed,
    reconnects: stats.disconnects,
  };
  lines.push(line);
  console.log(
    `t=${String(el).padStart(4)}s rss_mb=${line.rss.join("/")} fds=${line.fds.join("/")} ` +
      `ok=${line.ok} errors=${line.errors} timeouts=${line.timeouts} acked=${line.acked} lost=${line.lost} ` +
      `pushes=${line.pushes} resyncs=${line.resyncs} churned=${line.churned} slow_closed=${line.slowClosed} reconnects=${line.reconnects}`,
  );
}

async function faults() {
  let n = 0;
  while (!stopping) {
    await sleep(FAULT_EVERY);
    if (stopping) break;
    const kind = n++ % 2 === 0 ? "redis-restart" : "pg-terminate";
    const cmd = kind === "redis-restart" ? REDIS_RESTART : PG_TERMINATE;
    const at = Math.round((Date.now() - started) / 1000);
    try {
      const { stdout } = await run("bash", ["-c", cmd]);
      stats.faults.push({ at, kind, out: stdout.trim() });
      console.log(`t=${String(at).padStart(4)}s FAULT ${kind} ${stdout.trim()}`);
    } catch (e) {
      console.log(`t=${String(at).padStart(4)}s FAULT ${kind} failed: ${e.message}`);
    }
  }
}

/** Every row, by the API: list pages of 1000 ordered by id. */
async function listAll() {
  const c = await connect(`${node(0)}/ws/todos/`);
  const rows = new Map();
  for (let offset = 0; ; offset += 1000) {
    const reply = await c.request("list", { limit: 1000, offset, ordering: "id" });
    if (!reply || reply.response_status !== 200) throw new Error(`list failed: ${JSON.stringify(reply)}`);
    const results = reply.data.results ?? reply.data;
    for (const row of results) rows.set(row.id, row.title);
    if (results.length < 1000) break;
  }
  c.close();
  return rows;
}

const tasks = [];
for (let i = 0; i < WORKERS; i++) tasks.push(worker(i));
for (let i = 0; i < WRITERS; i++) tasks.push(writer(i));
for (let i = 0; i < SUBSCRIBERS; i++) tasks.push(subscriber(i));
for (let i = 0; i < 2; i++) tasks.push(churn(i));
for (let i = 0; i < SLOW; i++) tasks.push(slowReader(i));
const faulting = faults();
const ticker = setInterval(report, 10_000);
await sleep(DURATION);
stopping = true;
clearInterval(ticker);
await Promise.race([Promise.all(tasks), sleep(TIMEOUT + 2000)]);
await sleep(3000); // pushes in flight
await report();

// The final checks.
const rows = await listAll();
let lost = 0;
let wrong = 0;
for (const [id, w] of acked) {
  if (!rows.has(id)) lost++;
  else if (rows.get(id) !== w.title) wrong++;
}
let missed = 0;
let missedWithResync = 0;
let stayed = 0;
for (const sub of subscribers) {
  if (!sub.stayed) continue;
  stayed++;
  for (const [id, w] of acked) {
    if (w.at > sub.since + 100 && !sub.seen.has(id)) {
      if (sub.resyncs > 0) missedWithResync++;
      else missed++;
    }
  }
  sub.conn?.close();
}
const summary = {
  seconds: Math.round((Date.now() - started) / 1000),
  acked: acked.size,
  lost_acknowledged_writes: lost,
  wrong_title: wrong,
  subscribers_stayed: stayed,
  pushes_missed_without_resync: missed,
  pushes_missed_with_resync: missedWithResync,
  requests_ok: stats.ok,
  errors: stats.errors,
  timeouts: stats.timeouts,
  churned: stats.churned,
  slow_readers_closed: stats.slowClosed,
  faults: stats.faults,
  error_kinds: Object.fromEntries(stats.errorKinds),
  first: lines[0],
  last: lines[lines.length - 1],
};
console.log(`SUMMARY ${JSON.stringify(summary)}`);
process.exit(lost === 0 && wrong === 0 && missed === 0 ? 0 : 1);
