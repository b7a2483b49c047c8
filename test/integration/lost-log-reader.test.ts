/**
 * A daemon whose log reader goes away (`hutch serve | head`, a supervisor that died) keeps
 * serving without spinning: every write to the closed pipe fails with EPIPE, and before the fix
 * each failure was logged as an uncaught exception, which failed again, forever (a core at
 * 100 % and a SIGTERM that never finished).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { imageDir, root } from '../helpers/daemon.js';

/** User + system CPU time of a process so far, in seconds. */
function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

test('a closed log pipe: the daemon stays idle, keeps serving, and stops on SIGTERM', async () => {
  const stateDir = mkdtempSync(join(tmpdir(), 'hutch-test-'));
  const p = spawn('node', [join(root, 'bin', 'hutch.js'), 'serve', '--port', '0', '--state-dir', stateDir], {
    env: {
      ...process.env,
      HUTCH_IMAGE_DIR: imageDir,
      HUTCH_POOL_SIZE: '0',
      HUTCH_CACHE_GC_ON_START: '0',
      HUTCH_GRPC_PORT: '0',
      HUTCH_BOXES_SOCKET: 'off',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  try {
    let out = '';
    const url = await new Promise<string>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no start in 120 s: ${out}`)), 120_000);
      p.stderr.on('data', (b: Buffer) => {
        out += b.toString();
        const m = /hutch is serving (http:\/\/\S+)/.exec(out);
        if (m?.[1]) {
          clearTimeout(t);
          resolve(m[1]);
        }
      });
    });
    // The reader goes away.
    p.stderr.destroy();
    p.stdout.destroy();
    // Requests that log (audit lines, errors) now write to a closed pipe.
    for (let i = 0; i < 20; i++) {
      const r = await fetch(`${url}/v1/machines`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ template: 'no-such-template' }),
      });
      assert.equal(r.status, 404);
      await r.text();
    }
    const pid = p.pid as number;
    const c0 = cpuSeconds(pid);
    await new Promise((r) => setTimeout(r, 3000));
    const used = cpuSeconds(pid) - c0;
    assert.ok(used < 0.5, `an idle daemon used ${used.toFixed(2)} s of CPU in 3 s`);
    assert.equal((await fetch(`${url}/healthz`)).status, 200);
    const exited = new Promise<number | null>((resolve) => p.once('exit', (code) => resolve(code)));
    p.kill('SIGTERM');
    const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r('hung'), 20_000))]);
    assert.equal(code, 0, 'SIGTERM ends it');
  } finally {
    if (p.exitCode === null) p.kill('SIGKILL');
    rmSync(stateDir, { recursive: true, force: true });
  }
});
