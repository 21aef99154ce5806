/**
 * Subscriptions that survive reconnections: each remembers the position of the last push it
 * applied and resubscribes with `since`; the server then replays what was missed
 * (`recovered: true`) or says it cannot (`recovered: false`, or no `recovered` at all from a
 * server that does not number events), and the subscription reloads.
 *
 * @module
 */

import type { Payload, Position } from './client.js';
import { ConnectionError, DcrfError, RequestError } from './errors.js';
import { uuid4 } from './ids.js';
import type { Pk, Stream } from './stream.js';

/** Where a subscription is. */
export type SubscriptionStatus =
  /** The subscribe request is on its way (first time or after a reconnection). */
  | 'subscribing'
  /** Subscribed: pushes arrive as changes commit. */
  | 'live'
  /** The connection is down; what is held may be out of date until it resubscribes. */
  | 'stale'
  /** The server refused to (re)subscribe; see {@link Subscription.error}. */
  | 'error'
  /** Closed by {@link Subscription.close} or by closing the client. */
  | 'closed';

/** Options of {@link Stream.subscribe}. */
export interface SubscriptionOptions {
  /** The subscribe action, e.g. `subscribe_to_all`. */
  action: string;
  /** Its arguments. */
  args?: Record<string, unknown>;
  /** The action {@link Subscription.close} sends (with the same request id), if any. */
  unsubscribeAction?: string;
  /** Its arguments. */
  unsubscribeArgs?: Record<string, unknown>;
  /** Called with every push, in order. */
  onEvent?: (payload: Payload) => void;
  /** Called when events were missed and cannot be replayed: reload what you show. */
  onMissed?: () => void;
  /** The request id (default: a new UUIDv4); pushes carry it. */
  requestId?: unknown;
}

/** Is `a` at or before `b` in the same stream? */
function notAfter(a: Position, b: Position): boolean {
  return a.epoch === b.epoch && a.offset <= b.offset;
}

function isPosition(value: unknown): value is Position {
  return (
    !!value &&
    typeof value === 'object' &&
    typeof (value as Position).epoch === 'string' &&
    typeof (value as Position).offset === 'number'
  );
}

/**
 * A subscription on one stream with one request id. The base of {@link LiveList} and
 * {@link InstanceSubscription}; on its own, the handle of {@link Stream.subscribe}.
 */
export class Subscription {
  /** The stream name (null on a plain consumer endpoint). */
  readonly stream: string | null;
  /** The request id every push of this subscription carries. */
  readonly requestId: unknown;
  /** The consumer. */
  protected readonly owner: Stream<unknown, unknown>;
  private readonly options: SubscriptionOptions;
  private statusValue: SubscriptionStatus = 'subscribing';
  private readonly statusListeners = new Set<(status: SubscriptionStatus) => void>();
  private positionValue: Position | null = null;
  private errorValue: Error | null = null;
  private started: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private attempt = 0;

  constructor(owner: Stream<any, any>, options: SubscriptionOptions) {
    this.owner = owner;
    this.stream = owner.name;
    this.options = options;
    this.requestId = options.requestId !== undefined ? options.requestId : uuid4();
  }

  /** Where the subscription is. */
  get status(): SubscriptionStatus {
    return this.statusValue;
  }

  /** The position of the last event applied (null before the first, or from a server that
   * does not number events). */
  get position(): Position | null {
    return this.positionValue;
  }

  /** Why the last (re)subscribe failed, when {@link status} is `error`. */
  get error(): Error | null {
    return this.errorValue;
  }

  /** Calls `listener` on every change of {@link status}; returns a function that stops it. */
  onStatus(listener: (status: SubscriptionStatus) => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  /** Unsubscribes (when there is an unsubscribe action) and stops the pushes. */
  async close(): Promise<void> {
    if (this.statusValue === 'closed') return;
    const wasLive = this.statusValue === 'live';
    this.setStatus('closed');
    this.owner.client.removeSubscription(this);
    const action = this.unsubscribeAction();
    if (action && wasLive && this.owner.client.state === 'open') {
      try {
        await this.owner.requestPayload(action, this.unsubscribeArgs(), { requestId: this.requestId });
      } catch (error) {
        if (!(error instanceof RequestError) && !(error instanceof ConnectionError)) throw error;
      }
    }
  }

  // --- for subclasses -------------------------------------------------------------------

  /** The subscribe action. */
  protected subscribeAction(): string {
    return this.options.action;
  }

  /** The subscribe arguments (without `since`). */
  protected subscribeArgs(): Record<string, unknown> {
    return this.options.args ?? {};
  }

  /** The unsubscribe action, if any. */
  protected unsubscribeAction(): string | undefined {
    return this.options.unsubscribeAction;
  }

  /** The unsubscribe arguments. */
  protected unsubscribeArgs(): Record<string, unknown> {
    return this.options.unsubscribeArgs ?? {};
  }

  /**
   * The subscribe reply (2xx). `resumed` tells whether the client sent `since`; the
   * reply's `recovered` says whether the server replays what was missed.
   */
  protected applyReply(payload: Payload, resumed: boolean): void {
    if (resumed && payload.recovered !== true) this.options.onMissed?.();
  }

  /** One push, in order (already deduplicated by position). */
  protected applyPush(payload: Payload): void {
    if (payload.action === 'resync') this.options.onMissed?.();
    this.options.onEvent?.(payload);
  }

  /** Sets the position (after a reload from a snapshot that carries one). */
  protected setPosition(position: unknown): void {
    if (isPosition(position)) this.positionValue = position;
  }

  /** Forgets the position: the next subscribe asks for a fresh start (no `since`). */
  protected forgetPosition(): void {
    this.positionValue = null;
  }

  // --- driven by the client --------------------------------------------------------------

  /** @internal Subscribes for the first time; resolves on the first reply. */
  start(): Promise<void> {
    this.owner.client.addSubscription(this);
    const done = new Promise<void>((resolve, reject) => {
      this.started = { resolve, reject };
    });
    if (this.owner.client.state === 'open') this.resubscribe();
    return done;
  }

  /** @internal Sends the subscribe frame (again), with `since` when there is a position. */
  resubscribe(): void {
    if (this.statusValue === 'closed') return;
    const attempt = ++this.attempt;
    const since = this.positionValue;
    const args: Record<string, unknown> = { ...this.subscribeArgs() };
    if (since) args.since = since;
    this.setStatus('subscribing');
    this.owner
      .requestPayload(this.subscribeAction(), args, {
        requestId: this.requestId,
        onReply: (payload) => {
          if (attempt !== this.attempt || this.statusValue === 'closed') return;
          const status = payload.response_status;
          if (typeof status === 'number' && Math.floor(status / 100) === 2) {
            if (!(since && payload.recovered === true)) {
              this.positionValue = null;
              this.setPosition(payload.position);
            }
            this.applyReply(payload, since !== null);
            this.errorValue = null;
            this.setStatus('live');
            this.started?.resolve();
            this.started = null;
          }
        },
      })
      .catch((error: Error) => {
        if (attempt !== this.attempt || this.statusValue === 'closed') return;
        if (error instanceof ConnectionError) return; // resubscribes when the socket is back
        this.errorValue = error;
        this.setStatus('error');
        if (this.started) {
          this.owner.client.removeSubscription(this);
          this.started.reject(error);
          this.started = null;
          this.statusValue = 'closed';
        }
      });
  }

  /** @internal A push carrying this subscription's request id. */
  handlePush(payload: Payload): void {
    if (this.statusValue === 'closed') return;
    const position = payload.position;
    if (isPosition(position)) {
      const current = this.positionValue;
      // Already applied (a replay overlapping what was pushed).
      if (current && payload.action !== 'resync' && notAfter(position, current)) return;
      this.positionValue = position;
    }
    this.applyPush(payload);
  }

  /** @internal The socket closed. */
  connectionLost(): void {
    if (this.statusValue === 'live' || this.statusValue === 'subscribing') this.setStatus('stale');
  }

  /** @internal The client was closed. */
  clientClosed(): void {
    this.setStatus('closed');
    this.started?.reject(new ConnectionError('the client is closed'));
    this.started = null;
  }

  private setStatus(status: SubscriptionStatus): void {
    if (this.statusValue === status) return;
    this.statusValue = status;
    for (const listener of [...this.statusListeners]) listener(status);
  }
}

/**
 * `subscribe_instance` on one row: see {@link Stream.subscribeInstance}. {@link value} is the
 * row as last pushed or reloaded (undefined before any, null once deleted).
 */
export class InstanceSubscription<T> extends Subscription {
  /** The row's primary key. */
  readonly pk: Pk;
  private valueHeld: T | null | undefined = undefined;
  private readonly onChange: (value: T | null, action: 'update' | 'delete') => void;

  constructor(
    owner: Stream<T, any>,
    pk: Pk,
    onChange: (value: T | null, action: 'update' | 'delete') => void,
    requestId?: unknown,
  ) {
    super(owner, {
      action: 'subscribe_instance',
      args: { pk },
      unsubscribeAction: 'unsubscribe_instance',
      unsubscribeArgs: { pk },
      requestId,
    });
    this.pk = pk;
    this.onChange = onChange;
  }

  /** The row as last seen: undefined before any push or reload, null once deleted. */
  get value(): T | null | undefined {
    return this.valueHeld;
  }

  protected override applyReply(payload: Payload, resumed: boolean): void {
    if (resumed && payload.recovered !== true) void this.reload();
  }

  protected override applyPush(payload: Payload): void {
    if (payload.action === 'update') {
      this.valueHeld = payload.data as T;
      this.onChange(this.valueHeld, 'update');
    } else if (payload.action === 'delete') {
      this.valueHeld = null;
      this.onChange(null, 'delete');
    } else if (payload.action === 'resync') {
      void this.reload();
    }
  }

  /** Retrieves the row again after missed events. */
  private async reload(): Promise<void> {
    try {
      const row = await (this.owner as Stream<T, unknown>).retrieve(this.pk);
      if (this.status === 'closed') return;
      this.valueHeld = row;
      this.onChange(row, 'update');
    } catch (error) {
      if (this.status === 'closed') return;
      if (error instanceof RequestError && error.response_status === 404) {
        this.valueHeld = null;
        this.onChange(null, 'delete');
      } else if (!(error instanceof DcrfError)) {
        throw error;
      }
    }
  }
}
