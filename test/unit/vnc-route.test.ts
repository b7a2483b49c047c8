import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { closeCodes } from '../../src/api/http/websocket.js';
import {
  type BareVnc,
  connectRfb,
  fixtureToken,
  openWs,
  startBareVnc,
  startVncApi,
  type VncApi,
} from '../helpers/vnc.js';

/** The status an upgrade was refused with (or 101). */
function upgradeStatus(url: string, headers: Record<string, string> = {}): Promise<number> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers });
    ws.once('open', () => {
      ws.terminate();
      resolve(101);
    });
    ws.once('unexpected-response', (_req, res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    ws.once('error', reject);
  });
}

describe('GET /v1/machines/{id}/vnc: the route, its auth and its ends (real server, real QEMU VNC)', () => {
  let qemu: BareVnc;
  let api: VncApi;
  let ws: string;
  before(async () => {
    qemu = await startBareVnc();
    api = await startVncApi(qemu.sock);
    ws = api.base.replace(/^http/, 'ws');
  });
  after(async () => {
    await api?.close();
    await qemu?.stop();
  });

  test('browsers pass ?token= (no headers on a WebSocket): RFB through the route', async () => {
    const rfb = await connectRfb(api.wsUrl);
    const init = await rfb.handshake();
    assert.equal(init.name, 'QEMU');
    const next = rfb.nextUpdate();
    rfb.request(false);
    await next;
    rfb.close();
  });

  test('an authorization header works as on every route', async () => {
    const s = await openWs(`${ws}/v1/machines/m1/vnc`, { authorization: `Bearer ${fixtureToken}` });
    s.terminate();
  });

  test('no token, a bad one, or another machine are refused before the upgrade', async () => {
    assert.equal(await upgradeStatus(`${ws}/v1/machines/m1/vnc`), 401);
    assert.equal(await upgradeStatus(`${ws}/v1/machines/m1/vnc?token=a.b.c`), 401);
    assert.equal(await upgradeStatus(`${ws}/v1/machines/m1/vnc?token=`), 401);
    assert.equal(await upgradeStatus(`${ws}/v1/machines/m2/vnc?token=${fixtureToken}`), 404);
    // A header wins over the query: a bad header is not rescued by a good ?token=.
    assert.equal(
      await upgradeStatus(`${ws}/v1/machines/m1/vnc?token=${fixtureToken}`, {
        authorization: 'Bearer x.y.z',
      }),
      401,
    );
  });

  test('a plain GET is told to upgrade', async () => {
    const r = await fetch(`${api.base}/v1/machines/m1/vnc?token=${fixtureToken}`);
    assert.equal(r.status, 426);
  });

  test('the machine going away: 1001 with the reason when its VNC server ends', async () => {
    const rfb = await connectRfb(api.wsUrl);
    await rfb.handshake();
    const closed = new Promise<{ code: number; reason: string }>((r) =>
      rfb.ws.once('close', (code, reason) => r({ code, reason: reason.toString() })),
    );
    api.setState('destroyed');
    await qemu.stop();
    assert.deepEqual(await closed, {
      code: closeCodes.goingAway,
      reason: 'machine m1 went away (destroyed)',
    });
  });
});
