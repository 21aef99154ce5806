/**
 * Errors the client rejects with. Every one extends {@link DcrfError}, so
 * `catch (e) { if (e instanceof DcrfError) ... }` catches them all.
 *
 * @module
 */

/** The base class of every error this client throws or rejects with. */
export class DcrfError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/**
 * The server answered a request with a status that is not 2xx. Carries DCRF's envelope:
 * `response_status` (e.g. 400, 403, 404, 405) and `errors` (e.g.
 * `[{"title": ["This field is required."]}]` or `["Not found"]`).
 */
export class RequestError extends DcrfError {
  /** The reply's `response_status`. */
  readonly response_status: number;
  /** The reply's `errors`, as the server sent them. */
  readonly errors: unknown[];
  /** The reply's `data` (usually null). */
  readonly data: unknown;
  /** The action the reply names (null when the server could not tell). */
  readonly action: string | null;
  /** The request id the reply echoed. */
  readonly request_id: unknown;

  constructor(payload: {
    response_status: number;
    errors?: unknown;
    data?: unknown;
    action?: unknown;
    request_id?: unknown;
  }) {
    const errors = Array.isArray(payload.errors) ? payload.errors : [];
    const action = typeof payload.action === 'string' ? payload.action : null;
    super(`${action ?? 'request'} failed with ${payload.response_status}: ${JSON.stringify(errors)}`);
    this.response_status = payload.response_status;
    this.errors = errors;
    this.data = payload.data ?? null;
    this.action = action;
    this.request_id = payload.request_id;
  }
}

/** No reply came within the request's timeout. */
export class TimeoutError extends DcrfError {
  /** The action that timed out. */
  readonly action: string;
  /** Its request id. */
  readonly request_id: unknown;
  /** The timeout, in milliseconds. */
  readonly timeoutMs: number;

  constructor(action: string, requestId: unknown, timeoutMs: number) {
    super(`no reply to ${action} (request_id ${JSON.stringify(requestId)}) within ${timeoutMs} ms`);
    this.action = action;
    this.request_id = requestId;
    this.timeoutMs = timeoutMs;
  }
}

/**
 * The connection closed while the request was in flight (the server may or may not have run
 * it), or the client was closed.
 */
export class ConnectionError extends DcrfError {}
