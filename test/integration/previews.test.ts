/**
 * Web previews end to end through the real API server and auth (test/helpers/preview-harness.ts):
 * pages, bodies and streams both ways, WebSockets, rewriting, grants, public ports, Host routing
 * and TLS. Only the guest is stood in for, by real servers on this host.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { request as httpRequest, type IncomingHttpHeaders } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { type Harness, publicDomain, startPreviewHarness } from '../helpers/preview-harness.js';

interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  json: () => Record<string, unknown>;
}

interface Ask {
  method?: string;
  headers?: Record<string, string>;
  body?: Buffer | string;
  ca?: string;
}

/** One request, read whole; redirects are not followed. */
function ask(base: string, path: string, o: Ask = {}): Promise<Reply> {
  const u = new URL(path, base);
  const send = u.protocol === 'https:' ? httpsRequest : httpRequest;
  return new Promise((resolve, reject) => {
    const r = send(
      u,
      { method: o.method ?? 'GET', headers: o.headers ?? {}, ...(o.ca ? { ca: o.ca } : {}) },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (b: Buffer) => chunks.push(b));
        res.on('error', reject);
        res.on('end', () => {
          const body = Buffer.concat(chunks);
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body,
            json: () => JSON.parse(body.toString()) as Record<string, unknown>,
          });
        });
      },
    );
    r.on('error', reject);
    r.end(o.body);
  });
}

const bearer = (t: string): Record<string, string> => ({ authorization: `Bearer ${t}` });

/** The grant cookie of a Set-Cookie reply, as a Cookie header. */
function grantCookie(r: Reply): string {
  const c = (r.headers['set-cookie'] ?? []).find((v) => v.startsWith('hutch_preview='));
  assert.ok(c, `a grant cookie is set: ${JSON.stringify(r.headers['set-cookie'])}`);
  return c.split(';')[0] as string;
}

describe('web previews', () => {
  let h: Harness;
  let web: string;
  before(async () => {
    h = await startPreviewHarness();
    web = `/v1/machines/${h.machines.alice}/web/${h.ports.web}`;
  });
  after(async () => h.close());

  test('a page: prefix stripped, forwarded headers set, no credential reaches the guest', async () => {
    const r = await ask(h.url, `${web}/echo/page?x=1`, {
      headers: {
        ...bearer(h.tokens.alice),
        cookie: 'theirs=1; hutch_preview=zzz',
        'x-forwarded-for': '10.9.9.9',
      },
    });
    assert.equal(r.status, 200);
    const seen = r.json();
    const headers = seen.headers as Record<string, string>;
    assert.equal(seen.url, '/echo/page?x=1');
    assert.equal(headers['x-forwarded-prefix'], web);
    assert.equal(headers['x-forwarded-proto'], 'http');
    assert.equal(headers['x-forwarded-for'], '10.9.9.9, 127.0.0.1');
    assert.equal(headers['x-forwarded-host'], new URL(h.url).host);
    assert.equal(headers.authorization, undefined);
    assert.equal(headers.cookie, 'theirs=1');
  });

  test('by machine name, and `/web/{port}` redirects to its slash form', async () => {
    const byName = await ask(h.url, `/v1/machines/${h.machines.aliceName}/web/${h.ports.web}/echo`, {
      headers: bearer(h.tokens.alice),
    });
    assert.equal(byName.status, 200);
    const r = await ask(h.url, `${web}?q=1`, { headers: bearer(h.tokens.alice) });
    assert.equal(r.status, 308);
    assert.equal(r.headers.location, `${web}/?q=1`);
  });

  test('a POST body streams to the guest intact', async () => {
    const body = randomBytes(3 * 1024 * 1024);
    const r = await ask(h.url, `${web}/echo/upload`, {
      method: 'POST',
      headers: bearer(h.tokens.alice),
      body,
    });
    assert.equal(r.status, 200);
    const seen = r.json();
    assert.equal(seen.method, 'POST');
    assert.equal(seen.bodyLength, body.length);
    assert.equal(seen.bodySha256, createHash('sha256').update(body).digest('hex'));
  });

  test('a streamed response arrives in pieces, before the guest ends it (chunked and SSE)', async () => {
    for (const path of ['/stream', '/sse']) {
      const arrivals: number[] = [];
      const t0 = Date.now();
      await new Promise<void>((resolve, reject) => {
        httpRequest(new URL(`${web}${path}`, h.url), { headers: bearer(h.tokens.alice) }, (res) => {
          res.on('data', () => arrivals.push(Date.now() - t0));
          res.on('end', () => resolve());
          res.on('error', reject);
        })
          .on('error', reject)
          .end();
      });
      assert.ok(arrivals.length >= 2, `${path}: ${arrivals.length} pieces`);
      const first = arrivals[0] as number;
      const last = arrivals[arrivals.length - 1] as number;
      assert.ok(last - first >= 500, `${path}: the first piece came ${last - first} ms before the last`);
    }
  });

  test('a WebSocket echoes through the preview', async () => {
    const ws = new WebSocket(`${h.url.replace('http', 'ws')}${web}/socket`, {
      headers: bearer(h.tokens.alice),
    });
    await new Promise((resolve, reject) => {
      ws.once('open', resolve);
      ws.once('error', reject);
    });
    const got = new Promise<string>((resolve) => ws.once('message', (d) => resolve(String(d))));
    ws.send('hello through the proxy');
    assert.equal(await got, 'hello through the proxy');
    ws.close();
  });

  test('Location and Set-Cookie are moved under the prefix', async () => {
    const hdr = bearer(h.tokens.alice);
    assert.equal((await ask(h.url, `${web}/redirect`, { headers: hdr })).headers.location, `${web}/landing`);
    assert.equal(
      (await ask(h.url, `${web}/redirect-abs`, { headers: hdr })).headers.location,
      `${web}/landing?a=1`,
    );
    assert.equal((await ask(h.url, `${web}/redirect-local`, { headers: hdr })).headers.location, `${web}/x`);
    assert.equal(
      (await ask(h.url, `${web}/redirect-away`, { headers: hdr })).headers.location,
      'https://example.org/elsewhere',
    );
    const cookies = (await ask(h.url, `${web}/cookies`, { headers: hdr })).headers['set-cookie'];
    assert.deepEqual(cookies, [`a=1; Path=${web}/app; HttpOnly`, `b=2; Path=${web}/`, `c=3; Path=${web}/`]);
  });

  test('?token= is traded for a grant cookie that opens this machine and port only', async () => {
    const r = await ask(h.url, `${web}/echo?token=${h.tokens.alice}&keep=1`);
    assert.equal(r.status, 303);
    assert.equal(r.headers.location, `${web}/echo?keep=1`);
    const set = (r.headers['set-cookie'] ?? [])[0] as string;
    assert.match(set, new RegExp(`Path=${web}/; Max-Age=\\d+; HttpOnly; SameSite=Lax$`));
    assert.ok(!set.includes(h.tokens.alice), 'the cookie is not the JWT');
    const cookie = grantCookie(r);
    const page = await ask(h.url, `${web}/echo?keep=1`, { headers: { cookie } });
    assert.equal(page.status, 200);
    assert.equal(
      (page.json().headers as Record<string, string>).cookie,
      undefined,
      'the guest never sees it',
    );
    // Another port of the same machine: the grant does not open it.
    const other = await ask(h.url, `/v1/machines/${h.machines.alice}/web/${h.ports.other}/`, {
      headers: { cookie },
    });
    assert.equal(other.status, 401);
    // The API never takes a grant.
    const api = await ask(h.url, '/v1/whoami', { headers: { cookie } });
    assert.equal(api.status, 401);
  });

  test("a revoked token's grant dies with it", async () => {
    const t = await h.auth.createToken(h.auth.principalFor('alice', 'token'), 600);
    const cookie = grantCookie(await ask(h.url, `${web}/?token=${t.token}`));
    assert.equal((await ask(h.url, `${web}/echo`, { headers: { cookie } })).status, 200);
    h.auth.revokeToken(h.auth.principalFor('alice', 'token'), t.jti);
    const r = await ask(h.url, `${web}/echo`, { headers: { cookie } });
    assert.deepEqual([r.status, r.json().code], [401, 'UNAUTHENTICATED']);
  });

  test("another user's machine is 404 with a valid token; no credential is 401", async () => {
    const bobs = `/v1/machines/${h.machines.bob}/web/${h.ports.web}/`;
    const r = await ask(h.url, bobs, { headers: bearer(h.tokens.alice) });
    assert.deepEqual([r.status, r.json().code], [404, 'MACHINE_NOT_FOUND']);
    const viaToken = await ask(h.url, `${bobs}?token=${h.tokens.alice}`);
    assert.deepEqual([viaToken.status, viaToken.json().code], [404, 'MACHINE_NOT_FOUND']);
    const none = await ask(h.url, `${web}/`);
    assert.deepEqual([none.status, none.json().code], [401, 'UNAUTHENTICATED']);
    // Bob's own token opens his machine.
    assert.equal((await ask(h.url, bobs, { headers: bearer(h.tokens.bob) })).status, 200);
  });

  test('the loopback listener serves previews to its local admin without a token', async () => {
    assert.equal((await ask(h.adminUrl, `${web}/echo`)).status, 200);
  });

  test('a public port needs no credential; only its owner can make it so', async () => {
    const port = h.ports.other;
    const path = `/v1/machines/${h.machines.alice}/web/${port}`;
    assert.equal((await ask(h.url, `${path}/`)).status, 401);
    const byBob = await ask(h.url, `${path}/public`, {
      method: 'PUT',
      headers: { ...bearer(h.tokens.bob), 'content-type': 'application/json' },
      body: '{"public":true}',
    });
    assert.equal(byBob.status, 404);
    const set = await ask(h.url, `${path}/public`, {
      method: 'PUT',
      headers: { ...bearer(h.tokens.alice), 'content-type': 'application/json' },
      body: '{"public":true}',
    });
    assert.equal(set.status, 200);
    assert.deepEqual(set.json(), { port, public: true, url: `${h.url}${path}/` });
    const open = await ask(h.url, `${path}/`);
    assert.deepEqual([open.status, open.body.toString()], [200, 'other']);
    const listed = await ask(h.url, `/v1/machines/${h.machines.alice}/ports`, {
      headers: bearer(h.tokens.alice),
    });
    assert.deepEqual(
      (listed.json().ports as { port: number; public: boolean }[]).map((p) => [p.port, p.public]),
      [
        [h.ports.web, false],
        [port, true],
      ].sort((a, b) => (a[0] as number) - (b[0] as number)),
    );
    await ask(h.url, `${path}/public`, {
      method: 'PUT',
      headers: { ...bearer(h.tokens.alice), 'content-type': 'application/json' },
      body: '{"public":false}',
    });
    assert.equal((await ask(h.url, `${path}/`)).status, 401);
  });

  test('guest failures: refused port 502, no headers 504, reset mid-response cuts the client', async () => {
    const hdr = bearer(h.tokens.alice);
    const refused = await ask(h.url, `/v1/machines/${h.machines.alice}/web/${h.ports.refused}/`, {
      headers: hdr,
    });
    assert.deepEqual([refused.status, refused.json().code], [502, 'PORT_NOT_LISTENING']);
    const slow = await ask(h.url, `/v1/machines/${h.machines.alice}/web/${h.ports.slowloris}/`, {
      headers: hdr,
    });
    assert.deepEqual([slow.status, slow.json().code], [504, 'PREVIEW_TIMEOUT']);
    await assert.rejects(ask(h.url, `${web}/reset`, { headers: hdr }), /aborted|ECONNRESET|socket hang up/);
  });

  test('Host routing: {port}-{id}, proxy names (port 0 too), bound domains; never the API', async () => {
    const host = (name: string): Record<string, string> => ({ host: `${name}:${new URL(h.hostUrl).port}` });
    const portHost = `${h.ports.web}-${h.machines.alice}.${publicDomain}`;
    const r = await ask(h.hostUrl, '/echo?z=1', {
      headers: { ...host(portHost), ...bearer(h.tokens.alice) },
    });
    assert.equal(r.status, 200);
    const headers = r.json().headers as Record<string, string>;
    assert.equal(r.json().url, '/echo?z=1');
    assert.equal(headers['x-forwarded-prefix'], '');
    assert.equal((await ask(h.hostUrl, '/', { headers: host(portHost) })).status, 401);
    // ?token= on a preview host: a grant for that host, Path=/.
    const t = await ask(h.hostUrl, `/echo?token=${h.tokens.alice}`, { headers: host(portHost) });
    assert.equal(t.status, 303);
    assert.match((t.headers['set-cookie'] ?? [])[0] as string, /; Path=\/; /);
    const cookie = grantCookie(t);
    assert.equal((await ask(h.hostUrl, '/echo', { headers: { ...host(portHost), cookie } })).status, 200);
    // The API's paths on a preview host go to the guest, not the API.
    const api = await ask(h.hostUrl, `/v1/machines/${h.machines.alice}/ports`, {
      headers: { ...host(portHost), ...bearer(h.tokens.alice) },
    });
    assert.equal(api.json().url, `/v1/machines/${h.machines.alice}/ports`);
    // Proxies and bound domains are public.
    const shop = await ask(h.hostUrl, '/echo', { headers: host(`shop.${publicDomain}`) });
    assert.deepEqual([shop.status, shop.json().url], [200, '/echo']);
    const auto = await ask(h.hostUrl, '/', { headers: host(`auto.${publicDomain}`) });
    assert.equal(auto.status, 200, 'port 0: the first listening port');
    const bound = await ask(h.hostUrl, '/echo', { headers: host('www.alice.example') });
    assert.deepEqual([bound.status, bound.json().url], [200, '/echo']);
    const unknown = await ask(h.hostUrl, '/', { headers: host(`nobody.${publicDomain}`) });
    assert.equal(unknown.status, 404);
    // The API itself is still served on its own host.
    const own = await ask(h.hostUrl, '/v1/whoami', { headers: bearer(h.tokens.alice) });
    assert.deepEqual(own.json(), { user_id: 'alice' });
    const urls = await ask(h.hostUrl, `/v1/machines/${h.machines.alice}/ports`, {
      headers: bearer(h.tokens.alice),
    });
    assert.equal(
      (urls.json().ports as { url: string }[])[0]?.url,
      `http://${Math.min(h.ports.web, h.ports.other)}-${h.machines.alice}.${publicDomain}:${new URL(h.hostUrl).port}/`,
    );
  });

  test('TLS listener: previews over https, the grant cookie is Secure', async () => {
    const r = await ask(h.tlsUrl, `${web}/echo`, { headers: bearer(h.tokens.alice), ca: h.cert });
    assert.equal(r.status, 200);
    assert.equal((r.json().headers as Record<string, string>)['x-forwarded-proto'], 'https');
    const t = await ask(h.tlsUrl, `${web}/?token=${h.tokens.alice}`, { ca: h.cert });
    assert.match((t.headers['set-cookie'] ?? [])[0] as string, /; Secure$/);
  });
});
