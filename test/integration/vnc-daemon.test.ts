import assert from 'node:assert/strict';
import { symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { userWithToken } from '../helpers/accounts.js';
import { cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { renderNoVnc } from '../helpers/novnc.js';
import { type BareVnc, connectRfb, startBareVnc } from '../helpers/vnc.js';

/** The status and code an upgrade was refused with. */
function refused(url: string): Promise<{ status: number; code: string }> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.once('open', () => reject(new Error('the upgrade was accepted')));
    ws.once('unexpected-response', (_req, res) => {
      let text = '';
      res.on('data', (b: Buffer) => {
        text += b.toString();
      });
      res.on('end', () => resolve({ status: res.statusCode ?? 0, code: JSON.parse(text).code }));
    });
    ws.once('error', () => {});
  });
}

describe('the real daemon: GET /v1/machines/{id}/vnc with ?token= (engine, auth, route, bridge)', () => {
  let d: TestDaemon;
  let qemu: BareVnc;
  let alice: { token: string };
  let bob: { token: string };
  let id: string;
  let ws: string;
  before(async () => {
    d = await startDaemon();
    ws = d.url.replace(/^http/, 'ws');
    alice = await userWithToken(d, 'alice');
    bob = await userWithToken(d, 'bob');
    const r = await fetch(new URL('/v1/machines', d.url), {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${alice.token}` },
      body: JSON.stringify({ template: 'python', ttl_seconds: 300 }),
    });
    const body = (await r.json()) as { id: string };
    assert.equal(r.status, 201, JSON.stringify(body));
    id = body.id;
    qemu = await startBareVnc();
  });
  after(async () => {
    await qemu?.stop();
    if (d) await cleanup(d);
  });

  test("a machine without a display: 409 NO_DISPLAY; another user's: 404; no valid token: 401", async () => {
    assert.deepEqual(await refused(`${ws}/v1/machines/${id}/vnc?token=${alice.token}`), {
      status: 409,
      code: 'NO_DISPLAY',
    });
    assert.equal((await refused(`${ws}/v1/machines/${id}/vnc?token=${bob.token}`)).status, 404);
    assert.equal((await refused(`${ws}/v1/machines/${id}/vnc?token=a.b.c`)).status, 401);
  });

  test('with a VNC server in its run dir, RFB and noVNC work through the daemon', async () => {
    // Stand-in for the display QEMU will have: the run dir's vnc.sock leads to a bare QEMU's.
    symlinkSync(qemu.sock, join(d.stateDir, 'run', id, 'vnc.sock'));
    const url = `${ws}/v1/machines/${id}/vnc?token=${alice.token}`;
    const rfb = await connectRfb(url);
    assert.equal((await rfb.handshake()).name, 'QEMU');
    const next = rfb.nextUpdate();
    rfb.request(false);
    await next;
    rfb.close();
    const r = await renderNoVnc(url, { timeoutMs: 30_000 });
    assert.equal(r.connected, true);
    assert.ok(r.canvas.nonBlankPixels > 200);
  });

  test('the VNC server ending with a destroyed machine: the viewer gets 1001 and the reason', async () => {
    const rfb = await connectRfb(`${ws}/v1/machines/${id}/vnc?token=${alice.token}`);
    await rfb.handshake();
    const closed = new Promise<{ code: number; reason: string }>((r) =>
      rfb.ws.once('close', (code, reason) => r({ code, reason: reason.toString() })),
    );
    const del = await fetch(new URL(`/v1/machines/${id}`, d.url), {
      method: 'DELETE',
      headers: { authorization: `Bearer ${alice.token}` },
    });
    assert.equal(del.status, 204);
    // A desktop's VNC server is its QEMU, which the destroy ends: the stand-in ends here.
    await qemu.stop();
    const c = await Promise.race([
      closed,
      new Promise<{ code: number; reason: string }>((r) =>
        setTimeout(() => r({ code: 0, reason: 'still open 10 s after the destroy' }), 10_000),
      ),
    ]);
    assert.equal(c.code, 1001, c.reason);
    assert.match(c.reason, new RegExp(`machine ${id} went away`));
  });
});
