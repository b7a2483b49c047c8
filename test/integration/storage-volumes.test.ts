/**
 * Persistent volumes against the real daemon and real machines, the same cases on both
 * backends: the local directory (on a small loop-mounted ext4, so it can be filled) and S3
 * (s3rver in its own process behind a proxy that can fail requests; test/helpers/s3-server.ts).
 * Metadata, listing, ownership, byte-exact uploads and downloads, refused paths, TTL
 * collection, a machine's /root saved and restored exactly (modes, setuid, owners, symlinks out
 * of /root, empty and nested directories, a 20 MiB file), versions replaced whole, restores
 * during a save, a hostile guest tar, and the store failing: full disk, S3 killed mid-upload,
 * S3 answering 503s and resets (retried).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { authed, runHutch, userWithToken } from '../helpers/accounts.js';
import { api, cleanup, sleep, startDaemon, type TestDaemon, waitFor } from '../helpers/daemon.js';
import { type S3Server, startS3Server } from '../helpers/s3-server.js';
import { getFileSha, patternChunks, patternSha, putFile } from '../helpers/volume-client.js';

const MiB = 1024 * 1024;

/** What a machine's /root is, for comparing two machines: entries with attributes, sizes, hashes. */
const listing =
  "cd /root && find . -mindepth 1 -printf '%p %y %m %U %G %l\\n' | LC_ALL=C sort && " +
  "find . -type f -printf '%p %s\\n' | LC_ALL=C sort && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum";

const tree1 = [
  'cd /root',
  'mkdir -p nested/deep/er empty',
  'printf secret > s600 && chmod 600 s600',
  "printf '#!/bin/sh\\necho hi\\n' > x755 && chmod 755 x755",
  'printf suid > suid && chmod 4755 suid',
  'ln -s /etc/passwd passwd-link && ln -s nested/deep rel-link',
  'head -c 20971520 /dev/urandom > big && ln big big-hard',
  'printf owned > owned && chown 1234:1234 owned',
  'echo deep > nested/deep/er/f && chmod 0750 nested/deep',
  "touch -d '2001-02-03 04:05:06' s600",
].join(' && ');

async function exec(d: TestDaemon, id: string, cmd: string): Promise<string> {
  const r = await api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: 300_000 });
  assert.equal(r.body.exit_code, 0, `${cmd.slice(0, 100)}: ${JSON.stringify(r.body).slice(0, 600)}`);
  return String(r.body.stdout);
}

async function newMachine(
  d: TestDaemon,
  volume?: string,
): Promise<{ status: number; body: Record<string, unknown> }> {
  return api(d.url, 'POST', '/v1/machines', {
    template: 'python',
    ttl_seconds: 900,
    ...(volume ? { volume } : {}),
  });
}

async function machine(d: TestDaemon, volume?: string): Promise<string> {
  const r = await newMachine(d, volume);
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return String(r.body.id);
}

async function save(
  d: TestDaemon,
  id: string,
  vol: string,
): Promise<{ status: number; body: Record<string, unknown> }> {
  return api(d.url, 'POST', `/v1/machines/${id}/save?volume=${vol}`);
}

async function volume(d: TestDaemon, ttl?: number): Promise<string> {
  const r = await api(d.url, 'POST', '/v1/volumes', ttl ? { ttl_seconds: ttl } : {});
  assert.equal(r.status, 201, JSON.stringify(r.body));
  return String(r.body.id);
}

async function files(d: TestDaemon, vol: string): Promise<string[]> {
  const r = await api(d.url, 'GET', `/v1/volumes/${vol}/files`);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return (r.body.files as { path: string; type: string; mode: string; size: number }[]).map(
    (f) => `${f.path} ${f.type} ${f.mode} ${f.size}`,
  );
}

interface Backend {
  name: 'local' | 's3';
  setup(): Promise<Record<string, string>>;
  teardown(): Promise<void>;
}

let s3: S3Server | undefined;
let mnt = '';

const backends: Backend[] = [
  {
    name: 'local',
    // The volume directory on its own small filesystem: the full-disk case fills it.
    setup: async () => {
      const base = mkdtempSync(join(tmpdir(), 'hutch-volfs-'));
      mnt = join(base, 'mnt');
      mkdirSync(mnt);
      execFileSync('truncate', ['-s', String(300 * MiB), join(base, 'fs.img')]);
      execFileSync('mkfs.ext4', ['-q', '-F', '-m', '0', join(base, 'fs.img')]);
      execFileSync('mount', ['-o', 'loop', join(base, 'fs.img'), mnt]);
      return { HUTCH_VOLUME_DIR: join(mnt, 'volumes') };
    },
    teardown: async () => {
      if (!mnt) return;
      execFileSync('umount', ['-l', mnt]);
      rmSync(join(mnt, '..'), { recursive: true, force: true });
    },
  },
  {
    name: 's3',
    setup: async () => {
      s3 = await startS3Server();
      return {
        HUTCH_VOLUME_BACKEND: 's3',
        HUTCH_S3_ENDPOINT: s3.url,
        HUTCH_S3_BUCKET: s3.bucket,
        HUTCH_S3_ACCESS_KEY_ID: 'S3RVER',
        HUTCH_S3_SECRET_ACCESS_KEY: 'S3RVER',
        HUTCH_S3_PREFIX: 'test',
        HUTCH_S3_PART_BYTES: String(5 * MiB),
        HUTCH_S3_MAX_ATTEMPTS: '4',
        HUTCH_S3_TIMEOUT_MS: '5000',
      };
    },
    teardown: async () => {
      await s3?.stop();
    },
  },
];

for (const b of backends) {
  describe(`persistent volumes (${b.name} store)`, () => {
    let d: TestDaemon;
    let expiring = '';
    let expiringAt = 0;
    let a = '';
    let vol = '';
    let listing1 = '';

    before(async () => {
      const env = await b.setup();
      d = await startDaemon({
        env: {
          ...env,
          HUTCH_VOLUME_GC_INTERVAL_MS: '1000',
          HUTCH_VOLUME_GC_GRACE_MS: '1000',
          HUTCH_VOLUME_MAX_BYTES: String(200 * MiB),
        },
      });
      // Made first: its 60 s TTL runs out while the rest of the suite runs.
      expiring = await volume(d, 60);
      expiringAt = Date.now();
      await putFile(d.url, expiring, 'x', [Buffer.from('soon gone')]);
    });
    after(async () => {
      try {
        if (d) await cleanup(d);
      } finally {
        await b.teardown();
      }
    });

    test('create, get, list, delete; ttl checked', async () => {
      const v = await api(d.url, 'POST', '/v1/volumes', { ttl_seconds: 3600 });
      assert.equal(v.status, 201, JSON.stringify(v.body));
      const id = String(v.body.id);
      assert.match(id, /^vol-[a-z2-7]{26}$/);
      assert.equal(v.body.bytes, 0);
      assert.equal(v.body.files, 0);
      assert.equal(v.body.ttl_seconds, 3600);
      const g = await api(d.url, 'GET', `/v1/volumes/${id}`);
      assert.equal(g.status, 200);
      assert.equal(g.body.expires_at, v.body.expires_at);
      const l = await api(d.url, 'GET', '/v1/volumes');
      assert.ok((l.body.volumes as { id: string }[]).some((x) => x.id === id));
      for (const bad of [59, 366 * 86400, 1.5, 'x', -1]) {
        const r = await api(d.url, 'POST', '/v1/volumes', { ttl_seconds: bad });
        assert.equal(r.status, 400, `${bad}: ${JSON.stringify(r.body)}`);
      }
      assert.equal((await api(d.url, 'DELETE', `/v1/volumes/${id}`)).status, 204);
      assert.equal((await api(d.url, 'GET', `/v1/volumes/${id}`)).body.code, 'VOLUME_NOT_FOUND');
      assert.equal((await api(d.url, 'DELETE', `/v1/volumes/${id}`)).status, 404);
    });

    test('a 40 MiB upload and download are byte-exact (multipart on S3); files list', async () => {
      const id = await volume(d);
      const size = 40 * MiB + 17;
      const before = s3?.requests() ?? 0;
      const r = await putFile(d.url, id, '/data/big.bin', patternChunks(size, 'big'), {
        query: '&mode=0640',
      });
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.equal(r.body.size, size);
      if (s3) assert.ok(s3.requests() - before >= 9, `multipart: ${s3.requests() - before} requests`);
      const g = await getFileSha(d.url, id, 'data/big.bin');
      assert.equal(g.status, 200);
      assert.equal(g.length, String(size));
      assert.equal(g.sha, patternSha(size, 'big'));
      await putFile(d.url, id, 'data/empty', []);
      const e = await getFileSha(d.url, id, 'data/empty');
      assert.equal(e.status, 200);
      assert.equal(e.bytes, 0);
      assert.deepEqual(await files(d, id), [
        'data dir 0755 0',
        `data/big.bin file 0640 ${size}`,
        'data/empty file 0644 0',
      ]);
      const v = await api(d.url, 'GET', `/v1/volumes/${id}`);
      assert.equal(v.body.bytes, size);
      assert.equal(v.body.files, 2);
      assert.equal(v.body.generation, 2);
      assert.equal((await getFileSha(d.url, id, 'data')).status, 409);
      assert.equal((await getFileSha(d.url, id, 'nope')).status, 404);
    });

    test('bad paths are refused with 400 and change nothing', async () => {
      const id = await volume(d);
      await putFile(d.url, id, 'ok', [Buffer.from('ok')]);
      for (const bad of ['../x', 'a/../../b', 'a\0b', '', '/', '..', 'ok/under']) {
        const r = await putFile(d.url, id, bad, [Buffer.from('evil')]);
        assert.equal(r.status, 400, `${JSON.stringify(bad)}: ${JSON.stringify(r.body)}`);
        assert.equal(r.body.code, 'INVALID_ARGUMENT');
      }
      assert.equal((await putFile(d.url, id, 'x', [Buffer.from('x')], { query: '&mode=999' })).status, 400);
      assert.deepEqual(await files(d, id), ['ok file 0644 2']);
      assert.equal((await api(d.url, 'GET', `/v1/volumes/${id}`)).body.generation, 1);
      // A leading "/" is the volume root.
      assert.equal((await putFile(d.url, id, '//a/./b', [Buffer.from('b')])).status, 200);
      assert.deepEqual(await files(d, id), ['ok file 0644 2', 'a dir 0755 0', 'a/b file 0644 1']);
    });

    test("another user's volume is VOLUME_NOT_FOUND everywhere", async () => {
      const id = await volume(d);
      await putFile(d.url, id, 'f', [Buffer.from('mine')]);
      const bob = await userWithToken(d, `bob-${b.name}`);
      const t = { token: bob.token };
      for (const [method, path] of [
        ['GET', `/v1/volumes/${id}`],
        ['DELETE', `/v1/volumes/${id}`],
        ['GET', `/v1/volumes/${id}/files`],
        ['GET', `/v1/volumes/${id}/file?path=f`],
      ] as const) {
        const r = await authed(d.url, method, path, t);
        assert.equal(r.status, 404, `${method} ${path}: ${JSON.stringify(r.body)}`);
        assert.equal(r.body.code, 'VOLUME_NOT_FOUND');
      }
      const p = await putFile(d.url, id, 'g', [Buffer.from('x')], {
        headers: { authorization: `Bearer ${bob.token}` },
      });
      assert.equal(p.status, 404);
      assert.deepEqual(((await authed(d.url, 'GET', '/v1/volumes', t)).body.volumes as unknown[]).length, 0);
      const m = await authed(d.url, 'POST', '/v1/machines', t, { template: 'python', volume: id });
      assert.equal(m.status, 404, JSON.stringify(m.body));
      assert.equal(m.body.code, 'VOLUME_NOT_FOUND');
      assert.equal((await getFileSha(d.url, id, 'f')).status, 200);
    });

    test("a machine's /root round-trips exactly through save and restore", async () => {
      a = await machine(d);
      await exec(d, a, tree1);
      listing1 = await exec(d, a, listing);
      assert.match(listing1, /\.\/suid f 4755 0 0/);
      assert.match(listing1, /\.\/owned f 644 1234 1234/);
      assert.match(listing1, /\.\/passwd-link l 777 0 0 \/etc\/passwd/);
      vol = await volume(d);
      const s = await save(d, a, vol);
      assert.equal(s.status, 200, JSON.stringify(s.body));
      assert.equal((s.body.volume as { generation: number }).generation, 1);
      assert.ok(Number(s.body.bytes) >= 40 * MiB, JSON.stringify(s.body));
      const t0 = Date.now();
      const m = await newMachine(d, vol);
      assert.equal(m.status, 201, JSON.stringify(m.body));
      console.log(`restore create: ${Date.now() - t0} ms, save ${s.body.duration_ms} ms`);
      const bm = String(m.body.id);
      assert.equal(await exec(d, bm, listing), listing1);
      // The symlink out of /root is a symlink in the guest, never followed on the host.
      assert.equal((await exec(d, bm, 'readlink /root/passwd-link')).trim(), '/etc/passwd');
      await api(d.url, 'DELETE', `/v1/machines/${bm}`);
    });

    test('a second save replaces the version; a restore during a save sees one version whole', async () => {
      await exec(
        d,
        a,
        'cd /root && rm -rf nested empty && echo two > gen2 && chmod 700 gen2 && head -c 5000000 /dev/urandom > big',
      );
      const listing2 = await exec(d, a, listing);
      const saving = save(d, a, vol);
      // Restores while the save runs (and one just after it started).
      const during = [];
      for (let i = 0; i < 2; i++) {
        during.push(newMachine(d, vol));
        await sleep(300);
      }
      const s = await saving;
      assert.equal(s.status, 200, JSON.stringify(s.body));
      assert.equal((s.body.volume as { generation: number }).generation, 2);
      for (const p of during) {
        const m = await p;
        assert.equal(m.status, 201, JSON.stringify(m.body));
        const got = await exec(d, String(m.body.id), listing);
        assert.ok(got === listing1 || got === listing2, `a restore saw a mix:\n${got}`);
        await api(d.url, 'DELETE', `/v1/machines/${m.body.id}`);
      }
      const c = await machine(d, vol);
      assert.equal(await exec(d, c, listing), listing2);
      await api(d.url, 'DELETE', `/v1/machines/${c}`);
      const f = await files(d, vol);
      assert.ok(f.includes('gen2 file 0700 4'), f.join('\n'));
      assert.ok(!f.some((x) => x.startsWith('nested')));
    });

    test('a hostile tar in the guest fails the save clearly; the host and the version are untouched', async () => {
      const h = await machine(d);
      const before = await files(d, vol);
      const gen = (await api(d.url, 'GET', `/v1/volumes/${vol}`)).body.generation;
      await exec(
        d,
        h,
        `python3 -c "
import tarfile, io
t = tarfile.open('/tmp/evil.tar', 'w')
for name in ['ok', '../evil', '/etc/evil']:
    i = tarfile.TarInfo(name); data = b'pwned'; i.size = len(data); t.addfile(i, io.BytesIO(data))
t.close()" && mv /usr/bin/tar /usr/bin/tar.real && printf '#!/bin/sh\\ncat /tmp/evil.tar\\n' > /usr/bin/tar && chmod 755 /usr/bin/tar`,
      );
      const s = await save(d, h, vol);
      assert.equal(s.status, 422, JSON.stringify(s.body));
      assert.equal(s.body.code, 'VOLUME_SAVE_FAILED');
      assert.match(String(s.body.message), /\.\.\/evil/);
      // Not tar at all, and a tar that fails.
      await exec(d, h, "printf '#!/bin/sh\\nhead -c 100000 /dev/urandom\\n' > /usr/bin/tar");
      assert.equal((await save(d, h, vol)).body.code, 'VOLUME_SAVE_FAILED');
      await exec(d, h, "printf '#!/bin/sh\\necho nope >&2; exit 2\\n' > /usr/bin/tar");
      const f = await save(d, h, vol);
      assert.equal(f.body.code, 'VOLUME_SAVE_FAILED');
      assert.match(String(f.body.message), /nope/);
      assert.deepEqual(await files(d, vol), before);
      assert.equal((await api(d.url, 'GET', `/v1/volumes/${vol}`)).body.generation, gen);
      for (const p of ['/evil', '/etc/evil', join(d.stateDir, '..', 'evil')])
        assert.throws(() => readFileSync(p), `${p} must not exist`);
      await api(d.url, 'DELETE', `/v1/machines/${h}`);
    });

    test('a restore that fails destroys the new machine and answers the error', async () => {
      const id = await volume(d);
      await putFile(d.url, id, 'f', [Buffer.from('lost bytes')]);
      const count = ((await api(d.url, 'GET', '/v1/machines')).body.machines as unknown[]).length;
      // The file's segment disappears from the store (a broken store, or S3 gone).
      if (b.name === 'local') execFileSync('sh', ['-c', `rm -f ${join(mnt, 'volumes', id, 'seg')}/*`]);
      else await (s3 as S3Server).kill();
      try {
        const m = await newMachine(d, id);
        assert.equal(m.status, 503, JSON.stringify(m.body));
        assert.equal(m.body.code, 'STORAGE_UNAVAILABLE');
      } finally {
        if (b.name === 's3') await (s3 as S3Server).restart();
      }
      await waitFor(
        'the machine to be gone',
        async () =>
          ((await api(d.url, 'GET', '/v1/machines')).body.machines as unknown[]).length === count
            ? true
            : undefined,
        30_000,
      );
    });

    test('DELETE of a volume with a save running is VOLUME_BUSY', async () => {
      // A tar that takes its time, so the DELETE surely lands during the save.
      await exec(
        d,
        a,
        `mv /usr/bin/tar /usr/bin/tar.real && printf '#!/bin/sh\\nsleep 3\\nexec /usr/bin/tar.real "$@"\\n' > /usr/bin/tar && chmod 755 /usr/bin/tar`,
      );
      try {
        const saving = save(d, a, vol);
        await sleep(1000);
        const r = await api(d.url, 'DELETE', `/v1/volumes/${vol}`);
        assert.equal(r.status, 409, JSON.stringify(r.body));
        assert.equal(r.body.code, 'VOLUME_BUSY');
        assert.equal((await saving).status, 200);
      } finally {
        await exec(d, a, 'mv /usr/bin/tar.real /usr/bin/tar');
      }
    });

    if (b.name === 'local')
      test('a full volume disk: STORAGE_FULL, the previous version intact, then it works again', async () => {
        const filler = join(mnt, 'filler');
        try {
          execFileSync('sh', ['-c', `dd if=/dev/zero of=${filler} bs=1M 2>/dev/null; true`]);
          unlinkSync(filler);
          // Leave ~8 MiB: the 20 MiB file of the save (and the upload) cannot fit.
          execFileSync('sh', [
            '-c',
            `free=$(df -B1M --output=avail ${mnt} | tail -1); dd if=/dev/zero of=${filler} bs=1M count=$((free - 8)) 2>/dev/null; sync`,
          ]);
          const before = await files(d, vol);
          await exec(d, a, 'head -c 20971520 /dev/urandom > /root/big');
          const s = await save(d, a, vol);
          assert.equal(s.status, 507, JSON.stringify(s.body));
          assert.equal(s.body.code, 'STORAGE_FULL');
          // Paced, so the early answer is read before the server closes the connection under it.
          const p = await putFile(d.url, vol, 'huge', patternChunks(30 * MiB, 'full'), { delayMs: 20 });
          assert.equal(p.status, 507, JSON.stringify(p.body));
          assert.deepEqual(await files(d, vol), before);
          const c = await machine(d, vol);
          assert.match(await exec(d, c, 'ls /root'), /gen2/);
          await api(d.url, 'DELETE', `/v1/machines/${c}`);
        } finally {
          rmSync(filler, { force: true });
        }
        assert.equal((await save(d, a, vol)).status, 200);
        // Nothing half-written stays behind once collected.
        await sleep(2500);
        const tmp = execFileSync('find', [join(mnt, 'volumes'), '-name', '.tmp-*']).toString();
        assert.equal(tmp, '');
      });

    if (b.name === 's3') {
      test('S3 killed mid-upload: STORAGE_UNAVAILABLE, the version intact; after a restart the retry works', async () => {
        const server = s3 as S3Server;
        const id = await volume(d);
        await putFile(d.url, id, 'f', [Buffer.from('v1')]);
        let killed = false;
        const r = await putFile(d.url, id, 'f', patternChunks(40 * MiB, 'kill'), {
          onSent: async (sent) => {
            if (!killed && sent >= 15 * MiB) {
              killed = true;
              await server.kill();
            }
          },
        });
        try {
          assert.ok(killed);
          assert.equal(r.status, 503, JSON.stringify(r.body));
          assert.equal(r.body.code, 'STORAGE_UNAVAILABLE');
          assert.equal((await api(d.url, 'GET', `/v1/volumes/${id}`)).body.code, 'STORAGE_UNAVAILABLE');
        } finally {
          await server.restart();
        }
        const g = await getFileSha(d.url, id, 'f');
        assert.equal(g.body, 'v1');
        const again = await putFile(d.url, id, 'f', patternChunks(40 * MiB, 'kill'));
        assert.equal(again.status, 200, JSON.stringify(again.body));
        assert.equal((await getFileSha(d.url, id, 'f')).sha, patternSha(40 * MiB, 'kill'));
        // A save with S3 gone keeps the previous version too.
        await server.kill();
        try {
          const s = await save(d, a, vol);
          assert.equal(s.status, 503, JSON.stringify(s.body));
        } finally {
          await server.restart();
        }
        assert.ok((await files(d, vol)).includes('gen2 file 0700 4'));
      });

      test('503s and connection resets are retried: the upload succeeds, a read cut off mid-body is read again', async () => {
        const server = s3 as S3Server;
        const id = await volume(d);
        for (const how of ['503', 'reset'] as const) {
          server.failNext(2, how);
          const before = server.requests();
          const r = await putFile(d.url, id, `f-${how}`, patternChunks(12 * MiB, how));
          assert.equal(r.status, 200, `${how}: ${JSON.stringify(r.body)}`);
          assert.ok(server.requests() - before >= 5, `${how}: ${server.requests() - before} requests`);
          assert.equal((await getFileSha(d.url, id, `f-${how}`)).sha, patternSha(12 * MiB, how));
        }
        // More failures than attempts: STORAGE_UNAVAILABLE, nothing changed.
        server.failNext(20, '503');
        const r = await putFile(d.url, id, 'f-never', [Buffer.from('x')]);
        assert.equal(r.status, 503, JSON.stringify(r.body));
        server.failNext(0);
        assert.equal((await files(d, id)).length, 2);
        // An answer cut off mid-body (after the headers, where the SDK's retries end) is read again.
        for (let i = 0; i < 3; i++) {
          server.failNext(1, 'cut');
          const before = server.requests();
          assert.equal((await files(d, id)).length, 2);
          assert.ok(server.requests() - before >= 2, `${server.requests() - before} requests`);
        }
        server.failNext(0);
      });
    }

    if (b.name === 'local')
      test('the CLI: hutch volume create/put/cat/files/get/ls/rm, hutch save, hutch new --volume', async () => {
        const tmp = mkdtempSync(join(tmpdir(), 'hutch-vol-cli-'));
        try {
          const ok = async (...args: string[]): Promise<string> => {
            const r = await runHutch(d, ...args);
            assert.equal(r.status, 0, `hutch ${args.join(' ')}: ${r.stdout}${r.stderr}`);
            return r.stdout;
          };
          const v = JSON.parse(await ok('volume', 'create', '--ttl', '3600', '--json')) as { id: string };
          writeFileSync(join(tmp, 'in.txt'), 'from the cli\n');
          assert.match(
            await ok('volume', 'put', v.id, 'docs/in.txt', join(tmp, 'in.txt'), '--mode', '0600'),
            /docs\/in.txt\t13/,
          );
          assert.equal(await ok('volume', 'cat', v.id, 'docs/in.txt'), 'from the cli\n');
          const f = JSON.parse(await ok('volume', 'files', v.id, '--json')) as {
            path: string;
            mode: string;
          }[];
          assert.deepEqual(
            f.map((x) => `${x.path} ${x.mode}`),
            ['docs 0755', 'docs/in.txt 0600'],
          );
          assert.match(await ok('volume', 'get', v.id), new RegExp(`^${v.id}\t13B\t1 files`));
          assert.match(await ok('volume', 'ls'), new RegExp(v.id));
          const m = (await ok('new', '--ttl', '300', '--volume', v.id)).trim();
          assert.equal(
            await exec(d, m, 'cat /root/docs/in.txt && stat -c %a /root/docs/in.txt'),
            'from the cli\n600\n',
          );
          await exec(d, m, 'echo more > /root/more');
          const s = JSON.parse(await ok('save', m, '--volume', v.id, '--json')) as {
            volume: { generation: number };
          };
          assert.equal(s.volume.generation, 2);
          assert.equal(await ok('volume', 'cat', v.id, 'more'), 'more\n');
          const bad = await runHutch(d, 'volume', 'cat', v.id, '../etc/passwd', '--json');
          assert.notEqual(bad.status, 0);
          assert.equal((JSON.parse(bad.stdout) as { code: string }).code, 'INVALID_ARGUMENT');
          await ok('rm', m);
          assert.equal((await ok('volume', 'rm', v.id)).trim(), v.id);
          assert.equal(
            (JSON.parse((await runHutch(d, 'volume', 'get', v.id, '--json')).stdout) as { code: string })
              .code,
            'VOLUME_NOT_FOUND',
          );
        } finally {
          rmSync(tmp, { recursive: true, force: true });
        }
      });

    test('an expired volume is collected', async () => {
      const left = expiringAt + 61_000 - Date.now();
      if (left > 0) await sleep(left);
      await waitFor(
        'the expired volume to be collected',
        async () => ((await api(d.url, 'GET', `/v1/volumes/${expiring}`)).status === 404 ? true : undefined),
        10_000,
      );
      // And its objects are gone from the store.
      if (b.name === 'local')
        await waitFor(
          'its directory to go',
          async () => {
            try {
              execFileSync('test', ['!', '-e', join(mnt, 'volumes', expiring)]);
              return true;
            } catch {
              return undefined;
            }
          },
          10_000,
        );
      assert.ok(d.log().includes('volume removed'), 'the collector logged the removal');
    });
  });
}
