/**
 * The gRPC API (boxd.api.v1.BoxdApi) against a real daemon and real VMs: a client made the way
 * the spec's Node snippet makes one (the checked-in proto through @grpc/proto-loader), another
 * that only has server reflection, and every RPC with its status codes.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { type BoxdClient, boxdClient, type Msg, rejectsWith, tokenFor } from '../helpers/grpc.js';
import { grpcExec } from '../helpers/grpc-exec.js';
import { reflect } from '../helpers/grpc-reflection.js';

const MiB = 1024 * 1024;
/** Small, and never auto-suspended (tests that look at a running VM do not race the timer). */
const small = { memory_bytes: String(512 * MiB), srf: { auto_suspend_timeout_secs: 0 } };

describe('gRPC API', () => {
  let d: TestDaemon;
  let alice: BoxdClient;
  let bob: BoxdClient;
  let aliceToken: string;
  let vm: Msg;

  before(async () => {
    d = await startDaemon();
    assert.ok(d.grpcAddress, 'the daemon reports its gRPC address');
    aliceToken = await tokenFor(d, 'alice');
    alice = boxdClient(d.grpcAddress, aliceToken);
    bob = boxdClient(d.grpcAddress, await tokenFor(d, 'bob'));
  });

  after(async () => {
    for (const c of [alice, bob]) {
      const vms = await c.call<{ vms: Msg[] }>('ListVms', {}).catch(() => ({ vms: [] }));
      for (const v of vms.vms) await c.call('DestroyVm', { vm_id: v.vm_id }).catch(() => {});
      c.close();
    }
    await cleanup(d);
  });

  test('every call needs a valid bearer token', async () => {
    const c = boxdClient(d.grpcAddress as string, aliceToken);
    await rejectsWith(c.call('Whoami', {}, null), status.UNAUTHENTICATED);
    await rejectsWith(c.call('ListVms', {}, 'not-a-jwt'), status.UNAUTHENTICATED);
    await rejectsWith(c.call('ListVms', {}, 'a.b.c'), status.UNAUTHENTICATED);
    await rejectsWith(grpcExec(c, 'a1', 'true', { token: '' }).done, status.UNAUTHENTICATED);
    c.close();
  });

  test('reflection alone is enough to call the API (v1 and v1alpha)', async () => {
    for (const version of ['v1', 'v1alpha'] as const) {
      const r = await reflect(d.grpcAddress as string, 'boxd.api.v1.BoxdApi', version);
      try {
        assert.ok(r.services.includes('boxd.api.v1.BoxdApi'), r.services.join(','));
        assert.equal(Object.keys(r.root.lookupService('boxd.api.v1.BoxdApi').methods).length, 41);
        assert.equal((await r.call('Whoami', {}, aliceToken)).user_id, 'alice');
        assert.deepEqual((await r.call('ListVms', {}, aliceToken)).vms, []);
      } finally {
        r.close();
      }
    }
  });

  test('accounts: Whoami, tokens and API keys', async () => {
    assert.equal((await alice.call<Msg>('Whoami', {})).user_id, 'alice');
    const t = await alice.call<{ token: string; expires_at: string }>('CreateToken', {
      expires_in_secs: '600',
    });
    assert.ok(Number(t.expires_at) > Date.now() / 1000);
    const viaNew = boxdClient(d.grpcAddress as string, t.token);
    assert.equal((await viaNew.call<Msg>('Whoami', {})).user_id, 'alice');
    const tokens = (await alice.call<{ tokens: { jti: string }[] }>('ListTokens', {})).tokens;
    assert.ok(tokens.length >= 2);
    // The new token's jti is in its payload: revoke it, and it stops working at once.
    const jti = (
      JSON.parse(Buffer.from(t.token.split('.')[1] ?? '', 'base64url').toString()) as { jti: string }
    ).jti;
    assert.ok(tokens.some((x) => x.jti === jti));
    await alice.call('RevokeToken', { jti });
    await rejectsWith(viaNew.call('Whoami', {}), status.UNAUTHENTICATED);
    viaNew.close();
    // Expired: a token made to live 1 s is refused once it has.
    const short = await alice.call<{ token: string }>('CreateToken', { expires_in_secs: '1' });
    await new Promise((r) => setTimeout(r, 2100));
    const msg = await rejectsWith(alice.call('Whoami', {}, short.token), status.UNAUTHENTICATED);
    assert.match(msg, /expired/);
    await rejectsWith(
      alice.call('CreateToken', { expires_in_secs: String(10 ** 9) }),
      status.INVALID_ARGUMENT,
    );
    await rejectsWith(alice.call('RevokeToken', { jti: 'nope' }), status.NOT_FOUND);
    await rejectsWith(alice.call('RevokeToken', { jti: '' }), status.INVALID_ARGUMENT);
    const k = await alice.call<{ id: string; api_key: string }>('CreateApiKey', {
      name: 'ci',
      expires_in_secs: '0',
    });
    assert.match(k.api_key, /^bxd_/);
    const keys = (await alice.call<{ keys: { id: string; name: string }[] }>('ListApiKeys', {})).keys;
    assert.ok(keys.some((x) => x.id === k.id && x.name === 'ci'));
    await alice.call('DeleteApiKey', { id: k.id });
    await rejectsWith(alice.call('DeleteApiKey', { id: k.id }), status.NOT_FOUND);
  });

  test('GetConfig', async () => {
    assert.deepEqual(await alice.call('GetConfig', {}), { default_image: 'debian:bookworm', zone: 'local' });
  });

  test('CreateVm, GetVm and ListVms; names work wherever ids do; other users see nothing', async () => {
    vm = await alice.call<Msg>('CreateVm', {
      name: 'a1',
      env: [{ key: 'GREETING', value: 'hello' }],
      config: small,
    });
    assert.equal(vm.name, 'a1');
    assert.equal(vm.status, 'running');
    assert.equal(vm.image, 'debian:bookworm');
    // On the owner's network: the address their other VMs reach it at. No public domain: no URL.
    assert.match(vm.public_ip as string, /^10\.213\.\d+\.\d+$/);
    assert.equal(vm.url, '');
    assert.ok(Number(vm.boot_time_ms) > 0, `boot_time_ms ${vm.boot_time_ms}`);
    const byName = await alice.call<Msg>('GetVm', { vm_id: 'a1' });
    const byId = await alice.call<Msg>('GetVm', { vm_id: vm.vm_id });
    assert.deepEqual(byName, byId);
    assert.equal(byId.status, 'running');
    assert.equal(byId.disk_bytes, String(8 * 1024 * MiB));
    assert.equal(byId.restart_policy, 'no');
    assert.equal(byId.auto_suspend_timeout_secs, 0);
    const list = (await alice.call<{ vms: Msg[] }>('ListVms', {})).vms;
    assert.deepEqual(
      list.map((v) => v.vm_id),
      [vm.vm_id],
    );
    await rejectsWith(bob.call('GetVm', { vm_id: vm.vm_id }), status.NOT_FOUND);
    await rejectsWith(bob.call('GetVm', { vm_id: 'a1' }), status.NOT_FOUND);
    await rejectsWith(bob.call('DestroyVm', { vm_id: vm.vm_id }), status.NOT_FOUND);
    assert.deepEqual((await bob.call<{ vms: Msg[] }>('ListVms', {})).vms, []);
    await rejectsWith(alice.call('GetVm', { vm_id: 'nope' }), status.NOT_FOUND);
    const r = await grpcExec(alice, 'a1', 'echo $GREETING').done;
    assert.equal(r.out.toString(), 'hello\n');
  });

  test('bad requests are INVALID_ARGUMENT and change nothing', async () => {
    const lim = { vcpu: 10_000 };
    await rejectsWith(alice.call('GetVm', { vm_id: '' }), status.INVALID_ARGUMENT);
    await rejectsWith(alice.call('CreateVm', { name: 'bad name!' }), status.INVALID_ARGUMENT);
    await rejectsWith(alice.call('CreateVm', { name: 'x', image_ref: 'Bad Image' }), status.INVALID_ARGUMENT);
    const cpu = await rejectsWith(
      alice.call('CreateVm', { name: 'x', config: lim }),
      status.INVALID_ARGUMENT,
    );
    assert.match(cpu, /cpu 10000 is over this server's limit/);
    const mem = await rejectsWith(
      alice.call('CreateVm', { name: 'x', config: { memory_bytes: String(1024 * 1024 * MiB) } }),
      status.INVALID_ARGUMENT,
    );
    assert.match(mem, /memory_mb .* limit/);
    await rejectsWith(
      alice.call('CreateVm', {
        name: 'x',
        env: [
          { key: 'A', value: '1' },
          { key: 'A', value: '2' },
        ],
        config: small,
      }),
      status.INVALID_ARGUMENT,
    );
    // Not UTF-8: a lone surrogate goes out as the bytes ED A0 80, which UTF-8 forbids.
    await rejectsWith(alice.call('GetVm', { vm_id: 'a\uD800b' }), status.INVALID_ARGUMENT);
    await rejectsWith(
      alice.call('CreateVm', { name: 'x', image_ref: 'debian:\uD800' }),
      status.INVALID_ARGUMENT,
    );
    await rejectsWith(alice.call('CreateVm', { name: 'a1', config: small }), status.ALREADY_EXISTS);
    assert.equal((await alice.call<{ vms: Msg[] }>('ListVms', {})).vms.length, 1);
  });

  test('Exec: output as produced, exit code, stdin, tty, EOF by half-close', async () => {
    const r = await grpcExec(alice, 'a1', 'echo out; echo err >&2; exit 3').done;
    assert.equal(r.exit, 3);
    assert.match(r.out.toString(), /out\n/);
    assert.match(r.out.toString(), /err\n/);
    const input = randomBytes(300 * 1024);
    const s = await grpcExec(alice, vm.vm_id as string, 'sha256sum', {
      stdin: [input.subarray(0, 100_000), input.subarray(100_000)],
    }).done;
    const { createHash } = await import('node:crypto');
    assert.equal(s.out.toString().split(' ')[0], createHash('sha256').update(input).digest('hex'));
    assert.equal(s.exit, 0);
    const h = await grpcExec(alice, 'a1', 'wc -c', { stdin: [Buffer.from('abc')], eof: 'half-close' }).done;
    assert.equal(h.out.toString().trim(), '3');
    const t = await grpcExec(alice, 'a1', 'test -t 0 && test -t 1 && tty', { tty: true }).done;
    assert.equal(t.exit, 0);
    assert.match(t.out.toString(), /\/dev\/pts\//);
    const n = await grpcExec(alice, 'a1', 'test -t 1').done;
    assert.equal(n.exit, 1);
  });

  test('Exec: several MB of output arrive whole (sha256)', async () => {
    await grpcExec(alice, 'a1', 'head -c 8388608 /dev/urandom > /tmp/big').done;
    const sum = (await grpcExec(alice, 'a1', 'sha256sum /tmp/big').done).out.toString().split(' ')[0];
    const big = await grpcExec(alice, 'a1', 'cat /tmp/big', { keepBytes: 0 }).done;
    assert.equal(big.exit, 0);
    assert.equal(big.sha256, sum);
    assert.ok(big.messages > 8, `${big.messages} messages`);
  });

  test('Exec: bad first messages, and a client cancel kills the command', async () => {
    const noVm = grpcExec(alice, '', 'true');
    await rejectsWith(noVm.done, status.INVALID_ARGUMENT);
    const noCmd = grpcExec(alice, 'a1', '');
    await rejectsWith(noCmd.done, status.INVALID_ARGUMENT);
    await rejectsWith(grpcExec(bob, 'a1', 'true').done, status.NOT_FOUND);
    const long = grpcExec(alice, 'a1', 'echo started; exec sleep 1234', { eof: 'none' });
    await new Promise<void>((resolve) => long.call.once('data', () => resolve()));
    long.call.cancel();
    await rejectsWith(long.done, status.CANCELLED);
    let left = '';
    for (let i = 0; i < 50; i++) {
      left = (await grpcExec(alice, 'a1', 'pgrep -x sleep || true').done).out.toString();
      if (left === '') break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(left, '', 'the cancelled command is gone');
  });

  test('StreamLogs: the buffered console, then live output with follow', async () => {
    const chunks: Buffer[] = [];
    await new Promise<void>((resolve, reject) => {
      const s = (alice.raw.StreamLogs as (r: Msg, m: unknown) => NodeJS.EventEmitter)(
        { vm_id: 'a1' },
        alice.meta(),
      );
      s.on('data', (m: { data: Buffer }) => chunks.push(m.data));
      s.on('end', resolve);
      s.on('error', reject);
    });
    assert.ok(Buffer.concat(chunks).length > 0, 'the boot log');
    const marker = `marker-${randomBytes(4).toString('hex')}`;
    const live = (alice.raw.StreamLogs as (r: Msg, m: unknown) => NodeJS.EventEmitter & { cancel(): void })(
      { vm_id: 'a1', follow: true },
      alice.meta(),
    );
    let seen = '';
    const got = new Promise<void>((resolve, reject) => {
      live.on('data', (m: { data: Buffer }) => {
        seen += m.data.toString('latin1');
        if (seen.includes(marker)) resolve();
      });
      live.on('error', (e: { code: number }) => (e.code === status.CANCELLED ? undefined : reject(e)));
    });
    await new Promise((r) => setTimeout(r, 300));
    await grpcExec(alice, 'a1', `echo ${marker} > /dev/console`).done;
    await got;
    live.cancel();
    await rejectsWith(bob.call('GetVm', { vm_id: 'a1' }), status.NOT_FOUND);
  });

  test('UploadFile and DownloadFile', async () => {
    const data = randomBytes(3 * MiB);
    await alice.call('UploadFile', { vm_id: 'a1', path: '/root/up/file.bin', data });
    const back = await alice.call<{ data: Buffer }>('DownloadFile', {
      vm_id: 'a1',
      path: '/root/up/file.bin',
    });
    assert.ok(back.data.equals(data));
    await rejectsWith(
      alice.call('UploadFile', { vm_id: 'a1', path: 'relative', data }),
      status.INVALID_ARGUMENT,
    );
    await rejectsWith(
      alice.call('UploadFile', { vm_id: 'a1', path: '/a/../b', data }),
      status.INVALID_ARGUMENT,
    );
    await rejectsWith(alice.call('DownloadFile', { vm_id: 'a1', path: '/nope' }), status.NOT_FOUND);
    await rejectsWith(alice.call('DownloadFile', { vm_id: 'a1', path: '/root' }), status.FAILED_PRECONDITION);
    await grpcExec(alice, 'a1', 'truncate -s 70M /tmp/huge').done;
    const msg = await rejectsWith(
      alice.call('DownloadFile', { vm_id: 'a1', path: '/tmp/huge' }),
      status.FAILED_PRECONDITION,
    );
    assert.match(msg, /over DownloadFile's limit of 67108864 bytes/);
  });

  test('StopVm and StartVm; a stopped VM has no logs or exec', async () => {
    await alice.call('StopVm', { vm_id: 'a1' });
    assert.equal((await alice.call<Msg>('GetVm', { vm_id: 'a1' })).status, 'stopped');
    await rejectsWith(grpcExec(alice, 'a1', 'true').done, status.FAILED_PRECONDITION);
    await rejectsWith(
      new Promise((resolve, reject) => {
        const s = (alice.raw.StreamLogs as (r: Msg, m: unknown) => NodeJS.EventEmitter)(
          { vm_id: 'a1' },
          alice.meta(),
        );
        s.on('data', () => {});
        s.on('end', resolve);
        s.on('error', reject);
      }),
      status.FAILED_PRECONDITION,
    );
    await alice.call('StartVm', { vm_id: 'a1' });
    assert.equal((await alice.call<Msg>('GetVm', { vm_id: 'a1' })).status, 'running');
    // The disk persisted across the stop.
    const r = await grpcExec(alice, 'a1', 'test -f /root/up/file.bin && echo kept').done;
    assert.equal(r.out.toString(), 'kept\n');
  });

  test('every method is served: none answers UNIMPLEMENTED', async () => {
    const r = await reflect(d.grpcAddress as string, 'boxd.api.v1.BoxdApi');
    const methods = Object.keys(r.root.lookupService('boxd.api.v1.BoxdApi').methods);
    r.close();
    for (const m of methods) {
      // Streams are covered above; CreateVm with nothing set makes a VM (covered above too).
      if (m === 'Exec' || m === 'StreamLogs' || m === 'CreateVm') continue;
      const code = await alice.call(m, {}).then(
        () => status.OK,
        (e: { code: number }) => e.code,
      );
      assert.notEqual(code, status.UNIMPLEMENTED, m);
      // Unauthenticated: refused before anything else, for every method.
      await rejectsWith(alice.call(m, {}, null), status.UNAUTHENTICATED);
    }
  });

  test('DestroyVm', async () => {
    await alice.call('DestroyVm', { vm_id: 'a1' });
    await rejectsWith(alice.call('GetVm', { vm_id: 'a1' }), status.NOT_FOUND);
    await rejectsWith(alice.call('DestroyVm', { vm_id: 'a1' }), status.NOT_FOUND);
  });
});
