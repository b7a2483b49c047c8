/**
 * The volume code on the host, without machines: a "guest" whose tar is the host's GNU tar run
 * in a temporary directory, against the local store and an S3 server (s3rver) — saves and
 * restores round-trip exactly, hostile archives are refused with the previous version intact,
 * uploads and downloads are byte-exact, and the collector removes what no version references.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  linkSync,
  mkdirSync,
  mkdtempSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { HutchError } from '../../src/errors.js';
import type { GuestProcess } from '../../src/guest/guest-ops.js';
import type { BlobStore } from '../../src/storage/volumes/blob-store.js';
import type { TarGuest } from '../../src/storage/volumes/guest-tar.js';
import { LocalStore } from '../../src/storage/volumes/local-store.js';
import { S3Store } from '../../src/storage/volumes/s3-store.js';
import { VolumeService } from '../../src/storage/volumes/volume-service.js';
import { type S3Server, startS3Server } from '../helpers/s3-server.js';

/** A guest whose /root is `dir` on the host (argv's "/root" is replaced), or whose tar is `fake`. */
function hostGuest(dir: string, fake?: string[]): TarGuest {
  return {
    exec: async (req) => {
      const argv = fake ?? req.argv.map((a) => (a === '/root' ? dir : a));
      const child = spawn(argv[0] as string, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
      const exit = new Promise<{ exitCode: number | null; signal: number | null; timedOut: boolean }>(
        (resolve) => child.on('close', (code) => resolve({ exitCode: code, signal: null, timedOut: false })),
      );
      child.stdin.on('error', () => {});
      if (!req.stdin) child.stdin.end();
      const p: GuestProcess = {
        write: (data) =>
          new Promise((resolve, reject) => child.stdin.write(data, (e) => (e ? reject(e) : resolve()))),
        end: async () => {
          child.stdin.end();
        },
        resize: () => {},
        cancel: () => child.kill('SIGKILL'),
        run: async (onOutput) => {
          const pump = async (r: Readable, s: 'stdout' | 'stderr'): Promise<void> => {
            for await (const c of r as AsyncIterable<Buffer>) await onOutput(s, c);
          };
          const [r] = await Promise.all([exit, pump(child.stdout, 'stdout'), pump(child.stderr, 'stderr')]);
          return { ...r, durationMs: 0 } as never;
        },
      };
      return p;
    },
  };
}

const noLog = (): void => {};

function service(store: BlobStore, over: Partial<{ maxBytes: number; graceMs: number }> = {}): VolumeService {
  return new VolumeService(
    store,
    {
      maxBytes: over.maxBytes ?? 1024 ** 3,
      maxFiles: 10_000,
      maxPerUser: 5,
      ttlDefaultSeconds: 3600,
      ttlMinSeconds: 60,
      ttlMaxSeconds: 86400,
    },
    { intervalMs: 60_000, graceMs: over.graceMs ?? 60_000 },
    noLog,
  );
}

/** A tree with every kind of thing a save must keep exactly. */
function makeTree(dir: string): void {
  mkdirSync(join(dir, 'a/b/c'), { recursive: true });
  mkdirSync(join(dir, 'empty'));
  writeFileSync(join(dir, 'secret'), 'shh');
  chmodSync(join(dir, 'secret'), 0o600);
  writeFileSync(join(dir, 'a/run.sh'), '#!/bin/sh\necho hi\n');
  chmodSync(join(dir, 'a/run.sh'), 0o755);
  writeFileSync(join(dir, 'a/b/suid'), 'x');
  chmodSync(join(dir, 'a/b/suid'), 0o4755);
  writeFileSync(join(dir, 'zero'), '');
  chmodSync(join(dir, 'zero'), 0o000);
  writeFileSync(join(dir, 'big'), randomBytes(6 * 1024 * 1024 + 123));
  linkSync(join(dir, 'big'), join(dir, 'a/big-link'));
  symlinkSync('/etc/passwd', join(dir, 'passwd-link'));
  symlinkSync('../secret', join(dir, 'a/rel-link'));
  writeFileSync(join(dir, 'a/b/c/owned'), 'mine');
  chownSync(join(dir, 'a/b/c/owned'), 1234, 4321);
  writeFileSync(join(dir, `${'n'.repeat(120)}-long-name`), 'long');
  writeFileSync(join(dir, 'ünïcødé'), 'u');
  execFileSync('touch', ['-d', '2001-02-03 04:05:06', join(dir, 'secret')]);
}

/** What must match after a round trip: every entry's type, mode, owner, size, link target, mtime, content. */
function describeTree(dir: string): string {
  const list = execFileSync('find', ['.', '-mindepth', '1', '-printf', '%p %y %m %U %G %l %T@\\n'], {
    cwd: dir,
  })
    .toString()
    .split('\n')
    .filter(Boolean)
    // Directory mtimes change when tar fills them; symlink mtimes are not restored by GNU tar.
    .map((l) => (/ [dl] /.test(l) ? l.replace(/ \S+$/, '') : l.replace(/\.\d+$/, '')))
    .sort();
  const sums = execFileSync('sh', ['-c', 'find . -type f -print0 | sort -z | xargs -0 sha256sum'], {
    cwd: dir,
  }).toString();
  const sizes = execFileSync('find', ['.', '-type', 'f', '-printf', '%p %s\\n'], { cwd: dir })
    .toString()
    .split('\n')
    .sort();
  return `${list.join('\n')}\n${sums}\n${sizes.join('\n')}`;
}

async function text(s: Readable): Promise<Buffer> {
  const out: Buffer[] = [];
  for await (const c of s as AsyncIterable<Buffer>) out.push(c);
  return Buffer.concat(out);
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'ok';
  } catch (e) {
    return e instanceof HutchError ? e.code : `thrown: ${(e as Error).message}`;
  }
}

const backends: { name: string; open: () => Promise<{ store: BlobStore; close: () => Promise<void> }> }[] = [
  {
    name: 'local',
    open: async () => {
      const dir = mkdtempSync(join(tmpdir(), 'hutch-vol-unit-'));
      return { store: new LocalStore(dir), close: async () => rmSync(dir, { recursive: true, force: true }) };
    },
  },
  {
    name: 's3',
    open: async () => {
      const s3: S3Server = await startS3Server();
      return {
        store: new S3Store({
          endpoint: s3.url,
          bucket: s3.bucket,
          region: 'us-east-1',
          accessKeyId: 'S3RVER',
          secretAccessKey: 'S3RVER',
          forcePathStyle: true,
          prefix: 'unit/volumes/',
          maxAttempts: 2,
          partBytes: 5 * 1024 * 1024,
          timeoutMs: 10_000,
        }),
        close: () => s3.stop(),
      };
    },
  },
];

for (const b of backends) {
  describe(`volumes on the ${b.name} store (host tar)`, () => {
    let store: BlobStore;
    let close: () => Promise<void>;
    let work: string;
    before(async () => {
      ({ store, close } = await b.open());
      work = mkdtempSync(join(tmpdir(), 'hutch-vol-tree-'));
    });
    after(async () => {
      await close();
      rmSync(work, { recursive: true, force: true });
    });

    test('save then restore round-trips modes, owners, links, mtimes and bytes', async () => {
      const svc = service(store);
      const src = join(work, 'src');
      const dst = join(work, 'dst');
      mkdirSync(src);
      mkdirSync(dst);
      makeTree(src);
      const v = await svc.create('alice');
      const saved = await svc.save('alice', v.id, hostGuest(src));
      assert.equal(saved.volume.generation, 1);
      assert.equal(saved.files, 9, JSON.stringify(saved));
      const lease = await svc.lease('alice', v.id);
      try {
        await svc.restore(lease, hostGuest(dst));
      } finally {
        lease.release();
      }
      assert.equal(describeTree(dst), describeTree(src));
      const files = await svc.files('alice', v.id);
      assert.equal(files.find((f) => f.path === 'a/b/suid')?.mode, '4755');
      assert.equal(files.find((f) => f.path === 'passwd-link')?.target, '/etc/passwd');
      assert.equal(files.find((f) => f.path === 'a/b/c/owned')?.uid, 1234);
      // Another user sees nothing.
      assert.equal(await code(svc.get('bob', v.id)), 'VOLUME_NOT_FOUND');
    });

    test('a hostile archive is refused and the previous version is kept', async () => {
      const svc = service(store);
      const v = await svc.create('alice');
      await svc.putFile('alice', v.id, 'keep.txt', Readable.from([Buffer.from('keep')]));
      const evil = join(work, 'evil.tar');
      execFileSync('python3', [
        '-c',
        `import tarfile, io
t = tarfile.open(${JSON.stringify(evil)}, 'w')
i = tarfile.TarInfo('../evil'); d = b'pwned'; i.size = len(d); t.addfile(i, io.BytesIO(d)); t.close()`,
      ]);
      for (const fake of [
        ['cat', evil],
        ['sh', '-c', 'printf "not a tar at all, just some bytes that go on and on"'],
        ['sh', '-c', 'echo broken >&2; exit 2'],
      ]) {
        assert.equal(
          await code(svc.save('alice', v.id, hostGuest(work, fake))),
          'VOLUME_SAVE_FAILED',
          fake.join(' '),
        );
        const files = await svc.files('alice', v.id);
        assert.deepEqual(
          files.map((f) => f.path),
          ['keep.txt'],
        );
      }
    });

    test('put and get are byte-exact; bad paths change nothing', async () => {
      const svc = service(store, { maxBytes: 20 * 1024 * 1024 });
      const v = await svc.create('alice');
      const data = randomBytes(12 * 1024 * 1024 + 7);
      const r = await svc.putFile(
        'alice',
        v.id,
        '/dir/sub/data.bin',
        Readable.from([data.subarray(0, 5e6), data.subarray(5e6)]),
        {
          mode: 0o640,
        },
      );
      assert.equal(r.size, data.length);
      const f = await svc.openFile('alice', v.id, 'dir/sub/data.bin');
      const got = await text(f.stream);
      assert.equal(
        createHash('sha256').update(got).digest('hex'),
        createHash('sha256').update(data).digest('hex'),
      );
      for (const bad of ['../x', 'a/../../b', 'a\0b', '', '/', '.'])
        assert.equal(
          await code(svc.putFile('alice', v.id, bad, Readable.from([Buffer.from('x')]))),
          'INVALID_ARGUMENT',
          bad,
        );
      assert.equal(
        await code(svc.putFile('alice', v.id, 'dir/sub/data.bin/under', Readable.from([Buffer.from('x')]))),
        'INVALID_ARGUMENT',
      );
      assert.equal(
        await code(svc.putFile('alice', v.id, 'dir', Readable.from([Buffer.from('x')]))),
        'NOT_A_FILE',
      );
      assert.equal(await code(svc.openFile('alice', v.id, 'dir')), 'NOT_A_FILE');
      assert.equal(await code(svc.openFile('alice', v.id, 'nope')), 'FILE_NOT_FOUND');
      assert.equal(
        await code(svc.putFile('alice', v.id, 'too-big', Readable.from([randomBytes(9 * 1024 * 1024)]))),
        'VOLUME_TOO_LARGE',
      );
      const after = await svc.get('alice', v.id);
      assert.equal(after.generation, 1);
      assert.equal(after.bytes, data.length);
      assert.deepEqual(
        (await svc.files('alice', v.id)).map((x) => `${x.path} ${x.type} ${x.mode}`),
        ['dir dir 0755', 'dir/sub dir 0755', 'dir/sub/data.bin file 0640'],
      );
    });

    test('the collector removes unreferenced segments and expired volumes', async () => {
      const svc = service(store, { graceMs: 1000 });
      const v = await svc.create('carol', 60);
      await svc.putFile('carol', v.id, 'f', Readable.from([Buffer.from('one')]));
      await svc.putFile('carol', v.id, 'f', Readable.from([Buffer.from('two')]));
      // A segment of an interrupted write.
      await store.put(`${v.id}/seg/aaaaaaaa`, Readable.from([Buffer.from('junk')]));
      await new Promise((r) => setTimeout(r, 2100));
      await svc.collect();
      const left = (await store.list(`${v.id}/`)).objects.map((o) => o.key).sort();
      assert.equal(left.length, 3, left.join(' '));
      assert.equal((await text((await svc.openFile('carol', v.id, 'f')).stream)).toString(), 'two');
      // Expired: made to look so by its metadata.
      const meta = JSON.parse((await store.getSmall(`${v.id}/volume.json`)).toString());
      meta.expires_at = new Date(Date.now() - 1000).toISOString();
      await store.putSmall(`${v.id}/volume.json`, Buffer.from(JSON.stringify(meta)));
      const fresh = service(store, { graceMs: 1000 });
      const r = await fresh.collect();
      assert.ok(r.volumes >= 1);
      assert.equal((await store.list(`${v.id}/`)).objects.length, 0);
      assert.equal(await code(fresh.get('carol', v.id)), 'VOLUME_NOT_FOUND');
    });
  });
}
