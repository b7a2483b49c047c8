import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, cleanup, qemusOf, startDaemon, type TestDaemon, waitFor } from '../helpers/daemon.js';

function cgroupDirs(id: string): string[] {
  const roots = [
    '/sys/fs/cgroup/hutch',
    '/sys/fs/cgroup/unified/hutch',
    '/sys/fs/cgroup/memory/hutch',
    '/sys/fs/cgroup/cpu/hutch',
    '/sys/fs/cgroup/pids/hutch',
  ];
  return roots.map((r) => join(r, id)).filter((x) => existsSync(x));
}

interface Machine {
  id: string;
  status: string;
  mode: string;
  boot_ms: number;
  template: string;
  expires_at: string | null;
  created_at: string;
  persistent: boolean;
  ttl_seconds: number | null;
  accel: string;
  error: string | null;
}

interface Exec {
  exit_code: number | null;
  signal: number | null;
  timed_out: boolean;
  stdout: string;
  stderr: string;
  truncated: boolean;
}

describe('machines: create → exec → delete', () => {
  let d: TestDaemon;
  let m: Machine;
  before(async () => {
    d = await startDaemon();
    const r = await api(d.url, 'POST', '/v1/machines', {
      template: 'python',
      ttl_seconds: 300,
      mode: 'cold',
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    m = r.body as unknown as Machine;
  });
  after(async () => cleanup(d));

  test('the create response describes a running cold-booted machine', () => {
    assert.match(m.id, /^m-[0-9a-f]{8}$/);
    assert.equal(m.status, 'running');
    assert.equal(m.mode, 'cold');
    assert.equal(m.template, 'python');
    assert.ok(m.boot_ms > 0);
    assert.ok(['tcg', 'kvm'].includes(m.accel));
    const ttl = (Date.parse(m.expires_at ?? '') - Date.parse(m.created_at)) / 1000;
    assert.equal(ttl, 300);
  });

  test('exec returns stdout, stderr and the exit code', async () => {
    const r = await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, { cmd: ['python3', '-c', 'print(6*7)'] });
    assert.equal(r.status, 200);
    assert.deepEqual(
      { exit_code: r.body.exit_code, stdout: r.body.stdout, stderr: r.body.stderr },
      { exit_code: 0, stdout: '42\n', stderr: '' },
    );
    const e = (
      await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, {
        cmd: ['sh', '-c', 'echo out; echo err >&2; exit 7'],
      })
    ).body as unknown as Exec;
    assert.equal(e.exit_code, 7);
    assert.equal(e.stdout, 'out\n');
    assert.equal(e.stderr, 'err\n');
  });

  test('the guest is the machine it says it is: hostname, node, python', async () => {
    const r = (
      await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, {
        cmd: 'hostname; node -e "console.log(1+1)"; python3 -m pip --version >/dev/null && echo pip',
      })
    ).body as unknown as Exec;
    assert.equal(r.stdout, `${m.id}\n2\npip\n`);
  });

  test('stdin, env and cwd reach the command', async () => {
    const r = (
      await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, {
        cmd: ['sh', '-c', 'cat; echo "$GREETING"; pwd'],
        stdin: 'from stdin\n',
        env: { GREETING: 'hello' },
        cwd: '/tmp',
      })
    ).body as unknown as Exec;
    assert.equal(r.stdout, 'from stdin\nhello\n/tmp\n');
  });

  test('a 10 MB output arrives whole', async () => {
    const r = (
      await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, {
        cmd: ['python3', '-c', 'import sys; sys.stdout.write("0123456789abcdef" * 655360)'],
      })
    ).body as unknown as Exec;
    assert.equal(r.exit_code, 0);
    assert.equal(r.truncated, false);
    assert.equal(r.stdout.length, 16 * 655360);
    const want = createHash('sha256').update('0123456789abcdef'.repeat(655360)).digest('hex');
    assert.equal(createHash('sha256').update(r.stdout).digest('hex'), want);
  });

  test('a command that outlives its timeout is killed and says so', async () => {
    const t0 = Date.now();
    const r = (
      await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, { cmd: ['sleep', '30'], timeout_ms: 1500 })
    ).body as unknown as Exec;
    assert.equal(r.timed_out, true);
    assert.equal(r.exit_code, null);
    assert.equal(r.signal, 9);
    assert.ok(Date.now() - t0 < 10_000);
  });

  test('a client that gives up on an exec takes the command with it', async () => {
    const sleeping = async (): Promise<string> =>
      String(
        (
          await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, {
            cmd: [
              'sh',
              '-c',
              'for f in /proc/[0-9]*/cmdline; do tr "\\0" " " < $f; echo; done 2>/dev/null | grep -cx "sleep 271 "',
            ],
          })
        ).body.stdout,
      ).trim();
    const gaveUp = new AbortController();
    const req = fetch(new URL(`/v1/machines/${m.id}/exec`, d.url), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ cmd: ['sleep', '271'], timeout_ms: 300_000 }),
      signal: gaveUp.signal,
    }).catch(() => undefined);
    for (let t = 0; (await sleeping()) !== '1'; t++) {
      assert.ok(t < 100, 'the command never started');
      await new Promise((r) => setTimeout(r, 100));
    }
    gaveUp.abort();
    await req;
    for (let t = 0; (await sleeping()) !== '0'; t++) {
      assert.ok(t < 50, 'the command outlived the request that started it');
      await new Promise((r) => setTimeout(r, 100));
    }
  });

  test('a missing program is a clear EXEC_FAILED error', async () => {
    const r = await api(d.url, 'POST', `/v1/machines/${m.id}/exec`, { cmd: ['no-such-program'] });
    assert.equal(r.status, 422);
    assert.equal(r.body.code, 'EXEC_FAILED');
    assert.match(String(r.body.message), /ENOENT/);
  });

  test('execs run concurrently', async () => {
    const t0 = Date.now();
    const rs = await Promise.all(
      [1, 2, 3, 4].map((i) =>
        api(d.url, 'POST', `/v1/machines/${m.id}/exec`, { cmd: ['sh', '-c', `sleep 2; echo ${i}`] }),
      ),
    );
    assert.deepEqual(
      rs.map((r) => r.body.stdout),
      ['1\n', '2\n', '3\n', '4\n'],
    );
    assert.ok(Date.now() - t0 < 7000, 'four 2 s sleeps should overlap');
  });

  test('GET and list show the machine; healthz counts it', async () => {
    const g = await api(d.url, 'GET', `/v1/machines/${m.id}`);
    assert.equal(g.body.id, m.id);
    const l = await api(d.url, 'GET', '/v1/machines');
    assert.deepEqual(
      (l.body.machines as Machine[]).map((x) => x.id),
      [m.id],
    );
    const h = await api(d.url, 'GET', '/healthz');
    assert.equal(h.body.status, 'ok');
    assert.equal(h.body.running, 1);
    assert.ok(['tcg', 'kvm'].includes(String(h.body.accel)));
  });

  test('its QEMU is jailed: seccomp, an unprivileged user, a cgroup capping memory', async () => {
    const [pid] = qemusOf(d.stateDir);
    assert.ok(pid);
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    assert.match(status, /^Seccomp:\s+2$/m, 'seccomp filter mode');
    const uid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]);
    assert.notEqual(uid, 0, 'QEMU does not run as root');
    const jail = (m as unknown as { jail: { cgroup: string | null; user: string | null } }).jail;
    assert.equal(jail.user, 'hutch-vm');
    assert.ok(jail.cgroup, 'cgroups are available on the test hosts');
    const dirs = cgroupDirs(m.id);
    const mem = dirs.find(
      (x) => existsSync(join(x, 'memory.limit_in_bytes')) || existsSync(join(x, 'memory.max')),
    );
    assert.ok(mem, `memory cgroup for ${m.id}`);
    const limit = readFileSync(
      join(mem, existsSync(join(mem, 'memory.max')) ? 'memory.max' : 'memory.limit_in_bytes'),
      'utf8',
    );
    assert.equal(Number(limit), (256 + 192) * 1024 * 1024);
    assert.match(readFileSync(join(mem, 'cgroup.procs'), 'utf8'), new RegExp(`^${pid}$`, 'm'));
  });

  test('DELETE destroys it: no process, no files', async () => {
    const runDir = join(d.stateDir, 'run', m.id);
    assert.ok(existsSync(runDir));
    assert.equal(qemusOf(d.stateDir).length, 1);
    const r = await api(d.url, 'DELETE', `/v1/machines/${m.id}`);
    assert.equal(r.status, 204);
    assert.equal(qemusOf(d.stateDir).length, 0);
    assert.equal(existsSync(runDir), false);
    assert.deepEqual(cgroupDirs(m.id), [], 'cgroups removed');
    assert.equal((await api(d.url, 'GET', `/v1/machines/${m.id}`)).status, 404);
    assert.equal((await api(d.url, 'DELETE', `/v1/machines/${m.id}`)).status, 404);
  });
});

describe('TTL', () => {
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon();
  });
  after(async () => cleanup(d));

  test('ttl_seconds is clamped to 15–900 and the machine is destroyed within a second of expires_at', async () => {
    const big = (await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 5000 })).body as unknown as Machine;
    assert.equal(big.ttl_seconds, 900);
    await api(d.url, 'DELETE', `/v1/machines/${big.id}`);
    const m = (await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 1 })).body as unknown as Machine;
    assert.equal(m.ttl_seconds, 15);
    const expires = Date.parse(m.expires_at ?? '');
    assert.equal(expires - Date.parse(m.created_at), 15_000);
    const goneAt = await waitFor(
      'expiry',
      async () => ((await api(d.url, 'GET', `/v1/machines/${m.id}`)).status === 404 ? Date.now() : undefined),
      30_000,
    );
    assert.ok(goneAt - expires < 1000, `destroyed ${goneAt - expires} ms after expires_at`);
    assert.ok(goneAt >= expires - 50, 'not destroyed before expires_at');
    assert.equal(qemusOf(d.stateDir).length, 0);
  });
});
