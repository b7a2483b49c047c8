/**
 * Hostile clients and guests against web previews: injection in the port segment, request
 * smuggling, forged and misused grants, absurd headers both ways, 500 upgrades that never read
 * from a guest that floods them, and guest servers that trickle, babble or never answer. The
 * proxy runs in a process of its own (test/helpers/preview-harness.ts: the real API server and
 * auth, real servers standing in for the guest's), so its memory is what is measured.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { request as httpRequest } from 'node:http';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { root } from '../helpers/daemon.js';
import { memoryOf, processAlive, Tally } from '../helpers/hostile.js';
import type { HarnessInfo } from '../helpers/preview-harness.js';
import { type Endpoint, exchange, rawRequest, tcpEndpoint } from '../helpers/raw-http.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Forgets the process's peak RSS, so VmHWM afterwards is the peak under the next abuser. */
function resetPeak(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

/** GET through the proxy with a well-behaved client: status and body. */
function get(
  base: string,
  path: string,
  headers: Record<string, string> = {},
): Promise<{ status: number; body: string; cookies: string[] }> {
  return new Promise((resolve, reject) => {
    httpRequest(new URL(path, base), { headers }, (res) => {
      let body = '';
      res.on('data', (b: Buffer) => {
        body += b.toString();
      });
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, body, cookies: res.headers['set-cookie'] ?? [] }),
      );
      res.on('error', reject);
    })
      .on('error', reject)
      .end();
  });
}

const codeOf = (body: Buffer | string): string | undefined => {
  try {
    return (JSON.parse(body.toString()) as { code?: string }).code;
  } catch {
    return undefined;
  }
};

describe('hostile: web previews', () => {
  const tally = new Tally('previews');
  let proc: ChildProcess;
  let h: HarnessInfo;
  let ep: Endpoint;
  let web: string;
  let auth: [string, string];
  let stderr = '';
  /** The flood's memory figures, for the tally line. */
  let memory = '';

  before(async () => {
    proc = spawn('node', [join(root, 'dist', 'test', 'helpers', 'preview-harness.js')], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, PREVIEW_TIMEOUT_MS: '1500' },
    });
    proc.stderr?.on('data', (b: Buffer) => {
      stderr += b.toString();
    });
    h = await new Promise<HarnessInfo>((resolve, reject) => {
      let out = '';
      proc.stdout?.on('data', (b: Buffer) => {
        out += b.toString();
        const nl = out.indexOf('\n');
        if (nl >= 0) resolve(JSON.parse(out.slice(0, nl)) as HarnessInfo);
      });
      proc.once('exit', (code) => reject(new Error(`the harness exited (${code}): ${stderr}`)));
    });
    ep = tcpEndpoint('previews', h.url);
    web = `/v1/machines/${h.machines.alice}/web/${h.ports.web}`;
    auth = ['authorization', `Bearer ${h.tokens.alice}`];
  });

  after(async () => {
    tally.report(memory);
    proc.stdin?.end();
    await new Promise((r) => {
      const t = setTimeout(() => {
        proc.kill('SIGKILL');
        r(undefined);
      }, 5000);
      proc.once('exit', () => {
        clearTimeout(t);
        r(undefined);
      });
    });
    assert.equal(/uncaught|unhandled/i.test(stderr), false, stderr);
  });

  test('injection in the port segment: refused, never forwarded', async () => {
    const m = h.machines.alice;
    const grant = (await get(h.url, `${web}/?token=${h.tokens.alice}`)).cookies[0]?.split(';')[0] ?? '';
    for (const port of ['abc', '0', '65536', '080', '-1', '1e3', '8080%0d%0aX-Evil:%201', ''])
      await tally.check(`port segment ${JSON.stringify(port)}`, async () => {
        const o = await exchange(ep, rawRequest('GET', `/v1/machines/${m}/web/${port}/`, [auth]), 5000);
        assert.equal(o.kind, 'response');
        if (o.kind !== 'response') return;
        assert.equal(o.res.status, 400);
        assert.equal(codeOf(o.res.body), 'INVALID_ARGUMENT');
        return String(o.res.status);
      });
    for (const target of [
      `/v1/machines/${m}/web/../${h.ports.web}/echo`,
      `/v1/machines/${m}/web/%2e%2e/${h.ports.web}/echo`,
      `/v1/machines/${m}/web/${h.ports.web}/../../../../whoami`,
      `/v1/machines/../machines/${m}/web/${h.ports.other}/`,
    ])
      await tally.check(`dot segments ${target}`, async () => {
        // With the grant of one port: a path with dot segments is refused outright (400), as
        // every API path is, so it can name neither the API (which never takes a grant) nor
        // another port (which this grant does not open). Nothing answers 200.
        const o = await exchange(ep, rawRequest('GET', target, [['cookie', grant]]), 5000);
        assert.equal(o.kind, 'response');
        if (o.kind !== 'response') return;
        const code = codeOf(o.res.body);
        assert.ok(
          [400, 404, 401].includes(o.res.status),
          `${o.res.status} ${o.res.body.toString().slice(0, 200)}`,
        );
        return `${o.res.status} ${code ?? 'from the guest'}`;
      });
  });

  test('request smuggling: ambiguous framing refused, the guest sees one unambiguous request', async () => {
    const smuggled = `GET /v1/machines/${h.machines.alice}/web/${h.ports.other}/ HTTP/1.1\r\nhost: x\r\n\r\n`;
    const chunkedEmpty = `0\r\n\r\n${smuggled}`;
    const cases: [string, [string, string][], string, number | null][] = [
      ['CL + TE: chunked', [auth, ['transfer-encoding', 'chunked']], chunkedEmpty, chunkedEmpty.length],
      [
        'TE: chunked + CL',
        [auth, ['transfer-encoding', 'chunked'], ['content-length', '4']],
        chunkedEmpty,
        null,
      ],
      [
        'two different CLs',
        [auth, ['content-length', '0'], ['content-length', String(smuggled.length)]],
        smuggled,
        null,
      ],
      ['TE: chunked, identity', [auth, ['transfer-encoding', 'chunked, identity']], chunkedEmpty, null],
      ['TE with a space before the colon', [auth, ['transfer-encoding ', 'chunked']], chunkedEmpty, null],
      ['TE: xchunked', [auth, ['transfer-encoding', 'xchunked']], chunkedEmpty, null],
    ];
    for (const [what, headers, body, cl] of cases)
      await tally.check(`smuggling: ${what}`, async () => {
        const o = await exchange(
          ep,
          rawRequest('POST', `${web}/echo`, headers, body, { contentLength: cl }),
          5000,
        );
        if (o.kind !== 'response') return `closed without an answer (${o.kind})`;
        // Refused outright, or forwarded as one request whose body the guest saw whole: never
        // a second request to the other port.
        if (o.res.status === 400) return '400';
        assert.equal(o.res.status, 200, o.res.body.toString().slice(0, 200));
        assert.ok(!o.res.body.toString().includes('other'), 'no second request reached the guest');
        const seen = JSON.parse(o.res.body.toString()) as { headers: Record<string, string> };
        assert.ok(
          !(seen.headers['content-length'] !== undefined && seen.headers['transfer-encoding'] !== undefined),
          'the guest never gets both framings',
        );
        return '200, one request';
      });
    await tally.check(
      'Connection: content-length, x-forwarded-for (hop-by-hop stripping trick)',
      async () => {
        const body = 'abcdefgh';
        const o = await exchange(
          ep,
          rawRequest(
            'POST',
            `${web}/echo`,
            [auth, ['connection', 'content-length, x-forwarded-for, host']],
            body,
          ),
          5000,
        );
        assert.equal(o.kind, 'response');
        if (o.kind !== 'response') return;
        const seen = JSON.parse(o.res.body.toString()) as {
          bodyLength: number;
          headers: Record<string, string>;
        };
        assert.equal(seen.bodyLength, body.length);
        assert.equal(seen.headers['x-forwarded-for'], '127.0.0.1');
        assert.equal(seen.headers.host, 'fuzz');
        return 'framing, host and X-Forwarded-For kept';
      },
    );
  });

  test('grants: forged, tampered, expired, another machine or port, on the API', async () => {
    const real = (await get(h.url, `${web}/?token=${h.tokens.alice}`)).cookies[0]?.split(';')[0] ?? '';
    const short = (await get(h.url, `${web}/?token=${h.tokens.short}`)).cookies[0]?.split(';')[0] ?? '';
    const bobs = `/v1/machines/${h.machines.bob}/web/${h.ports.web}`;
    const bobGrant = (await get(h.url, `${bobs}/?token=${h.tokens.bob}`)).cookies[0]?.split(';')[0] ?? '';
    assert.ok(real.startsWith('hutch_preview=g1.') && bobGrant.startsWith('hutch_preview=g1.'));
    assert.equal((await get(h.url, `${web}/echo`, { cookie: real })).status, 200, 'the real grant works');
    const [, value] = real.split('=') as [string, string];
    const [v, body, sig] = value.split('.') as [string, string, string];
    const claims = JSON.parse(Buffer.from(body, 'base64url').toString()) as unknown[];
    const tampered = (c: unknown[]): string =>
      `hutch_preview=${v}.${Buffer.from(JSON.stringify(c)).toString('base64url')}.${sig}`;
    const cases: [string, string, string][] = [
      ['random bytes', `hutch_preview=g1.${'A'.repeat(40)}.${'B'.repeat(43)}`, web],
      ['the JWT itself as the cookie', `hutch_preview=${h.tokens.alice}`, web],
      [
        'port changed, signature kept',
        tampered([claims[0], claims[1], h.ports.other, claims[3], claims[4]]),
        `/v1/machines/${h.machines.alice}/web/${h.ports.other}`,
      ],
      [
        'expiry pushed out, signature kept',
        tampered([claims[0], claims[1], claims[2], claims[3], 4102444800]),
        web,
      ],
      [
        'user changed, signature kept',
        tampered(['bob', h.machines.bob, claims[2], claims[3], claims[4]]),
        bobs,
      ],
      ['a 100 KiB cookie', `hutch_preview=${'g'.repeat(100_000)}`, web],
      ["alice's grant on another port", real, `/v1/machines/${h.machines.alice}/web/${h.ports.other}`],
      ["bob's grant on alice's machine", bobGrant, web],
      ["alice's grant on bob's machine", real, bobs],
    ];
    for (const [what, cookie, path] of cases)
      await tally.check(`grant: ${what}`, async () => {
        const r = await get(h.url, `${path}/echo`, { cookie }).catch((e: Error) => ({
          status: 0,
          body: e.message,
        }));
        assert.ok([400, 401, 431].includes(r.status), `${r.status} ${r.body.slice(0, 200)}`);
        return String(r.status);
      });
    await tally.check('grant: used on API routes', async () => {
      for (const path of ['/v1/whoami', `/v1/machines/${h.machines.alice}/ports`]) {
        const r = await get(h.url, path, { cookie: real });
        assert.equal(r.status, 401, path);
      }
      const put = await exchange(
        ep,
        rawRequest(
          'PUT',
          `${web}/public`,
          [
            ['cookie', real],
            ['content-type', 'application/json'],
          ],
          '{"public":true}',
        ),
        5000,
      );
      assert.ok(put.kind === 'response' && put.res.status === 401, 'PUT …/public refuses a grant');
      return '401';
    });
    await tally.check('grant: expired with its token', async () => {
      await sleep(2500);
      const r = await get(h.url, `${web}/echo`, { cookie: short });
      assert.equal(r.status, 401);
      return '401';
    });
  });

  test("web pages never act as the loopback listener's admin; a preview the user opens gets a grant of its own", async () => {
    const admin = tcpEndpoint('admin', h.adminUrl);
    const other = `/v1/machines/${h.machines.alice}/web/${h.ports.other}`;
    const put = async (headers: [string, string][]): Promise<number> => {
      const r = await exchange(
        admin,
        rawRequest(
          'PUT',
          `${other}/public`,
          [...headers, ['content-type', 'application/json']],
          '{"public":true}',
        ),
        5000,
      );
      return r.kind === 'response' ? r.res.status : 0;
    };
    const pages: [string, Record<string, string>][] = [
      ['another site (Origin)', { origin: 'http://evil.example' }],
      ['a sandboxed page (Origin: null)', { origin: 'null' }],
      ['a path preview on the same origin', { 'sec-fetch-site': 'same-origin', 'sec-fetch-mode': 'cors' }],
      ['an image on another site', { 'sec-fetch-site': 'cross-site', 'sec-fetch-mode': 'no-cors' }],
    ];
    for (const [what, headers] of pages)
      await tally.check(`loopback admin: ${what}`, async () => {
        assert.equal(await put(Object.entries(headers)), 401, 'PUT …/public');
        assert.equal((await get(h.adminUrl, '/v1/whoami', headers)).status, 401, 'GET /v1/whoami');
        const page = await get(h.adminUrl, `${web}/echo`, headers);
        assert.deepEqual([page.status, page.cookies.length], [401, 0], 'a preview, no grant');
        return '401';
      });
    // Nothing above made the port public; the same request from curl does.
    assert.equal((await get(h.url, `${other}/`)).status, 401);
    assert.equal((await get(h.adminUrl, '/v1/whoami')).status, 200);
    const plain = await get(h.adminUrl, `${web}/echo`);
    assert.deepEqual([plain.status, plain.cookies.length], [200, 0], 'curl: served, no cookie');

    await tally.check("loopback admin: the user's own navigation to a preview", async () => {
      const nav = await get(h.adminUrl, `${web}/echo`, {
        'sec-fetch-site': 'none',
        'sec-fetch-mode': 'navigate',
        'sec-fetch-dest': 'document',
      });
      assert.equal(nav.status, 200);
      const set = nav.cookies.find((c) => c.startsWith('hutch_preview='));
      assert.ok(set, `a grant cookie: ${nav.cookies.join(' | ')}`);
      assert.match(set, new RegExp(`; Path=${web}/;`));
      assert.match(set, /HttpOnly; SameSite=Lax/);
      const cookie = set.split(';')[0] as string;
      const sameOrigin = { 'sec-fetch-site': 'same-origin', origin: new URL(h.adminUrl).origin, cookie };
      const sub = await get(h.adminUrl, `${web}/echo`, sameOrigin);
      assert.equal(sub.status, 200, "the page's own requests carry it");
      assert.equal(sub.body.includes('hutch_preview'), false, 'the guest never sees the grant');
      assert.equal((await get(h.adminUrl, `${other}/echo`, sameOrigin)).status, 401, 'another port');
      const bobs = `/v1/machines/${h.machines.bob}/web/${h.ports.web}/echo`;
      assert.ok([401, 404].includes((await get(h.adminUrl, bobs, sameOrigin)).status), 'another machine');
      assert.equal((await get(h.url, `${web}/echo`, { cookie })).status, 401, 'a listener that wants tokens');
      assert.equal((await get(h.adminUrl, '/v1/whoami', sameOrigin)).status, 401, 'an API route');
      assert.equal(await put(Object.entries(sameOrigin)), 401, 'PUT …/public');
      return '200, then only that preview';
    });
    assert.equal((await get(h.url, `${other}/`)).status, 401, 'the port is still private');
  });

  test('absurd headers both ways', async () => {
    await tally.check('a 64 KiB request header', async () => {
      const o = await exchange(
        ep,
        rawRequest('GET', `${web}/echo`, [auth, ['x-big', 'a'.repeat(65536)]]),
        5000,
      );
      if (o.kind !== 'response') return `closed (${o.kind})`;
      assert.ok([400, 431].includes(o.res.status), String(o.res.status));
      return String(o.res.status);
    });
    await tally.check('1000 small request headers', async () => {
      const many: [string, string][] = Array.from({ length: 1000 }, (_, i) => [`x-h${i}`, 'v']);
      const o = await exchange(ep, rawRequest('GET', `${web}/echo`, [auth, ...many]), 5000);
      if (o.kind !== 'response') return `closed (${o.kind})`;
      assert.ok([200, 400, 431].includes(o.res.status), String(o.res.status));
      return String(o.res.status);
    });
    await tally.check('a guest answering with 100 KB of headers', async () => {
      const r = await get(h.url, `${web}/huge-headers`, { authorization: auth[1] });
      assert.deepEqual([r.status, codeOf(r.body)], [502, 'PREVIEW_UPSTREAM_FAILED']);
      return '502';
    });
    await tally.check('a guest answering with something that is not HTTP', async () => {
      const r = await get(h.url, `/v1/machines/${h.machines.alice}/web/${h.ports.garbage}/`, {
        authorization: auth[1],
      });
      assert.deepEqual([r.status, codeOf(r.body)], [502, 'PREVIEW_UPSTREAM_FAILED']);
      return '502';
    });
  });

  test('slowloris guest: 504 in the timeout, the guest connection closed', async () => {
    await tally.check('a guest trickling header lines forever', async () => {
      const t0 = Date.now();
      const r = await get(h.url, `/v1/machines/${h.machines.alice}/web/${h.ports.slowloris}/`, {
        authorization: auth[1],
      });
      const ms = Date.now() - t0;
      assert.deepEqual([r.status, codeOf(r.body)], [504, 'PREVIEW_TIMEOUT']);
      assert.ok(ms >= 1400 && ms < 5000, `${ms} ms`);
      return `504 after ${ms} ms`;
    });
    await tally.check('20 slowloris previews at once, others still served', async () => {
      const slow = Array.from({ length: 20 }, () =>
        get(h.url, `/v1/machines/${h.machines.alice}/web/${h.ports.slowloris}/`, { authorization: auth[1] }),
      );
      const fast = await get(h.url, `${web}/echo`, { authorization: auth[1] });
      assert.equal(fast.status, 200);
      const done = await Promise.all(slow);
      assert.ok(done.every((r) => r.status === 504));
      return 'all 504, the fast one 200';
    });
  });

  test('500 upgrades to a flooding guest that never read: bounded memory, others served', async () => {
    const pid = proc.pid as number;
    const before = memoryOf(pid);
    resetPeak(pid);
    const sockets: Socket[] = [];
    const path = `/v1/machines/${h.machines.alice}/web/${h.ports.flood}/`;
    await tally.check('500 upgrades that never read', async () => {
      const url = new URL(h.url);
      for (let i = 0; i < 500; i++) {
        const s = connect(Number(url.port), url.hostname);
        s.on('error', () => {});
        s.write(
          `GET ${path} HTTP/1.1\r\nhost: x\r\nauthorization: ${auth[1]}\r\nconnection: upgrade\r\nupgrade: flood\r\n\r\n`,
        );
        // Never read: the kernel's buffers fill, then the proxy has to hold the guest back.
        s.pause();
        sockets.push(s);
      }
      await sleep(4000);
      const mid = memoryOf(pid);
      const page = await get(h.url, `${web}/echo`, { authorization: auth[1] });
      assert.equal(page.status, 200, 'another request is served meanwhile');
      await sleep(3000);
      const late = memoryOf(pid);
      assert.ok(processAlive(pid));
      // Held, not growing: between the two samples the flood kept trying for 3 s.
      assert.ok(late.rssMb - mid.rssMb < 48, `RSS ${mid.rssMb} → ${late.rssMb} MiB while flooded`);
      assert.ok(late.peakMb - before.rssMb < 256, `peak ${late.peakMb} MiB over ${before.rssMb} before`);
      memory = `500 flooded upgrades: RSS ${before.rssMb} → ${mid.rssMb} → ${late.rssMb} MiB, peak ${late.peakMb}`;
      return memory;
    });
    for (const s of sockets) s.destroy();
    await tally.check('after the 500 went away, previews still work', async () => {
      await sleep(500);
      const page = await get(h.url, `${web}/echo`, { authorization: auth[1] });
      assert.equal(page.status, 200);
      return `RSS ${memoryOf(pid).rssMb} MiB`;
    });
  });
});
