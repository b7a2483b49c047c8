import { randomBytes } from 'node:crypto';

const alphabet = 'abcdefghijklmnopqrstuvwxyz234567';

/** RFC 4648 base32, lower case, no padding. */
function base32(b: Buffer): string {
  let out = '';
  let bits = 0;
  let value = 0;
  for (const byte of b) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out;
}

/**
 * A volume's id: "vol-" and 128 random bits (26 base32 characters). The id is the only thing
 * that names a volume in the store, so it must not be guessable; ownership is checked besides.
 */
export function newVolumeId(): string {
  return `vol-${base32(randomBytes(16))}`;
}

/** Whether a string can be a volume id at all (anything else is not found without a look-up). */
export function isVolumeId(s: string): boolean {
  return /^vol-[a-z2-7]{26}$/.test(s);
}

/** A segment's name: random, so concurrent writers (and hosts) never collide. */
export function newSegmentId(): string {
  return base32(randomBytes(15));
}
