/**
 * Reconnection delays: exponential backoff with full jitter.
 *
 * @module
 */

/** How long to wait between reconnection attempts. */
export interface BackoffOptions {
  /** The first delay, in milliseconds (default 250). */
  minDelayMs?: number;
  /** The largest delay (default 5000). */
  maxDelayMs?: number;
  /** Each failed attempt multiplies the delay by this (default 2). */
  factor?: number;
  /** Fraction of each delay drawn at random, 0 to 1 (default 0.5), so clients spread out. */
  jitter?: number;
}

/** The delay before attempt number `attempt` (0 for the first retry). */
export function backoffDelay(attempt: number, options: BackoffOptions = {}, random = Math.random): number {
  const min = options.minDelayMs ?? 250;
  const max = options.maxDelayMs ?? 5000;
  const factor = options.factor ?? 2;
  const jitter = Math.min(Math.max(options.jitter ?? 0.5, 0), 1);
  const base = Math.min(max, min * factor ** attempt);
  return Math.round(base * (1 - jitter) + base * jitter * random());
}
