/**
 * Previews of a real guest: a server bound to the guest's own loopback (not reachable over any
 * network) answers through /v1/machines/{id}/web/{port}/ — pages, streams, WebSockets,
 * rewriting — for its owner only.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { userWithToken } from '../helpers/accounts.js';
import { api, cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { startGuestWebServer } from '../helpers/guest-web-server.js';

describe('previews of a real guest', () => {
  let d: TestDaemon;
  let id: string;
  let base: string;
  before(async () => {
    d = await startDaemon();
    const r = await api(d.url, 'POST', '/v1/machines', { template: 'python', ttl_seconds: 600 });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    id = r.body.id as string;
    const s = await api(d.url, 'POST', `/v1/machines/${id}/exec`, {
      cmd: startGuestWebServer(8000),
      timeout_ms: 60_000,
    });
    assert.equal(s.body.exit_code, 0, JSON.stringify(s.body));
    base = new URL(`/v1/machines/${id}/web/8000/`, d.url).href;
  });
  after(async () => cleanup(d));

  test('the listening port is listed, and a page served on the guest loopback comes back', async () => {
    const ports = await api(d.url, 'GET', `/v1/machines/${id}/ports`);
    assert.equal(ports.status, 200, JSON.stringify(ports.body));
    assert.ok(
      (ports.body.ports as { port: number }[]).some((p) => p.port === 8000),
      JSON.stringify(ports.body),
    );
    const r = await fetch(base);
    assert.equal(r.status, 200);
    assert.equal(await r.text(), 'hello from the guest');
  });

  test('the prefix is passed on, the API token is not, and Location and cookie paths are rewritten', async () => {
    const h = await fetch(new URL('headers', base), {
      headers: { authorization: 'Bearer not-for-the-guest' },
    });
    // A bad bearer token is a 401 before anything reaches the guest.
    assert.equal(h.status, 401);
    const ok = await (await fetch(new URL('headers', base))).text();
    assert.equal(ok, `prefix=/v1/machines/${id}/web/8000 auth=None`);
    const r = await fetch(new URL('redirect', base), { redirect: 'manual' });
    assert.equal(r.status, 302);
    assert.equal(r.headers.get('location'), `/v1/machines/${id}/web/8000/target`);
    assert.match(r.headers.get('set-cookie') ?? '', new RegExp(`Path=/v1/machines/${id}/web/8000/`));
  });

  test('a streamed response arrives in pieces, as the guest writes them', async () => {
    const r = await fetch(new URL('stream', base));
    const reader = (r.body as ReadableStream<Uint8Array>).getReader();
    const first = await reader.read();
    const t0 = Date.now();
    let rest = '';
    for (;;) {
      const c = await reader.read();
      if (c.done) break;
      rest += Buffer.from(c.value).toString();
    }
    assert.match(Buffer.from(first.value ?? []).toString(), /^tick 0/);
    assert.match(rest, /tick 4/);
    // The remaining ticks came over time after the first: it was not buffered whole.
    assert.ok(Date.now() - t0 > 800);
  });

  test('a WebSocket to the guest server echoes', async () => {
    const ws = new WebSocket(new URL('ws', base).href.replace('http', 'ws'));
    const got = await new Promise<string>((resolve, reject) => {
      ws.on('open', () => ws.send('ping'));
      ws.on('message', (m) => resolve(m.toString()));
      ws.on('error', reject);
    });
    ws.close();
    assert.equal(got, 'echo:ping');
  });

  test("another user's token is refused; a port nobody listens on says so", async () => {
    const { token } = await userWithToken(d, 'eve');
    const r = await fetch(base, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(r.status, 404);
    const none = await fetch(new URL(`/v1/machines/${id}/web/8001/`, d.url));
    assert.equal(none.status, 502);
    assert.equal(((await none.json()) as { code: string }).code, 'PORT_NOT_LISTENING');
  });
});
