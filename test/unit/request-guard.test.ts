import assert from 'node:assert/strict';
import type { IncomingMessage, Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { attachmentDisposition } from '../../src/api/content-disposition.js';
import { decodePathSegment, requestUrl } from '../../src/api/http/match.js';
import { createGuardedServer } from '../../src/api/http/request-guard.js';
import { checkHandshake } from '../../src/api/http/websocket.js';
import { HutchError } from '../../src/errors.js';
import { type Endpoint, exchange, rawRequest, tcpEndpoint } from '../helpers/raw-http.js';

const idleMs = 400;

/** How each request's handler ended, by path. */
const ended = new Map<string, string>();

async function readBody(req: IncomingMessage): Promise<number> {
  let n = 0;
  for await (const c of req as AsyncIterable<Buffer>) n += c.length;
  return n;
}

describe('request guard: slow bodies, idle connections, malformed requests, the connection cap', () => {
  let server: Server;
  let ep: Endpoint;
  before(async () => {
    server = createGuardedServer({ bodyIdleTimeoutMs: idleMs, maxConnections: 8 }, (req, res) => {
      const path = req.url ?? '';
      void (async () => {
        try {
          if (path === '/slow-reader') await new Promise((r) => setTimeout(r, idleMs * 3));
          if (path === '/gives-up') {
            // Stops reading part-way (leaving the loop destroys the request), then takes its time.
            let n = 0;
            for await (const c of req as AsyncIterable<Buffer>) {
              n += c.length;
              if (n > 64 * 1024) break;
            }
            await new Promise((r) => setTimeout(r, idleMs * 3));
            res.writeHead(413).end('too large');
            ended.set(path, 'gave up');
            return;
          }
          if (path === '/stream') {
            // Answers for a while without reading the body it was promised.
            res.writeHead(200);
            for (let i = 0; i < 6; i++) {
              res.write('x');
              await new Promise((r) => setTimeout(r, idleMs / 2));
            }
            res.end();
            ended.set(path, 'answered');
            return;
          }
          const n = await readBody(req);
          ended.set(path, `read ${n}`);
          res.end(`read ${n}`);
        } catch (e) {
          ended.set(path, `failed: ${(e as Error).message}`);
          if (!res.headersSent) res.writeHead(500).end();
        }
      })();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    ep = tcpEndpoint('guard', `http://127.0.0.1:${(server.address() as AddressInfo).port}`);
  });
  after(() => {
    server.closeAllConnections();
    server.close();
  });

  test('a body that stops is answered 408 after the idle time, and its reader ends', async () => {
    const o = await exchange(ep, rawRequest('POST', '/stall', [], 'abc', { contentLength: 100 }), 5000);
    assert.equal(o.kind, 'response');
    if (o.kind !== 'response') return;
    assert.equal(o.res.status, 408);
    assert.equal(JSON.parse(o.res.body.toString()).code, 'REQUEST_TIMEOUT');
    assert.ok(o.ms >= idleMs && o.ms < idleMs * 4, `${o.ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
    assert.match(ended.get('/stall') ?? '', /^failed/);
  });

  test('a trickle slower than a byte per idle/2 but steady is never cut', async () => {
    const body = 'abcdefgh';
    const writes = [
      {
        data: rawRequest('POST', '/trickle', [], '', { contentLength: body.length }),
        thenWaitMs: idleMs / 2,
      },
      ...[...body].map((c) => ({ data: c, thenWaitMs: idleMs / 2 })),
    ];
    const o = await exchange(ep, writes, 10_000);
    assert.ok(o.kind === 'response' && o.res.status === 200, JSON.stringify(o));
    assert.equal(ended.get('/trickle'), 'read 8');
  });

  test('a handler that reads late, or answers without reading, is not the client stalling', async () => {
    const big = Buffer.alloc(1024 * 1024, 1);
    const o = await exchange(ep, rawRequest('POST', '/slow-reader', [], big), 10_000);
    assert.ok(o.kind === 'response' && o.res.status === 200, JSON.stringify(o));
    assert.equal(ended.get('/slow-reader'), `read ${big.length}`);
    const s = await exchange(ep, rawRequest('POST', '/stream', [], '', { contentLength: 10 }), 10_000);
    assert.ok(s.kind === 'response' && s.res.status === 200 && s.res.body.toString() === 'xxxxxx');
  });

  test('a handler that gives up on a body and answers late gets its own answer out', async () => {
    const crashes: unknown[] = [];
    const onCrash = (e: unknown): void => void crashes.push(e);
    process.on('uncaughtException', onCrash);
    try {
      const head = rawRequest('POST', '/gives-up', [], '', { contentLength: 4 * 1024 * 1024 });
      const o = await exchange(
        ep,
        [{ data: head }, { data: Buffer.alloc(256 * 1024, 1), thenWaitMs: idleMs * 5 }],
        10_000,
      );
      assert.ok(o.kind === 'response' && o.res.status === 413, JSON.stringify(o).slice(0, 300));
      assert.equal(ended.get('/gives-up'), 'gave up');
      await new Promise((r) => setTimeout(r, 100));
    } finally {
      process.off('uncaughtException', onCrash);
    }
    assert.deepEqual(crashes, []);
  });

  test('headers that stop, and a connection that sends nothing, get 408 in the error format', async () => {
    for (const req of ['POST /x HTTP/1.1\r\nhost: x\r\n', '']) {
      const o = await exchange(ep, req, 5000);
      assert.ok(o.kind === 'response' && o.res.status === 408, JSON.stringify(o));
      assert.equal(JSON.parse(o.res.body.toString()).code, 'REQUEST_TIMEOUT');
    }
  });

  test('what node cannot parse or does not serve is answered in the error format', async () => {
    const cases: [Buffer | string, number, string][] = [
      ['get / HTTP/1.1\r\n\r\n', 400, 'INVALID_ARGUMENT'],
      ['GET /\u0000 HTTP/1.1\r\n\r\n', 400, 'INVALID_ARGUMENT'],
      [rawRequest('GET', '/', [['x', 'a'.repeat(20_000)]]), 400, 'INVALID_ARGUMENT'],
      [rawRequest('GET', '/', [['expect', 'teapot']]), 400, 'INVALID_ARGUMENT'],
      [rawRequest('CONNECT', 'localhost:1'), 405, 'METHOD_NOT_ALLOWED'],
    ];
    for (const [req, status, code] of cases) {
      const o = await exchange(ep, req, 5000);
      assert.ok(o.kind === 'response', JSON.stringify(req).slice(0, 40));
      if (o.kind !== 'response') continue;
      assert.equal(o.res.status, status);
      assert.equal(JSON.parse(o.res.body.toString()).code, code);
    }
  });

  test('past the connection cap, new connections are closed at once', async () => {
    const socks = Array.from({ length: 20 }, () => ep.connect());
    let closed = 0;
    for (const s of socks) {
      s.on('error', () => {});
      s.on('close', () => closed++);
      s.resume();
    }
    await new Promise((r) => setTimeout(r, 200));
    // At least the 12 past the cap (more while earlier tests' connections are still counted).
    assert.ok(closed >= 12 && closed < 20, `${closed} closed`);
    for (const s of socks) s.destroy();
  });
});

describe('odd input in paths, downloads and handshakes', () => {
  test('a malformed escape or target is a 400, not a URIError', () => {
    assert.equal(decodePathSegment('a%20b'), 'a b');
    for (const s of ['%zz', '%', '%E0%A4%A', '%ED%A0%80', '%C0%AF'])
      assert.throws(
        () => decodePathSegment(s),
        (e: unknown) => e instanceof HutchError && e.code === 'INVALID_ARGUMENT',
      );
    assert.equal(requestUrl('//evil/v1/x?a=1').pathname, '//evil/v1/x');
    assert.throws(() => requestUrl('http://[::1'), HutchError);
    // Dot segments would make one route another (/v1/machines/../disks is /v1/disks).
    for (const t of [
      '/v1/machines/../disks',
      '/v1/machines/%2e%2e/disks',
      '/v1/./disks',
      '/v1/machines/%2E./x',
    ])
      assert.throws(() => requestUrl(t), /"\." or "\.\." segments/, t);
    assert.equal(requestUrl('/v1/machines/a..b/disks?path=../x').pathname, '/v1/machines/a..b/disks');
  });

  test('any file name fits content-disposition, as RFC 5987 UTF-8 with an ASCII fallback', () => {
    assert.equal(
      attachmentDisposition('€uro "x".txt'),
      `attachment; filename="_uro _x_.txt"; filename*=UTF-8''%E2%82%ACuro%20%22x%22.txt`,
    );
    assert.match(
      attachmentDisposition('\ud800\r\n'),
      /^attachment; filename="___"; filename\*=UTF-8''%EF%BF%BD%0D%0A$/,
    );
    assert.match(attachmentDisposition(''), /filename="download"/);
  });

  test('a handshake ws would refuse is refused first', () => {
    const req = (headers: Record<string, string>): IncomingMessage =>
      ({
        headers: {
          upgrade: 'websocket',
          'sec-websocket-version': '13',
          'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==',
          ...headers,
        },
      }) as unknown as IncomingMessage;
    checkHandshake(req({}));
    checkHandshake(req({ 'sec-websocket-protocol': 'a, b' }));
    const bads: Record<string, string>[] = [
      { upgrade: 'h2c' },
      { 'sec-websocket-key': 'short' },
      { 'sec-websocket-version': '12' },
      { 'sec-websocket-protocol': 'a,,b' },
      { 'sec-websocket-protocol': 'a, a' },
    ];
    for (const bad of bads) assert.throws(() => checkHandshake(req(bad)), HutchError, JSON.stringify(bad));
  });
});
