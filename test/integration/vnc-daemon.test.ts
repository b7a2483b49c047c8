import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { userWithToken } from '../helpers/accounts.js';
import { cleanup, type TestDaemon, waitFor } from '../helpers/daemon.js';
import { startDesktopDaemon } from '../helpers/desktop.js';
import { openNoVnc } from '../helpers/novnc.js';
import { connectRfb } from '../helpers/vnc.js';

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

/**
 * The VNC channel on the real daemon and a real desktop: RFB through the WebSocket route with
 * ?token=, noVNC in headless Chromium showing the desktop and driving it (a click and typed keys
 * reach the guest), several viewers at once, and the refusals (no display, another user, no token).
 */
describe('the real daemon: GET /v1/machines/{id}/vnc with ?token= (engine, auth, route, bridge)', () => {
  let d: TestDaemon;
  let alice: { token: string };
  let bob: { token: string };
  let id: string;
  let desk: string;
  let ws: string;
  const create = async (template: string): Promise<string> => {
    const r = await fetch(new URL('/v1/machines', d.url), {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${alice.token}` },
      body: JSON.stringify({ template, ttl_seconds: 900 }),
    });
    const body = (await r.json()) as { id: string };
    assert.equal(r.status, 201, JSON.stringify(body));
    return body.id;
  };
  const exec = async (m: string, cmd: string): Promise<{ exit_code: number; stdout: string }> => {
    const r = await fetch(new URL(`/v1/machines/${m}/exec`, d.url), {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${alice.token}` },
      body: JSON.stringify({ cmd }),
    });
    return (await r.json()) as { exit_code: number; stdout: string };
  };
  before(async () => {
    d = await startDesktopDaemon();
    ws = d.url.replace(/^http/, 'ws');
    alice = await userWithToken(d, 'alice');
    bob = await userWithToken(d, 'bob');
    id = await create('python');
    desk = await create('desktop');
  });
  after(async () => {
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

  test("RFB through the daemon: the desktop's 1024x768 screen, two viewers at once", async () => {
    const url = `${ws}/v1/machines/${desk}/vnc?token=${alice.token}`;
    const one = await connectRfb(url);
    const two = await connectRfb(url);
    const init = await one.handshake();
    assert.equal(init.width, 1024);
    assert.equal(init.height, 768);
    assert.equal((await two.handshake()).width, 1024);
    for (const v of [one, two]) {
      const next = v.nextUpdate();
      v.request(false);
      await next;
    }
    one.close();
    two.close();
  });

  test('noVNC in headless Chromium shows the desktop and drives it', async () => {
    const v = await openNoVnc(`${ws}/v1/machines/${desk}/vnc?token=${alice.token}`, { timeoutMs: 60_000 });
    try {
      assert.equal(v.connected, true);
      const canvas = await waitFor(
        'the desktop on the canvas',
        async () => {
          const c = await v.canvas();
          return c.width === 1024 && c.colours > 3 ? c : undefined;
        },
        30_000,
      );
      assert.equal(canvas.height, 768);
      // The page itself shows it (what a person would see).
      const page = await v.screenshot();
      assert.ok(page.length > 5000, 'a page screenshot with the desktop in it');
      // A click through noVNC focuses the terminal; keys typed there run a command in the guest.
      await v.click(400, 300);
      // Unshifted characters only: Puppeteer types "A" or ">" without pressing Shift, and QEMU
      // follows the key's scancode (noVNC sends both), as it should for a real keyboard.
      await v.type('touch /tmp/novnc-was-here');
      await v.press('Enter');
      const out = await waitFor(
        'the command typed through noVNC',
        async () => {
          const r = await exec(desk, 'ls /tmp/novnc-was-here 2>/dev/null');
          return r.exit_code === 0 ? r.stdout : undefined;
        },
        30_000,
      );
      assert.equal(out, '/tmp/novnc-was-here\n');
    } finally {
      await v.close();
    }
  });

  test('the VNC server ending with a destroyed machine: the viewer gets 1001 and the reason', async () => {
    const rfb = await connectRfb(`${ws}/v1/machines/${desk}/vnc?token=${alice.token}`);
    await rfb.handshake();
    const closed = new Promise<{ code: number; reason: string }>((r) =>
      rfb.ws.once('close', (code, reason) => r({ code, reason: reason.toString() })),
    );
    const del = await fetch(new URL(`/v1/machines/${desk}`, d.url), {
      method: 'DELETE',
      headers: { authorization: `Bearer ${alice.token}` },
    });
    assert.equal(del.status, 204);
    const c = await Promise.race([
      closed,
      new Promise<{ code: number; reason: string }>((r) =>
        setTimeout(() => r({ code: 0, reason: 'still open 10 s after the destroy' }), 10_000),
      ),
    ]);
    assert.equal(c.code, 1001, c.reason);
    assert.match(c.reason, new RegExp(`machine ${desk} went away`));
  });
});
