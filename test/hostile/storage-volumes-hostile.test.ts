/**
 * Hostile clients against persistent volumes (the local store; the S3 paths share every check
 * above the store): every endpoint without credentials, garbage and huge query parameters,
 * path traversal in every spelling, guessed volume ids, another user's volume, uploads over
 * the limit (declared and streamed), a slow-loris upload, a client that leaves mid-upload, 20
 * concurrent writers of one file, a DELETE during a download, the per-user volume cap, and the
 * daemon's memory while a 200 MiB upload and download stream. Nothing may be written outside a
 * volume's own objects, and no leftovers may stay once collected.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { request } from 'node:http';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { authed, userWithToken } from '../helpers/accounts.js';
import { cleanup, sleep, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { bugLines, memoryOf, Tally } from '../helpers/hostile.js';
import { exchange, tcpEndpoint } from '../helpers/raw-http.js';
import { getFileSha, patternChunks, patternSha, putFile } from '../helpers/volume-client.js';

const MiB = 1024 * 1024;
const limit = 256 * MiB;

describe('hostile: persistent volumes', () => {
  const tally = new Tally('volumes');
  let d: TestDaemon;
  let token = '';
  let bobToken = '';
  let vol = '';
  let memory = '';
  const auth = (): Record<string, string> => ({ authorization: `Bearer ${token}` });
  const as = (): { token: string } => ({ token });

  before(async () => {
    d = await startDaemon({
      env: {
        HUTCH_REQUIRE_AUTH: '1',
        HUTCH_VOLUME_MAX_BYTES: String(limit),
        HUTCH_VOLUME_MAX_PER_USER: '5',
        HUTCH_VOLUME_GC_INTERVAL_MS: '1000',
        HUTCH_VOLUME_GC_GRACE_MS: '1000',
        HUTCH_BODY_IDLE_TIMEOUT_MS: '2000',
        // No machines here: nothing to boot or snapshot.
        HUTCH_NET: 'off',
      },
    });
    token = (await userWithToken(d, 'alice')).token;
    bobToken = (await userWithToken(d, 'bob')).token;
    const v = await authed(d.url, 'POST', '/v1/volumes', as(), {});
    assert.equal(v.status, 201, JSON.stringify(v.body));
    vol = String(v.body.id);
    const p = await putFile(d.url, vol, 'keep', [Buffer.from('keep')], { headers: auth() });
    assert.equal(p.status, 200, JSON.stringify(p.body));
  });

  after(async () => {
    try {
      tally.report(memory);
    } finally {
      await cleanup(d);
    }
  });

  /** What the volume holds (alice's view): it must not change under refused requests. */
  const filesOf = async (id = vol): Promise<string> =>
    JSON.stringify((await authed(d.url, 'GET', `/v1/volumes/${id}/files`, as())).body.files);

  /** Every object of the store, relative to the volume dir: all must be some volume's own. */
  const storeFiles = (): string[] =>
    execFileSync('find', [join(d.stateDir, 'volumes'), '-type', 'f', '-printf', '%P\\n'])
      .toString()
      .split('\n')
      .filter(Boolean);

  test('every volume endpoint refuses a request without credentials (401)', async () => {
    const routes: [string, string][] = [
      ['POST', '/v1/volumes'],
      ['GET', '/v1/volumes'],
      ['GET', `/v1/volumes/${vol}`],
      ['DELETE', `/v1/volumes/${vol}`],
      ['GET', `/v1/volumes/${vol}/files`],
      ['PUT', `/v1/volumes/${vol}/file?path=x`],
      ['GET', `/v1/volumes/${vol}/file?path=keep`],
      ['POST', `/v1/machines/m-00000000/save?volume=${vol}`],
    ];
    for (const [method, path] of routes)
      for (const header of [undefined, 'Bearer garbage', 'Basic YWxpY2U6eA==', `Bearer ${token}x`])
        await tally.check(`${method} ${path} with ${header ?? 'no credentials'} → 401`, async () => {
          const r = await authed(d.url, method, path, header === undefined ? {} : { header });
          assert.equal(r.status, 401, JSON.stringify(r.body));
          return undefined;
        });
    await tally.check('the volume is unchanged', async () => {
      assert.match(await filesOf(), /"keep"/);
      return undefined;
    });
  });

  test('path traversal in every spelling is refused; nothing lands outside the volume', async () => {
    const before = await filesOf();
    const bad = [
      '../x',
      '..',
      'a/../../b',
      '/../x',
      'a/./../../x',
      '../../../../../../etc/passwd',
      'a\0b',
      '\0',
      '',
      '/',
      '///',
      './',
      `${'a/'.repeat(2100)}x`,
      `${'x'.repeat(256)}`,
      'keep/under',
    ];
    for (const p of bad)
      await tally.check(`PUT ?path=${JSON.stringify(p).slice(0, 40)} → 400`, async () => {
        const r = await putFile(d.url, vol, p, [Buffer.from('evil')], { headers: auth() });
        assert.equal(r.status, 400, JSON.stringify(r.body));
        return undefined;
      });
    for (const raw of ['%2e%2e/x', '%2E%2E%2Fx', 'a%2F..%2F..%2Fb', '%00', '..%00/x'])
      await tally.check(`PUT ?path=${raw} (encoded) → 400`, async () => {
        const r = await authed(d.url, 'PUT', `/v1/volumes/${vol}/file?path=${raw}`, as());
        assert.equal(r.status, 400, JSON.stringify(r.body));
        return undefined;
      });
    for (const p of ['../keep', '..', 'a/../../keep', '\0'])
      await tally.check(`GET ?path=${JSON.stringify(p)} → 400`, async () => {
        const r = await getFileSha(d.url, vol, p, auth());
        assert.equal(r.status, 400, r.body);
        return undefined;
      });
    await tally.check('the volume is unchanged and the store holds only volume objects', async () => {
      assert.equal(await filesOf(), before);
      for (const f of storeFiles())
        assert.match(f, /^vol-[a-z2-7]{26}\/(volume\.json|manifest\.json|seg\/[a-z2-7]+)$/, f);
      return undefined;
    });
    // Odd but harmless names stay inside the volume: stored as names, never as host paths.
    for (const p of ['....//x', 'a\\..\\b', '.hidden/..x', 'ünï/çødé', ' spaced name '])
      await tally.check(`PUT ?path=${JSON.stringify(p)} is an ordinary name in the volume`, async () => {
        const r = await putFile(d.url, vol, p, [Buffer.from('odd')], { headers: auth() });
        assert.equal(r.status, 200, JSON.stringify(r.body));
        for (const f of storeFiles()) assert.match(f, /^vol-[a-z2-7]{26}\//, f);
        return undefined;
      });
  });

  test('garbage and huge query parameters, bodies and ids', async () => {
    const ep = tcpEndpoint('machines', d.url);
    for (const [what, path] of [
      ['mode=99999', `/v1/volumes/${vol}/file?path=m&mode=99999`],
      ['mode=-1', `/v1/volumes/${vol}/file?path=m&mode=-1`],
      ['mode=0x1ff', `/v1/volumes/${vol}/file?path=m&mode=0x1ff`],
      ['path of 9000 bytes', `/v1/volumes/${vol}/file?path=${'p'.repeat(9000)}`],
      ['volume= of 100 bytes on save', `/v1/machines/m-1/save?volume=${'v'.repeat(100)}`],
    ] as const)
      await tally.check(`${what} → 400`, async () => {
        const r = await authed(d.url, path.includes('/save') ? 'POST' : 'PUT', path, as());
        assert.equal(r.status, 400, JSON.stringify(r.body));
        return undefined;
      });
    await tally.check('a 64 KiB query string is refused by the server, which stays up', async () => {
      const o = await exchange(
        ep,
        `GET /v1/volumes/${vol}/file?path=${'q'.repeat(65536)} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\nconnection: close\r\n\r\n`,
        10_000,
      );
      assert.ok(o.kind !== 'timeout', 'no answer');
      if (o.kind === 'response') assert.ok(o.res.status >= 400 && o.res.status < 500, String(o.res.status));
      assert.equal((await authed(d.url, 'GET', `/v1/volumes/${vol}`, as())).status, 200);
      return o.kind === 'response' ? String(o.res.status) : 'closed';
    });
    for (const body of [
      { ttl_seconds: '3600' },
      { ttl_seconds: 1e308 },
      { ttl_seconds: 59 },
      { ttl_seconds: 3600, extra: 1 },
      { ttl_seconds: null },
      [],
    ])
      await tally.check(`POST /v1/volumes ${JSON.stringify(body)} → 400`, async () => {
        const r = await authed(d.url, 'POST', '/v1/volumes', as(), body);
        assert.equal(r.status, 400, JSON.stringify(r.body));
        return undefined;
      });
    await tally.check('a 2 MiB JSON body → 413', async () => {
      const r = await authed(d.url, 'POST', '/v1/volumes', as(), { pad: 'x'.repeat(2 * MiB) });
      assert.equal(r.status, 413, JSON.stringify(r.body));
      return undefined;
    });
    for (const id of [
      'vol-../../etc',
      '..',
      'vol-',
      `vol-${'a'.repeat(26)}`,
      `vol-${'A'.repeat(26)}`,
      'x'.repeat(2000),
      '%00',
    ])
      await tally.check(`volume id ${JSON.stringify(id).slice(0, 40)} → 404`, async () => {
        const r = await authed(d.url, 'GET', `/v1/volumes/${id}`, as());
        assert.equal(r.status, 404, JSON.stringify(r.body));
        return undefined;
      });
    await tally.check('200 well-formed random ids are all VOLUME_NOT_FOUND', async () => {
      const alphabet = 'abcdefghijklmnopqrstuvwxyz234567';
      for (let i = 0; i < 200; i++) {
        const id = `vol-${[...randomBytes(26)].map((x) => alphabet[x & 31]).join('')}`;
        const r = await authed(d.url, 'GET', `/v1/volumes/${id}/files`, as());
        assert.equal(r.body.code, 'VOLUME_NOT_FOUND', id);
      }
      return undefined;
    });
    await tally.check("bob guessing alice's real id gets the same 404 as a random one", async () => {
      const r = await authed(d.url, 'GET', `/v1/volumes/${vol}`, { token: bobToken });
      assert.equal(r.status, 404);
      assert.equal(r.body.message, `no volume "${vol}"`);
      const w = await putFile(d.url, vol, 'bob', [Buffer.from('x')], {
        headers: { authorization: `Bearer ${bobToken}` },
      });
      assert.equal(w.status, 404);
      const s = await authed(d.url, 'POST', `/v1/machines/m-00000000/save?volume=${vol}`, {
        token: bobToken,
      });
      assert.equal(s.body.code, 'VOLUME_NOT_FOUND');
      const m = await authed(d.url, 'POST', '/v1/machines', { token: bobToken }, { volume: vol });
      assert.equal(m.body.code, 'VOLUME_NOT_FOUND');
      return undefined;
    });
  });

  test('uploads over the limit, slow and abandoned uploads change nothing and leave nothing', async () => {
    const before = await filesOf();
    await tally.check('content-length over the limit → 413 before the body is read', async () => {
      // The client sends a first piece and waits, as one using Expect: 100-continue would.
      const o = await exchange(
        tcpEndpoint('machines', d.url),
        [
          {
            data: `PUT /v1/volumes/${vol}/file?path=big HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\ncontent-length: ${limit + MiB}\r\nconnection: close\r\n\r\n${'z'.repeat(65536)}`,
            thenWaitMs: 3000,
          },
        ],
        10_000,
      );
      assert.equal(o.kind, 'response');
      if (o.kind === 'response') assert.equal(o.res.status, 413, o.res.body.toString());
      return `${o.ms} ms`;
    });
    await tally.check('a chunked upload that grows over the limit → 413', async () => {
      const r = await putFile(d.url, vol, 'big', patternChunks(limit + 8 * MiB, 'y'), { headers: auth() });
      assert.equal(r.status, 413, JSON.stringify(r.body));
      assert.equal(r.body.code, 'VOLUME_TOO_LARGE');
      return undefined;
    });
    await tally.check('a slow-loris upload is cut off (408)', async () => {
      const ep = tcpEndpoint('machines', d.url);
      const o = await exchange(
        ep,
        [
          {
            data: `PUT /v1/volumes/${vol}/file?path=slow HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\ncontent-length: 1000000\r\nconnection: close\r\n\r\nabc`,
            thenWaitMs: 6000,
          },
        ],
        15_000,
      );
      assert.ok(o.kind === 'response' || o.kind === 'closed', o.kind);
      if (o.kind === 'response') assert.equal(o.res.status, 408);
      return `${o.kind} after ${o.ms} ms`;
    });
    await tally.check('a client that leaves mid-upload', async () => {
      await new Promise<void>((resolve) => {
        const req = request(new URL(`/v1/volumes/${vol}/file?path=left`, d.url), {
          method: 'PUT',
          headers: { ...auth(), 'content-length': String(50 * MiB) },
        });
        req.on('error', () => resolve());
        req.write(Buffer.alloc(10 * MiB));
        setTimeout(() => {
          req.destroy();
          resolve();
        }, 500);
      });
      await sleep(500);
      return undefined;
    });
    await tally.check('the volume is unchanged, and its leftovers are collected', async () => {
      assert.equal(await filesOf(), before);
      await sleep(3000);
      const left = storeFiles().filter((f) => f.includes('.tmp-'));
      assert.deepEqual(left, []);
      const id = vol;
      const segs = storeFiles().filter((f) => f.startsWith(`${id}/seg/`)).length;
      const manifest = JSON.parse(
        execFileSync('cat', [join(d.stateDir, 'volumes', id, 'manifest.json')]).toString(),
      ) as { entries: { seg: string | null }[] };
      assert.equal(segs, new Set(manifest.entries.map((e) => e.seg).filter(Boolean)).size);
      return undefined;
    });
  });

  test('20 writers of one file at once; a DELETE during a download; the per-user cap', async () => {
    await tally.check('20 concurrent PUTs of one path all succeed, one after another', async () => {
      const g0 = Number((await authed(d.url, 'GET', `/v1/volumes/${vol}`, as())).body.generation);
      const rs = await Promise.all(
        Array.from({ length: 20 }, (_, i) =>
          putFile(d.url, vol, 'race', [Buffer.from(`writer ${i}`)], { headers: auth() }),
        ),
      );
      for (const r of rs) assert.equal(r.status, 200, JSON.stringify(r.body));
      const v = await authed(d.url, 'GET', `/v1/volumes/${vol}`, as());
      assert.equal(v.body.generation, g0 + 20);
      const f = await getFileSha(d.url, vol, 'race', auth());
      assert.match(f.body, /^writer \d+$/);
      return undefined;
    });
    await tally.check('DELETE during a slow download is VOLUME_BUSY; after it, 204', async () => {
      const id = String((await authed(d.url, 'POST', '/v1/volumes', as(), {})).body.id);
      await putFile(d.url, id, 'big', patternChunks(64 * MiB, 'dl'), { headers: auth() });
      let got = 0;
      const res = await new Promise<import('node:http').IncomingMessage>((resolve, reject) =>
        request(new URL(`/v1/volumes/${id}/file?path=big`, d.url), { headers: auth() }, resolve)
          .on('error', reject)
          .end(),
      );
      res.pause();
      await sleep(300);
      const busy = await authed(d.url, 'DELETE', `/v1/volumes/${id}`, as());
      assert.equal(busy.status, 409, JSON.stringify(busy.body));
      assert.equal(busy.body.code, 'VOLUME_BUSY');
      res.on('data', (b: Buffer) => {
        got += b.length;
      });
      res.resume();
      await new Promise((r) => res.on('end', r));
      assert.equal(got, 64 * MiB);
      await sleep(200);
      assert.equal((await authed(d.url, 'DELETE', `/v1/volumes/${id}`, as())).status, 204);
      return undefined;
    });
    await tally.check('the 6th volume of a user is refused (429), the 5 exist', async () => {
      const mine = ((await authed(d.url, 'GET', '/v1/volumes', as())).body.volumes as unknown[]).length;
      const made: number[] = [];
      for (let i = mine; i < 7; i++) made.push((await authed(d.url, 'POST', '/v1/volumes', as(), {})).status);
      assert.deepEqual(made, [...Array(5 - mine).fill(201), ...Array(7 - 5).fill(429)]);
      assert.equal(((await authed(d.url, 'GET', '/v1/volumes', as())).body.volumes as unknown[]).length, 5);
      return undefined;
    });
  });

  test('memory stays flat while 200 MiB streams up and down', async () => {
    const pid = d.proc.pid as number;
    const id = vol;
    const rss0 = memoryOf(pid).rssMb;
    let peak = rss0;
    const sampler = setInterval(() => {
      peak = Math.max(peak, memoryOf(pid).rssMb);
    }, 50);
    try {
      const size = 200 * MiB;
      const up = await putFile(d.url, id, 'huge', patternChunks(size, 'mem'), { headers: auth() });
      const down = await getFileSha(d.url, id, 'huge', auth());
      await tally.check('a 200 MiB upload and download round-trip', async () => {
        assert.equal(up.status, 200, JSON.stringify(up.body));
        assert.equal(down.sha, patternSha(size, 'mem'));
        return undefined;
      });
    } finally {
      clearInterval(sampler);
    }
    await tally.check('daemon RSS grew by less than 80 MiB while 200 MiB streamed', async () => {
      memory = `daemon RSS ${rss0} → ${peak} MiB while 200 MiB streamed`;
      assert.ok(peak - rss0 < 80, memory);
      return memory;
    });
    await tally.check('no bug lines in the daemon log', async () => {
      assert.deepEqual(bugLines(d.log()), []);
      return undefined;
    });
  });
});
