/**
 * Desktop machines on real guests under TCG: the desktop template restores from a snapshot
 * taken with Xorg up; the screenshot is a real PNG of what the screen shows, taken by the host;
 * input from the host moves the real pointer and types into the real terminal (checked inside
 * the guest with xdotool and the file the typed command wrote); screens of other sizes; a
 * desktop survives pause/resume, suspend/resume and a branch; machines without a display and
 * bad input are refused clearly; another user's desktop does not exist for you.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { decodePng, pngSize } from '../../src/desktop/png.js';
import { authed, userWithToken } from '../helpers/accounts.js';
import {
  cleanup,
  type Json,
  outsideAddress,
  poolReady,
  type TestDaemon,
  waitFor,
} from '../helpers/daemon.js';
import { startDesktopDaemon } from '../helpers/desktop.js';
import { type FakeInternet, guestFetch, startFakeInternet } from '../helpers/fake-internet.js';
import { startGuestWebServer } from '../helpers/guest-web-server.js';

describe('desktop machines', () => {
  let d: TestDaemon;
  let alice: string;
  let bob: string;
  const A = (method: string, path: string, body?: unknown): Promise<Json> =>
    authed(d.url, method, path, { token: alice }, body);
  const shot = async (
    id: string,
    query = '',
    token = alice,
  ): Promise<{ status: number; png: Buffer; headers: Headers }> => {
    const r = await fetch(`${d.url}/v1/machines/${id}/screenshot${query}`, {
      headers: { authorization: `Bearer ${token}` },
    });
    return { status: r.status, png: Buffer.from(await r.arrayBuffer()), headers: r.headers };
  };
  const sh = async (id: string, cmd: string): Promise<string> => {
    const r = await A('POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: 60_000 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(r.body.exit_code, 0, String(r.body.stderr));
    return String(r.body.stdout);
  };
  const input = (id: string, actions: unknown[]): Promise<Json> =>
    A('POST', `/v1/machines/${id}/input`, { actions });
  /** Distinct colours in a PNG: a blank screen has one. */
  const colours = (png: Buffer): number => {
    const img = decodePng(png);
    const seen = new Set<number>();
    for (let i = 0; i < img.rgb.length; i += 3 * 7)
      seen.add(((img.rgb[i] ?? 0) << 16) | ((img.rgb[i + 1] ?? 0) << 8) | (img.rgb[i + 2] ?? 0));
    return seen.size;
  };

  let desk: string;

  before(async () => {
    d = await startDesktopDaemon();
    alice = (await userWithToken(d, 'alice')).token;
    bob = (await userWithToken(d, 'bob')).token;
  });
  after(async () => {
    await cleanup(d);
  });

  test('a desktop restores from its snapshot with the screen up: 1024x768, a network when the server has one', async () => {
    const r = await A('POST', '/v1/machines', { template: 'desktop', ttl_seconds: 900, mode: 'snapshot' });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    desk = r.body.id as string;
    assert.deepEqual(r.body.screen, { width: 1024, height: 768 });
    assert.equal(r.body.mode, 'snapshot');
    assert.equal(r.body.net, true);
    const out = await sh(
      desk,
      'DISPLAY=:0 xdpyinfo | grep dimensions; DISPLAY=:0 xdotool search --onlyvisible --class xterm | wc -l',
    );
    assert.match(out, /dimensions:\s+1024x768 pixels/);
    assert.notEqual(out.trim().split('\n')[1], '0', 'the terminal is on screen');
  });

  test('the screenshot is a real PNG of the screen, scaled on request', async () => {
    const full = await shot(desk);
    assert.equal(full.status, 200);
    assert.equal(full.headers.get('content-type'), 'image/png');
    assert.deepEqual(pngSize(full.png), { width: 1024, height: 768 });
    assert.ok(colours(full.png) > 3, 'not a blank screen: background, a window, text');
    const half = await shot(desk, '?scale=0.5');
    assert.deepEqual(pngSize(half.png), { width: 512, height: 384 });
    assert.equal(half.headers.get('x-screen-width'), '1024');
    const narrow = await shot(desk, '?max_width=640');
    assert.deepEqual(pngSize(narrow.png), { width: 640, height: 480 });
    assert.ok(colours(narrow.png) > 3);
    // A part of the screen: the rectangle at full resolution.
    const part = await shot(desk, '?region=40,40,200,100');
    assert.equal(part.status, 200);
    assert.deepEqual(pngSize(part.png), { width: 200, height: 100 });
    for (const q of [
      '?scale=0',
      '?scale=2',
      '?max_width=3',
      '?max_width=abc',
      '?zoom=1',
      '?region=1,2,3',
      '?region=0,0,0,10',
      '?region=1000,700,100,100',
    ]) {
      const bad = await shot(desk, q);
      assert.equal(bad.status, 400, q);
    }
  });

  test('input: the pointer goes exactly where asked, and typed text reaches the terminal', async () => {
    const moved = await input(desk, [{ type: 'move', x: 613, y: 407 }]);
    assert.equal(moved.status, 200, JSON.stringify(moved.body));
    assert.deepEqual(moved.body.cursor, { x: 613, y: 407 });
    assert.match(await sh(desk, 'DISPLAY=:0 xdotool getmouselocation'), /^x:613 y:407 /);
    for (const [x, y] of [
      [0, 0],
      [1023, 767],
      [100, 700],
    ]) {
      await input(desk, [{ type: 'move', x, y }]);
      assert.match(await sh(desk, 'DISPLAY=:0 xdotool getmouselocation'), new RegExp(`^x:${x} y:${y} `));
    }
    // Click into the terminal, then type a command with shifted characters and a newline.
    const before = await shot(desk);
    const typed = await input(desk, [
      { type: 'click', x: 400, y: 300 },
      { type: 'type', text: 'echo "Hutch: typed & run!" > /tmp/typed.txt\n' },
    ]);
    assert.equal(typed.status, 200, JSON.stringify(typed.body));
    const content = await waitFor(
      'the typed command to run',
      async () => {
        const r = await A('POST', `/v1/machines/${desk}/exec`, { cmd: 'cat /tmp/typed.txt 2>/dev/null' });
        return r.body.exit_code === 0 ? String(r.body.stdout) : undefined;
      },
      15_000,
    );
    assert.equal(content, 'Hutch: typed & run!\n');
    const afterShot = await shot(desk);
    assert.ok(!afterShot.png.equals(before.png), 'the screen shows what was typed');
    // Key combinations: ctrl+u clears a typed line, so only the second command runs.
    await input(desk, [
      { type: 'type', text: 'touch /tmp/not-run' },
      { type: 'key', keys: 'ctrl+u' },
      { type: 'type', text: 'touch /tmp/run' },
      { type: 'key', keys: 'Return' },
    ]);
    await waitFor(
      '/tmp/run',
      async () =>
        (await A('POST', `/v1/machines/${desk}/exec`, { cmd: 'test -e /tmp/run' })).body.exit_code === 0
          ? true
          : undefined,
      15_000,
    );
    assert.equal(
      (await A('POST', `/v1/machines/${desk}/exec`, { cmd: 'test -e /tmp/not-run' })).body.exit_code,
      1,
    );
  });

  test('bad input is refused before anything reaches the machine', async () => {
    await input(desk, [{ type: 'move', x: 10, y: 10 }]);
    const cases: unknown[][] = [
      [],
      [{ type: 'move', x: 1024, y: 0 }],
      [{ type: 'click', x: -1, y: 5 }],
      [{ type: 'key', keys: 'ctrl+nosuchkey' }],
      [{ type: 'type', text: 'snow ☃' }],
      [{ type: 'scroll', direction: 'sideways' }],
      [{ type: 'wait', ms: 60_000 }],
      [{ type: 'teleport' }],
      // One bad action in a batch: the good one before it is not performed either.
      [
        { type: 'move', x: 500, y: 500 },
        { type: 'click', x: 5000, y: 5 },
      ],
    ];
    for (const actions of cases) {
      const r = await input(desk, actions);
      assert.equal(r.status, 400, JSON.stringify(actions));
      assert.equal(r.body.code, 'INVALID_ARGUMENT');
    }
    assert.match(await sh(desk, 'DISPLAY=:0 xdotool getmouselocation'), /^x:10 y:10 /);
  });

  test('a machine without a display says so; "screen" is for desktops', async () => {
    const py = await A('POST', '/v1/machines', { template: 'python', ttl_seconds: 300 });
    assert.equal(py.status, 201);
    const id = py.body.id as string;
    assert.equal(py.body.screen, null);
    const s = await shot(id);
    assert.equal(s.status, 409);
    assert.equal(JSON.parse(s.png.toString()).code, 'NO_DISPLAY');
    const i = await input(id, [{ type: 'move', x: 1, y: 1 }]);
    assert.equal(i.status, 409);
    assert.equal(i.body.code, 'NO_DISPLAY');
    const bad = await A('POST', '/v1/machines', { template: 'python', screen: { width: 800, height: 600 } });
    assert.equal(bad.status, 400);
    const odd = await A('POST', '/v1/machines', { template: 'desktop', screen: { width: 801, height: 600 } });
    assert.equal(odd.status, 400);
    assert.match(String(odd.body.message), /even/);
    await A('DELETE', `/v1/machines/${id}`);
  });

  test("another user's desktop does not exist for them", async () => {
    const s = await shot(desk, '', bob);
    assert.equal(s.status, 404);
    const r = await authed(
      d.url,
      'POST',
      `/v1/machines/${desk}/input`,
      { token: bob },
      { actions: [{ type: 'move', x: 1, y: 1 }] },
    );
    assert.equal(r.status, 404);
    const anon = await fetch(`${d.url}/v1/machines/${desk}/screenshot`, {
      headers: { authorization: 'Bearer nope' },
    });
    assert.equal(anon.status, 401);
  });

  test('the desktop survives pause/resume, suspend/resume and a branch', async () => {
    assert.equal((await A('POST', `/v1/machines/${desk}/pause`)).status, 200);
    // A paused machine's screen can still be looked at.
    assert.equal((await shot(desk)).status, 200);
    assert.equal((await A('POST', `/v1/machines/${desk}/resume`)).status, 200);
    assert.equal((await A('POST', `/v1/machines/${desk}/suspend`)).status, 200);
    // A screenshot wakes a suspended desktop, like any use.
    const woke = await shot(desk);
    assert.equal(woke.status, 200);
    assert.ok(colours(woke.png) > 3);
    await input(desk, [{ type: 'type', text: 'echo after-suspend > /tmp/after.txt\n' }]);
    await waitFor(
      'typing after a resume',
      async () =>
        (await A('POST', `/v1/machines/${desk}/exec`, { cmd: 'grep -q after-suspend /tmp/after.txt' })).body
          .exit_code === 0
          ? true
          : undefined,
      15_000,
    );
    const b = await A('POST', `/v1/machines/${desk}/branch`, {});
    assert.equal(b.status, 201, JSON.stringify(b.body));
    const clone = b.body.id as string;
    assert.deepEqual(b.body.screen, { width: 1024, height: 768 });
    const cs = await shot(clone);
    assert.equal(cs.status, 200);
    assert.ok(colours(cs.png) > 3);
    // The clone's screen is its own: typing there leaves the source alone.
    await input(clone, [{ type: 'type', text: 'echo clone > /tmp/clone.txt\n' }]);
    await waitFor(
      'typing in the clone',
      async () =>
        (await A('POST', `/v1/machines/${clone}/exec`, { cmd: 'test -e /tmp/clone.txt' })).body.exit_code ===
        0
          ? true
          : undefined,
      15_000,
    );
    assert.equal(
      (await A('POST', `/v1/machines/${desk}/exec`, { cmd: 'test -e /tmp/clone.txt' })).body.exit_code,
      1,
    );
    await A('DELETE', `/v1/machines/${clone}`);
  });

  test('a screen of another size: its own snapshot, then restores', async () => {
    const r = await A('POST', '/v1/machines', {
      template: 'desktop',
      ttl_seconds: 300,
      screen: { width: 1280, height: 800 },
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.equal(r.body.mode, 'snapshot');
    const s = await shot(r.body.id as string);
    assert.deepEqual(pngSize(s.png), { width: 1280, height: 800 });
    assert.match(await sh(r.body.id as string, 'DISPLAY=:0 xdpyinfo | grep dimensions'), /1280x800/);
    await input(r.body.id as string, [{ type: 'move', x: 1279, y: 799 }]);
    assert.match(await sh(r.body.id as string, 'DISPLAY=:0 xdotool getmouselocation'), /^x:1279 y:799 /);
    await A('DELETE', `/v1/machines/${r.body.id}`);
  });
});

describe('the warm pool serves desktops: networked, handed to their user', () => {
  let inet: FakeInternet;
  let d: TestDaemon;
  const tokens: Record<string, string> = {};
  const as = (user: string, method: string, path: string, body?: unknown): Promise<Json> =>
    authed(d.url, method, path, { token: tokens[user] ?? '' }, body);
  const run = async (user: string, id: string, cmd: string): Promise<{ code: number; out: string }> => {
    const r = await as(user, 'POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: 60_000 });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return { code: r.body.exit_code as number, out: String(r.body.stdout).trim() + String(r.body.stderr) };
  };
  const desktopPool = (): Promise<true> => poolReady(d, 'desktop', 1, 400_000);
  const desktop = async (user: string, extra: Record<string, unknown> = {}): Promise<string> => {
    await desktopPool();
    const r = await as(user, 'POST', '/v1/machines', { template: 'desktop', ttl_seconds: 600, ...extra });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.equal(r.body.mode, 'pool', 'served from the pool');
    assert.equal(r.body.net, true);
    assert.equal(r.body.owner ?? user, user);
    return r.body.id as string;
  };

  before(async () => {
    inet = await startFakeInternet();
    d = await startDesktopDaemon({ ...inet.env, HUTCH_POOL_SIZE: '1' });
    for (const u of ['alice', 'bob']) tokens[u] = (await userWithToken(d, u)).token;
  });
  after(async () => {
    await cleanup(d);
    await inet.close();
  });

  test("a pooled desktop reaches the internet under its user's rules and is on its user's network only", async () => {
    // alice's web server on her own network.
    const py = await as('alice', 'POST', '/v1/machines', { template: 'python', net: true, ttl_seconds: 600 });
    assert.equal(py.status, 201, JSON.stringify(py.body));
    const server = py.body.id as string;
    const started = await run(
      'alice',
      server,
      startGuestWebServer(8080).replace('("127.0.0.1"', '("0.0.0.0"'),
    );
    assert.equal(started.code, 0, started.out);
    const serverUrl = `http://${outsideAddress(d.stateDir, server)}:8080/`;

    const mine = await desktop('alice');
    assert.deepEqual(await run('alice', mine, guestFetch('http://pypi.test/')), {
      code: 0,
      out: 'hello from the fake internet',
    });
    assert.deepEqual(await run('alice', mine, guestFetch(serverUrl)), {
      code: 0,
      out: 'hello from the guest',
    });
    // The screen is up, as from the snapshot.
    const shot = await fetch(`${d.url}/v1/machines/${mine}/screenshot`, {
      headers: { authorization: `Bearer ${tokens.alice}` },
    });
    assert.equal(shot.status, 200);

    // Rules asked for at create hold from the first packet: a name outside the allowlist is refused.
    const ruled = await desktop('alice', { egress: { allow: ['files.test'] } });
    assert.notEqual((await run('alice', ruled, guestFetch('http://pypi.test/'))).code, 0);
    assert.equal((await run('alice', ruled, guestFetch('http://files.test/'))).code, 0);
    const e = await as('alice', 'GET', `/v1/machines/${ruled}/egress`);
    assert.deepEqual((e.body.rules as { allow: string[] }).allow, ['files.test'], JSON.stringify(e.body));

    // bob's pooled desktop is on bob's network: alice's server is not his to reach.
    const his = await desktop('bob');
    assert.equal((await run('bob', his, guestFetch('http://pypi.test/'))).code, 0);
    assert.notEqual((await run('bob', his, guestFetch(serverUrl))).code, 0);

    // Asking for no network, or another screen, is not the pool's.
    await desktopPool();
    const plain = await as('alice', 'POST', '/v1/machines', {
      template: 'desktop',
      net: false,
      ttl_seconds: 60,
    });
    assert.equal(plain.status, 201, JSON.stringify(plain.body));
    assert.notEqual(plain.body.mode, 'pool');
    assert.equal(plain.body.net, false);
    for (const [u, id] of [
      ['alice', server],
      ['alice', mine],
      ['alice', ruled],
      ['bob', his],
      ['alice', plain.body.id as string],
    ] as const)
      assert.equal((await as(u, 'DELETE', `/v1/machines/${id}`)).status, 204);
  });
});
