/**
 * Hostile clients and guests against a desktop's screen: requests without credentials or for
 * another user's desktop, input that is not what it claims (off-screen points, unknown keys,
 * text that cannot be typed, floods), screenshots asked for at once and in bulk, VNC viewers
 * that never read or send text; guests that kill their display server, switch to a huge mode or
 * flood the screen. Each is refused or tolerated with a clear answer, nothing reaches the host,
 * the daemon's memory stays bounded, and the desktop still serves its owner afterwards.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WebSocket } from 'ws';
import { pngSize } from '../../src/desktop/png.js';
import { authed, userWithToken } from '../helpers/accounts.js';
import { api, cleanup, type Json, type TestDaemon } from '../helpers/daemon.js';
import { startDesktopDaemon } from '../helpers/desktop.js';
import { bugLines, memoryOf, processAlive, Tally } from '../helpers/hostile.js';

describe('hostile: desktops', () => {
  const tally = new Tally('desktops');
  let d: TestDaemon;
  let alice: string;
  let bob: string;
  let desk: string;
  let py: string;
  const A = (method: string, path: string, body?: unknown): Promise<Json> =>
    authed(d.url, method, path, { token: alice }, body);
  const shot = async (id: string, token = alice, query = ''): Promise<Response> =>
    fetch(`${d.url}/v1/machines/${id}/screenshot${query}`, { headers: { authorization: `Bearer ${token}` } });
  const sh = async (cmd: string): Promise<{ code: number; out: string }> => {
    const r = await A('POST', `/v1/machines/${desk}/exec`, { cmd, timeout_ms: 60_000 });
    return { code: r.body.exit_code as number, out: String(r.body.stdout) };
  };
  const stillServes = async (): Promise<string | undefined> => {
    const r = await shot(desk);
    assert.equal(r.status, 200, await r.clone().text());
    const size = pngSize(Buffer.from(await r.arrayBuffer()));
    const i = await A('POST', `/v1/machines/${desk}/input`, { actions: [{ type: 'move', x: 5, y: 5 }] });
    assert.equal(i.status, 200, JSON.stringify(i.body));
    return `${size.width}x${size.height}`;
  };

  before(async () => {
    d = await startDesktopDaemon();
    alice = (await userWithToken(d, 'alice')).token;
    bob = (await userWithToken(d, 'bob')).token;
    const r = await A('POST', '/v1/machines', { template: 'desktop', ttl_seconds: 1800 });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    desk = r.body.id as string;
    const p = await A('POST', '/v1/machines', { template: 'python', ttl_seconds: 1800 });
    py = p.body.id as string;
  });
  after(async () => {
    await cleanup(d);
  });

  test('hostile clients', async () => {
    const forged = `${alice.slice(0, -4)}AAAA`;
    const endpoints: [string, string, unknown?][] = [
      ['GET', `/v1/machines/${desk}/screenshot`],
      ['POST', `/v1/machines/${desk}/input`, { actions: [{ type: 'move', x: 1, y: 1 }] }],
    ];
    for (const [method, path, body] of endpoints) {
      await tally.check(`${method} ${path} with a forged token`, async () => {
        const r = await authed(d.url, method, path, { token: forged }, body);
        assert.equal(r.status, 401, JSON.stringify(r.body));
        return undefined;
      });
      await tally.check(`${method} ${path} as another user`, async () => {
        const r = await authed(d.url, method, path, { token: bob }, body);
        assert.equal(r.status, 404, JSON.stringify(r.body));
        return undefined;
      });
    }
    for (const [what, url] of [
      ['a forged ?token=', `/v1/machines/${desk}/vnc?token=${forged}`],
      ["another user's ?token=", `/v1/machines/${desk}/vnc?token=${bob}`],
      ['a machine without a display', `/v1/machines/${py}/vnc?token=${alice}`],
    ] as const)
      await tally.check(`VNC upgrade with ${what}`, async () => {
        const status = await new Promise<number>((resolve) => {
          const ws = new WebSocket(d.url.replace(/^http/, 'ws') + url);
          ws.once('open', () => {
            ws.close();
            resolve(101);
          });
          ws.once('unexpected-response', (_q, res) => resolve(res.statusCode ?? 0));
          ws.once('error', () => resolve(-1));
        });
        assert.ok([401, 404, 409].includes(status), `status ${status}`);
        return String(status);
      });

    const badInput: [string, unknown][] = [
      ['no actions', { actions: [] }],
      ['201 actions', { actions: Array.from({ length: 201 }, () => ({ type: 'move', x: 1, y: 1 })) }],
      ['a point off the screen', { actions: [{ type: 'move', x: 100_000, y: 1 }] }],
      ['a negative point', { actions: [{ type: 'click', x: -5, y: -5 }] }],
      ['fractional pixels', { actions: [{ type: 'move', x: 1.5, y: 2 }] }],
      ['an unknown key', { actions: [{ type: 'key', keys: 'ctrl+alt+nosuchkey' }] }],
      ['a key name of 10 KB', { actions: [{ type: 'key', keys: 'a'.repeat(10_000) }] }],
      ['text that cannot be typed', { actions: [{ type: 'type', text: 'héllo\u0000' }] }],
      ['5,000 characters of text', { actions: [{ type: 'type', text: 'a'.repeat(5000) }] }],
      ['a wait of an hour', { actions: [{ type: 'wait', ms: 3_600_000 }] }],
      ['1,000 scroll notches', { actions: [{ type: 'scroll', direction: 'down', amount: 1000 }] }],
      ['a click 9 times', { actions: [{ type: 'click', count: 9 }] }],
      ['an unknown action', { actions: [{ type: 'rm -rf /' }] }],
      ['an extra field', { actions: [{ type: 'move', x: 1, y: 1, exec: 'reboot' }] }],
      ['not an object', { actions: ['move'] }],
      ['a body that is an array', [{ type: 'move', x: 1, y: 1 }]],
    ];
    for (const [what, body] of badInput)
      await tally.check(`input with ${what}`, async () => {
        const r = await A('POST', `/v1/machines/${desk}/input`, body);
        assert.equal(r.status, 400, JSON.stringify(r.body));
        assert.equal(r.body.code, 'INVALID_ARGUMENT');
        return undefined;
      });
    for (const q of [
      '?scale=NaN',
      '?scale=-1',
      '?scale=1e309',
      '?max_width=0',
      '?max_width=99999999999999999999',
      '?x=1',
    ])
      await tally.check(`screenshot with ${q}`, async () => {
        const r = await shot(desk, alice, q);
        assert.equal(r.status, 400, await r.text());
        return undefined;
      });

    const before = memoryOf(d.proc.pid as number).rssMb;
    await tally.check('40 screenshots at once, full size and scaled', async () => {
      const all = await Promise.all(
        Array.from({ length: 40 }, (_, i) => shot(desk, alice, i % 2 ? '?max_width=300' : '')),
      );
      for (const r of all) assert.equal(r.status, 200);
      await Promise.all(all.map((r) => r.arrayBuffer()));
      return undefined;
    });
    await tally.check('input requests racing each other (serialized per machine, none lost)', async () => {
      const rs = await Promise.all(
        Array.from({ length: 20 }, (_, i) =>
          A('POST', `/v1/machines/${desk}/input`, { actions: [{ type: 'move', x: 10 + i, y: 10 + i }] }),
        ),
      );
      for (const r of rs) assert.equal(r.status, 200);
      return undefined;
    });
    await tally.check('a VNC viewer that never reads, and one that sends text frames', async () => {
      const url = `${d.url.replace(/^http/, 'ws')}/v1/machines/${desk}/vnc?token=${alice}`;
      const deaf = new WebSocket(url);
      await new Promise((r) => deaf.once('open', r));
      // Ask for full updates over and over and never read the answers.
      deaf.send(Buffer.from('RFB 003.008\n'));
      (deaf as unknown as { _socket: { pause(): void } })._socket.pause();
      const chatty = new WebSocket(url);
      await new Promise((r) => chatty.once('open', r));
      const closed = new Promise<number>((r) => chatty.once('close', (code) => r(code)));
      chatty.send('hello, this is text');
      assert.equal(await closed, 1003);
      deaf.terminate();
      return undefined;
    });
    const grown = memoryOf(d.proc.pid as number).rssMb - before;
    tally.record(
      'the daemon did not grow without bound (screenshots, input, viewers)',
      grown < 150,
      `+${grown} MiB`,
    );
    await tally.check('the desktop still serves its owner', stillServes);
  });

  test('hostile guests', async () => {
    await tally.check(
      'a guest that switches to a 2560x1600 mode: screenshots follow it, input too',
      async () => {
        const r = await sh(
          'export DISPLAY=:0; xrandr --newmode big 350.00 2560 2760 3040 3520 1600 1603 1609 1658 -hsync +vsync 2>/dev/null; ' +
            "o=$(xrandr | awk '/ connected/{print $1; exit}'); xrandr --addmode $o big && xrandr --output $o --mode big; xdpyinfo | grep dimensions",
        );
        const s = await shot(desk);
        assert.equal(s.status, 200);
        const size = pngSize(Buffer.from(await s.arrayBuffer()));
        // Whatever mode the guest took, the host reports what the screen shows.
        assert.ok(size.width >= 320 && size.width <= 4096, `${size.width}x${size.height}`);
        return `${r.out.trim()} → ${size.width}x${size.height}`;
      },
    );
    await tally.check(
      'a guest that kills its display server: screenshots and input still answer',
      async () => {
        await sh('pkill -9 Xorg; sleep 1');
        const s = await shot(desk);
        assert.equal(s.status, 200);
        const i = await A('POST', `/v1/machines/${desk}/input`, {
          actions: [{ type: 'type', text: 'ls\n' }],
        });
        assert.equal(i.status, 200);
        return undefined;
      },
    );
    await tally.check('a guest that floods its screen while viewers watch', async () => {
      await sh(
        '/usr/local/sbin/hutch-desktop >/dev/null 2>&1; (for i in $(seq 200); do DISPLAY=:0 xsetroot -solid "#$(printf %06x $((i*4099)))"; done) >/dev/null 2>&1 &',
      );
      const all = await Promise.all(Array.from({ length: 10 }, () => shot(desk)));
      for (const r of all) assert.equal(r.status, 200);
      return undefined;
    });
    await tally.check('the desktop came back for its owner (hutch-desktop restarts it)', async () => {
      const r = await sh('/usr/local/sbin/hutch-desktop && DISPLAY=:0 xdpyinfo | grep -c dimensions');
      assert.equal(r.code, 0);
      return stillServes();
    });
    tally.record('the daemon is alive', processAlive(d.proc.pid as number));
    const h = await api(d.url, 'GET', '/healthz');
    tally.record('health answers', h.status === 200, String(h.status));
    const bugs = bugLines(d.log());
    tally.record('no unhandled errors in the log', bugs.length === 0, bugs.join(' | '));
    tally.report();
  });
});
