/**
 * What the hostile-client and hostile-guest suite shares: a tally of attacks tried and held,
 * printed as `hostile <class>: N tried, N held` and failing the test if any did not hold, and
 * the daemon's memory as the kernel counts it (what a client could grow is what is measured).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

export interface Attempt {
  what: string;
  held: boolean;
  detail: string;
}

export class Tally {
  readonly attempts: Attempt[] = [];
  constructor(readonly name: string) {}

  /** Records one attack: `held` is whether the daemon behaved as it must. */
  record(what: string, held: boolean, detail = ''): void {
    this.attempts.push({ what, held, detail });
  }

  /**
   * Runs `check`; a throw counts as not held, with its message as the detail, and so does a
   * check still pending after `timeoutMs` (a hung request is a failure, not a stuck suite).
   */
  async check(
    what: string,
    check: () => Promise<string | undefined> | string | undefined,
    timeoutMs = 90_000,
  ): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const hung = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer in ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      const detail = await Promise.race([Promise.resolve().then(check), hung]);
      this.record(what, true, detail ?? '');
    } catch (e) {
      this.record(what, false, (e as Error).message);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Prints the tally (one line, plus each failure) and fails when anything did not hold. */
  report(extra = ''): void {
    const failed = this.attempts.filter((a) => !a.held);
    const line = `hostile ${this.name}: ${this.attempts.length} tried, ${this.attempts.length - failed.length} held${extra ? ` (${extra})` : ''}`;
    console.log(line);
    for (const f of failed) console.log(`  NOT HELD: ${f.what}: ${f.detail}`);
    assert.equal(failed.length, 0, `${line}\n${failed.map((f) => `${f.what}: ${f.detail}`).join('\n')}`);
    assert.ok(this.attempts.length > 0, `hostile ${this.name}: nothing was tried`);
  }
}

/** Resident and peak resident memory of a process, MiB (VmRSS, VmHWM). */
export function memoryOf(pid: number): { rssMb: number; peakMb: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string): number =>
    Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0);
  return { rssMb: Math.round(kb('VmRSS') / 1024), peakMb: Math.round(kb('VmHWM') / 1024) };
}

/** Lines of a daemon's log that report a bug: an error nothing handled (src/background.ts). */
export function bugLines(log: string): string[] {
  return log.split('\n').filter((l) => /unhandled rejection|uncaught exception/.test(l));
}

/** Whether a process is still there (and not a zombie). */
export function processAlive(pid: number): boolean {
  try {
    return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false;
  }
}
