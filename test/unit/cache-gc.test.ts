import assert from 'node:assert/strict';
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type MachineRow, Store } from '../../src/engine/store.js';
import type { BuildKeys } from '../../src/images/builder.js';
import { collectCacheGarbage, type GcReport } from '../../src/images/cache-gc.js';
import { registerHolder } from '../../src/images/cache-holders.js';
import { imageDiskName } from '../../src/images/oci.js';
import { snapshotFormat } from '../../src/images/snapshots.js';
import { repoRoot } from '../../src/paths.js';
import { createOverlay } from '../../src/vmm/disk.js';

// A fake cache with real files: what this "build" resolves to, artifacts of older keys, and
// older ones still in use in every way the collector must see (rows, disk chains, open files,
// another daemon's registration).
const keys: BuildKeys = {
  kernel: 'kcur',
  agent: 'a'.repeat(16),
  templates: { python: 'tcur' },
  rootfs: ['rcur'],
  localImages: [],
};
const digest = (c: string): string => `sha256:${c.repeat(64)}`;
const day = 24 * 3600 * 1000;

function row(id: string, fields: Partial<MachineRow>): MachineRow {
  return {
    id,
    owner: 'local',
    name: null,
    template: 'python',
    template_hash: 'tcur',
    state: 'running',
    mode: 'snapshot',
    accel: 'tcg',
    vcpus: 1,
    memory_mb: 256,
    persistent: 0,
    ttl_seconds: null,
    created_at: new Date().toISOString(),
    expires_at: null,
    boot_ms: null,
    pid: null,
    run_dir: '',
    error: null,
    jail: null,
    auto_suspend_seconds: null,
    parent_id: null,
    kind: 'machine',
    spec: null,
    started_at: null,
    stopped_at: null,
    net: 0,
    display: null,
    ...fields,
  };
}

describe('cache gc', () => {
  const root = mkdtempSync(join(tmpdir(), 'hutch-gc-'));
  const img = join(root, 'images');
  const state = join(root, 'state');
  const other = join(root, 'other-state');
  const holders: ChildProcess[] = [];
  /** Paths made old (two days unused), every artifact but the fresh one. */
  const aged: string[] = [];

  const artifact = (rel: string, files: Record<string, string | number> = {}): string => {
    const dir = join(img, rel);
    mkdirSync(dir, { recursive: true });
    // Real bytes, so sizes are what the disk holds, not holes.
    for (const [f, c] of Object.entries(files))
      writeFileSync(join(dir, f), typeof c === 'number' ? randomBytes(c) : c);
    aged.push(dir);
    return dir;
  };
  const sparse = (path: string, mb: number): void => {
    writeFileSync(path, '');
    execFileSync('truncate', ['-s', `${mb}M`, path]);
  };
  const snapshot = async (name: string, key: string, base: string): Promise<string> => {
    const dir = artifact(`snapshots/${name}-${key}`, { state: 4096 });
    await createOverlay(base, join(dir, 'disk.qcow2'), 'raw');
    writeFileSync(
      join(dir, 'meta.json'),
      JSON.stringify({ template: name, key, dir, disk: join(dir, 'disk.qcow2') }),
    );
    return dir;
  };
  const manifest = (dir: string, kernel: string): void =>
    writeFileSync(
      join(dir, 'manifest.json'),
      JSON.stringify({ kernel: join(img, kernel, 'vmlinux'), rootfs: join(dir, 'rootfs.ext4') }),
    );

  before(async () => {
    // current
    const tcur = artifact('templates/python-tcur', { 'rootfs.ext4': 65536 });
    artifact('kernels/kcur', { vmlinux: 4096 });
    artifact('rootfs/rcur', { 'root.tar': 4096 });
    artifact(`oci/pulls/${'1'.repeat(64)}`, { 'image.json': '{}' });
    const d1 = artifact(`oci/disks/${imageDiskName(digest('1'), keys.agent ?? '', keys.kernel)}`, {
      'rootfs.ext4': 4096,
    });
    manifest(d1, 'kernels/kcur');
    mkdirSync(join(img, 'oci', 'refs'), { recursive: true });
    writeFileSync(join(img, 'oci/refs/cur.json'), JSON.stringify({ digest: digest('1') }));
    await snapshot('python', `tcur-tcg-1-256-${snapshotFormat}-abc`, join(tcur, 'rootfs.ext4'));

    // stale
    const told = artifact('templates/python-told', { 'rootfs.ext4': 1024 * 1024 });
    await snapshot('python', `told-tcg-1-256-${snapshotFormat}-abc`, join(told, 'rootfs.ext4'));
    await snapshot('python', 'tcur-tcg-1-256-0-abc', join(tcur, 'rootfs.ext4')); // an old snapshot format
    artifact('kernels/kold', { vmlinux: 8192 });
    artifact('rootfs/rold', { 'root.tar': 8192 });
    artifact(`oci/pulls/${'0'.repeat(64)}`, { 'image.json': '{}' });
    artifact(`oci/disks/${'0'.repeat(16)}-oldkey`, { 'rootfs.ext4': 8192 });
    writeFileSync(join(img, 'oci/refs/old.json'), JSON.stringify({ digest: digest('0') }));
    const oldRef = new Date(Date.now() - 40 * day);
    utimesSync(join(img, 'oci/refs/old.json'), oldRef, oldRef);
    artifact('kernels/knew.tmp-99999999', { vmlinux: 4096 }); // its builder died
    artifact('templates/python-tcur.tmp-1', { 'rootfs.ext4': 4096 }); // its builder (pid 1) lives

    // stale keys, in use
    const tchain = artifact('templates/python-tchain');
    sparse(join(tchain, 'rootfs.ext4'), 64);
    const chainSnap = await snapshot(
      'python',
      `tchain-tcg-1-256-${snapshotFormat}-abc`,
      join(tchain, 'rootfs.ext4'),
    );
    const boxDisk = artifact(`oci/disks/${'2'.repeat(16)}-boxkey`, { 'rootfs.ext4': 4096 });
    manifest(boxDisk, 'kernels/kbox');
    artifact('kernels/kbox', { vmlinux: 4096 });
    const topen = artifact('templates/python-topen', { 'rootfs.ext4': 4096 });
    const fd = openSync(join(topen, 'rootfs.ext4'), 'r');
    holders.push(spawn('sleep', ['600'], { stdio: [fd, 'ignore', 'ignore'] }));
    closeSync(fd);
    artifact('templates/python-tother', { 'rootfs.ext4': 4096 });
    const otherDisk = artifact(`oci/disks/${'3'.repeat(16)}-otherkey`, { 'rootfs.ext4': 4096 });
    // built or used recently: kept whatever its key
    artifact('templates/python-tfresh', { 'rootfs.ext4': 4096 });
    aged.pop();

    // This daemon's state: a machine whose disk is an overlay of a stale snapshot, a stopped
    // box of a stale image, an exec log no exec knows, a run dir no row knows.
    const store = new Store(join(mkdirp(state), 'hutch.db'));
    const runM = mkdirp(join(state, 'run', 'm-aaaaaaaa'));
    await createOverlay(join(chainSnap, 'disk.qcow2'), join(runM, 'disk.qcow2'), 'qcow2');
    store.insertMachine(row('m-aaaaaaaa', { run_dir: runM }), () => {});
    const runB = mkdirp(join(state, 'run', 'b-bbbbbbbb', 'execs'));
    store.insertMachine(
      row('b-bbbbbbbb', {
        kind: 'box',
        state: 'stopped',
        template: 'img',
        template_hash: 'boxkey',
        run_dir: join(state, 'run', 'b-bbbbbbbb'),
        spec: JSON.stringify({ manifest: JSON.parse(readFileSync(join(boxDisk, 'manifest.json'), 'utf8')) }),
      }),
      () => {},
    );
    store.insertExec({
      id: 'x-keep',
      box_id: 'b-bbbbbbbb',
      cmd: '["true"]',
      status: 'completed',
      exit_code: 0,
      signal: null,
      error: null,
      created_at: new Date().toISOString(),
      finished_at: null,
    });
    store.close();
    writeFileSync(join(runB, 'x-keep.ndjson'), '{}\n');
    writeFileSync(join(runB, 'x-orphan.ndjson'), 'x'.repeat(10_000));
    aged.push(join(runB, 'x-keep.ndjson'), join(runB, 'x-orphan.ndjson'));
    aged.push(mkdirp(join(state, 'run', 'm-gone')));

    // Another daemon, running a build whose template key is `tother`, with a box of its own.
    const sleeper = spawn('sleep', ['600'], { stdio: 'ignore' });
    holders.push(sleeper);
    const otherStore = new Store(join(mkdirp(other), 'hutch.db'));
    otherStore.insertMachine(
      row('b-cccccccc', {
        kind: 'box',
        state: 'stopped',
        run_dir: join(other, 'run', 'b-cccccccc'),
        spec: JSON.stringify({
          manifest: { kernel: join(img, 'kernels/kbox/vmlinux'), rootfs: join(otherDisk, 'rootfs.ext4') },
        }),
      }),
      () => {},
    );
    otherStore.close();
    registerHolder(img, other, sleeper.pid ?? 0, { ...keys, templates: { python: 'tother' } });

    const old = new Date(Date.now() - 2 * day);
    for (const p of aged) utimesSync(p, old, old);
  });
  after(() => {
    for (const h of holders) h.kill('SIGKILL');
    rmSync(root, { recursive: true, force: true });
  });

  const stale = [
    'templates/python-told',
    `snapshots/python-told-tcg-1-256-${snapshotFormat}-abc`,
    'snapshots/python-tcur-tcg-1-256-0-abc',
    'kernels/kold',
    'rootfs/rold',
    `oci/pulls/${'0'.repeat(64)}`,
    `oci/disks/${'0'.repeat(16)}-oldkey`,
    'oci/refs/old.json',
    'kernels/knew.tmp-99999999',
  ];
  const staleState = ['run/b-bbbbbbbb/execs/x-orphan.ndjson', 'run/m-gone'];
  const removedNames = (r: GcReport): string[] =>
    r.removed.map((e) => (e.path.startsWith(img) ? relative(img, e.path) : relative(state, e.path))).sort();

  test('a dry run reports exactly the unused entries, with their bytes, and removes nothing', async () => {
    const r = await collectCacheGarbage({
      imageDir: img,
      stateDir: state,
      minAgeMs: day,
      keys,
      dryRun: true,
    });
    assert.deepEqual(removedNames(r), [...stale, ...staleState].sort());
    for (const p of stale) assert.ok(existsSync(join(img, p)), p);
    const told = r.removed.find((e) => e.path.endsWith('templates/python-told'));
    // what `du` counts: the blocks the files take (1 MiB of data, plus the directory)
    const du = Number(
      execFileSync('du', ['-s', '--block-size=1', join(img, 'templates/python-told')])
        .toString()
        .split('\t')[0],
    );
    assert.equal(told?.bytes, du);
    assert.ok(du >= 1024 * 1024);
    assert.equal(r.freed.count, r.removed.length);
    assert.equal(
      r.freed.bytes,
      r.removed.reduce((s, e) => s + e.bytes, 0),
    );
    assert.equal(r.kinds.templates.removed, 1);
    assert.equal(r.kinds.templates.bytes, du);
    assert.equal(r.kinds['exec-logs'].removed, 1);
    assert.equal(r.kinds['run-dirs'].removed, 1);
    assert.equal(r.kinds['image-refs'].removed, 1);
  });

  test('each entry in use is kept, for the reason it is in use', async () => {
    const r = await collectCacheGarbage({
      imageDir: img,
      stateDir: state,
      minAgeMs: day,
      keys,
      dryRun: true,
    });
    const why = (rel: string): string | undefined => r.kept.find((k) => k.path === join(img, rel))?.reason;
    assert.equal(why('templates/python-tcur'), 'current');
    assert.equal(
      why(`snapshots/python-tcur-tcg-1-256-${snapshotFormat}-abc`),
      'a snapshot of a current template or image',
    );
    assert.match(
      why(`snapshots/python-tchain-tcg-1-256-${snapshotFormat}-abc`) ?? '',
      /used by a machine or box of .*\/state$/,
    );
    assert.match(why('templates/python-tchain') ?? '', /used by a machine or box of .*\/state$/);
    assert.match(why(`oci/disks/${'2'.repeat(16)}-boxkey`) ?? '', /used by a machine or box/);
    assert.match(why('kernels/kbox') ?? '', /used by a machine or box/);
    assert.match(why('templates/python-topen') ?? '', /^open by pid \d+$/);
    assert.match(why('templates/python-tother') ?? '', /current for the running daemon of .*other-state$/);
    assert.match(
      why(`oci/disks/${'3'.repeat(16)}-otherkey`) ?? '',
      /used by a machine or box of .*other-state$/,
    );
    assert.equal(why('templates/python-tfresh'), 'built or used recently');
  });

  test('the collection removes them; a second finds nothing', async () => {
    const r = await collectCacheGarbage({ imageDir: img, stateDir: state, minAgeMs: day, keys });
    assert.deepEqual(removedNames(r), [...stale, ...staleState].sort());
    for (const p of stale) assert.ok(!existsSync(join(img, p)), p);
    for (const p of staleState) assert.ok(!existsSync(join(state, p)), p);
    for (const k of r.kept) assert.ok(existsSync(k.path), k.path);
    assert.ok(existsSync(join(state, 'run/b-bbbbbbbb/execs/x-keep.ndjson')));
    assert.ok(existsSync(join(img, 'templates/python-tcur.tmp-1')), 'a live build is never touched');
    const again = await collectCacheGarbage({ imageDir: img, stateDir: state, minAgeMs: day, keys });
    assert.equal(again.freed.count, 0);
  });

  test('when the other daemon stops, its build keys stop counting; its boxes still do', async () => {
    for (const h of holders.splice(0)) {
      h.kill('SIGKILL');
      await new Promise((r) => h.once('exit', r));
    }
    const r = await collectCacheGarbage({ imageDir: img, stateDir: state, minAgeMs: day, keys });
    assert.deepEqual(removedNames(r), ['templates/python-topen', 'templates/python-tother']);
    assert.ok(existsSync(join(img, `oci/disks/${'3'.repeat(16)}-otherkey`)));
  });

  test('hutch cache gc --json: the report, run without a daemon', () => {
    const out = execFileSync(
      'node',
      [join(repoRoot(), 'bin', 'hutch.js'), 'cache', 'gc', '--json', '--dry-run', '--min-age', '0'],
      { env: { ...process.env, HUTCH_STATE_DIR: state, HUTCH_IMAGE_DIR: img } },
    );
    const r = JSON.parse(out.toString()) as GcReport;
    assert.deepEqual(Object.keys(r).sort(), [
      'dry_run',
      'freed',
      'image_dir',
      'kept',
      'kinds',
      'min_age_seconds',
      'removed',
      'state_dir',
      'warnings',
    ]);
    assert.equal(r.dry_run, true);
    assert.equal(r.image_dir, img);
    assert.equal(r.state_dir, state);
    assert.equal(r.min_age_seconds, 0);
    assert.deepEqual(Object.keys(r.kinds).sort(), [
      'exec-logs',
      'image-disks',
      'image-pulls',
      'image-refs',
      'kernels',
      'rootfs',
      'run-dirs',
      'snapshots',
      'templates',
    ]);
    for (const k of Object.values(r.kinds))
      assert.deepEqual(Object.keys(k).sort(), ['bytes', 'kept', 'removed']);
    // This checkout's keys are not the fake ones: with no minimum age, what no row holds goes.
    assert.ok(r.removed.some((e) => e.path === join(img, 'rootfs/rcur')));
    assert.ok(!r.removed.some((e) => e.path === join(img, 'templates/python-tchain')));
    for (const e of r.removed) {
      assert.deepEqual(Object.keys(e).sort(), ['bytes', 'kind', 'path', 'reason']);
      assert.ok(existsSync(e.path), `dry run left ${e.path}`);
    }
    const text = execFileSync(
      'node',
      [join(repoRoot(), 'bin', 'hutch.js'), 'cache', 'gc', '--dry-run', '--min-age', '0'],
      { env: { ...process.env, HUTCH_STATE_DIR: state, HUTCH_IMAGE_DIR: img } },
    ).toString();
    assert.match(text, new RegExp(`^would free [0-9.]+ MiB in ${r.freed.count} entries$`, 'm'));
  });
});

function mkdirp(dir: string): string {
  mkdirSync(dir, { recursive: true });
  return dir;
}
