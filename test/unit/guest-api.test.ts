// Guest API streams (docs/agent-protocol.md, "Guest API"): the real agent tunnelling its API
// socket to an AgentConnection that serves HTTP on each stream, the guest's C `hutch` over it,
// and a hostile agent's streams (ids, limits, windows).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import type { AgentConnection } from '../../src/guest/agent-connection.js';
import { AGENT_STREAM_BIT, MAX_GUEST_API_STREAMS } from '../../src/guest/guest-api.js';
import {
  ALL_FEATURES,
  encodeFrame,
  encodeTlv,
  FrameType,
  INITIAL_WINDOW,
  MAX_PAYLOAD,
  PROTOCOL_VERSION,
} from '../../src/guest/protocol.js';
import { AgentProcess, agentBinary, FakeAgent } from '../helpers/agent-harness.js';

/** A tiny machines API: GET /v1/machines lists one machine, POST /echo answers with its body. */
function apiServer(): http.Server {
  return http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (req.method === 'GET' && req.url === '/v1/machines') {
        res.setHeader('content-type', 'application/json');
        res.end(
          JSON.stringify({ machines: [{ id: 'm-1', name: 'sib', status: 'running', template: 'python' }] }),
        );
        return;
      }
      if (req.method === 'POST' && req.url === '/echo') {
        // Written in pieces, so the answer is chunked like the daemon's streamed results.
        const body = Buffer.concat(chunks);
        res.write(body.subarray(0, body.length >> 1));
        res.end(body.subarray(body.length >> 1));
        return;
      }
      res.statusCode = 404;
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ code: 'MACHINE_NOT_FOUND', message: `no machine at ${req.url}` }));
    });
  });
}

function request(
  socketPath: string,
  method: string,
  url: string,
  body?: Buffer,
): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, method, path: url, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

function guestCli(
  cli: string,
  socketPath: string,
  args: string[],
): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(cli, args, { env: { ...process.env, HUTCH_API_SOCKET: socketPath } });
    let out = '';
    let err = '';
    p.stdout.on('data', (b: Buffer) => {
      out += b.toString();
    });
    p.stderr.on('data', (b: Buffer) => {
      err += b.toString();
    });
    p.on('error', reject);
    p.on('close', (code) => resolve({ code, out, err }));
  });
}

describe('guest API streams through the real agent', { timeout: 60_000 }, () => {
  let dir: string;
  let apiSocket: string;
  let cli: string;
  let agent: AgentProcess;
  let conn: AgentConnection;
  const server = apiServer();
  const served: Duplex[] = [];

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'hutch-guest-api-'));
    apiSocket = path.join(dir, 'api.sock');
    cli = path.join(dir, 'hutch');
    symlinkSync(agentBinary(), cli);
    agent = await AgentProcess.start(agentBinary(), ['--api-socket', apiSocket]);
    conn = await agent.connect();
    assert.equal(conn.features.version, PROTOCOL_VERSION);
    assert.ok(conn.supports('guest-api'));
    conn.serveGuestApi((d) => {
      served.push(d);
      server.emit('connection', d);
    });
  });
  after(async () => {
    conn?.close();
    await agent?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("answers a guest process's requests with the host's server", async () => {
    const r = await request(apiSocket, 'GET', '/v1/machines');
    assert.equal(r.status, 200);
    assert.equal((JSON.parse(r.body.toString()) as { machines: { id: string }[] }).machines[0]?.id, 'm-1');
    const missing = await request(apiSocket, 'GET', '/v1/machines/nope');
    assert.equal(missing.status, 404);
  });

  it('moves 3 MB each way through the windows', async () => {
    const body = Buffer.alloc(3 * 1024 * 1024);
    for (let i = 0; i < body.length; i++) body[i] = (i * 7 + (i >> 12)) & 0xff;
    const r = await request(apiSocket, 'POST', '/echo', body);
    assert.equal(r.status, 200);
    assert.ok(r.body.equals(body), 'the echo differs');
  });

  it("the guest's hutch prints the documents the host CLI prints", async () => {
    const list = await guestCli(cli, apiSocket, ['list', '--json']);
    assert.equal(list.code, 0, list.err);
    assert.deepEqual(JSON.parse(list.out), [
      { id: 'm-1', name: 'sib', status: 'running', template: 'python' },
    ]);
    const ls = await guestCli(cli, apiSocket, ['ls']);
    assert.equal(ls.out, 'm-1\tsib\trunning\tpython\n');
    const missing = await guestCli(cli, apiSocket, ['get', 'nope', '--json']);
    assert.equal(missing.code, 1);
    assert.equal((JSON.parse(missing.out) as { code: string }).code, 'MACHINE_NOT_FOUND');
    assert.match(missing.err, /^hutch: MACHINE_NOT_FOUND: /);
  });

  it('every tunnel ends: none is left open on either side', async () => {
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(conn.stats.openStreams, 0);
    for (const d of served) assert.ok(d.destroyed || (d.readableEnded && d.writableFinished));
  });

  it('without a handler, connections are refused at once', async () => {
    conn.serveGuestApi(undefined);
    try {
      const r = await guestCli(cli, apiSocket, ['list', '--json']);
      assert.equal(r.code, 1);
      assert.equal((JSON.parse(r.out) as { code: string }).code, 'UNAVAILABLE');
    } finally {
      conn.serveGuestApi((d) => server.emit('connection', d));
    }
  });

  it('a tunnel dies with the agent link', async () => {
    const opened = new Promise<Duplex>((resolve) => conn.serveGuestApi(resolve));
    const client = net.connect(apiSocket);
    client.write('GET /v1/machines HTTP/1.1\r\nHost: hutch\r\n');
    const d = await opened;
    const ended = new Promise<void>((resolve) => {
      client.on('close', () => resolve());
      client.on('error', () => resolve());
      client.resume();
    });
    conn.close();
    await ended;
    assert.ok(d.destroyed);
  });
});

const apiOpen = (id: number): Buffer => encodeFrame(FrameType.API_OPEN, id);

describe('a hostile agent opening guest API streams', () => {
  const hello = { version: PROTOCOL_VERSION, features: ALL_FEATURES };

  it('may not choose a host stream id, nor reuse an open one', async () => {
    for (const frames of [[apiOpen(7)], [apiOpen(AGENT_STREAM_BIT + 1), apiOpen(AGENT_STREAM_BIT + 1)]]) {
      const fake = await FakeAgent.start({ hello });
      try {
        fake.conn.serveGuestApi(() => {});
        fake.send(...frames);
        const why = await fake.conn.closed;
        assert.match(String(why?.message), /API_OPEN/);
      } finally {
        await fake.stop();
      }
    }
  });

  it(`gets at most ${MAX_GUEST_API_STREAMS} at once; the rest are refused with CANCEL`, async () => {
    const fake = await FakeAgent.start({ hello });
    try {
      const taken: Duplex[] = [];
      fake.conn.serveGuestApi((d) => taken.push(d));
      const n = MAX_GUEST_API_STREAMS + 4;
      fake.send(...Array.from({ length: n }, (_, i) => apiOpen(AGENT_STREAM_BIT + i)));
      await fake.waitFor((f) => f.filter((x) => x.type === FrameType.CANCEL).length === 4);
      assert.equal(taken.length, MAX_GUEST_API_STREAMS);
      assert.deepEqual(
        fake.received.filter((x) => x.type === FrameType.CANCEL).map((x) => x.stream - AGENT_STREAM_BIT),
        [16, 17, 18, 19],
      );
      // A stream the host closes frees its place.
      taken[0]?.destroy();
      await fake.waitFor((f) => f.some((x) => x.type === FrameType.CANCEL && x.stream === AGENT_STREAM_BIT));
      fake.send(apiOpen(AGENT_STREAM_BIT + 100));
      await fake.waitFor(() => taken.length === MAX_GUEST_API_STREAMS + 1);
      assert.equal(fake.conn.isOpen, true);
    } finally {
      await fake.stop();
    }
  });

  it('a flood of refused opens ends the connection', async () => {
    const fake = await FakeAgent.start({ hello });
    try {
      fake.send(...Array.from({ length: 5000 }, (_, i) => apiOpen(AGENT_STREAM_BIT + i)));
      const why = await fake.conn.closed;
      assert.match(String(why?.message), /unknown-stream/);
    } finally {
      await fake.stop();
    }
  });

  it('cannot send past its window, nor frames of another kind on the stream', async () => {
    for (const [frames, kind] of [
      [
        Array.from({ length: INITIAL_WINDOW / MAX_PAYLOAD + 1 }, () =>
          encodeFrame(FrameType.DATA, AGENT_STREAM_BIT, Buffer.alloc(MAX_PAYLOAD)),
        ),
        /window/,
      ],
      [[encodeFrame(FrameType.STDOUT, AGENT_STREAM_BIT, Buffer.from('x'))], /unexpected/],
      [[encodeFrame(FrameType.DONE, AGENT_STREAM_BIT, encodeTlv([]))], /unexpected/],
    ] as const) {
      const fake = await FakeAgent.start({ hello });
      try {
        // A consumer that never reads: the window must hold.
        fake.conn.serveGuestApi((d) => d.pause());
        fake.send(apiOpen(AGENT_STREAM_BIT), ...frames);
        const why = await fake.conn.closed;
        assert.match(String(why?.message), kind);
      } finally {
        await fake.stop();
      }
    }
  });

  it('credits only what the host consumed, and ends on ERROR', async () => {
    const fake = await FakeAgent.start({ hello });
    try {
      let duplex: Duplex | undefined;
      fake.conn.serveGuestApi((d) => {
        duplex = d;
        d.pause();
      });
      fake.send(
        apiOpen(AGENT_STREAM_BIT),
        encodeFrame(FrameType.DATA, AGENT_STREAM_BIT, Buffer.alloc(60_000)),
      );
      await new Promise((r) => setTimeout(r, 100));
      assert.ok(!fake.received.some((f) => f.type === FrameType.CREDIT), 'credited bytes nobody read');
      const got: Buffer[] = [];
      duplex?.on('data', (c: Buffer) => got.push(c));
      duplex?.resume();
      const credit = await fake.next(FrameType.CREDIT);
      assert.equal(credit.payload.readUInt32BE(0), 60_000);
      const closed = new Promise<void>((resolve) => duplex?.on('close', () => resolve()));
      fake.send(
        encodeFrame(
          FrameType.ERROR,
          AGENT_STREAM_BIT,
          encodeTlv([
            { tag: 1, value: Buffer.from('EPIPE') },
            { tag: 2, value: Buffer.from('the client went away') },
          ]),
        ),
      );
      await closed;
      assert.equal(fake.conn.stats.openStreams, 0);
      assert.equal(fake.conn.isOpen, true);
    } finally {
      await fake.stop();
    }
  });
});
