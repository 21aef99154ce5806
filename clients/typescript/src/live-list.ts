/**
 * A live collection: `subscribe_list`'s snapshot plus every push applied in order, so it
 * holds what `list` with the same filters returns, through reconnections.
 *
 * @module
 */

import type { Payload } from './client.js';
import type { Pk, Stream } from './stream.js';
import { Subscription } from './subscription.js';

/** Options of {@link Stream.subscribeList}. */
export interface LiveListOptions<T> {
  /** `filters`, as for `list` (e.g. `{done: false}`). */
  filters?: Record<string, unknown>;
  /**
   * `ordering`, as for `list` (`"-id"`, `["done", "title"]`): the server orders the
   * snapshot, the list keeps every change in that order.
   */
  ordering?: string | string[];
  /** The primary key field of the rows (default `id`). */
  pkField?: string;
  /** Orders {@link LiveList.items} (overrides `ordering` on the client side). */
  compare?: (a: T, b: T) => number;
  /** The request id (default: a new UUIDv4). */
  requestId?: unknown;
}

/** What changed in a {@link LiveList}. */
export type ListChange<T> =
  /** Every row was replaced: the first snapshot, or a reload after missed events. */
  | { type: 'snapshot'; items: readonly T[] }
  /** A row entered the list. */
  | { type: 'create'; item: T }
  /** A row of the list changed. */
  | { type: 'update'; item: T; previous: T }
  /** A row left the list. */
  | { type: 'delete'; pk: Pk; previous: T };

/** Compares two JSON scalars as the database would order them (nulls first). */
function compareValues(a: unknown, b: unknown): number {
  if (a === b) return 0;
  if (a === null || a === undefined) return -1;
  if (b === null || b === undefined) return 1;
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  if (typeof a === 'boolean' && typeof b === 'boolean') return Number(a) - Number(b);
  const sa = String(a);
  const sb = String(b);
  return sa < sb ? -1 : sa > sb ? 1 : 0;
}

/** A comparator for DRF-style ordering fields (`"-id"`, `["done", "title"]`). */
export function orderingComparator<T>(ordering: string | string[]): (a: T, b: T) => number {
  const fields = (Array.isArray(ordering) ? ordering : ordering.split(','))
    .map((f) => f.trim())
    .filter((f) => f.length > 0)
    .map((f) => (f.startsWith('-') ? { name: f.slice(1), sign: -1 } : { name: f, sign: 1 }));
  return (a, b) => {
    for (const { name, sign } of fields) {
      const c = compareValues((a as Record<string, unknown>)[name], (b as Record<string, unknown>)[name]);
      if (c !== 0) return sign * c;
    }
    return 0;
  };
}

/**
 * The live list of {@link Stream.subscribeList}. {@link items} is the current rows; listeners
 * of {@link onChange} hear of every change; {@link status} is `live` while subscribed.
 */
export class LiveList<T> extends Subscription {
  private readonly rows = new Map<string, T>();
  private readonly pkField: string;
  private readonly compare: ((a: T, b: T) => number) | undefined;
  private readonly listOptions: LiveListOptions<T>;
  private readonly changeListeners = new Set<(list: LiveList<T>, change: ListChange<T>) => void>();
  private sorted: T[] | null = null;

  constructor(owner: Stream<T, any>, options: LiveListOptions<T> = {}) {
    const args: Record<string, unknown> = {};
    if (options.filters !== undefined) args.filters = options.filters;
    if (options.ordering !== undefined) args.ordering = options.ordering;
    super(owner, {
      action: 'subscribe_list',
      args,
      unsubscribeAction: 'unsubscribe_list',
      requestId: options.requestId,
    });
    this.listOptions = options;
    this.pkField = options.pkField ?? 'id';
    this.compare =
      options.compare ?? (options.ordering !== undefined ? orderingComparator<T>(options.ordering) : undefined);
  }

  /** The rows, in order (`compare`, else `ordering`, else snapshot order with new rows last). */
  get items(): readonly T[] {
    if (this.sorted === null) {
      const all = [...this.rows.values()];
      if (this.compare) all.sort(this.compare);
      this.sorted = all;
    }
    return this.sorted;
  }

  /** How many rows the list holds. */
  get size(): number {
    return this.rows.size;
  }

  /** The row with this primary key, if the list holds it. */
  get(pk: Pk): T | undefined {
    return this.rows.get(String(pk));
  }

  /** The filters this list was subscribed with. */
  get filters(): Record<string, unknown> | undefined {
    return this.listOptions.filters;
  }

  /**
   * Calls `listener` after every change (the list already holds it); returns a function that
   * stops it.
   */
  onChange(listener: (list: LiveList<T>, change: ListChange<T>) => void): () => void {
    this.changeListeners.add(listener);
    return () => this.changeListeners.delete(listener);
  }

  protected override applyReply(payload: Payload): void {
    const data = payload.data as { results?: unknown } | null | undefined;
    // `recovered: true` answers without rows: what was missed follows as pushes.
    if (data && Array.isArray(data.results)) this.replace(data.results as T[]);
  }

  protected override applyPush(payload: Payload): void {
    const data = payload.data as Record<string, unknown> | null | undefined;
    switch (payload.action) {
      case 'create':
      case 'update': {
        if (!data) return;
        const item = data as T;
        const key = String(data[this.pkField] ?? data.pk);
        const previous = this.rows.get(key);
        this.rows.set(key, item);
        this.sorted = null;
        this.emit(previous === undefined ? { type: 'create', item } : { type: 'update', item, previous });
        return;
      }
      case 'delete': {
        if (!data) return;
        const pk = (data[this.pkField] ?? data.pk) as Pk;
        const key = String(pk);
        const previous = this.rows.get(key);
        if (previous === undefined) return;
        this.rows.delete(key);
        this.sorted = null;
        this.emit({ type: 'delete', pk, previous });
        return;
      }
      case 'resync': {
        const results = (data as { results?: unknown } | null | undefined)?.results;
        if (Array.isArray(results)) {
          this.replace(results as T[]);
        } else {
          // A notice without rows (change capture lost track): take a fresh snapshot.
          this.resubscribeFresh();
        }
        return;
      }
      default:
        return;
    }
  }

  private resubscribeFresh(): void {
    this.forgetPosition();
    this.resubscribe();
  }

  private replace(results: T[]): void {
    this.rows.clear();
    for (const row of results) {
      const record = row as Record<string, unknown>;
      this.rows.set(String(record[this.pkField] ?? record.pk), row);
    }
    this.sorted = null;
    this.emit({ type: 'snapshot', items: this.items });
  }

  private emit(change: ListChange<T>): void {
    for (const listener of [...this.changeListeners]) listener(this, change);
  }
}
