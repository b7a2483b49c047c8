import { createHash, randomBytes } from 'node:crypto';

const base62 = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';

/** `n` base62 characters from the OS's CSPRNG (rejection sampling: no modulo bias). */
export function randomBase62(n: number): string {
  let out = '';
  while (out.length < n) {
    for (const b of randomBytes(n * 2)) {
      // 248 = 4 × 62: bytes at or above it would favour the first characters.
      if (b < 248) out += base62[b % 62];
      if (out.length === n) break;
    }
  }
  return out;
}

/** A new API key: `bxd_` + 40 base62 characters (~238 bits). Shown once, stored as its hash. */
export function newApiKey(): string {
  return `bxd_${randomBase62(40)}`;
}

/**
 * What is stored of a key. A plain sha256 rather than a slow password hash: the key is 238 random
 * bits, so there is nothing to brute-force, and every exchange would otherwise pay the slow hash.
 */
export function hashApiKey(key: string): string {
  return createHash('sha256').update(key).digest('hex');
}

/** Shape check before any lookup: a key that can't be one is refused without touching the store. */
export function looksLikeApiKey(key: unknown): key is string {
  return typeof key === 'string' && /^bxd_[0-9A-Za-z]{40}$/.test(key);
}

/** The part of a key kept for listing: enough to tell keys apart, far too little to guess one. */
export function keyPrefix(key: string): string {
  return key.slice(0, 10);
}

export function newKeyId(): string {
  return `ak_${randomBase62(16)}`;
}

export function newJti(): string {
  return `tk_${randomBase62(22)}`;
}
