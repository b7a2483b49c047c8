import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  linkSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { TemplateBuilder } from '../../src/images/builder.js';
import { collectCacheGarbage, type GcReport } from '../../src/images/cache-gc.js';
import { snapshotFormat } from '../../src/images/snapshots.js';
import { api, cleanup, imageDir, startDaemon, type TestDaemon, waitFor } from '../helpers/daemon.js';

/**
 * Two daemons, two state dirs, one image dir: B runs a machine restored from a template snapshot;
 * a collection by A, whose build resolves other keys, must keep everything that machine's disk
 * chain and memory file need, whichever way it learns of it. The image dir is a private one,
 * made of hard links to the shared cache's template and snapshot (removing a link there
 * removes nothing from the shared cache).
 */
describe('cache gc across daemons sharing an image dir', () => {
  const img = mkdtempSync(join(tmpdir(), 'hutch-gc-img-'));
  const stateA = mkdtempSync(join(tmpdir(), 'hutch-gc-a-'));
  let b: TestDaemon | undefined;
  after(async () => {
    if (b) await cleanup(b);
    rmSync(img, { recursive: true, force: true });
    rmSync(stateA, { recursive: true, force: true });
  });

  test('an artifact a live machine of another daemon uses survives; once it is gone, so is the artifact', async (t) => {
    const keys = await new TemplateBuilder(imageDir).currentKeys();
    const name = `python-${keys.templates.python}`;
    const srcTemplate = join(imageDir, 'templates', name);
    // One of the current format (older ones are garbage to the collector whatever uses them),
    // and the one machines without a network restore from (the networked one has a NIC).
    const snapName = readdirSync(join(imageDir, 'snapshots')).find((s) => {
      if (!s.startsWith(`${name}-tcg-1-256-${snapshotFormat}-`)) return false;
      const meta = join(imageDir, 'snapshots', s, 'meta.json');
      return existsSync(meta) && !readFileSync(meta, 'utf8').includes('"nic"');
    });
    if (!existsSync(join(srcTemplate, 'manifest.json')) || !snapName) {
      t.skip('the shared cache has no python template and TCG snapshot (run the suite once)');
      return;
    }
    const tdir = join(img, 'templates', name);
    mkdirSync(tdir, { recursive: true });
    for (const f of ['rootfs.ext4', 'vmlinux']) linkSync(join(srcTemplate, f), join(tdir, f));
    const manifest = JSON.parse(readFileSync(join(srcTemplate, 'manifest.json'), 'utf8')) as Record<
      string,
      unknown
    >;
    writeFileSync(
      join(tdir, 'manifest.json'),
      JSON.stringify({ ...manifest, kernel: join(tdir, 'vmlinux'), rootfs: join(tdir, 'rootfs.ext4') }),
    );
    const sdir = join(img, 'snapshots', snapName);
    mkdirSync(sdir, { recursive: true });
    for (const f of ['mem', 'state']) linkSync(join(imageDir, 'snapshots', snapName, f), join(sdir, f));
    // The disk is an overlay naming its base by path: a copy, pointed at this cache's template.
    copyFileSync(join(imageDir, 'snapshots', snapName, 'disk.qcow2'), join(sdir, 'disk.qcow2'));
    execFileSync('qemu-img', [
      'rebase',
      '-u',
      '-F',
      'raw',
      '-b',
      join(tdir, 'rootfs.ext4'),
      join(sdir, 'disk.qcow2'),
    ]);
    const meta = JSON.parse(
      readFileSync(join(imageDir, 'snapshots', snapName, 'meta.json'), 'utf8'),
    ) as Record<string, unknown>;
    writeFileSync(
      join(sdir, 'meta.json'),
      JSON.stringify({
        ...meta,
        dir: sdir,
        mem: join(sdir, 'mem'),
        state: join(sdir, 'state'),
        disk: join(sdir, 'disk.qcow2'),
      }),
    );
    const env = { HUTCH_IMAGE_DIR: img, HUTCH_ACCEL: 'tcg' };
    b = await startDaemon({ env });
    const daemonB = b;
    await waitFor(
      'the snapshot',
      async () =>
        ((await api(daemonB.url, 'GET', '/healthz')).body.snapshots as Record<string, string>).python ===
        'ready'
          ? true
          : undefined,
      60_000,
    );
    const m = await api(b.url, 'POST', '/v1/machines', { ttl_seconds: 600 });
    assert.equal(m.status, 201, JSON.stringify(m.body));
    assert.equal(m.body.mode, 'snapshot');

    // A's build resolves other keys: B's template is not current for it.
    const otherKeys = { ...keys, templates: { python: 'ffffffffffffffff' } };
    const stale = join(img, 'templates', 'python-0000000000000000');
    mkdirSync(stale);
    writeFileSync(join(stale, 'rootfs.ext4'), 'x'.repeat(100_000));
    const old = new Date(Date.now() - 48 * 3600 * 1000);
    for (const p of [stale, tdir, sdir]) utimesSync(p, old, old);
    const gc = (): Promise<GcReport> =>
      collectCacheGarbage({ imageDir: img, stateDir: stateA, minAgeMs: 3600_000, keys: otherKeys });
    const reasons = (r: GcReport): (string | undefined)[] =>
      [tdir, sdir].map((p) => r.kept.find((k) => k.path === p)?.reason);

    // B running: its build's keys count.
    let r = await gc();
    assert.deepEqual(
      r.removed.map((e) => e.path),
      [stale],
    );
    assert.ok((r.removed[0]?.bytes ?? 0) >= 100_000);
    assert.match(reasons(r)[0] ?? '', new RegExp(`current for the running daemon of ${b.stateDir}`));
    assert.equal(reasons(r)[1], `used by a machine or box of ${b.stateDir}`);

    // B stopped (its machine runs on): its rows and its machine's disk chain count.
    await b.stop();
    r = await gc();
    assert.equal(r.freed.count, 0);
    for (const why of reasons(r)) assert.equal(why, `used by a machine or box of ${b.stateDir}`);

    // A daemon that never registered (an older hutch): the files QEMU has open count.
    rmSync(join(img, 'holders'), { recursive: true });
    r = await gc();
    assert.equal(r.freed.count, 0);
    for (const why of reasons(r)) assert.match(why ?? '', /^open by pid \d+$/);

    // The machine gone (B back, the machine deleted, B's state dir removed): both go.
    const again = await startDaemon({ env, stateDir: b.stateDir });
    b = undefined;
    await cleanup(again);
    for (const p of [tdir, sdir]) utimesSync(p, old, old); // B's start used them again
    r = await gc();
    assert.deepEqual(r.removed.map((e) => e.path).sort(), [sdir, tdir].sort());
    assert.ok(!existsSync(tdir) && !existsSync(sdir));
    assert.ok(existsSync(join(srcTemplate, 'rootfs.ext4')), 'the shared cache keeps its own links');
  });
});
