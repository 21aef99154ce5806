/**
 * One consumer on a socket: DCRF's model actions, custom actions and subscriptions.
 *
 * @module
 */

import type { Client, Payload, RequestOptions } from './client.js';
import { LiveList, type LiveListOptions } from './live-list.js';
import { InstanceSubscription, Subscription, type SubscriptionOptions } from './subscription.js';

/** A primary key as the server sends it. */
export type Pk = number | string;

/**
 * A consumer: `client.stream('todos')` on a multiplexed socket, `client.stream()` on a plain
 * one. `T` is what the consumer sends (a row), `I` what it accepts (`create`'s `data`).
 */
export class Stream<T = unknown, I = Partial<T>> {
  /** The client. */
  readonly client: Client;
  /** The stream name, or null on a plain consumer endpoint. */
  readonly name: string | null;

  constructor(client: Client, name: string | null) {
    this.client = client;
    this.name = name;
  }

  /** Any action: resolves with the reply's `data` (see {@link Client.request}). */
  request<R = unknown>(action: string, args: Record<string, unknown> = {}, options: RequestOptions = {}): Promise<R> {
    return this.client.request<R>(this.name, action, args, options);
  }

  /** Any action: resolves with the whole reply payload. */
  requestPayload(action: string, args: Record<string, unknown> = {}, options: RequestOptions = {}): Promise<Payload> {
    return this.client.requestPayload(this.name, action, args, options);
  }

  /**
   * `list`: whatever the consumer answers (`{count, results, limit, offset}` when paginated,
   * an array otherwise). `args` may hold `filters`, `ordering`, `limit`, `offset`.
   */
  list<R = unknown>(args: Record<string, unknown> = {}, options: RequestOptions = {}): Promise<R> {
    return this.request<R>('list', args, options);
  }

  /** `retrieve` the row with this primary key. */
  retrieve(pk: Pk, options: RequestOptions = {}): Promise<T> {
    return this.request<T>('retrieve', { pk }, options);
  }

  /** `create` a row from `data`; resolves with it as stored. */
  create(data: I, options: RequestOptions = {}): Promise<T> {
    return this.request<T>('create', { data }, options);
  }

  /** `update` (a full write) of row `pk`. */
  update(pk: Pk, data: I, options: RequestOptions = {}): Promise<T> {
    return this.request<T>('update', { pk, data }, options);
  }

  /** `patch` (a partial write) of row `pk`. */
  patch(pk: Pk, data: Partial<I>, options: RequestOptions = {}): Promise<T> {
    return this.request<T>('patch', { pk, data }, options);
  }

  /** `delete` row `pk`. */
  async delete(pk: Pk, options: RequestOptions = {}): Promise<void> {
    await this.request('delete', { pk }, options);
  }

  /**
   * `subscribe_instance`: `onChange` gets every `update` and `delete` of row `pk`. After a
   * reconnection the subscription resumes from its last position; when the server cannot
   * replay what was missed (or does not number events, as Python DCRF), the row is
   * retrieved again and passed to `onChange` as an update (or a delete if it is gone).
   */
  async subscribeInstance(
    pk: Pk,
    onChange: (value: T | null, action: 'update' | 'delete') => void,
    options: { requestId?: unknown } = {},
  ): Promise<InstanceSubscription<T>> {
    const sub = new InstanceSubscription<T>(this, pk, onChange, options.requestId);
    await sub.start();
    return sub;
  }

  /**
   * `subscribe_list`: a {@link LiveList} holding exactly what `list` with the same `filters`
   * returns, kept up to date by the server's pushes, across reconnections. Resolves once the
   * first snapshot is in.
   */
  async subscribeList(options: LiveListOptions<T> = {}): Promise<LiveList<T>> {
    const list = new LiveList<T>(this, options);
    await list.start();
    return list;
  }

  /**
   * A custom subscription action (e.g. `subscribe_to_all`, or DCRF's `subscribe_many`):
   * `onEvent` gets every push (`{action, data, ...}`); `onMissed` is called when a
   * reconnection could not replay what was missed (reload what you show).
   */
  async subscribe(options: SubscriptionOptions): Promise<Subscription> {
    const sub = new Subscription(this, options);
    await sub.start();
    return sub;
  }
}
