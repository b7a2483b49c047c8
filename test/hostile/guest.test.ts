/**
 * A hostile guest and a hostile local user. The guest is root in its machine: it takes the
 * agent's virtio-serial port from PID 1 (pidfd_getfd) and writes garbage or floods it, and it
 * floods its serial console. The local user is any account but the daemon's: it must read none
 * of hutch's state. Each attack is tallied; the daemon must stay up, bounded and truthful.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { api, cleanup, imageDir, sleep, startDaemon, type TestDaemon, waitFor } from '../helpers/daemon.js';
import { bugLines, memoryOf, processAlive, Tally } from '../helpers/hostile.js';

/** Runs in the guest as root: `garbage` writes random short frames, `flood` 64 KiB blocks of 0xff. */
const portAttack = `
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(1)
port = next(int(f) for f in os.listdir('/proc/1/fd') if os.readlink(f'/proc/1/fd/{f}').startswith('/dev/vport'))
fd = libc.syscall(438, pidfd, port, 0)  # pidfd_getfd
if fd < 0:
    sys.exit(f'pidfd_getfd: errno {ctypes.get_errno()}')
mode, end = sys.argv[1], time.time() + float(sys.argv[2])
junk, n = os.urandom(4096), 0
while time.time() < end:
    try:
        if mode == 'garbage':
            os.write(fd, junk[: 64 + n % 512]); time.sleep(0.02)
        else:
            os.write(fd, b'\\xff' * 65536)
        n += 1
    except OSError:
        time.sleep(0.01)
print(n)
`;

async function upload(d: TestDaemon, id: string, name: string, body: string): Promise<void> {
  const r = await fetch(new URL(`/v1/machines/${id}/upload`, d.url), {
    method: 'POST',
    headers: { 'x-filename': name },
    body,
  });
  assert.equal(r.status, 200, await r.text());
}

describe('hostile guest', () => {
  let d: TestDaemon;
  let victim: string;
  let bystander: string;
  const tally = new Tally('guest');
  before(async () => {
    d = await startDaemon();
    victim = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 900 })).body.id);
    bystander = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 900 })).body.id);
    await upload(d, victim, 'attack.py', portAttack);
  });
  after(async () => {
    await cleanup(d);
  });

  for (const mode of ['garbage', 'flood'] as const) {
    test(`a guest that ${mode === 'garbage' ? 'writes garbage into' : 'floods'} its agent port`, async () => {
      const seconds = 15;
      const before = d.log().split('\n').length;
      const rss0 = memoryOf(d.proc.pid as number).rssMb;
      const started = await api(d.url, 'POST', `/v1/machines/${victim}/exec`, {
        cmd: `nohup python3 /root/attack.py ${mode} ${seconds} > /root/attack.out 2>&1 &`,
      });
      assert.equal(started.body.exit_code, 0, JSON.stringify(started.body));
      let sawBroken = false;
      let bystanderOk = 0;
      const t0 = Date.now();
      while (Date.now() - t0 < seconds * 1000) {
        const m = (await api(d.url, 'GET', `/v1/machines/${victim}`)).body;
        if (m.status === 'running' && /^agent broken: /.test(String(m.error))) sawBroken = true;
        const b = await api(d.url, 'POST', `/v1/machines/${bystander}/exec`, { cmd: ['true'] });
        if (b.body.exit_code === 0) bystanderOk++;
        await sleep(500);
      }
      const reconnects = d
        .log()
        .split('\n')
        .slice(before)
        .filter((l) => l.includes('reconnecting') && l.includes(victim)).length;
      const rss = memoryOf(d.proc.pid as number).rssMb;
      tally.record(`${mode}: daemon alive`, processAlive(d.proc.pid as number));
      tally.record(`${mode}: reported as "agent broken: …" while running`, sawBroken);
      tally.record(
        `${mode}: reconnects back off`,
        reconnects >= 1 && reconnects <= 10,
        `${reconnects} reconnects in ${seconds} s`,
      );
      tally.record(`${mode}: another machine unaffected`, bystanderOk >= seconds, `${bystanderOk} execs ok`);
      tally.record(`${mode}: daemon memory bounded`, rss - rss0 < 100, `RSS ${rss0} → ${rss} MiB`);
      console.log(`${mode}: ${reconnects} reconnects in ${seconds} s, daemon RSS ${rss0} → ${rss} MiB`);
      // Once the guest stops, the link comes back by itself and the error clears.
      await tally.check(`${mode}: the machine recovers after the attack`, async () => {
        await waitFor(
          'a working exec and a cleared error',
          async () => {
            const r = await api(d.url, 'POST', `/v1/machines/${victim}/exec`, { cmd: ['true'] });
            const m = (await api(d.url, 'GET', `/v1/machines/${victim}`)).body;
            return r.body.exit_code === 0 && m.error === null ? true : undefined;
          },
          60_000,
        );
        return undefined;
      });
    });
  }

  test('a guest that floods its serial console', async () => {
    const rss0 = memoryOf(d.proc.pid as number).rssMb;
    const r = await api(d.url, 'POST', `/v1/machines/${victim}/exec`, {
      cmd: 'timeout 15 sh -c "base64 /dev/urandom > /dev/console"; true',
      timeout_ms: 30_000,
    });
    assert.equal(r.body.exit_code, 0, JSON.stringify(r.body));
    const dir = join(d.stateDir, 'run', victim);
    const onDisk = readdirSync(dir)
      .filter((f) => f.startsWith('console.log'))
      .reduce((s, f) => s + statSync(join(dir, f)).size, 0);
    const rss = memoryOf(d.proc.pid as number).rssMb;
    tally.record('console flood: log files bounded', onDisk <= 8 * 1024 * 1024, `${onDisk} bytes on disk`);
    tally.record('console flood: daemon memory bounded', rss - rss0 < 100, `RSS ${rss0} → ${rss} MiB`);
    const e = await api(d.url, 'POST', `/v1/machines/${victim}/exec`, { cmd: ['echo', 'ok'] });
    tally.record('console flood: the machine still answers', e.body.stdout === 'ok\n');
  });

  test('what held', () => {
    tally.record(
      'no unhandled error in the daemon log',
      bugLines(d.log()).length === 0,
      bugLines(d.log()).join('\n'),
    );
    tally.report();
  });
});

describe('hostile local user', () => {
  let d: TestDaemon;
  const tally = new Tally('local-user');
  before(async () => {
    d = await startDaemon();
  });
  after(async () => cleanup(d));

  test("another local account reads none of hutch's state", async () => {
    const m = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 600 })).body.id);
    await api(d.url, 'POST', `/v1/machines/${m}/exec`, { cmd: 'echo secret > /root/s; sync' });
    const boxes = new BoxesClient({ socketPath: d.boxesSocket });
    const box = await boxes.create<{ id: string }>({ image: 'debian:bookworm', env: { TOKEN: 'secret' } });
    const ex = await boxes.exec<{ id: string }>(box.id, { cmd: ['echo', 'secret'] });
    for await (const e of boxes.events(box.id, ex.id)) if (e.event === 'exit') break;
    const run = join(d.stateDir, 'run');
    const targets = [
      join(d.stateDir, 'hutch.db'),
      join(d.stateDir, 'hutch.db-wal'),
      join(run, m, 'disk.qcow2'),
      join(run, m, 'console.log'),
      join(run, m, 'qemu.log'),
      join(run, box.id, 'disk.qcow2'),
      join(run, box.id, 'execs', `${ex.id}.ndjson`),
    ];
    // The image cache holds pulled images (private registries' too) and snapshot memory.
    for (const sub of ['templates', 'oci', 'snapshots']) targets.push(join(imageDir, sub));
    for (const path of targets) {
      const r = spawnSync('runuser', ['-u', 'nobody', '--', 'head', '-c', '1', path], { encoding: 'utf8' });
      tally.record(
        `nobody cannot read ${path.replace(d.stateDir, '$STATE')}`,
        r.status !== 0,
        r.stderr.trim(),
      );
    }
    const sock = spawnSync(
      'runuser',
      ['-u', 'nobody', '--', 'curl', '-s', '--unix-socket', d.boxesSocket, 'http://boxrun/v1/boxes'],
      { encoding: 'utf8' },
    );
    tally.record('nobody cannot use the boxes socket', sock.status !== 0 && !sock.stdout.includes('box'));
    // And QEMU, which drops to its own user, still reaches everything it needs.
    const again = await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 60 });
    tally.record('machines still boot', again.status === 201, JSON.stringify(again.body).slice(0, 200));
    await boxes.remove(box.id, true);
    tally.report();
  });
});

describe('hostile guest: output the host must store', () => {
  let d: TestDaemon;
  const tally = new Tally('guest-storage');
  const mib = 1024 * 1024;
  before(async () => {
    d = await startDaemon({
      env: {
        HUTCH_EXEC_LOG_MAX_BYTES: String(2 * mib),
        HUTCH_EXEC_LOGS_BOX_MAX_BYTES: String(3 * mib),
        HUTCH_EXEC_LOGS_TOTAL_MAX_BYTES: String(5 * mib),
      },
    });
  });
  after(async () => cleanup(d));

  test('exec logs are bounded per exec, per box and in total', async () => {
    const boxes = new BoxesClient({ socketPath: d.boxesSocket });
    const logBytes = (box: string): number => {
      const dir = join(d.stateDir, 'run', box, 'execs');
      return readdirSync(dir).reduce((s, f) => s + statSync(join(dir, f)).size, 0);
    };
    const print = async (box: string, mb: number): Promise<{ truncated: boolean; got: number }> => {
      const x = await boxes.exec<{ id: string }>(box, {
        cmd: ['sh', '-c', `head -c ${mb * mib} /dev/zero | tr '\\0' x`],
      });
      let got = 0;
      let truncated = false;
      for await (const e of boxes.events(box, x.id)) {
        if (e.data.stream === 'stdout') got += e.data.data.length;
        if (e.event === 'exit') truncated = JSON.parse(e.data.data).truncated === true;
      }
      return { truncated, got };
    };
    const a = (await boxes.create<{ id: string }>({ image: 'debian:bookworm' })).id;
    const b = (await boxes.create<{ id: string }>({ image: 'debian:bookworm' })).id;
    const one = await print(a, 4);
    tally.record('one exec stops at its cap', one.truncated && one.got < 2 * mib, `${one.got} bytes kept`);
    const two = await print(a, 4);
    tally.record(
      'the box stops at its cap',
      two.truncated && logBytes(a) <= 3 * mib + 4096,
      `${logBytes(a)} bytes`,
    );
    const three = await print(b, 4);
    tally.record(
      'every box together stops at the total',
      three.truncated && logBytes(a) + logBytes(b) <= 5 * mib + 8192,
      `${logBytes(a) + logBytes(b)} bytes`,
    );
    // Removing a box gives its bytes back.
    await boxes.remove(a, true);
    const four = await print(b, 0.5);
    tally.record(
      'a removed box frees its share',
      !four.truncated && four.got === mib / 2,
      `${four.got} bytes`,
    );
    await boxes.remove(b, true);
    tally.report();
  });
});
