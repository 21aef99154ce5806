/**
 * The connection: one WebSocket, reconnected with backoff; requests correlated by
 * `request_id`; subscriptions resumed after every reconnection; token refresh.
 *
 * @module
 */

import { type BackoffOptions, backoffDelay } from './backoff.js';
import { ConnectionError, DcrfError, RequestError, TimeoutError } from './errors.js';
import { uuid4 } from './ids.js';
import { Stream } from './stream.js';
import type { Subscription } from './subscription.js';
import { tokenExpiry } from './token.js';

/** The part of the WebSocket interface the client uses (the browser's, or `ws` on Node). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
}

/** A WebSocket constructor: `globalThis.WebSocket`, or `ws`'s default export on Node. */
export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** Where the connection is. */
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** A credential, or a function that returns a current one (called before every connection
 * and before every refresh). */
export type TokenSource = string | (() => string | Promise<string>);

/** Options of {@link connect}. */
export interface ClientOptions {
  /** The WebSocket class (default `globalThis.WebSocket`; pass `ws` on Node 20). */
  WebSocket?: WebSocketConstructor;
  /** Milliseconds a request waits for its reply (default 10000). */
  requestTimeoutMs?: number;
  /** Reconnection delays. */
  backoff?: BackoffOptions;
  /** A connection that stayed open this long (ms, default 1000) resets the backoff. */
  minUptimeMs?: number;
  /**
   * A JWT sent as the `?token=` query parameter of every connection. With a function, the
   * client refreshes it before it expires: it asks the function for a new one and sends it
   * with the `refresh_token` action (servers without that action are left alone; the client
   * reconnects with a new token when the server closes with 4401).
   */
  token?: TokenSource;
  /** The query parameter carrying the token (default `token`). */
  tokenParam?: string;
  /** Refresh this many ms before the token expires (default 30000, at most half its life). */
  refreshBeforeExpiryMs?: number;
  /** The stream that carries `refresh_token` on a multiplexed socket (default: the first
   * stream used). */
  refreshStream?: string;
}

/** A reply or push, as the server sent it (the payload, without the multiplexer envelope). */
export interface Payload {
  errors?: unknown;
  data?: unknown;
  action?: unknown;
  response_status?: unknown;
  request_id?: unknown;
  position?: Position;
  recovered?: boolean;
  [key: string]: unknown;
}

/** A place in a subscription's stream of events (see the server's delivery guarantees). */
export interface Position {
  epoch: string;
  offset: number;
}

/** How a request is sent. */
export interface RequestOptions {
  /** The request id (default: a new UUIDv4). */
  requestId?: unknown;
  /** Overrides the client's timeout for this request. */
  timeoutMs?: number;
  /**
   * Called synchronously with the reply, before the promise settles and before any frame
   * that follows it is handled (subscriptions use it so pushes after the reply apply after
   * it).
   */
  onReply?: (payload: Payload) => void;
}

interface Pending {
  key: string;
  stream: string | null;
  action: string;
  requestId: unknown;
  text: string;
  sent: boolean;
  timer: ReturnType<typeof setTimeout> | undefined;
  onReply: ((payload: Payload) => void) | undefined;
  resolve: (payload: Payload) => void;
  reject: (error: Error) => void;
}

/** Correlates replies and pushes: the stream and the JSON of the request id. */
export function routeKey(stream: string | null, requestId: unknown): string {
  return `${stream ?? ''}\u0000${JSON.stringify(requestId)}`;
}

/** Is `status` a success (2xx), as DCRF clients decide it? */
function isSuccess(status: unknown): boolean {
  return typeof status === 'number' && Math.floor(status / 100) === 2;
}

/** The close code the server uses when the connection's token expired. */
export const CLOSE_TOKEN_EXPIRED = 4401;

/**
 * One connection to a dcrf (or DCRF) server. Created by {@link connect}; use
 * {@link Client.stream} to talk to a consumer.
 */
export class Client {
  /** The WebSocket URL (without the token). */
  readonly url: string;
  private readonly options: ClientOptions;
  private readonly WebSocketClass: WebSocketConstructor;
  private socket: WebSocketLike | null = null;
  private stateValue: ConnectionState = 'connecting';
  private readonly pending = new Map<string, Pending>();
  private readonly queue: Pending[] = [];
  private readonly subscriptions = new Map<string, Subscription>();
  private readonly stateListeners = new Set<(state: ConnectionState) => void>();
  private readonly frameListeners = new Set<(payload: Payload, stream: string | null) => void>();
  private attempts = 0;
  private openedAt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private currentToken: string | null = null;
  private refreshSupported = true;
  private firstStream: string | null | undefined = undefined;
  private connectionId = 0;

  constructor(url: string, options: ClientOptions = {}) {
    this.url = url;
    this.options = options;
    const ctor =
      options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!ctor) {
      throw new DcrfError('no WebSocket class: pass { WebSocket } (e.g. the `ws` package on Node 20)');
    }
    this.WebSocketClass = ctor;
    if (typeof options.token === 'string') this.currentToken = options.token;
    void this.open();
  }

  /** Where the connection is now. */
  get state(): ConnectionState {
    return this.stateValue;
  }

  /** Calls `listener` on every change of {@link state}; returns a function that stops it. */
  onStateChange(listener: (state: ConnectionState) => void): () => void {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  }

  /**
   * Calls `listener` with every payload received, before the client handles it (for logging
   * and tests); returns a function that stops it.
   */
  onFrame(listener: (payload: Payload, stream: string | null) => void): () => void {
    this.frameListeners.add(listener);
    return () => this.frameListeners.delete(listener);
  }

  /** Resolves when the connection is open (at once if it is). */
  whenOpen(): Promise<void> {
    if (this.stateValue === 'open') return Promise.resolve();
    if (this.stateValue === 'closed') return Promise.reject(new ConnectionError('the client is closed'));
    return new Promise((resolve, reject) => {
      const stop = this.onStateChange((state) => {
        if (state === 'open') {
          stop();
          resolve();
        } else if (state === 'closed') {
          stop();
          reject(new ConnectionError('the client is closed'));
        }
      });
    });
  }

  /**
   * A consumer on this socket: `stream('todos')` on a multiplexed endpoint (frames are
   * `{"stream": "todos", "payload": ...}`), `stream()` on a plain consumer endpoint.
   */
  stream<T = unknown, I = Partial<T>>(name?: string): Stream<T, I> {
    if (this.firstStream === undefined) this.firstStream = name ?? null;
    return new Stream<T, I>(this, name ?? null);
  }

  /**
   * Sends `{action, request_id, ...args}` on `stream` and resolves with the reply's payload
   * when its status is 2xx; rejects with {@link RequestError} otherwise, {@link TimeoutError}
   * after the timeout, {@link ConnectionError} if the socket closes before the reply. While
   * the socket is down, requests wait and are sent once it is back (their timeout runs).
   */
  requestPayload(
    stream: string | null,
    action: string,
    args: Record<string, unknown> = {},
    options: RequestOptions = {},
  ): Promise<Payload> {
    if (this.stateValue === 'closed') {
      return Promise.reject(new ConnectionError('the client is closed'));
    }
    const requestId = options.requestId !== undefined ? options.requestId : uuid4();
    // DCRF's key order, action and request_id first; `args` cannot override either.
    const payload: Record<string, unknown> = { action, request_id: requestId, ...args };
    payload.action = action;
    payload.request_id = requestId;
    const text = JSON.stringify(stream === null ? payload : { stream, payload });
    const key = routeKey(stream, requestId);
    return new Promise<Payload>((resolve, reject) => {
      const entry: Pending = {
        key,
        stream,
        action,
        requestId,
        text,
        sent: false,
        timer: undefined,
        onReply: options.onReply,
        resolve,
        reject,
      };
      const timeoutMs = options.timeoutMs ?? this.options.requestTimeoutMs ?? 10000;
      entry.timer = setTimeout(() => {
        this.forget(entry);
        reject(new TimeoutError(action, requestId, timeoutMs));
      }, timeoutMs);
      const previous = this.pending.get(key);
      if (previous) {
        this.forget(previous);
        previous.reject(new DcrfError(`request ${JSON.stringify(requestId)} was replaced by another with the same id`));
      }
      this.pending.set(key, entry);
      if (this.stateValue === 'open') this.transmit(entry);
      else this.queue.push(entry);
    });
  }

  /** Like {@link requestPayload}, resolving with the reply's `data`. */
  async request<R = unknown>(
    stream: string | null,
    action: string,
    args: Record<string, unknown> = {},
    options: RequestOptions = {},
  ): Promise<R> {
    const payload = await this.requestPayload(stream, action, args, options);
    return payload.data as R;
  }

  /**
   * Closes the connection for good: no reconnection; requests still waiting reject with
   * {@link ConnectionError}. Subscriptions are not unsubscribed (the server drops them with
   * the socket); close them first to unsubscribe explicitly.
   */
  close(): void {
    if (this.stateValue === 'closed') return;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    this.setState('closed');
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.onopen = null;
      socket.onmessage = null;
      socket.onerror = null;
      socket.onclose = null;
      try {
        socket.close(1000);
      } catch {
        // already closing
      }
    }
    for (const entry of [...this.pending.values()]) {
      this.forget(entry);
      entry.reject(new ConnectionError('the client is closed'));
    }
    for (const sub of this.subscriptions.values()) sub.clientClosed();
    this.subscriptions.clear();
  }

  /**
   * Breaks the current socket as if the network failed (for tests and for "reconnect now"
   * buttons): the client reconnects with backoff and resumes every subscription.
   */
  dropConnection(): void {
    const socket = this.socket;
    if (socket) {
      try {
        socket.close(4000, 'dropped by the client');
      } catch {
        // already closing
      }
    }
  }

  // --- used by subscriptions -----------------------------------------------------------

  /** @internal Registers a subscription for pushes with its request id. */
  addSubscription(sub: Subscription): void {
    this.subscriptions.set(routeKey(sub.stream, sub.requestId), sub);
  }

  /** @internal Stops routing pushes to `sub`. */
  removeSubscription(sub: Subscription): void {
    const key = routeKey(sub.stream, sub.requestId);
    if (this.subscriptions.get(key) === sub) this.subscriptions.delete(key);
  }

  // --- the socket ------------------------------------------------------------------------

  private setState(state: ConnectionState): void {
    if (this.stateValue === state) return;
    this.stateValue = state;
    for (const listener of [...this.stateListeners]) listener(state);
  }

  private async connectUrl(): Promise<string> {
    const source = this.options.token;
    if (typeof source === 'function') this.currentToken = await source();
    if (this.currentToken === null) return this.url;
    const param = this.options.tokenParam ?? 'token';
    const sep = this.url.includes('?') ? '&' : '?';
    return `${this.url}${sep}${encodeURIComponent(param)}=${encodeURIComponent(this.currentToken)}`;
  }

  private async open(): Promise<void> {
    const id = ++this.connectionId;
    let url: string;
    try {
      url = await this.connectUrl();
    } catch {
      if (id === this.connectionId && this.stateValue !== 'closed') this.scheduleReconnect(false);
      return;
    }
    if (id !== this.connectionId || this.stateValue === 'closed') return;
    let socket: WebSocketLike;
    try {
      socket = new this.WebSocketClass(url);
    } catch {
      this.scheduleReconnect(false);
      return;
    }
    this.socket = socket;
    socket.onopen = () => this.opened(socket);
    socket.onmessage = (event) => {
      if (this.socket === socket) this.received(event.data);
    };
    socket.onerror = () => {
      // a close event follows
    };
    socket.onclose = (event) => {
      if (this.socket === socket) this.closed(event.code);
    };
  }

  private opened(socket: WebSocketLike): void {
    if (this.socket !== socket) return;
    this.openedAt = Date.now();
    this.setState('open');
    // Subscriptions first, in the order they were made, then what waited.
    for (const sub of [...this.subscriptions.values()]) sub.resubscribe();
    for (const entry of this.queue.splice(0)) {
      if (this.pending.get(entry.key) === entry) this.transmit(entry);
    }
    this.scheduleRefresh();
  }

  private closed(code: number): void {
    this.socket = null;
    clearTimeout(this.refreshTimer);
    for (const entry of [...this.pending.values()]) {
      if (!entry.sent) continue;
      this.forget(entry);
      entry.reject(new ConnectionError(`the connection closed (${code}) before the reply to ${entry.action}`));
    }
    for (const sub of this.subscriptions.values()) sub.connectionLost();
    const upLongEnough = this.openedAt > 0 && Date.now() - this.openedAt >= (this.options.minUptimeMs ?? 1000);
    this.openedAt = 0;
    if (upLongEnough) this.attempts = 0;
    this.scheduleReconnect(code === CLOSE_TOKEN_EXPIRED);
  }

  private scheduleReconnect(immediately: boolean): void {
    if (this.stateValue === 'closed') return;
    this.setState('reconnecting');
    const delay = immediately ? 0 : backoffDelay(this.attempts, this.options.backoff);
    this.attempts += 1;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => void this.open(), delay);
  }

  private transmit(entry: Pending): void {
    const socket = this.socket;
    if (!socket || this.stateValue !== 'open') {
      this.queue.push(entry);
      return;
    }
    entry.sent = true;
    socket.send(entry.text);
  }

  /** @internal Sends a frame that expects no reply. */
  sendFrame(stream: string | null, payload: Record<string, unknown>): void {
    const socket = this.socket;
    if (!socket || this.stateValue !== 'open') return;
    socket.send(JSON.stringify(stream === null ? payload : { stream, payload }));
  }

  private forget(entry: Pending): void {
    clearTimeout(entry.timer);
    if (this.pending.get(entry.key) === entry) this.pending.delete(entry.key);
    const queued = this.queue.indexOf(entry);
    if (queued >= 0) this.queue.splice(queued, 1);
  }

  private received(data: unknown): void {
    let frame: unknown;
    try {
      frame = JSON.parse(typeof data === 'string' ? data : String(data));
    } catch {
      return;
    }
    if (!frame || typeof frame !== 'object' || Array.isArray(frame)) return;
    let stream: string | null = null;
    let payload = frame as Payload;
    const envelope = frame as { stream?: unknown; payload?: unknown };
    if (typeof envelope.stream === 'string' && envelope.payload && typeof envelope.payload === 'object') {
      stream = envelope.stream;
      payload = envelope.payload as Payload;
    }
    for (const listener of [...this.frameListeners]) listener(payload, stream);
    const key = routeKey(stream, payload.request_id);
    const entry = this.pending.get(key);
    // A reply names its request's action (or none, when the server could not read it);
    // pushes of a subscription share its request id but name the change.
    if (entry && (payload.action === entry.action || payload.action == null)) {
      this.forget(entry);
      if (isSuccess(payload.response_status)) {
        entry.onReply?.(payload);
        entry.resolve(payload);
      } else {
        entry.onReply?.(payload);
        entry.reject(new RequestError({ ...payload, response_status: Number(payload.response_status) }));
      }
      return;
    }
    this.subscriptions.get(key)?.handlePush(payload);
  }

  // --- token refresh ---------------------------------------------------------------------

  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    if (typeof this.options.token !== 'function' || !this.refreshSupported || this.currentToken === null) return;
    const exp = tokenExpiry(this.currentToken);
    if (exp === null) return;
    const life = exp * 1000 - Date.now();
    const margin = Math.min(this.options.refreshBeforeExpiryMs ?? 30000, life / 2);
    const delay = Math.max(0, life - margin);
    this.refreshTimer = setTimeout(() => void this.refresh(), delay);
  }

  private async refresh(): Promise<void> {
    const source = this.options.token;
    if (typeof source !== 'function' || this.stateValue !== 'open') return;
    let token: string;
    try {
      token = await source();
    } catch {
      this.refreshTimer = setTimeout(() => void this.refresh(), 1000);
      return;
    }
    const stream = this.options.refreshStream ?? this.firstStream ?? null;
    try {
      await this.requestPayload(stream, 'refresh_token', { token });
      this.currentToken = token;
      this.scheduleRefresh();
    } catch (error) {
      if (error instanceof RequestError && (error.response_status === 405 || error.response_status === 404)) {
        // The server has no refresh_token action (Python DCRF): reconnect on 4401 instead.
        this.refreshSupported = false;
      } else if (!(error instanceof ConnectionError)) {
        // Rejected token or no reply: try again shortly, until the server closes with 4401.
        this.refreshTimer = setTimeout(() => void this.refresh(), 1000);
      }
    }
  }
}

/**
 * Opens a connection to `url` (e.g. `ws://localhost:8000/ws`); it reconnects by itself until
 * {@link Client.close}.
 */
export function connect(url: string, options: ClientOptions = {}): Client {
  return new Client(url, options);
}
