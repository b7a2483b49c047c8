/**
 * A full state filesystem: the daemon's state directory on a small loop-mounted ext4, filled to
 * 100 % while machines and boxes run, execs print and TTLs expire. Operations that need space
 * answer STORAGE_FULL (507) and change nothing; everything else keeps working; once space is
 * back, everything works again and nothing half-written is left. Then, with no overcommit,
 * guest disks that the host could not give are refused up front.
 */
import assert from 'node:assert/strict';
import { rmSync, statfsSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { ApiError } from '../../src/client/http-client.js';
import { ConsoleTap } from '../../src/vmm/console.js';
import { api, cleanup, qemusOf, sleep, startDaemon, type TestDaemon, waitFor } from '../helpers/daemon.js';
import { bugLines, memoryOf, processAlive, Tally } from '../helpers/hostile.js';
import { fill, type SmallFs, smallFs } from '../helpers/small-fs.js';

const fsBytes = 400 * 1024 * 1024;

async function storageCode(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (e) {
    return e instanceof ApiError ? e.code : `thrown: ${(e as Error).message}`;
  }
}

describe('hostile: a full state filesystem', () => {
  const tally = new Tally('full-disk');
  let mnt: string;
  let small: SmallFs;
  let d: TestDaemon;
  let boxes: BoxesClient;

  before(() => {
    small = smallFs('fulldisk', fsBytes);
    mnt = small.mnt;
  });
  after(async () => {
    try {
      if (d) await cleanup(d);
    } finally {
      small.close();
    }
  });

  test('at 100 % the daemon stays up, refuses what needs space with STORAGE_FULL, and recovers', async () => {
    const state = join(mnt, 'state');
    // Thin template disks (2 GiB each) on a 400 MiB filesystem: overcommit is what lets them in.
    d = await startDaemon({ stateDir: state, env: { HUTCH_DISK_OVERCOMMIT: '100' } });
    boxes = new BoxesClient({ socketPath: d.boxesSocket });
    const pid = d.proc.pid as number;
    const rss0 = memoryOf(pid).rssMb;
    const expiring = (await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 15 })).body;
    const kept = await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 900 });
    assert.equal(kept.status, 201, JSON.stringify(kept.body));
    const keeper = String(kept.body.id);
    const box = await boxes.create<{ id: string }>({ image: 'debian:bookworm' });
    const printing = await boxes.exec<{ id: string }>(box.id, {
      cmd: ['sh', '-c', 'for i in $(seq 1 40); do head -c 100000 /dev/urandom | base64; sleep 0.5; done'],
    });
    // A guest mid-way through a large write when the host's disk fills.
    const dd = await api(d.url, 'POST', `/v1/machines/${keeper}/exec`, {
      cmd: 'nohup dd if=/dev/urandom of=/root/big bs=1M count=100 conv=fsync > /root/dd.out 2>&1 &',
    });
    assert.equal(dd.body.exit_code, 0, JSON.stringify(dd.body));
    const machinesBefore = (await api(d.url, 'GET', '/v1/machines')).body.machines as unknown[];
    const qemusBefore = qemusOf(state);

    const fillers = fill(mnt);
    const free = statfsSync(mnt);
    console.log(`filled: ${free.bfree * free.bsize} bytes left of ${fsBytes}`);
    // Guests whose next disk write fails are stopped by QEMU; the daemon notices within a sweep.
    await sleep(3000);

    await tally.check('GET /healthz answers', async () => {
      assert.equal((await api(d.url, 'GET', '/healthz')).status, 200);
      return undefined;
    });
    await tally.check('GET /v1/machines and /v1/boxes answer', async () => {
      assert.equal((await api(d.url, 'GET', '/v1/machines')).status, 200);
      await boxes.list();
      return undefined;
    });
    await tally.check('a create answers 507 STORAGE_FULL and leaves nothing', async () => {
      const r = await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 60 });
      assert.equal(r.status, 507, JSON.stringify(r.body));
      assert.equal(r.body.code, 'STORAGE_FULL');
      const now = (await api(d.url, 'GET', '/v1/machines')).body.machines as unknown[];
      assert.equal(now.length, machinesBefore.length);
      // No QEMU of its own (a snapshot being built in the background may come and go).
      assert.deepEqual(
        qemusOf(state).filter((pid) => !qemusBefore.includes(pid)),
        [],
      );
      return String(r.body.message).slice(0, 80);
    });
    await tally.check('a box create answers 507 STORAGE_FULL', async () => {
      assert.equal(await storageCode(boxes.create({ image: 'debian:bookworm' })), 'STORAGE_FULL');
      return undefined;
    });
    let ranWhileFull = 'unknown';
    await tally.check('a box exec either runs and ends, or is refused and never runs', async () => {
      try {
        const x = await boxes.exec<{ id: string }>(box.id, { cmd: ['touch', '/tmp/ran-while-full'] });
        ranWhileFull = 'accepted';
        for await (const e of boxes.events(box.id, x.id)) if (e.event === 'exit') return 'accepted and ended';
        throw new Error('no exit event');
      } catch (e) {
        if (!(e instanceof ApiError)) throw e;
        assert.equal(e.code, 'STORAGE_FULL', e.message);
        ranWhileFull = 'refused';
        return 'refused with STORAGE_FULL';
      }
    });
    await tally.check('the console log on a full disk drops bytes, not the daemon', async () => {
      // The real console tap, its log on the full filesystem, fed by a socket like QEMU's.
      const sock = join(mnt, '..', 'console.sock');
      const server = createServer((c) => c.end(Buffer.alloc(256 * 1024, 0x41)));
      await new Promise<void>((r) => server.listen(sock, r));
      const tap = new ConsoleTap(sock, join(state, 'console-test.log'));
      tap.start();
      try {
        await waitFor(
          'the bytes',
          async () => (tap.recent().length >= 256 * 1024 ? true : undefined),
          10_000,
        );
        assert.ok(tap.droppedLogBytes > 0, 'the file could not take them');
      } finally {
        tap.stop();
        server.close();
      }
      return `${tap.droppedLogBytes} bytes dropped from the log, all kept in the ring`;
    });
    await tally.check('a TTL that expires on a full disk destroys its machine', async () => {
      await waitFor(
        'the expired machine to go',
        async () => {
          const r = await api(d.url, 'GET', `/v1/machines/${expiring.id}`);
          return r.status === 404 ? true : undefined;
        },
        40_000,
      );
      return undefined;
    });
    await tally.check(
      'a guest stopped by the full disk says so, and refuses work instead of hanging',
      async () => {
        const m = await waitFor(
          'the cause on the machine',
          async () => {
            const r = (await api(d.url, 'GET', `/v1/machines/${keeper}`)).body;
            return /disk is full/.test(String(r.error)) ? r : undefined;
          },
          60_000,
        );
        const t0 = Date.now();
        const r = await api(d.url, 'POST', `/v1/machines/${keeper}/exec`, { cmd: ['true'] });
        assert.equal(r.status, 507, JSON.stringify(r.body));
        assert.ok(Date.now() - t0 < 5000, 'answered at once');
        return String(m.error).slice(0, 60);
      },
    );
    tally.record('daemon alive while full', processAlive(pid));

    for (const f of fillers) rmSync(f, { force: true });

    await tally.check(
      'space back: the stopped guest continues by itself and its write completes',
      async () => {
        await waitFor(
          'the guest to continue',
          async () => {
            const r = await api(d.url, 'POST', `/v1/machines/${keeper}/exec`, {
              cmd: 'pgrep -x dd >/dev/null || stat -c %s /root/big',
            });
            return r.status === 200 && r.body.stdout !== '' ? String(r.body.stdout) : undefined;
          },
          90_000,
        ).then((size) => assert.equal(size, `${100 * 1024 * 1024}\n`));
        const m = (await api(d.url, 'GET', `/v1/machines/${keeper}`)).body;
        assert.equal(m.error, null);
        return undefined;
      },
    );
    await tally.check('an exec that printed while the disk was full ends with an exit event', async () => {
      let exit: string | undefined;
      for await (const e of boxes.events(box.id, printing.id)) if (e.event === 'exit') exit = e.data.data;
      assert.ok(exit, 'an exit event');
      return exit?.slice(0, 100);
    });
    await tally.check('space back: creates work again', async () => {
      const r = await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 60 });
      assert.equal(r.status, 201, JSON.stringify(r.body));
      return undefined;
    });
    await tally.check('space back: box execs work and replay completely', async () => {
      const x = await boxes.exec<{ id: string }>(box.id, { cmd: ['sh', '-c', 'seq 1 2000'] });
      let out = '';
      for await (const e of boxes.events(box.id, x.id)) if (e.data.stream === 'stdout') out += e.data.data;
      assert.equal(out.split('\n').filter(Boolean).length, 2000);
      return undefined;
    });
    await tally.check('a command refused while full never ran', async () => {
      if (ranWhileFull !== 'refused') return `it was ${ranWhileFull}`;
      const x = await boxes.exec<{ id: string }>(box.id, { cmd: ['test', '!', '-e', '/tmp/ran-while-full'] });
      let code: string | undefined;
      for await (const e of boxes.events(box.id, x.id)) if (e.event === 'exit') code = e.data.data;
      assert.match(String(code), /"exit_code":0/);
      return undefined;
    });
    await tally.check('the exec that ended while full is recorded as ended', async () => {
      await waitFor(
        'its row to catch up',
        async () => {
          const x = await boxes.getExec<{ status: string }>(box.id, printing.id);
          return x.status !== 'running' ? true : undefined;
        },
        10_000,
      );
      return undefined;
    });
    const rss = memoryOf(pid).rssMb;
    tally.record('daemon memory bounded', rss - rss0 < 150, `RSS ${rss0} → ${rss} MiB`);
    tally.record(
      'no unhandled error in the daemon log',
      bugLines(d.log()).length === 0,
      bugLines(d.log()).join('\n'),
    );

    if (tally.attempts.some((a) => !a.held))
      console.log(
        d
          .log()
          .split('\n')
          .filter((l) => /"level":"(warn|error)"|guest/.test(l))
          .join('\n'),
      );
    // No overcommit: a guest disk the host cannot give is refused before anything is made.
    await d.stop();
    d = await startDaemon({ stateDir: state, env: { HUTCH_DISK_OVERCOMMIT: '1' } });
    boxes = new BoxesClient({ socketPath: d.boxesSocket });
    await tally.check('without overcommit, a machine whose disk does not fit is refused', async () => {
      const before = qemusOf(state).length;
      const r = await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 60 });
      assert.equal(r.status, 507, JSON.stringify(r.body));
      assert.match(String(r.body.message), /HUTCH_DISK_OVERCOMMIT/);
      assert.equal(qemusOf(state).length, before);
      return undefined;
    });
    await tally.check('without overcommit, a box whose disk does not fit is refused', async () => {
      assert.equal(await storageCode(boxes.create({ image: 'debian:bookworm' })), 'STORAGE_FULL');
      return undefined;
    });
    await tally.check('/v1/info and /healthz say how much disk is free and promised', async () => {
      const info = await boxes.info<{
        disk: { free_bytes: number; promised_bytes: number; overcommit: number };
      }>();
      const health = (await api(d.url, 'GET', '/healthz')).body.disk as typeof info.disk;
      assert.ok(info.disk.free_bytes > 0 && info.disk.free_bytes <= fsBytes);
      assert.ok(info.disk.promised_bytes > 0, 'the running machine and the box hold promises');
      assert.equal(info.disk.overcommit, 1);
      assert.equal(health.overcommit, 1);
      return `free ${info.disk.free_bytes}, promised ${info.disk.promised_bytes}`;
    });
    const warnings = d
      .log()
      .split('\n')
      .filter((l) => /"level":"(warn|error)"/.test(l));
    if (tally.attempts.some((a) => !a.held)) console.log(warnings.join('\n'));
    tally.report();
  });
});
