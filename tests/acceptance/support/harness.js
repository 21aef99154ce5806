'use strict';
// Shared helpers for the acceptance suite: start/stop the demo server, connect dcrf-client
// instances to it, await with timeouts, and collect pushed events.

const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const dcrf = require('dcrf-client').default;
const WebSocket = require('ws');

const SUITE_DIR = path.resolve(__dirname, '..');

/** The demo binary: `DCRF_DEMO_BIN`, else the workspace's debug build. */
const DEMO_BIN = path.resolve(
  SUITE_DIR,
  process.env.DCRF_DEMO_BIN || path.join('..', '..', 'target', 'debug', 'dcrf-demo'),
);

/** A database shared by every server of the run (e.g. a PostgreSQL schema), or null. */
const SHARED_DATABASE = process.env.DCRF_TEST_DATABASE_URL || null;

/** The channel layer URL passed as `--layer`, or null for the server's default. */
const LAYER = process.env.DCRF_TEST_LAYER || null;

/**
 * True when every server gets an empty database of its own (`sqlite::memory:`). With a
 * shared database, rows from earlier files and runs are present, so exact list contents
 * cannot be asserted.
 */
const FRESH_DATABASE = SHARED_DATABASE == null;

/** How long a single awaited reply or event may take. */
const REPLY_TIMEOUT_MS = Number(process.env.DCRF_TEST_TIMEOUT_MS || 5000);
const START_TIMEOUT_MS = 30000;
const STOP_TIMEOUT_MS = 10000;

/** The two representations of the `thing` table, as in the client's own integration tests. */
const THING_STREAMS = [
  { stream: 'things', pkField: 'pk' },
  { stream: 'things_with_id', pkField: 'id' },
];

// ---------------------------------------------------------------------------------------------
// Traffic log: every frame sent or received by a test client, quoted in timeout errors so a
// failure shows what was on the wire.

const traffic = [];
const TRAFFIC_KEEP = 400;

function record(direction, label, text) {
  traffic.push(`${direction} ${label} ${text}`);
  if (traffic.length > TRAFFIC_KEEP) traffic.splice(0, traffic.length - TRAFFIC_KEEP);
}

function recentTraffic(n = 20) {
  const lines = traffic.slice(-n);
  return lines.length ? lines.join('\n') : '(no frames)';
}

// ---------------------------------------------------------------------------------------------
// Timeouts: dcrf-client has none, so every await goes through one of these.

class TimeoutError extends Error {}

/** Resolves like `promise`, or fails after `ms` naming `what` and quoting recent traffic. */
function withTimeout(promise, what, ms = REPLY_TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => {
      reject(
        new TimeoutError(
          `timed out after ${ms} ms waiting for ${what}\nlast frames (> sent, < received):\n` +
            recentTraffic(),
        ),
      );
    }, ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** The value `promise` rejects with (dcrf-client rejects with the whole reply payload). */
async function rejectionOf(promise, what, ms = REPLY_TIMEOUT_MS) {
  let value;
  try {
    value = await withTimeout(promise, what, ms);
  } catch (err) {
    if (err instanceof TimeoutError) throw err;
    return err;
  }
  assert.fail(`${what}: expected a rejection, but it resolved with ${JSON.stringify(value)}`);
}

// ---------------------------------------------------------------------------------------------
// Unique names, so tests stay independent on a shared database.

let uniqueCounter = 0;
const RUN_TAG = `${Date.now().toString(36)}${process.pid.toString(36)}`;

function uniqueName(label = 'thing') {
  uniqueCounter += 1;
  return `${label}-${RUN_TAG}-${uniqueCounter}`.slice(0, 64);
}

// ---------------------------------------------------------------------------------------------
// The demo server.

const running = new Set();

process.on('exit', () => {
  for (const child of running) {
    try {
      child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }
});

/** A temporary directory for SQLite files, removed when the process exits. */
function tempDir() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dcrf-acceptance-'));
  process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * A database URL that outlives one server process (for restart tests): the shared database
 * if there is one, else a SQLite file in a temporary directory.
 */
function persistentDatabase() {
  if (SHARED_DATABASE) return SHARED_DATABASE;
  return `sqlite://${path.join(tempDir(), 'demo.sqlite3')}?mode=rwc`;
}

/**
 * Starts `dcrf-demo` and waits for its `dcrf-demo listening on HOST:PORT` line.
 *
 * @param {object} [opts]
 * @param {string} [opts.database] database URL; default the shared one, else a fresh
 *   `sqlite::memory:`
 * @param {number} [opts.port] port to bind on 127.0.0.1 (0: any free port)
 */
async function startServer({ database, port = 0 } = {}) {
  if (!fs.existsSync(DEMO_BIN)) {
    throw new Error(
      `demo server binary not found at ${DEMO_BIN}: build it with ` +
        '`cargo build -p dcrf-demo` or set DCRF_DEMO_BIN',
    );
  }
  const db = database || SHARED_DATABASE || 'sqlite::memory:';
  const args = ['--bind', `127.0.0.1:${port}`, '--database', db];
  if (LAYER) args.push('--layer', LAYER);
  const child = spawn(DEMO_BIN, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn' },
  });
  running.add(child);

  // Always drain stderr (a full pipe would block the server); keep the tail for errors.
  const logTail = [];
  readline.createInterface({ input: child.stderr }).on('line', (line) => {
    logTail.push(line);
    if (logTail.length > 50) logTail.shift();
    if (process.env.DCRF_TEST_SERVER_LOGS) process.stderr.write(`[dcrf-demo] ${line}\n`);
  });

  const exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      running.delete(child);
      resolve({ code, signal });
    });
  });

  const stdout = readline.createInterface({ input: child.stdout });
  const firstLine = new Promise((resolve) => stdout.once('line', resolve));
  stdout.on('line', () => {}); // keep draining ("dcrf-demo stopped" comes at exit)

  const describeFailure = (why) =>
    new Error(
      `${why}: ${DEMO_BIN} ${args.join(' ')}\nserver log tail:\n${logTail.join('\n') || '(empty)'}`,
    );

  let timer;
  const outcome = await Promise.race([
    firstLine.then((line) => ({ line })),
    exited.then((status) => ({ status })),
    new Promise((resolve) => {
      timer = setTimeout(() => resolve({ timeout: true }), START_TIMEOUT_MS);
    }),
  ]);
  clearTimeout(timer);
  if (outcome.status) {
    throw describeFailure(`demo server exited during start-up (${JSON.stringify(outcome.status)})`);
  }
  if (outcome.timeout) {
    child.kill('SIGKILL');
    throw describeFailure(`demo server did not print its address within ${START_TIMEOUT_MS} ms`);
  }
  const match = /^dcrf-demo listening on 127\.0\.0\.1:(\d+)$/.exec(outcome.line);
  if (!match) {
    child.kill('SIGKILL');
    throw describeFailure(`unexpected first line ${JSON.stringify(outcome.line)}`);
  }
  const boundPort = Number(match[1]);

  return {
    port: boundPort,
    database: db,
    url: `ws://127.0.0.1:${boundPort}/ws`,
    child,
    /** SIGTERM, then wait for a graceful exit (fails, after a SIGKILL, if it does not come). */
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill('SIGTERM');
      let stopTimer;
      const result = await Promise.race([
        exited,
        new Promise((resolve) => {
          stopTimer = setTimeout(() => resolve(null), STOP_TIMEOUT_MS);
        }),
      ]);
      clearTimeout(stopTimer);
      if (result === null) {
        child.kill('SIGKILL');
        await exited;
        throw describeFailure(`demo server did not exit within ${STOP_TIMEOUT_MS} ms of SIGTERM`);
      }
      if (result.code !== 0) {
        throw describeFailure(`demo server exited with ${JSON.stringify(result)} after SIGTERM`);
      }
      return result;
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Clients.

let clientCounter = 0;

/**
 * Creates a dcrf-client for `server` (or a URL), starts it and waits for the socket to open.
 * `options` are dcrf-client options; `options.websocket` extends the reconnecting-websocket
 * options (fast reconnects by default, so restart tests stay short).
 */
async function connectClient(server, options = {}) {
  const url = typeof server === 'string' ? server : server.url;
  const label = options.label || `c${++clientCounter}`;
  const { label: _ignored, websocket, ...clientOptions } = options;
  const client = dcrf.createClient(url, {
    ...clientOptions,
    websocket: {
      WebSocket,
      minReconnectionDelay: 100,
      maxReconnectionDelay: 400,
      reconnectionDelayGrowFactor: 1.3,
      connectionTimeout: 2000,
      minUptime: 500,
      ...websocket,
    },
  });

  // Record the wire traffic. `client.sent` lists the frames handed to the socket, in order
  // (re-subscriptions and flushed queues included).
  client.sent = [];
  client.transport.on('message', (event) => record('<', label, event.data));

  const connected = new Promise((resolve) => client.transport.once('connect', resolve));
  client.initialize();
  const socket = client.transport.socket;
  const socketSend = socket.send.bind(socket);
  socket.send = (text) => {
    record('>', label, text);
    client.sent.push(JSON.parse(text));
    return socketSend(text);
  };
  await withTimeout(connected, `${label}: websocket connection to ${url}`);
  return client;
}

/**
 * Resolves once every frame the server sent `client` before this call has been dispatched: the
 * server handles a socket's frames and subscription events one at a time, in order, so the
 * reply to a request sent now comes after every push of the events it has already handled (a
 * test that has received one push of an event thereby has every other push of that event).
 * `pk` names any existing row of `stream`.
 */
async function roundTrip(client, stream, pk, what = 'round-trip retrieve') {
  await withTimeout(client.retrieve(stream, pk), what);
}

/** Closes clients made by connectClient (dcrf-client 0.3.0 sends nothing on close). */
function closeClients(clients) {
  for (const client of clients.splice(0)) client.close();
}

/** Resolves on the transport's next `reconnect` event. */
function nextReconnect(client) {
  return new Promise((resolve) => client.transport.once('reconnect', resolve));
}

/** Resolves when the client's current socket closes. */
function nextClose(client) {
  return new Promise((resolve) => client.transport.socket.addEventListener('close', resolve));
}

// ---------------------------------------------------------------------------------------------
// Events.

/**
 * Collects values pushed by callbacks (subscription callbacks, dispatcher listeners) so tests
 * can await them with a timeout.
 */
class Inbox {
  constructor(label) {
    this.label = label;
    this.items = [];
    this.waiters = [];
    this.push = this.push.bind(this);
  }

  /** Use as a callback: stores its arguments (one argument: the value, else an array). */
  push(...args) {
    const item = args.length === 1 ? args[0] : args;
    const waiter = this.waiters.find((w) => w.pred(item));
    if (waiter) {
      this.waiters.splice(this.waiters.indexOf(waiter), 1);
      waiter.resolve(item);
    } else {
      this.items.push(item);
    }
  }

  /** The first item (already received or coming) satisfying `pred`; removes it. */
  take(pred = () => true, what = this.label, ms = REPLY_TIMEOUT_MS) {
    const index = this.items.findIndex(pred);
    if (index >= 0) return Promise.resolve(this.items.splice(index, 1)[0]);
    let waiter;
    const promise = new Promise((resolve) => {
      waiter = { pred, resolve };
      this.waiters.push(waiter);
    });
    return withTimeout(promise, what, ms).catch((err) => {
      const i = this.waiters.indexOf(waiter);
      if (i >= 0) this.waiters.splice(i, 1);
      throw err;
    });
  }

  /** The next item. */
  next(what = this.label, ms = REPLY_TIMEOUT_MS) {
    return this.take(() => true, what, ms);
  }
}

/**
 * dcrf's extensions of DCRF's envelope: `position` (`{epoch, offset}`) on subscribe replies
 * and pushes, `recovered` on resumed subscribes. Checks their shape, then returns the frame
 * without them, so tests compare DCRF's envelope exactly.
 */
function withoutExtensions(frame) {
  const strip = (envelope) => {
    if (!envelope || typeof envelope !== 'object' || Array.isArray(envelope)) return envelope;
    const { position, recovered, ...rest } = envelope;
    if (position !== undefined) {
      if (typeof position.epoch !== 'string' || !Number.isInteger(position.offset)) {
        throw new Error(`malformed position in ${JSON.stringify(envelope)}`);
      }
    }
    if (recovered !== undefined && typeof recovered !== 'boolean') {
      throw new Error(`malformed recovered in ${JSON.stringify(envelope)}`);
    }
    return rest;
  };
  if (frame && frame.payload !== undefined && frame.stream !== undefined) {
    return { ...frame, payload: strip(frame.payload) };
  }
  return strip(frame);
}

/**
 * Listens on the client's dispatcher for raw frames matching `selector` (a partial match, as
 * the client does it) and returns an Inbox of whole frames (`{stream, payload}`), without
 * dcrf's envelope extensions (see `withoutExtensions`).
 */
function listenFrames(client, selector, label = JSON.stringify(selector)) {
  const inbox = new Inbox(label);
  inbox.listenerId = client.dispatcher.listen(selector, (frame) => inbox.push(withoutExtensions(frame)));
  inbox.cancel = () => client.dispatcher.cancel(inbox.listenerId);
  return inbox;
}

// ---------------------------------------------------------------------------------------------
// JWT (HS256) for the demo's default secret, to call `whoami` as a user.

const DEMO_JWT_SECRET = process.env.DCRF_TEST_JWT_SECRET || 'dcrf-demo-insecure-secret';

function hs256Token(claims, secret = DEMO_JWT_SECRET) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  const signature = crypto.createHmac('sha256', secret).update(body).digest('base64url');
  return `${body}.${signature}`;
}

/** Sorts objects by their `key` field (for comparing lists). */
function byKey(key) {
  return (a, b) => (a[key] < b[key] ? -1 : a[key] > b[key] ? 1 : 0);
}

module.exports = {
  DEMO_BIN,
  FRESH_DATABASE,
  LAYER,
  REPLY_TIMEOUT_MS,
  SHARED_DATABASE,
  THING_STREAMS,
  Inbox,
  TimeoutError,
  byKey,
  closeClients,
  connectClient,
  hs256Token,
  listenFrames,
  nextClose,
  nextReconnect,
  persistentDatabase,
  recentTraffic,
  rejectionOf,
  roundTrip,
  startServer,
  uniqueName,
  withTimeout,
  withoutExtensions,
};
