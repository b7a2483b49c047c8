import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { openNoVnc, renderNoVnc } from '../helpers/novnc.js';
import { type BareVnc, startBareVnc, startVncApi, type VncApi } from '../helpers/vnc.js';

/** PNG signature, then IHDR's width and height. */
function pngSize(png: Buffer): { width: number; height: number } {
  assert.equal(png.subarray(0, 8).toString('hex'), '89504e470d0a1a0a');
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
}

describe('noVNC in headless Chromium through the VNC route and bridge, to a real QEMU', () => {
  let qemu: BareVnc;
  let api: VncApi;
  before(async () => {
    qemu = await startBareVnc();
    api = await startVncApi(qemu.sock);
  });
  after(async () => {
    await api?.close();
    await qemu?.stop();
  });

  test("renderNoVnc connects with ?token= and draws QEMU's screen (text on black: not blank)", async () => {
    const r = await renderNoVnc(api.wsUrl, { timeoutMs: 30_000 });
    assert.equal(r.connected, true);
    assert.equal(r.canvas.width, 640);
    assert.equal(r.canvas.height, 480);
    // "Guest has not initialized the display (yet)." in light grey on black.
    assert.ok(r.canvas.nonBlankPixels > 200, `non-blank pixels: ${r.canvas.nonBlankPixels}`);
    assert.ok(r.canvas.colours >= 2);
    assert.deepEqual(pngSize(r.pagePng), { width: 1024, height: 768 });
  });

  test('a bad token: noVNC never connects', async () => {
    const r = await renderNoVnc(api.wsUrl.replace(/token=[^&]*/, 'token=a.b.c'), { timeoutMs: 10_000 });
    assert.equal(r.connected, false);
    assert.equal(r.canvas.nonBlankPixels, 0);
  });

  test('two browsers at once, and input through noVNC keeps the session up', async () => {
    const a = await openNoVnc(api.wsUrl, { timeoutMs: 30_000 });
    try {
      const b = await openNoVnc(api.wsUrl, { timeoutMs: 30_000 });
      try {
        assert.ok(a.connected && b.connected);
        await a.click(100, 100);
        await a.type('hutch');
        await a.press('Enter');
        assert.equal((await a.state()).state, 'connected');
        assert.equal((await b.state()).state, 'connected');
        assert.ok((await b.canvas()).nonBlankPixels > 200);
      } finally {
        await b.close();
      }
    } finally {
      await a.close();
    }
  });
});
