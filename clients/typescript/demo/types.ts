// Generated from the Rust types of crates/dcrf-demo by ts-rs; do not edit.
// Regenerate with: DCRF_UPDATE_TYPES=1 cargo test -p dcrf-demo --test frontend

/**
 * One todo: `{"id": 1, "title": "...", "done": false, "owner": ""}`. Exported to
 * TypeScript as `Todo`.
 */
export type Todo = { 
/**
 * Primary key.
 */
id: number, 
/**
 * Up to 200 characters, required.
 */
title: string, 
/**
 * Default false.
 */
done: boolean, 
/**
 * Default "".
 */
owner: string, };

/**
 * What clients may write.
 */
export type TodoInput = { 
/**
 * Required, not blank, at most 200 characters (DRF's `CharField(max_length=200)`).
 */
title: string, 
/**
 * Default false.
 */
done?: boolean, 
/**
 * Default "".
 */
owner?: string, };

/**
 * `bulk_set_done` arguments.
 */
export type BulkSetDone = { 
/**
 * The todos to change.
 */
ids: Array<number>, 
/**
 * The new value of `done`.
 */
done: boolean, };

/**
 * `{"updated": n}`.
 */
export type Updated = { 
/**
 * Rows changed.
 */
updated: number, };

/**
 * `{"subscribed": bool}`.
 */
export type Subscribed = { 
/**
 * Whether the connection now receives every change.
 */
subscribed: boolean, };

/**
 * `Thing(id, name ≤ 64, counter default 0)`; the `things_with_id` representation.
 * Exported to TypeScript as `Thing`.
 */
export type Thing = { 
/**
 * Primary key.
 */
id: number, 
/**
 * Up to 64 characters.
 */
name: string, 
/**
 * Default 0.
 */
counter: number, };

/**
 * `{"pk": 1, "name": "...", "counter": 0}` (the `things` stream).
 */
export type ThingWithPk = { 
/**
 * The primary key, named `pk`.
 */
pk: number, 
/**
 * Name.
 */
name: string, 
/**
 * Counter.
 */
counter: number, };

/**
 * What clients may write.
 */
export type ThingInput = { 
/**
 * Required, not empty, up to 64 characters.
 */
name: string, 
/**
 * Default 0.
 */
counter?: number, };
