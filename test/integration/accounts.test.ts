import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { addUser, authed, exchange, hutchCli, upgradeStatus, userWithToken } from '../helpers/accounts.js';
import { cleanup, root, startDaemon, type TestDaemon } from '../helpers/daemon.js';

const machine = { template: 'python', ttl_seconds: 300 };

describe('accounts on a loopback daemon (token-less requests are the local admin)', () => {
  let d: TestDaemon;
  let alice: Awaited<ReturnType<typeof userWithToken>>;
  let bob: Awaited<ReturnType<typeof userWithToken>>;
  before(async () => {
    // Users made before the daemon exists: the bootstrap needs only the state directory.
    const stateDir = mkdtempSync(join(tmpdir(), 'hutch-test-'));
    addUser(stateDir, 'carol');
    d = await startDaemon({ stateDir, env: { HUTCH_TOKEN_EXCHANGES_PER_MINUTE: '1000' } });
    // …and while it runs (both write auth.db).
    alice = await userWithToken(d, 'alice', ['--max-vms', '1']);
    bob = await userWithToken(d, 'bob');
  });
  after(async () => cleanup(d));

  test('bootstrap: user add and api-key create print what a script needs, and are refused when wrong', () => {
    const k = addUser(d.stateDir, 'dave');
    assert.match(k.api_key, /^bxd_[0-9A-Za-z]{40}$/);
    assert.match(k.id, /^ak_/);
    assert.equal(k.expires_at, 0);
    const again = hutchCli(['user', 'add', 'dave', '--state-dir', d.stateDir, '--json']);
    assert.equal(again.status, 1);
    assert.equal(JSON.parse(again.stdout).code, 'USER_EXISTS');
    const bad = hutchCli(['user', 'add', '../x', '--state-dir', d.stateDir, '--json']);
    assert.equal(JSON.parse(bad.stdout).code, 'INVALID_ARGUMENT');
    const nobody = hutchCli(['api-key', 'create', '--user', 'nobody', '--state-dir', d.stateDir, '--json']);
    assert.equal(JSON.parse(nobody.stdout).code, 'USER_NOT_FOUND');
    // The key is stored only as a hash: listing shows a prefix, never the key.
    const list = hutchCli(['api-key', 'list', '--user', 'dave', '--state-dir', d.stateDir, '--json']);
    const keys = (JSON.parse(list.stdout) as { keys: { id: string; key_prefix: string }[] }).keys;
    assert.deepEqual(
      keys.map((x) => [x.id, x.key_prefix]),
      [[k.id, k.api_key.slice(0, 10)]],
    );
    assert.ok(!list.stdout.includes(k.api_key));
    assert.equal(statSync(join(d.stateDir, 'auth.db')).mode & 0o777, 0o600);
  });

  test('the exchange: a key for a JWT; bad keys get 401 and bad bodies 400', async () => {
    const t = await exchange(d, alice.apiKey);
    assert.equal(t.status, 200);
    assert.equal(t.body.user_id, 'alice');
    assert.match(t.body.token as string, /^[\w-]+\.[\w-]+\.[\w-]+$/);
    const exp = t.body.expires_at as number;
    assert.ok(Math.abs(exp - (Date.now() / 1000 + 3600)) < 60, `expires in about an hour: ${exp}`);
    const unknown = await exchange(d, `bxd_${'A'.repeat(40)}`);
    assert.deepEqual([unknown.status, unknown.body.code], [401, 'UNAUTHENTICATED']);
    const malformed = await exchange(d, 'not-a-key');
    assert.deepEqual([malformed.status, malformed.body.code], [401, 'UNAUTHENTICATED']);
    const noKey = await authed(d.url, 'POST', '/api/v1/auth/token', {}, { apikey: 1 });
    assert.equal(noKey.status, 400);
    const me = await authed(d.url, 'GET', '/v1/whoami', { token: t.body.token as string });
    assert.deepEqual(me.body, { user_id: 'alice', via: 'token' });
  });

  test('no token on loopback: the local admin; a bad token is refused, never taken as anonymous', async () => {
    assert.deepEqual((await authed(d.url, 'GET', '/v1/whoami')).body, { user_id: 'local', via: 'local' });
    for (const header of ['Bearer nope', 'Basic YTpi', 'Bearer a.b.c', `Bearer ${alice.token}x`, 'Bearer']) {
      const r = await authed(d.url, 'GET', '/v1/machines', { header });
      assert.deepEqual([r.status, r.body.code], [401, 'UNAUTHENTICATED'], header);
    }
    // Signed by another server (another state dir's secret): refused too.
    const other = mkdtempSync(join(tmpdir(), 'hutch-test-'));
    addUser(other, 'alice');
    const o = await startDaemon({ stateDir: other, env: { HUTCH_BOXES_SOCKET: 'off' } });
    try {
      const foreign = await userWithToken(o, 'eve');
      const r = await authed(d.url, 'GET', '/v1/machines', { token: foreign.token });
      assert.equal(r.status, 401);
    } finally {
      await cleanup(o);
    }
  });

  test("users see only their own machines: another's is 404, on REST and WebSockets", async () => {
    const a = await authed(
      d.url,
      'POST',
      '/v1/machines',
      { token: alice.token },
      { ...machine, name: 'mine' },
    );
    assert.equal(a.status, 201, JSON.stringify(a.body));
    const id = a.body.id as string;
    const asBob = { token: bob.token };
    assert.equal((await authed(d.url, 'GET', `/v1/machines/${id}`, asBob)).status, 404);
    assert.equal((await authed(d.url, 'GET', '/v1/machines/mine', asBob)).status, 404);
    assert.deepEqual((await authed(d.url, 'GET', '/v1/machines', asBob)).body, { machines: [] });
    const del = await authed(d.url, 'DELETE', `/v1/machines/${id}`, asBob);
    assert.deepEqual([del.status, del.body.code], [404, 'MACHINE_NOT_FOUND']);
    const ex = await authed(d.url, 'POST', `/v1/machines/${id}/exec`, asBob, { cmd: ['true'] });
    assert.equal(ex.status, 404);
    // The local admin is a user like the others.
    assert.equal((await authed(d.url, 'GET', `/v1/machines/${id}`)).status, 404);
    // Bob's name space is his own: he may use the same name.
    const b = await authed(d.url, 'POST', '/v1/machines', asBob, { ...machine, name: 'mine' });
    assert.equal(b.status, 201, JSON.stringify(b.body));
    const ws = d.url.replace(/^http/, 'ws');
    assert.equal(
      await upgradeStatus(`${ws}/v1/machines/${id}/tty`, { authorization: `Bearer ${bob.token}` }),
      404,
    );
    assert.equal(await upgradeStatus(`${ws}/v1/machines/${id}/tty`, { authorization: 'Bearer x.y.z' }), 401);
    assert.equal(
      await upgradeStatus(`${ws}/v1/machines/${id}/tty`, { authorization: `Bearer ${alice.token}` }),
      101,
    );
    const run = await authed(
      d.url,
      'POST',
      `/v1/machines/mine/exec`,
      { token: alice.token },
      { cmd: ['echo', 'a'] },
    );
    assert.equal(run.body.stdout, 'a\n');
    for (const [t, m] of [
      [alice.token, id],
      [bob.token, b.body.id as string],
    ])
      assert.equal((await authed(d.url, 'DELETE', `/v1/machines/${m}`, { token: t })).status, 204);
  });

  test('quotas: enforced at create, changed by the CLI while the daemon runs', async () => {
    const asAlice = { token: alice.token };
    const first = await authed(d.url, 'POST', '/v1/machines', asAlice, machine);
    assert.equal(first.status, 201);
    const second = await authed(d.url, 'POST', '/v1/machines', asAlice, machine);
    assert.deepEqual([second.status, second.body.code], [429, 'RESOURCE_EXHAUSTED']);
    assert.match(second.body.message as string, /quota allows 1 running/);
    // Someone else's quota is theirs.
    const forBob = await authed(d.url, 'POST', '/v1/machines', { token: bob.token }, machine);
    assert.equal(forBob.status, 201);
    const q = hutchCli(['user', 'quota', 'alice', '--max-vms', '2', '--state-dir', d.stateDir, '--json']);
    assert.equal(q.status, 0, q.stdout);
    const third = await authed(d.url, 'POST', '/v1/machines', asAlice, machine);
    assert.equal(third.status, 201, JSON.stringify(third.body));
    const mem = hutchCli([
      'user',
      'quota',
      'bob',
      '--max-memory-mb',
      '100',
      '--state-dir',
      d.stateDir,
      '--json',
    ]);
    assert.equal(mem.status, 0);
    const big = await authed(d.url, 'POST', '/v1/machines', { token: bob.token }, machine);
    assert.deepEqual([big.status, big.body.code], [429, 'RESOURCE_EXHAUSTED']);
    assert.match(big.body.message as string, /MiB of guest memory/);
    for (const [t, r] of [
      [alice.token, first],
      [alice.token, third],
      [bob.token, forBob],
    ] as const)
      await authed(d.url, 'DELETE', `/v1/machines/${r.body.id}`, { token: t });
  });

  test('a deleted key takes its tokens with it, at once', async () => {
    const dave = await userWithToken(d, 'erin');
    assert.equal((await authed(d.url, 'GET', '/v1/machines', { token: dave.token })).status, 200);
    const rm = hutchCli([
      'api-key',
      'delete',
      '--user',
      'erin',
      dave.keyId,
      '--state-dir',
      d.stateDir,
      '--json',
    ]);
    assert.equal(rm.status, 0, rm.stdout);
    const after = await authed(d.url, 'GET', '/v1/machines', { token: dave.token });
    assert.deepEqual([after.status, after.body.code], [401, 'UNAUTHENTICATED']);
    assert.match(after.body.message as string, /revoked/);
    assert.equal((await exchange(d, dave.apiKey)).status, 401);
  });

  test('your keys and tokens over REST and the CLI: listed, revoked at once, never shown twice', async () => {
    const me = await userWithToken(d, 'hana');
    const asMe = { token: me.token };
    const made = await authed(d.url, 'POST', '/api/v1/api-keys', asMe, { name: 'ci', expires_in_secs: 3600 });
    assert.equal(made.status, 201);
    assert.match(made.body.api_key as string, /^bxd_/);
    const keys = await authed(d.url, 'GET', '/api/v1/api-keys', asMe);
    const list = keys.body.keys as { id: string; name: string; expires_at: number }[];
    assert.deepEqual(
      list.map((k) => k.name),
      ['test', 'ci'],
    );
    assert.ok(!JSON.stringify(keys.body).includes(made.body.api_key as string));
    const second = await authed(d.url, 'POST', '/api/v1/tokens', asMe, { expires_in_secs: 120 });
    assert.equal(second.status, 201);
    const jti = second.body.jti as string;
    const tokens = (await authed(d.url, 'GET', '/api/v1/tokens', asMe)).body.tokens as { jti: string }[];
    assert.ok(tokens.some((t) => t.jti === jti));
    // Another user can neither see nor revoke it.
    assert.equal((await authed(d.url, 'DELETE', `/api/v1/tokens/${jti}`, { token: bob.token })).status, 404);
    const viaCli = hutchCli(['token', 'revoke', jti, '--json'], { HUTCH_URL: d.url, HUTCH_TOKEN: me.token });
    assert.equal(viaCli.status, 0, viaCli.stdout + viaCli.stderr);
    const revoked = await authed(d.url, 'GET', '/v1/whoami', { token: second.body.token as string });
    assert.deepEqual([revoked.status, revoked.body.code], [401, 'UNAUTHENTICATED']);
    assert.equal((await authed(d.url, 'GET', '/v1/whoami', asMe)).status, 200, 'other tokens keep working');
    const tooLong = await authed(d.url, 'POST', '/api/v1/tokens', asMe, { expires_in_secs: 10 ** 9 });
    assert.deepEqual([tooLong.status, tooLong.body.code], [400, 'INVALID_ARGUMENT']);
    const gone = await authed(d.url, 'DELETE', `/api/v1/api-keys/${me.keyId}`, asMe);
    assert.equal(gone.status, 204);
    assert.equal(
      (await authed(d.url, 'GET', '/v1/whoami', asMe)).status,
      401,
      'its own token went with its key',
    );
  });

  test('the boxes socket: its permissions are the credential; a token there acts as its user', async () => {
    const { BoxesClient } = await import('../../src/client/boxes-client.js');
    const c = new BoxesClient({ socketPath: d.boxesSocket });
    const status = async (headers: Record<string, string>): Promise<number> => {
      const res = await c.raw('GET', '/v1/boxes', { headers });
      res.resume();
      return res.statusCode ?? 0;
    };
    assert.equal(await status({}), 200);
    assert.equal(await status({ authorization: 'Bearer x.y.z' }), 401);
    assert.equal(await status({ authorization: `Bearer ${alice.token}` }), 200);
  });

  test('hutch login saves the key owner-only; later commands carry its token', () => {
    const file = join(mkdtempSync(join(tmpdir(), 'hutch-cred-')), 'credentials.json');
    const env = { HUTCH_URL: d.url, HUTCH_CREDENTIALS: file };
    const bad = hutchCli(['login', '--api-key', `bxd_${'B'.repeat(40)}`, '--json'], env);
    assert.equal(bad.status, 1);
    assert.equal(JSON.parse(bad.stdout).code, 'UNAUTHENTICATED');
    const ok = hutchCli(['login', '--api-key', bob.apiKey, '--json'], env);
    assert.equal(ok.status, 0, ok.stdout + ok.stderr);
    assert.equal(JSON.parse(ok.stdout).user_id, 'bob');
    assert.equal(statSync(file).mode & 0o777, 0o600);
    const me = hutchCli(['whoami', '--json'], env);
    assert.deepEqual(JSON.parse(me.stdout), { user_id: 'bob', via: 'token' });
    assert.equal(hutchCli(['logout'], env).status, 0);
    assert.deepEqual(JSON.parse(hutchCli(['whoami', '--json'], env).stdout), {
      user_id: 'local',
      via: 'local',
    });
    const viaEnv = hutchCli(['whoami', '--json'], { ...env, HUTCH_API_KEY: alice.apiKey });
    assert.equal(JSON.parse(viaEnv.stdout).user_id, 'alice');
  });
});

describe('accounts where tokens are required', () => {
  test('HUTCH_REQUIRE_AUTH=1: every request needs a token; expired ones stop working', async () => {
    const d = await startDaemon({
      env: { HUTCH_REQUIRE_AUTH: '1', HUTCH_TOKEN_TTL_SECONDS: '2', HUTCH_TOKEN_EXCHANGES_PER_MINUTE: '3' },
    });
    try {
      const none = await authed(d.url, 'GET', '/v1/machines');
      assert.deepEqual([none.status, none.body.code], [401, 'UNAUTHENTICATED']);
      assert.equal((await authed(d.url, 'GET', '/healthz')).status, 200, 'health stays public');
      const u = await userWithToken(d, 'frank');
      assert.equal((await authed(d.url, 'GET', '/v1/machines', { token: u.token })).status, 200);
      await new Promise((r) => setTimeout(r, 3100));
      const late = await authed(d.url, 'GET', '/v1/machines', { token: u.token });
      assert.deepEqual([late.status, late.body.code], [401, 'UNAUTHENTICATED']);
      assert.match(late.body.message as string, /expired/);
      // Rate limit: a burst of 3 per address, then 429 with how long to wait.
      let limited: Awaited<ReturnType<typeof exchange>> | undefined;
      for (let i = 0; i < 5 && !limited; i++) {
        const r = await exchange(d, u.apiKey);
        if (r.status === 429) limited = r;
      }
      assert.ok(limited, 'the exchange is rate-limited');
      assert.equal(limited.body.code, 'RATE_LIMITED');
      assert.ok((limited.body.retry_after_ms as number) > 0);
    } finally {
      await cleanup(d);
    }
  });

  test('a non-loopback listener requires tokens, and is refused without them', async () => {
    const d = await startDaemon({ env: { HUTCH_HOST: '0.0.0.0', HUTCH_BOXES_SOCKET: 'off' } });
    try {
      const url = d.url.replace('0.0.0.0', '127.0.0.1');
      const none = await authed(url, 'GET', '/v1/machines');
      assert.equal(none.status, 401);
      const u = await userWithToken({ url, stateDir: d.stateDir }, 'gina');
      assert.equal((await authed(url, 'GET', '/v1/machines', { token: u.token })).status, 200);
    } finally {
      await cleanup(d);
    }
    const refused = await new Promise<{ code: number | null; out: string }>((resolve) => {
      const p = spawn('node', [join(root, 'bin', 'hutch.js'), 'serve', '--port', '0', '--host', '0.0.0.0'], {
        env: {
          ...process.env,
          HUTCH_REQUIRE_AUTH: '0',
          HUTCH_STATE_DIR: mkdtempSync(join(tmpdir(), 'hutch-test-')),
          HUTCH_BOXES_SOCKET: 'off',
        },
      });
      let out = '';
      p.stderr.on('data', (b: Buffer) => {
        out += b.toString();
      });
      p.on('exit', (code) => resolve({ code, out }));
    });
    assert.notEqual(refused.code, 0);
    assert.match(refused.out, /refusing to listen on 0\.0\.0\.0 without authentication/);
  });
});
