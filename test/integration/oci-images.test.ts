import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { bareQemuArgs } from '../../bench/bench-lib.js';
import { isHutchError } from '../../src/errors.js';
import { connectAgent, type ExecCollectResult, type ExecRequest } from '../../src/guest/agent-connection.js';
import { type BuildParts, TemplateBuilder } from '../../src/images/builder.js';
import { type ImageManifest, ImageStore } from '../../src/images/oci.js';
import type { RootfsSpec } from '../../src/images/recipes.js';
import { contentHash } from '../../src/images/staging.js';
import { createOverlay } from '../../src/vmm/disk.js';
import { tcgTimingArgs } from '../../src/vmm/host.js';
import { imageDir, root } from '../helpers/daemon.js';
import {
  freePort,
  pushTestImage,
  startRegistry,
  type TestImageLayer,
  type TestRegistry,
} from '../helpers/registry.js';

const run = promisify(execFile);

/** debugfs's view of one path in an ext4 image, without mounting it. */
async function ext4Stat(image: string, path: string): Promise<string> {
  const r = await run('debugfs', ['-R', `stat ${path}`, image]).catch(
    (e: { stdout: string; stderr: string }) => e,
  );
  return `${r.stdout}${r.stderr}`;
}
async function ext4Cat(image: string, path: string): Promise<string> {
  return (await run('debugfs', ['-R', `cat ${path}`, image])).stdout;
}
const typeOf = async (image: string, path: string): Promise<string> => {
  const s = await ext4Stat(image, path);
  if (/File not found/.test(s)) return 'absent';
  return /Type: (\w+)/.exec(s)?.[1] ?? `?${s}`;
};

const rejectsWith = async (p: Promise<unknown>, code: string): Promise<void> => {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(isHutchError(e), String(e));
    assert.equal(e.code, code, e.message);
    return true;
  });
};

/** Boots a bare QEMU (as bench/boot.ts does) on an overlay over the image's disk and runs one command. */
async function bootAndExec(
  m: ImageManifest,
  req: ExecRequest,
  diagnostic: (msg: string) => void,
): Promise<ExecCollectResult> {
  const dir = mkdtempSync(join(tmpdir(), 'hutch-oci-boot-'));
  try {
    await createOverlay(m.rootfs, join(dir, 'disk.qcow2'), 'raw');
    const sock = join(dir, 'agent.sock');
    const cmdline = `${m.cmdline} hutch.hostname=oci ${tcgTimingArgs(m.kernelHz)}`;
    const t0 = performance.now();
    const qemu = spawn(
      'qemu-system-x86_64',
      bareQemuArgs({ kernel: m.kernel, cmdline, disk: join(dir, 'disk.qcow2'), agentSock: sock }),
      { stdio: 'ignore' },
    );
    try {
      const conn = await connectAgent(sock, { timeoutMs: 90_000 });
      diagnostic(`${m.canonical}: boot → agent answers in ${(performance.now() - t0).toFixed(0)} ms`);
      try {
        return await conn.execCollect(req, { maxOutputBytes: 4096 });
      } finally {
        conn.close();
      }
    } finally {
      qemu.kill('SIGKILL');
      if (qemu.exitCode === null && qemu.signalCode === null) await new Promise((r) => qemu.once('exit', r));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const appImage = (marker: string): TestImageLayer[] => [
  { files: { 'etc/marker': `${marker}\n`, 'etc/removed-by-layer2': 'gone\n' } },
  { whiteouts: ['/etc/removed-by-layer2'] },
  { files: { 'etc/layer2': 'two\n' }, dirs: ['work'] },
];
const appConfig = { env: ['FOO=bar baz', 'PATH=/bin'], workdir: '/work' };

describe('OCI images → root disks', () => {
  let reg: TestRegistry;
  const logs: string[] = [];
  const store = new ImageStore(imageDir, {
    insecureRegistries: ['localhost', '127.0.0.1'],
    builder: new TemplateBuilder(imageDir),
    log: (m) => logs.push(m),
  });
  let first: ImageManifest;
  // Every run pushes images with new digests: their cache entries are removed afterwards.
  const made: ImageManifest[] = [];
  const resolve = async (ref: string): Promise<ImageManifest> => {
    const m = await store.resolve(ref);
    made.push(m);
    return m;
  };

  before(async () => {
    reg = await startRegistry();
    await pushTestImage(`docker://${reg.host}/team/app:1`, appImage('one'), appConfig);
  });
  after(async () => {
    await reg?.stop();
    const oci = join(imageDir, 'oci');
    const leftovers = ['pulls', 'disks'].flatMap((d) =>
      readdirSync(join(oci, d)).filter((f) => f.includes('.tmp-')),
    );
    for (const name of ['app:1', 'arm:1', 'hostile:1', 'hostile:2'])
      rmSync(join(oci, 'refs', `${contentHash(`${reg.host}/team/${name}`)}.json`), { force: true });
    for (const m of made) {
      rmSync(join(m.rootfs, '..'), { recursive: true, force: true });
      rmSync(join(oci, 'pulls', m.digest.slice('sha256:'.length)), { recursive: true, force: true });
      rmSync(join(oci, 'refs', `${contentHash(m.canonical)}.json`), { force: true });
    }
    assert.deepEqual(leftovers, [], 'temporary build directories left behind');
  });

  test('malformed refs are rejected by resolve with INVALID_ARGUMENT', async () => {
    await rejectsWith(store.resolve('Not/A:va lid'), 'INVALID_ARGUMENT');
    await rejectsWith(store.resolve(`${reg.host}/team/app:1@sha256:xyz`), 'INVALID_ARGUMENT');
  });

  test('an unknown tag or repository is IMAGE_NOT_FOUND', async () => {
    await rejectsWith(store.resolve(`${reg.host}/team/app:nope`), 'IMAGE_NOT_FOUND');
    await rejectsWith(store.resolve(`${reg.host}/team/nothing:1`), 'IMAGE_NOT_FOUND');
  });

  test('an unreachable registry is IMAGE_PULL_FAILED, with skopeo’s error', async () => {
    const port = await freePort();
    await assert.rejects(store.resolve(`127.0.0.1:${port}/team/app:1`), (e: unknown) => {
      assert.ok(isHutchError(e));
      assert.equal(e.code, 'IMAGE_PULL_FAILED', e.message);
      assert.match(e.message, /connection refused/);
      return true;
    });
  });

  test('a pushed image becomes a disk with the agent, layers applied and its config read', async (t) => {
    const t0 = performance.now();
    first = await resolve(`${reg.host}/team/app:1`);
    t.diagnostic(`pull + unpack + assemble: ${(performance.now() - t0).toFixed(0)} ms`);
    assert.equal(first.ref, `${reg.host}/team/app:1`);
    assert.equal(first.canonical, `${reg.host}/team/app:1`);
    assert.match(first.digest, /^sha256:[a-f0-9]{64}$/);
    assert.equal(first.source, 'registry');
    assert.deepEqual(first.env, appConfig.env);
    assert.equal(first.workdir, '/work');
    assert.match(first.cmdline, / init=\/\.hutch\/hutch-agent /);
    assert.ok(first.diskSizeMb >= 1024);
    assert.equal(statSync(first.rootfs).size, first.diskSizeMb * 1024 * 1024);
    // The digest is the registry's: what the registry serves for the tag hashes to it.
    const raw = await fetch(`http://${reg.host}/v2/team/app/manifests/1`, {
      headers: { accept: 'application/vnd.oci.image.manifest.v1+json' },
    });
    assert.equal(raw.headers.get('docker-content-digest'), first.digest);

    const agent = readFileSync(join(root, 'agent', 'build', 'hutch-agent'));
    const disk = first.rootfs;
    assert.equal(await typeOf(disk, '/.hutch/hutch-agent'), 'regular');
    const agentOnDisk = Buffer.from(
      (
        await run('debugfs', ['-R', 'cat /.hutch/hutch-agent', disk], {
          encoding: 'buffer',
          maxBuffer: 1 << 24,
        })
      ).stdout,
    );
    assert.equal(
      createHash('sha256').update(agentOnDisk).digest('hex'),
      createHash('sha256').update(agent).digest('hex'),
    );
    assert.equal(await ext4Cat(disk, '/etc/marker'), 'one\n');
    assert.equal(await ext4Cat(disk, '/etc/layer2'), 'two\n');
    assert.equal(await typeOf(disk, '/etc/removed-by-layer2'), 'absent');
    assert.equal(await typeOf(disk, '/work'), 'directory');
    for (const d of ['/root', '/tmp', '/proc', '/sys', '/dev', '/run'])
      assert.equal(await typeOf(disk, d), 'directory', d);
    assert.equal(await ext4Cat(disk, '/etc/hostname'), 'hutch\n');
    assert.deepEqual(store.load(join(first.rootfs, '..', 'manifest.json'))?.digest, first.digest);
    assert.equal(store.load(join(imageDir, 'oci', 'no-such', 'manifest.json')), undefined);
    // Unpacked trees hold the image's setuid files and device nodes: only root may reach them.
    assert.equal(statSync(join(imageDir, 'oci', 'pulls')).mode & 0o777, 0o700);
  });

  test('resolving again is a cache hit; concurrent resolves share one job', async (t) => {
    const t0 = performance.now();
    const again = await resolve(`${reg.host}/team/app:1`);
    const ms = performance.now() - t0;
    t.diagnostic(`cache-hit resolve: ${ms.toFixed(0)} ms`);
    assert.equal(again.digest, first.digest);
    assert.equal(again.rootfs, first.rootfs);
    assert.equal(again.builtAt, first.builtAt);
    assert.ok(ms < 5000, `${ms} ms`);
    const before = logs.length;
    const [a, b] = await Promise.all([resolve(`${reg.host}/team/app:1`), resolve(`${reg.host}/team/app:1`)]);
    assert.equal(a.rootfs, b.rootfs);
    assert.equal(
      logs.slice(before).filter((l) => /up to date/.test(l)).length,
      1,
      logs.slice(before).join('\n'),
    );
  });

  test('a different agent binary rebuilds the disk, not the pull', async () => {
    class OtherAgent extends TemplateBuilder {
      override async prepare(rootfs?: RootfsSpec): Promise<BuildParts> {
        const p = await super.prepare(rootfs);
        const bytes = Buffer.concat([p.agent.bytes, Buffer.from('\0another build')]);
        return { ...p, agent: { ...p.agent, bytes, hash: contentHash(bytes) } };
      }
    }
    const seen: string[] = [];
    const other = new ImageStore(imageDir, {
      insecureRegistries: ['127.0.0.1'],
      builder: new OtherAgent(imageDir),
      log: (m) => seen.push(m),
    });
    const m = await other.resolve(`${reg.host}/team/app:1`);
    made.push(m);
    assert.equal(m.digest, first.digest);
    assert.notEqual(m.rootfs, first.rootfs);
    assert.ok(
      seen.some((l) => /already pulled/.test(l)),
      seen.join('\n'),
    );
    assert.ok(!seen.some((l) => /^pulling/.test(l)), seen.join('\n'));
  });

  test('an image for another architecture is IMAGE_PULL_FAILED', async () => {
    await pushTestImage(`docker://${reg.host}/team/arm:1`, [], { architecture: 'arm64' });
    await assert.rejects(store.resolve(`${reg.host}/team/arm:1`), (e: unknown) => {
      assert.ok(isHutchError(e));
      assert.equal(e.code, 'IMAGE_PULL_FAILED', e.message);
      assert.match(e.message, /arm64/);
      return true;
    });
  });

  test('a disk can be booted and its agent answers', async (t) => {
    const r = await bootAndExec(
      first,
      { argv: ['/bin/sh', '-c', 'cat /etc/marker; echo "$FOO"; pwd'], env: { FOO: 'bar baz' }, cwd: '/work' },
      t.diagnostic.bind(t),
    );
    assert.equal(r.exitCode, 0, r.stderr.toString());
    assert.equal(r.stdout.toString(), 'one\nbar baz\n/work\n');
  });

  test('a changed image pushed under the same tag resolves to a new digest', async () => {
    await pushTestImage(`docker://${reg.host}/team/app:1`, appImage('changed'), appConfig);
    const m = await resolve(`${reg.host}/team/app:1`);
    assert.notEqual(m.digest, first.digest);
    assert.notEqual(m.rootfs, first.rootfs);
    assert.equal(await ext4Cat(m.rootfs, '/etc/marker'), 'changed\n');
    first = m;
  });

  test('a hostile image cannot make the host write outside the staging tree', async () => {
    const canary = mkdtempSync(join(tmpdir(), 'hutch-canary-'));
    const shadow = readFileSync('/etc/shadow');
    const shadowMtime = statSync('/etc/shadow').mtimeMs;
    const usrSbin = readdirSync('/usr/sbin').sort();
    try {
      const up = '../'.repeat(20);
      await pushTestImage(`docker://${reg.host}/team/hostile:1`, [
        {
          files: {
            'etc/hostname': { symlink: '/etc/shadow' },
            'etc/hosts': { symlink: `${up}${canary.slice(1)}/hosts` },
            'etc/resolv.conf': { symlink: `${canary}/resolv.conf` },
            'etc/machine-id': { symlink: `${canary}/machine-id` },
            sbin: { symlink: '/usr/sbin' },
            '.hutch': { symlink: canary },
            tmp: { symlink: canary },
            root: { symlink: '/root' },
            run: { symlink: `${up}${canary.slice(1)}` },
          },
        },
      ]);
      await pushTestImage(`docker://${reg.host}/team/hostile:2`, [
        {
          files: {
            etc: { symlink: canary },
            dev: { symlink: '/dev' },
            '.hutch/hutch-agent': 'not the agent',
          },
        },
      ]);
      const one = await resolve(`${reg.host}/team/hostile:1`);
      const two = await resolve(`${reg.host}/team/hostile:2`);
      assert.deepEqual(readdirSync(canary), []);
      assert.ok(readFileSync('/etc/shadow').equals(shadow));
      assert.equal(statSync('/etc/shadow').mtimeMs, shadowMtime);
      assert.deepEqual(readdirSync('/usr/sbin').sort(), usrSbin);
      for (const m of [one, two]) {
        assert.equal(await typeOf(m.rootfs, '/.hutch'), 'directory');
        assert.equal(await typeOf(m.rootfs, '/.hutch/hutch-agent'), 'regular');
        for (const d of ['/root', '/tmp', '/proc', '/sys', '/dev', '/run'])
          assert.equal(await typeOf(m.rootfs, d), 'directory', d);
      }
      // Symlinks we write over are replaced by files; the rest of the image is left as it is.
      assert.equal(await ext4Cat(one.rootfs, '/etc/hostname'), 'hutch\n');
      assert.equal(await typeOf(one.rootfs, '/etc/hosts'), 'regular');
      assert.equal(await typeOf(one.rootfs, '/sbin'), 'symlink');
      assert.equal(await typeOf(two.rootfs, '/etc'), 'symlink');
      assert.ok((await ext4Cat(two.rootfs, '/.hutch/hutch-agent')).length > 10_000);
    } finally {
      rmSync(canary, { recursive: true, force: true });
    }
  });

  test('when the registry is unreachable, a ref resolved before is served from the cache', async () => {
    await reg.stop();
    const before = logs.length;
    const m = await resolve(`${reg.host}/team/app:1`);
    assert.equal(m.digest, first.digest);
    assert.equal(m.rootfs, first.rootfs);
    assert.ok(
      logs.slice(before).some((l) => /unreachable/.test(l)),
      logs.slice(before).join('\n'),
    );
    await rejectsWith(store.resolve(`${reg.host}/team/never-pulled:1`), 'IMAGE_PULL_FAILED');
  });
});

describe('local images (built offline from Debian packages)', () => {
  test('debian:bookworm and its aliases are one locally built disk', async (t) => {
    const logs: string[] = [];
    const store = new ImageStore(imageDir, {
      insecureRegistries: [],
      builder: new TemplateBuilder(imageDir),
      log: (m) => logs.push(m),
    });
    const t0 = performance.now();
    const m = await store.resolve('debian:bookworm');
    t.diagnostic(`debian:bookworm resolve: ${(performance.now() - t0).toFixed(0)} ms\n${logs.join('\n')}`);
    assert.equal(m.source, 'local');
    assert.equal(m.canonical, 'docker.io/library/debian:bookworm');
    assert.match(m.digest, /^sha256:[a-f0-9]{64}$/);
    assert.ok(m.env.some((e) => e.startsWith('PATH=')));
    assert.equal(m.workdir, null);
    for (const alias of ['debian:12', 'debian:bookworm-slim', 'debian:latest', 'debian']) {
      const a = await store.resolve(alias);
      assert.equal(a.ref, alias);
      assert.equal(a.rootfs, m.rootfs, alias);
    }
    assert.equal(await typeOf(m.rootfs, '/.hutch/hutch-agent'), 'regular');
    assert.equal(await typeOf(m.rootfs, '/usr/bin/bash'), 'regular');
    assert.equal(await typeOf(m.rootfs, '/usr/bin/ps'), 'regular');
    assert.equal(await typeOf(m.rootfs, '/etc/ssl/certs'), 'directory');
    const r = await bootAndExec(
      m,
      { argv: ['/usr/bin/bash', '-c', 'ps -o comm= -p 1; id -un'] },
      t.diagnostic.bind(t),
    );
    assert.equal(r.exitCode, 0, r.stderr.toString());
    assert.equal(r.stdout.toString(), 'hutch-agent\nroot\n');
  });
});
