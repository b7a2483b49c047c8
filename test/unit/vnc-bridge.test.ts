import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { WebSocket } from 'ws';
import { closeCodes } from '../../src/api/http/websocket.js';
import {
  type BareVnc,
  type BridgeServer,
  connectRfb,
  openUnix,
  openWs,
  RfbClient,
  socketLink,
  startBareVnc,
  startBridgeServer,
  startSyntheticRfb,
} from '../helpers/vnc.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function closeOf(ws: WebSocket): Promise<{ code: number; reason: string }> {
  return new Promise((r) => ws.once('close', (code, reason) => r({ code, reason: reason.toString() })));
}

async function until(what: string, f: () => boolean, ms = 5000): Promise<void> {
  const t0 = Date.now();
  while (!f()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

describe('VNC bridge: a WebSocket spliced to a real QEMU VNC server (TCG, no guest)', () => {
  let qemu: BareVnc;
  let bridge: BridgeServer;
  const gone = new Map<WebSocket, AbortController>();
  before(async () => {
    qemu = await startBareVnc();
    bridge = await startBridgeServer(qemu.sock, (ws) => {
      const c = new AbortController();
      gone.set(ws, c);
      return { signal: c.signal, highWater: 256 * 1024 };
    });
  });
  after(async () => {
    await bridge?.close();
    await qemu?.stop();
  });

  test('RFB handshake through the bridge, and a FramebufferUpdateRequest gets an update', async () => {
    const rfb = await connectRfb(bridge.url);
    const ws = rfb.ws;
    assert.equal(await rfb.version, 'RFB 003.008\n');
    const init = await rfb.handshake();
    // No guest driver has set a mode: QEMU's placeholder screen (a desktop guest's is 1024x768).
    assert.deepEqual(init, { width: 640, height: 480, bitsPerPixel: 32, name: 'QEMU' });
    const next = rfb.nextUpdate();
    rfb.request(false);
    const u = await next;
    assert.ok(u.rects >= 1);
    assert.ok(u.bytes >= 640 * 480 * 4, `a full raw update, got ${u.bytes} bytes`);
    const closed = closeOf(ws);
    rfb.close();
    await closed;
  });

  test('two viewers at once both get updates (shared), and one asking for exclusive access kicks nobody', async () => {
    const a = await connectRfb(bridge.url);
    const b = await connectRfb(bridge.url);
    await Promise.all([a.handshake(), b.handshake()]);
    for (let i = 0; i < 3; i++) {
      const both = Promise.all([a.nextUpdate(), b.nextUpdate()]);
      a.request(false);
      b.request(false);
      await both;
    }
    // share=force-shared: QEMU refuses an exclusive client instead of dropping the others.
    const exclusive = await connectRfb(bridge.url, { shared: false });
    await assert.rejects(exclusive.handshake(), /closed/);
    const both = Promise.all([a.nextUpdate(), b.nextUpdate()]);
    a.request(false);
    b.request(false);
    await both;
    assert.ok(!a.closed && !b.closed);
    a.close();
    b.close();
  });

  test('a viewer that never reads does not grow the daemon: the VNC socket is paused', async (t) => {
    // An RFB server that answers every request at once with 3 MiB (QEMU would throttle itself).
    const synth = await startSyntheticRfb();
    const flood = await startBridgeServer(synth.sock, () => ({ highWater: 256 * 1024 }));
    try {
      const rfb = await connectRfb(flood.url);
      await rfb.handshake();
      const server = [...flood.sockets].at(-1)!;
      const raw = (rfb.ws as unknown as { _socket: { pause(): void; resume(): void } })._socket;
      raw.pause();
      global.gc?.();
      const before = process.memoryUsage();
      // 600 full screens: 1.8 GiB if anything on the way held what the viewer does not take.
      for (let i = 0; i < 600; i++) {
        rfb.request(false);
        if (i % 50 === 49) await sleep(10);
      }
      await sleep(2000);
      global.gc?.();
      const now = process.memoryUsage();
      const grown = now.rss - before.rss;
      t.diagnostic(
        `held for the viewer: ${server.bufferedAmount} bytes; rss grew ${(grown / 1048576).toFixed(1)} MiB`,
      );
      // The bound is highWater (256 KiB) plus one frame ws holds and what the sockets hold.
      assert.ok(server.bufferedAmount < 16 * 1024 * 1024, `bufferedAmount ${server.bufferedAmount}`);
      assert.ok(grown < 96 * 1024 * 1024, `the process grew by ${(grown / 1048576).toFixed(1)} MiB`);
      // Reading again, the viewer gets its updates, in order.
      raw.resume();
      await until('updates after resuming', () => rfb.updates >= 10, 30_000);
      rfb.close();
    } finally {
      await flood.close();
      await synth.close();
    }
  });

  test('a viewer flooding a VNC server that does not read is not read either', async (t) => {
    const synth = await startSyntheticRfb({ readAfterHandshake: false });
    const flood = await startBridgeServer(synth.sock, () => ({ highWater: 256 * 1024 }));
    try {
      const rfb = await connectRfb(flood.url);
      await rfb.handshake();
      const server = [...flood.sockets].at(-1)!;
      // 64 MiB of pointer events in 1 MiB frames.
      const frame = Buffer.alloc(1024 * 1024 - ((1024 * 1024) % 6));
      for (let off = 0; off < frame.length; off += 6) frame[off] = 5;
      for (let i = 0; i < 64; i++) rfb.ws.send(frame, { binary: true });
      await until('the bridge stops reading the viewer', () => server.isPaused, 10_000);
      await sleep(500);
      t.diagnostic(`still with the viewer: ${(rfb.ws.bufferedAmount / 1048576).toFixed(1)} MiB of 64`);
      // What the daemon does not take stays with the viewer (its socket, then TCP's window).
      assert.ok(rfb.ws.bufferedAmount > 32 * 1024 * 1024, `bufferedAmount ${rfb.ws.bufferedAmount}`);
      rfb.ws.terminate();
    } finally {
      await flood.close();
      await synth.close();
    }
  });

  test('the viewer closing closes the VNC connection', async () => {
    const before = bridge.sockets.size;
    const rfb = await connectRfb(bridge.url);
    const ws = rfb.ws;
    await rfb.handshake();
    const server = [...bridge.sockets].at(-1)!;
    const serverClosed = closeOf(server);
    ws.terminate();
    await serverClosed;
    await until('the bridge gone', () => bridge.sockets.size === before);
  });

  test('text frames are refused with 1003', async () => {
    const ws = await openWs(bridge.url);
    const closed = closeOf(ws);
    ws.send('RFB 003.008\n');
    assert.equal((await closed).code, closeCodes.unsupported);
  });

  test('the machine going away closes the viewer with 1001 and the reason', async () => {
    const rfb = await connectRfb(bridge.url);
    const ws = rfb.ws;
    await rfb.handshake();
    const server = [...bridge.sockets].at(-1)!;
    const closed = closeOf(ws);
    gone.get(server)?.abort('machine m-1 went away (destroyed)');
    assert.deepEqual(await closed, {
      code: closeCodes.goingAway,
      reason: 'machine m-1 went away (destroyed)',
    });
  });

  test('the VNC server ending closes the viewer with 1000 (QEMU killed last)', async () => {
    // A direct client too: the Unix socket serves RFB the same way.
    const direct = new RfbClient(socketLink(await openUnix(qemu.sock)));
    await direct.handshake();
    const viewer = await connectRfb(bridge.url);
    await viewer.handshake();
    const ws = viewer.ws;
    const closed = closeOf(ws);
    await qemu.stop();
    assert.equal((await closed).code, closeCodes.normal);
    await until('the direct client closed', () => direct.closed);
  });
});
