import assert from 'node:assert/strict';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { WebSocket, WebSocketServer } from 'ws';
import { feedInput, WsOutput } from '../../src/api/http/websocket.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('WebSocket flow: output counted per frame, input read only as fast as it is written', () => {
  let wss: WebSocketServer;
  let url: string;
  let accepted: (ws: WebSocket) => void;
  before(async () => {
    wss = new WebSocketServer({ port: 0, host: '127.0.0.1', maxPayload: 1024 * 1024 });
    await new Promise<void>((r) => wss.once('listening', () => r()));
    url = `ws://127.0.0.1:${(wss.address() as AddressInfo).port}`;
    wss.on('connection', (ws) => accepted(ws));
  });
  after(() => {
    for (const c of wss.clients) c.terminate();
    wss.close();
  });

  const connect = async (): Promise<{ client: WebSocket; server: WebSocket }> => {
    const server = new Promise<WebSocket>((r) => {
      accepted = r;
    });
    const client = new WebSocket(url);
    await new Promise((r) => client.once('open', r));
    return { client, server: await server };
  };

  test('a peer that does not read is over the limit after a bounded number of tiny chunks', async () => {
    const { client, server } = await connect();
    client.pause();
    const out = new WsOutput(server, 1024 * 1024);
    const sent: Buffer[] = [];
    let ok = true;
    // The kernel's socket buffers take the first few MB; after them, every chunk is ours to hold.
    for (let i = 0; ok && i < 2_000_000; i++) {
      const b = Buffer.from(`chunk ${String(i).padStart(27, '0')}\n`); // 35 bytes, like a console read
      sent.push(b);
      ok = out.send(b);
      if (i % 1000 === 999) await sleep(0);
    }
    assert.equal(ok, false, 'the limit was reached');
    assert.ok(out.queued <= 1024 * 1024 + 1024 + 35, `held ${out.queued}`);
    // Once the peer reads, everything arrives, in order, in far fewer frames than chunks.
    let frames = 0;
    const got: Buffer[] = [];
    const want = Buffer.concat(sent);
    const all = new Promise<void>((resolve) => {
      let size = 0;
      client.on('message', (d: Buffer) => {
        frames++;
        got.push(d);
        size += d.length;
        if (size >= want.length) resolve();
      });
    });
    client.resume();
    await all;
    assert.ok(Buffer.concat(got).equals(want));
    assert.ok(frames < sent.length / 4, `${frames} frames for ${sent.length} chunks`);
    await out.drained(0);
    assert.equal(out.queued, 0);
    client.terminate();
  });

  test('text frames and the close come after the output queued before them', async () => {
    const { client, server } = await connect();
    const out = new WsOutput(server);
    const seen: string[] = [];
    const closed = new Promise<number>((r) => client.on('close', (code) => r(code)));
    client.on('message', (d: Buffer, binary) => seen.push(binary ? `b:${d.length}` : `t:${d}`));
    for (let i = 0; i < 100; i++) out.send(Buffer.alloc(100, 'x'));
    out.sendText('{"type":"exit"}');
    out.close(1000, 'done');
    assert.equal(await closed, 1000);
    assert.equal(seen.at(-1), 't:{"type":"exit"}');
    const bytes = seen.filter((s) => s.startsWith('b:')).reduce((n, s) => n + Number(s.slice(2)), 0);
    assert.equal(bytes, 100 * 100);
  });

  test('input waits for the writer: past the high-water mark the socket is not read', async () => {
    const { client, server } = await connect();
    const written: Buffer[] = [];
    const pending: (() => void)[] = [];
    let held = 0;
    feedInput(
      server,
      (b) =>
        new Promise<void>((r) => {
          written.push(b);
          held += b.length;
          pending.push(() => {
            held -= b.length;
            r();
          });
        }),
      { highWater: 256 * 1024 },
    );
    const msg = Buffer.alloc(64 * 1024, 'k');
    const total = 64 * 1024 * 1024;
    let queued = 0;
    // The client sends far more than fits anywhere; the server takes only what the writer allows.
    for (let sent = 0; sent < total; sent += msg.length) {
      if (client.bufferedAmount > 4 * 1024 * 1024) await sleep(1);
      client.send(msg);
      queued += msg.length;
    }
    await sleep(300);
    assert.ok(held <= 256 * 1024 + 128 * 1024, `the writer was handed ${held} bytes at once`);
    assert.ok(server.isPaused, 'the server stopped reading');
    // Release as the writer takes them: everything arrives, in order.
    while (written.reduce((n, b) => n + b.length, 0) < queued) {
      const p = pending.splice(0);
      for (const r of p) r();
      await sleep(p.length ? 0 : 5);
    }
    assert.equal(
      written.reduce((n, b) => n + b.length, 0),
      queued,
    );
    client.terminate();
  });
});
