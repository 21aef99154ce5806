// Test helpers: start and stop dcrf-demo (and a private redis-server), connect clients with a
// recording, controllable WebSocket, sign demo JWTs, and wait for conditions with timeouts.
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import WebSocket from 'ws';

import { connect } from '../../dist/index.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '..', '..', '..', '..');

/** The demo binary: `DCRF_DEMO_BIN`, else the workspace's debug build. */
export const DEMO_BIN = path.resolve(
  process.env.DCRF_DEMO_BIN || path.join(process.env.CARGO_TARGET_DIR || path.join(repo, 'target'), 'debug', 'dcrf-demo'),
);

/** A database shared by the run (a PostgreSQL schema), or null for SQLite. */
export const SHARED_DATABASE = process.env.DCRF_TEST_DATABASE_URL || null;

/** The channel layer (`redis://...`), or null for the in-memory one. */
export const LAYER = process.env.DCRF_TEST_LAYER || null;

/** Which backend this run tests, for test names. */
export const BACKEND = SHARED_DATABASE && LAYER ? 'postgres+redis' : 'sqlite+memory';

/** How long one awaited condition may take. */
export const TIMEOUT_MS = Number(process.env.DCRF_TEST_TIMEOUT_MS || 10000);

const running = new Set();
process.on('exit', () => {
  for (const child of running) {
    try {
      child.kill('SIGKILL');
    } catch {
      // gone
    }
  }
});

/** A temporary directory, removed at exit. */
export function tempDir() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dcrf-ts-client-'));
  process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** A database that outlives a server process: the shared one, else a SQLite file. */
export function persistentDatabase() {
  return SHARED_DATABASE || `sqlite://${path.join(tempDir(), 'demo.sqlite3')}?mode=rwc`;
}

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Resolves once a line of `stream` matches `pattern` (or rejects after the timeout). */
function waitForLine(stream, pattern, what, ms = 30000) {
  return new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: stream });
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    lines.on('line', (line) => {
      const match = pattern.exec(line);
      if (match) {
        clearTimeout(timer);
        resolve(match);
      }
    });
  });
}

/**
 * Starts dcrf-demo on 127.0.0.1 and waits for its "listening" line.
 * @param {{database?: string, layer?: string|null, port?: number, args?: string[]}} [opts]
 */
export async function startServer({ database, layer = LAYER, port = 0, args = [] } = {}) {
  if (!fs.existsSync(DEMO_BIN)) {
    throw new Error(`demo server not found at ${DEMO_BIN}: run \`cargo build -p dcrf-demo\` or set DCRF_DEMO_BIN`);
  }
  const db = database || SHARED_DATABASE || 'sqlite::memory:';
  const argv = ['--bind', `127.0.0.1:${port}`, '--database', db, ...args];
  if (layer) argv.push('--layer', layer);
  const child = spawn(DEMO_BIN, argv, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn' },
  });
  running.add(child);
  const logTail = [];
  readline.createInterface({ input: child.stderr }).on('line', (line) => {
    logTail.push(line);
    if (logTail.length > 40) logTail.shift();
    if (process.env.DCRF_TEST_SERVER_LOGS) process.stderr.write(`[dcrf-demo] ${line}\n`);
  });
  const exited = new Promise((resolve) =>
    child.on('exit', (code, signal) => {
      running.delete(child);
      resolve({ code, signal });
    }),
  );
  const listening = waitForLine(child.stdout, /^dcrf-demo listening on 127\.0\.0\.1:(\d+)$/, 'dcrf-demo to listen');
  const outcome = await Promise.race([listening, exited.then((status) => ({ status }))]);
  if (outcome.status) {
    throw new Error(`dcrf-demo exited at start-up (${JSON.stringify(outcome.status)}):\n${logTail.join('\n')}`);
  }
  const boundPort = Number(outcome[1]);
  return {
    port: boundPort,
    database: db,
    http: `http://127.0.0.1:${boundPort}`,
    ws: (p) => `ws://127.0.0.1:${boundPort}${p}`,
    child,
    logTail,
    /** SIGTERM and wait; SIGKILL after 10 s. */
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
      const status = await exited;
      clearTimeout(timer);
      return status;
    },
    /** SIGKILL (a crash) and wait. */
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill('SIGKILL');
      return exited;
    },
  };
}

/** Starts a private redis-server on `port` (no persistence); resolves when it answers. */
export async function startRedis(port) {
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    cwd: tempDir(),
  });
  running.add(child);
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  child.on('exit', () => running.delete(child));
  child.stderr.resume();
  await Promise.race([
    waitForLine(child.stdout, /Ready to accept connections/, 'redis-server to start'),
    exited.then((s) => {
      throw new Error(`redis-server exited: ${JSON.stringify(s)}`);
    }),
  ]);
  return {
    url: `redis://127.0.0.1:${port}`,
    async kill() {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill('SIGKILL');
      return exited;
    },
  };
}

/** Is a command on PATH? */
export function hasCommand(name) {
  return (process.env.PATH || '').split(path.delimiter).some((dir) => fs.existsSync(path.join(dir, name)));
}

/**
 * A WebSocket class for the client that records every frame (`wire.sent`, `wire.received`,
 * parsed) and can be redirected or blocked: `wire.target` (a `host:port`) replaces the URL's,
 * and while `wire.blocked` connections are refused (as if the network were down).
 */
export function recordingWebSocket() {
  const wire = { sent: [], received: [], urls: [], sockets: [], target: null, blocked: false };
  class RecordingWebSocket extends WebSocket {
    constructor(url) {
      let u = url;
      if (wire.target) u = u.replace(/^(wss?:\/\/)[^/]+/, `$1${wire.target}`);
      if (wire.blocked) u = u.replace(/^(wss?:\/\/)[^/]+/, '$1127.0.0.1:9');
      super(u);
      wire.urls.push(u);
      wire.sockets.push(this);
      this.on('message', (data) => wire.received.push(JSON.parse(String(data))));
    }
    send(text) {
      wire.sent.push(JSON.parse(text));
      super.send(text);
    }
  }
  wire.WebSocket = RecordingWebSocket;
  /** Drops the current socket abruptly (a network failure: no close handshake). */
  wire.breakSocket = () => {
    const socket = wire.sockets.at(-1);
    if (socket) socket.terminate();
  };
  return wire;
}

/** Connects the TypeScript client with a recording WebSocket and fast reconnects. */
export function connectClient(url, options = {}) {
  const wire = recordingWebSocket();
  const client = connect(url, {
    WebSocket: wire.WebSocket,
    backoff: { minDelayMs: 50, maxDelayMs: 300, jitter: 0.2 },
    requestTimeoutMs: TIMEOUT_MS,
    ...options,
  });
  client.wire = wire;
  return client;
}

/** Polls `check` (sync or async, truthy = done) until it holds; fails after `ms` with `what`. */
export async function eventually(check, what, ms = TIMEOUT_MS) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms waiting for ${what}; last: ${last instanceof Error ? last.stack : JSON.stringify(last)}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Resolves with the rejection of `promise` (fails if it resolves). */
export async function rejection(promise) {
  try {
    const value = await promise;
    throw new Error(`expected a rejection, got ${JSON.stringify(value)}`);
  } catch (error) {
    return error;
  }
}

let counter = 0;
const RUN = `${Date.now().toString(36)}${process.pid.toString(36)}`;

/** A value no other test or run uses (todo owners isolate tests on a shared database). */
export function unique(label) {
  counter += 1;
  return `${label}-${RUN}-${counter}`;
}

/** The demo's default JWT secret. */
export const DEMO_JWT_SECRET = 'dcrf-demo-insecure-secret';

/** An HS256 JWT for `claims`. */
export function hs256(claims, secret = DEMO_JWT_SECRET) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${body}.${crypto.createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** Every todo of `owner`, by id, read with a plain `list` on its own connection. */
export async function listTodos(server, owner) {
  const client = connect(server.ws('/ws/todos/'), { WebSocket, requestTimeoutMs: TIMEOUT_MS });
  try {
    const page = await client.stream().list({ filters: { owner }, ordering: 'id', limit: 1000 });
    return page.results;
  } finally {
    client.close();
  }
}

/** Rows sorted by id (for comparing a live list with `list`). */
export function byId(rows) {
  return [...rows].sort((a, b) => a.id - b.id);
}

/** Closes clients and stops servers, ignoring what is already gone. */
export async function cleanup(clients, servers) {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await s.stop();
}
