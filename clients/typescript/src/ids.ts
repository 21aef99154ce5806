/**
 * Request ids: random UUIDv4 strings, as dcrf-client sends them.
 *
 * @module
 */

/**
 * A random UUIDv4. Uses `crypto.getRandomValues`, which (unlike `crypto.randomUUID`) is
 * available on pages served over plain HTTP from another host than localhost.
 */
export function uuid4(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  bytes[6] = (bytes[6]! & 0x0f) | 0x40;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
