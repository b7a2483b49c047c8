/**
 * Proof that nothing acknowledged is lost. Files with known checksums are written (and fsync'd:
 * that is the acknowledgement a program gets) to a machine's root disk, to an attached disk and
 * into a volume restored into another machine; then the machines are paused and resumed,
 * suspended and resumed three times in a row, branched, the daemon is killed -9 and restarted,
 * a QEMU is killed -9 with the disk attached, the daemon is restarted again, and the host's
 * state filesystem (a small loop-mounted ext4 holding all of the daemon's state) is filled up.
 * After each, every acknowledged write that should exist is checked; an operation that could
 * not keep its data must have failed and said so. The tally is printed.
 */
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, cleanup, type Json, qemusOf, sleep, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { fill, type SmallFs, smallFs } from '../helpers/small-fs.js';

/** Where an acknowledged write lives. */
type Place = 'root' | 'disk' | 'volume';

interface Written {
  place: Place;
  /** The machine holding it (for the disk: the machine it is attached to now). */
  machine: string;
  path: string;
  sha: string;
}

const fsBytes = 1536 * 2 ** 20;

describe('data integrity across pause, suspend, branch, crashes and a full disk', () => {
  let d: TestDaemon;
  let small: SmallFs;
  let mnt: string;
  const ledger: Written[] = [];
  const tally: { event: string; tried: number; survived: number; note: string }[] = [];
  let m: string;
  let r: string;
  let disk: string;
  let volume: string;

  const call = async (method: string, path: string, body?: unknown): Promise<Json> =>
    api(d.url, method, path, body);
  const sh = async (id: string, cmd: string): Promise<{ code: number; out: string; err: string }> => {
    const x = await call('POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: 300_000 });
    assert.equal(x.status, 200, JSON.stringify(x.body));
    return { code: x.body.exit_code as number, out: String(x.body.stdout), err: String(x.body.stderr) };
  };
  /** Writes files of the given sizes (KiB) under dir, fsync'd, and records them. */
  const write = async (
    id: string,
    place: Place,
    dir: string,
    tag: string,
    sizesKb: number[],
  ): Promise<void> => {
    const script = sizesKb
      .map((kb, i) => `head -c ${kb}K /dev/urandom > ${dir}/${tag}-${i} && sync ${dir}/${tag}-${i}`)
      .join(' && ');
    const w = await sh(id, `mkdir -p ${dir} && ${script} && sync && cd ${dir} && sha256sum ${tag}-*`);
    assert.equal(w.code, 0, w.err);
    for (const l of w.out.trim().split('\n')) {
      const [sha, name] = l.split(/\s+/);
      ledger.push({ place, machine: id, path: `${dir}/${name}`, sha: sha as string });
    }
  };
  /** Checks every recorded write of these places on their machines; returns [tried, survived]. */
  const verify = async (event: string, places: Place[], note = ''): Promise<void> => {
    const items = ledger.filter((w) => places.includes(w.place));
    let ok = 0;
    const byMachine = new Map<string, Written[]>();
    for (const w of items) byMachine.set(w.machine, [...(byMachine.get(w.machine) ?? []), w]);
    for (const [id, ws] of byMachine) {
      const x = await sh(id, `sha256sum ${ws.map((w) => w.path).join(' ')} 2>&1; true`);
      const got = new Map(
        x.out
          .trim()
          .split('\n')
          .map((l) => l.split(/\s+/))
          .map(([s, p]) => [p as string, s as string]),
      );
      for (const w of ws) if (got.get(w.path) === w.sha) ok++;
    }
    tally.push({ event, tried: items.length, survived: ok, note });
    assert.equal(ok, items.length, `${event}: ${items.length - ok} of ${items.length} writes lost`);
  };
  const state = (id: string) => call('GET', `/v1/machines/${id}`).then((x) => x.body);

  before(() => {
    small = smallFs('integrity', fsBytes);
    mnt = small.mnt;
  });
  after(async () => {
    try {
      if (d) await cleanup(d);
    } finally {
      for (const line of tally)
        console.log(
          `integrity ${line.event.padEnd(44)} ${line.survived}/${line.tried} acknowledged writes intact${line.note ? ` (${line.note})` : ''}`,
        );
      const tried = tally.reduce((n, t) => n + t.tried, 0);
      const kept = tally.reduce((n, t) => n + t.survived, 0);
      console.log(`integrity total: ${tally.length} checks, ${kept} of ${tried} writes intact`);
      small.close();
    }
  });

  test('written: root disk, attached disk, restored volume', async () => {
    d = await startDaemon({ stateDir: join(mnt, 'state'), env: { HUTCH_DISK_OVERCOMMIT: '100' } });
    m = (await call('POST', '/v1/machines', { template: 'python', name: 'src', ttl_seconds: 3600 })).body
      .id as string;
    const c = await call('POST', '/v1/disks', { name: 'd', size_bytes: 256 * 2 ** 20 });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    disk = c.body.disk_id as string;
    assert.equal((await call('POST', `/v1/machines/${m}/disks`, { disk, mount_path: '/data' })).status, 200);
    await write(m, 'root', '/root/int', 'r', [1, 4, 64, 1024, 8192]);
    await write(m, 'disk', '/data/int', 'd', [1, 4, 64, 1024, 8192]);
    const v = await call('POST', '/v1/volumes', { ttl_seconds: 3600 });
    assert.equal(v.status, 201, JSON.stringify(v.body));
    volume = v.body.id as string;
    const saved = await call('POST', `/v1/machines/${m}/save?volume=${volume}`);
    assert.equal(saved.status, 200, JSON.stringify(saved.body));
    const made = await call('POST', '/v1/machines', {
      template: 'python',
      name: 'restored',
      ttl_seconds: 3600,
      volume,
    });
    assert.equal(made.status, 201, JSON.stringify(made.body));
    r = made.body.id as string;
    for (const w of ledger.filter((x) => x.place === 'root'))
      ledger.push({ place: 'volume', machine: r, path: w.path, sha: w.sha });
    await verify('written', ['root', 'disk', 'volume']);
  });

  test('pause and resume', async () => {
    assert.equal((await call('POST', `/v1/machines/${m}/pause`)).status, 200);
    assert.equal((await call('POST', `/v1/machines/${m}/resume`)).status, 200);
    await verify('pause/resume', ['root', 'disk']);
  });

  test('suspend and resume, three times in a row', async () => {
    for (let i = 1; i <= 3; i++) {
      assert.equal((await call('POST', `/v1/machines/${m}/suspend`)).status, 200);
      assert.equal((await call('POST', `/v1/machines/${m}/resume`)).status, 200);
      await write(m, 'root', '/root/int', `s${i}`, [16]);
      await write(m, 'disk', '/data/int', `s${i}`, [16]);
      await verify(`suspend/resume #${i}`, ['root', 'disk']);
    }
  });

  test('branch: the clone has every write, the source keeps them', async () => {
    const b = await call('POST', `/v1/machines/${m}/branch`, { name: 'clone' });
    assert.equal(b.status, 201, JSON.stringify(b.body));
    const clone = b.body.id as string;
    const copies = ledger
      .filter((w) => w.machine === m)
      .map((w) => ({ ...w, place: w.place, machine: clone }));
    const before = ledger.length;
    ledger.push(...copies);
    await verify('branch (source and clone)', ['root', 'disk']);
    ledger.splice(before);
    assert.equal((await call('DELETE', `/v1/machines/${clone}`)).status, 204);
  });

  test('kill -9 of the daemon, and a restart', async () => {
    await d.stop('SIGKILL');
    d = await startDaemon({ stateDir: d.stateDir, env: { HUTCH_DISK_OVERCOMMIT: '100' } });
    await verify('daemon kill -9 + restart', ['root', 'disk', 'volume']);
  });

  test('kill -9 of the QEMU with the disk attached', async () => {
    await write(m, 'disk', '/data/int', 'k', [512]);
    const qemu = qemusOf(d.stateDir).find((pid) =>
      readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(`guest=hutch-${m},`),
    );
    assert.ok(qemu);
    process.kill(qemu, 'SIGKILL');
    let s: Record<string, unknown> = {};
    for (let i = 0; i < 100 && s.status !== 'failed'; i++) {
      await sleep(100);
      s = await state(m);
    }
    // A machine's root disk is the machine's: it failed, and says why.
    assert.equal(s.status, 'failed', JSON.stringify(s));
    assert.ok(String(s.error ?? '').length > 0, JSON.stringify(s));
    const rootLost = ledger.filter((w) => w.place === 'root').length;
    ledger.splice(0, ledger.length, ...ledger.filter((w) => w.place !== 'root'));
    // The disk outlives it: attached to the other machine, every write is there.
    assert.equal((await call('POST', `/v1/machines/${r}/disks`, { disk, mount_path: '/data' })).status, 200);
    for (const w of ledger) if (w.place === 'disk') w.machine = r;
    await verify(
      'QEMU kill -9 (disk re-attached elsewhere)',
      ['disk', 'volume'],
      `the failed machine's ${rootLost} root-disk files went with it, reported: ${String(s.error).slice(0, 60)}`,
    );
    await call('DELETE', `/v1/machines/${m}`);
  });

  test('a daemon restart', async () => {
    await d.stop('SIGTERM');
    d = await startDaemon({ stateDir: d.stateDir, env: { HUTCH_DISK_OVERCOMMIT: '100' } });
    await verify('daemon restart', ['disk', 'volume']);
  });

  test("the host's state filesystem full: writes wait or fail clearly, none is lost", async () => {
    const fillers = fill(mnt);
    // A save needs room: refused, and the volume keeps its version.
    const save = await call('POST', `/v1/machines/${r}/save?volume=${volume}`);
    assert.equal(save.body.code, 'STORAGE_FULL', JSON.stringify(save.body));
    const nd = await call('POST', '/v1/disks', { name: 'nope', size_bytes: 128 * 2 ** 20 });
    assert.equal(nd.body.code, 'STORAGE_FULL', JSON.stringify(nd.body));
    // A guest writing to its disk now: QEMU holds the write (the guest is paused, with the
    // cause shown) until there is room, then it completes.
    const bg = await sh(
      r,
      'nohup sh -c "head -c 8M /dev/urandom > /data/int/full.tmp && sync /data/int/full.tmp && mv /data/int/full.tmp /data/int/full && sync && sha256sum /data/int/full > /root/full.sha" >/dev/null 2>&1 & echo started',
    );
    assert.equal(bg.out, 'started\n');
    let cause = '';
    for (let i = 0; i < 100 && !cause; i++) {
      await sleep(200);
      cause = String((await state(r)).error ?? '');
    }
    assert.match(cause, /disk is full/);
    for (const f of fillers) rmSync(f);
    let done = '';
    for (let i = 0; i < 150 && !done; i++) {
      await sleep(200);
      const x = await call('POST', `/v1/machines/${r}/exec`, {
        cmd: 'cat /root/full.sha 2>/dev/null',
        timeout_ms: 10_000,
      });
      done = String(x.body.stdout ?? '');
    }
    const [sha] = done.trim().split(/\s+/);
    assert.ok(sha, 'the write finished once space was back');
    ledger.push({ place: 'disk', machine: r, path: '/data/int/full', sha: sha as string });
    await verify(
      'state filesystem full, then freed',
      ['disk', 'volume'],
      `save and disk create answered STORAGE_FULL; a guest write waited (${cause.slice(0, 40)}…)`,
    );
    // The volume kept its version: a restore now has every file of the first save.
    const again = await call('POST', '/v1/machines', { template: 'python', ttl_seconds: 600, volume });
    assert.equal(again.status, 201, JSON.stringify(again.body));
    const vol = ledger
      .filter((w) => w.place === 'volume')
      .map((w) => ({ ...w, machine: again.body.id as string }));
    const n = ledger.length;
    ledger.push(...vol);
    await verify('volume after the failed save', ['volume']);
    ledger.splice(n);
  });
});
