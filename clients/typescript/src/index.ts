/**
 * A TypeScript client for dcrf (and Python DCRF) servers: requests as promises, multiplexed
 * streams, subscriptions that resume after reconnections, and live lists.
 *
 * ```ts
 * import { connect } from 'dcrf-rs-client';
 * const client = connect('ws://localhost:8000/ws');
 * const todos = client.stream<Todo, TodoInput>('todos');
 * const live = await todos.subscribeList({ ordering: 'id' });
 * live.onChange((list) => render(list.items));
 * await todos.create({ title: 'write the docs' });
 * ```
 *
 * @module
 */

export { type BackoffOptions, backoffDelay } from './backoff.js';
export {
  CLOSE_TOKEN_EXPIRED,
  Client,
  type ClientOptions,
  type ConnectionState,
  type Payload,
  type Position,
  type RequestOptions,
  type TokenSource,
  type WebSocketConstructor,
  type WebSocketLike,
  connect,
} from './client.js';
export { ConnectionError, DcrfError, RequestError, TimeoutError } from './errors.js';
export { uuid4 } from './ids.js';
export { type ListChange, LiveList, type LiveListOptions, orderingComparator } from './live-list.js';
export { type Pk, Stream } from './stream.js';
export {
  InstanceSubscription,
  Subscription,
  type SubscriptionOptions,
  type SubscriptionStatus,
} from './subscription.js';
export { tokenExpiry } from './token.js';
