/**
 * JWT expiry, read without verifying (the server verifies): when to refresh.
 *
 * @module
 */

/** The `exp` claim of a JWT (seconds since the epoch), or null if it has none or is not one. */
export function tokenExpiry(token: string): number | null {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1]!.replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const claims: unknown = JSON.parse(atob(padded));
    if (claims && typeof claims === 'object' && typeof (claims as { exp?: unknown }).exp === 'number') {
      return (claims as { exp: number }).exp;
    }
  } catch {
    // not a JWT
  }
  return null;
}
