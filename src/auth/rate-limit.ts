/**
 * A token bucket per key (a source address): `burst` requests at once, refilled at `perMinute`.
 * At most `maxKeys` buckets are kept, least recently used dropped first, so a client cycling
 * through addresses can't grow the daemon's memory; a dropped bucket comes back full, which
 * costs that client nothing it couldn't get from a fresh address anyway.
 */
export class RateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();

  constructor(
    private readonly perMinute: number,
    private readonly burst = perMinute,
    private readonly maxKeys = 10_000,
  ) {}

  /** Takes one request's token for `key`: 0 when allowed, else how many ms until one is. */
  take(key: string, now = Date.now()): number {
    const rate = this.perMinute / 60_000;
    const b = this.buckets.get(key) ?? { tokens: this.burst, at: now };
    this.buckets.delete(key);
    b.tokens = Math.min(this.burst, b.tokens + (now - b.at) * rate);
    b.at = now;
    let wait = 0;
    if (b.tokens >= 1) b.tokens -= 1;
    else wait = Math.ceil((1 - b.tokens) / rate);
    this.buckets.set(key, b);
    if (this.buckets.size > this.maxKeys) {
      const oldest = this.buckets.keys().next().value;
      if (oldest !== undefined) this.buckets.delete(oldest);
    }
    return wait;
  }
}
