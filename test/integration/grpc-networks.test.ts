/**
 * Users' networks, proxies and domains: one user's machines reach each other at their
 * addresses, nobody else's do; a proxy name and a bound domain route HTTP by Host to a port of
 * the owner's machine, and belong to one user.
 */
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { authed, userWithToken } from '../helpers/accounts.js';
import { cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { type FakeInternet, startFakeInternet } from '../helpers/fake-internet.js';
import { type BoxdClient, boxdClient, type Msg, rejectsWith } from '../helpers/grpc.js';
import { startGuestWebServer } from '../helpers/guest-web-server.js';

describe('networks, proxies and domains', () => {
  let inet: FakeInternet;
  let d: TestDaemon;
  let alice: BoxdClient;
  let bob: BoxdClient;
  let aliceToken: string;
  let bobToken: string;
  const machines: Record<string, { id: string; address: string }> = {};
  before(async () => {
    inet = await startFakeInternet();
    d = await startDaemon({ env: { ...inet.env, HUTCH_PUBLIC_DOMAIN: 'hutch.test' } });
    aliceToken = (await userWithToken(d, 'alice')).token;
    bobToken = (await userWithToken(d, 'bob')).token;
    alice = boxdClient(d.grpcAddress as string, aliceToken);
    bob = boxdClient(d.grpcAddress as string, bobToken);
    for (const [name, token] of [
      ['a1', aliceToken],
      ['a2', aliceToken],
      ['b1', bobToken],
    ] as const) {
      const r = await authed(
        d.url,
        'POST',
        '/v1/machines',
        { token },
        { template: 'python', net: true, name, ttl_seconds: 900 },
      );
      assert.equal(r.status, 201, JSON.stringify(r.body));
      machines[name] = { id: r.body.id as string, address: r.body.address as string };
    }
    const s = await authed(
      d.url,
      'POST',
      `/v1/machines/a1/exec`,
      { token: aliceToken },
      {
        cmd: startGuestWebServer(8080).replace('("127.0.0.1"', '("0.0.0.0"'),
        timeout_ms: 60_000,
      },
    );
    assert.equal(s.body.exit_code, 0, JSON.stringify(s.body));
  });
  after(async () => {
    alice.close();
    bob.close();
    await cleanup(d);
    await inet.close();
  });

  const fetchFrom = async (token: string, machine: string, url: string): Promise<string> => {
    const r = await authed(
      d.url,
      'POST',
      `/v1/machines/${machine}/exec`,
      { token },
      {
        cmd: `python3 -c "import urllib.request as u; print(u.urlopen('${url}', timeout=5).read().decode())" 2>&1 | tail -n1`,
        timeout_ms: 30_000,
      },
    );
    return String(r.body.stdout).trim();
  };

  test("one user's machines reach each other on their network; another user's cannot", async () => {
    const a1 = machines.a1 as { address: string };
    assert.match(a1.address, /^10\.213\./);
    assert.equal(await fetchFrom(aliceToken, 'a2', `http://${a1.address}:8080/`), 'hello from the guest');
    assert.match(await fetchFrom(bobToken, 'b1', `http://${a1.address}:8080/`), /Connection refused/);
  });

  test('Whoami and ListNetworks report the default network; CreateNetwork adds one', async () => {
    const who = await alice.call<Msg>('Whoami', {});
    assert.match(who.default_network_id as string, /^net-[0-9a-f]{8}$/);
    const made = await alice.call<Msg>('CreateNetwork', { name: 'lab' });
    const list = (await alice.call<Msg>('ListNetworks', {})).networks as Msg[];
    assert.deepEqual(
      list.map((n) => n.network_id),
      [who.default_network_id, made.network_id],
    );
    assert.equal(list[0]?.subnet, '10.213.0.0/16');
    const bobs = (await bob.call<Msg>('ListNetworks', {})).networks as Msg[];
    assert.equal(bobs.length, 1);
    assert.notEqual(bobs[0]?.network_id, who.default_network_id);
    await rejectsWith(alice.call('CreateNetwork', { name: 'lab' }), status.ALREADY_EXISTS);
    // A machine put on "lab" does not reach alice's default network, and bob cannot use "lab".
    const lab = await authed(
      d.url,
      'POST',
      '/v1/machines',
      { token: aliceToken },
      {
        template: 'python',
        net: true,
        network_id: 'lab',
        ttl_seconds: 300,
      },
    );
    assert.equal(lab.status, 201, JSON.stringify(lab.body));
    assert.match(
      await fetchFrom(aliceToken, lab.body.id as string, `http://${machines.a1?.address}:8080/`),
      /Connection refused/,
    );
    const stolen = await authed(
      d.url,
      'POST',
      '/v1/machines',
      { token: bobToken },
      {
        template: 'python',
        net: true,
        network_id: made.network_id,
      },
    );
    assert.equal(stolen.status, 404);
    assert.equal(stolen.body.code, 'NETWORK_NOT_FOUND');
    await rejectsWith(alice.call('CreateNetwork', { name: 'Bad Name' }), status.INVALID_ARGUMENT);
  });

  // fetch() drops a Host header: node:http sends it.
  const viaHost = (host: string, path = '/'): Promise<{ status: number; text: string }> =>
    new Promise((resolve, reject) => {
      const req = request(new URL(path, d.url), { headers: { host } }, (res) => {
        let text = '';
        res.on('data', (c: Buffer) => {
          text += c.toString();
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
      });
      req.on('error', reject);
      req.end();
    });

  test('a proxy routes its name to a port of the machine; "auto" is the first port it listens on', async () => {
    const p = await alice.call<Msg>('CreateProxy', { name: 'web', vm_name: 'a1', port: 0 });
    assert.equal(p.domain, 'web.hutch.test');
    assert.deepEqual(await viaHost('web.hutch.test'), { status: 200, text: 'hello from the guest' });
    await alice.call('SetProxyPort', { name: 'web', vm_name: 'a1', port: '8081' });
    assert.equal((await viaHost('web.hutch.test')).status, 502);
    await alice.call('SetProxyPort', { name: 'web', vm_name: 'a1', port: '8080' });
    assert.equal((await viaHost('web.hutch.test')).text, 'hello from the guest');
    const list = (await alice.call<Msg>('ListProxies', { vm_name: 'a1' })).proxies as Msg[];
    assert.deepEqual(
      list.map((x) => [x.name, x.port, x.port_display, x.domain]),
      [['web', 8080, '8080', 'web.hutch.test']],
    );
    // Names are global: bob cannot take alice's, nor touch hers, nor point a proxy at her machine.
    await rejectsWith(
      bob.call('CreateProxy', { name: 'web', vm_name: 'b1', port: 0 }),
      status.ALREADY_EXISTS,
    );
    await rejectsWith(bob.call('DeleteProxy', { name: 'web', vm_name: '' }), status.NOT_FOUND);
    await rejectsWith(
      bob.call('CreateProxy', { name: 'bobs', vm_name: machines.a1?.id as string, port: 0 }),
      status.NOT_FOUND,
    );
    await rejectsWith(
      alice.call('CreateProxy', { name: 'no_underscores', vm_name: 'a1', port: 0 }),
      status.INVALID_ARGUMENT,
    );
    await alice.call('DeleteProxy', { name: 'web', vm_name: 'a1' });
    assert.equal((await viaHost('web.hutch.test')).status, 404);
  });

  test("a bound domain routes to the owner's machine; a domain belongs to one user", async () => {
    await alice.call('BindDomain', { domain: 'app.example.com', vm_id: 'a1' });
    assert.deepEqual(await viaHost('app.example.com'), { status: 200, text: 'hello from the guest' });
    assert.deepEqual((await alice.call<Msg>('ListDomains', {})).domains, [
      { domain: 'app.example.com', vm_id: machines.a1?.id },
    ]);
    await rejectsWith(
      bob.call('BindDomain', { domain: 'app.example.com', vm_id: 'b1' }),
      status.ALREADY_EXISTS,
    );
    await rejectsWith(bob.call('UnbindDomain', { domain: 'app.example.com' }), status.NOT_FOUND);
    await rejectsWith(
      alice.call('BindDomain', { domain: 'not a domain', vm_id: 'a1' }),
      status.INVALID_ARGUMENT,
    );
    await alice.call('UnbindDomain', { domain: 'app.example.com' });
    assert.equal((await viaHost('app.example.com')).status, 404);
  });

  test('a gRPC VM gets the internet, an address on its network and a default proxy with its URL', async () => {
    const vm = await alice.call<Msg>('CreateVm', {
      name: 'g1',
      image_ref: 'debian:bookworm',
      config: { memory_bytes: String(512 * 1024 * 1024), srf: { auto_suspend_timeout_secs: 0 } },
    });
    assert.match(vm.public_ip as string, /^10\.213\./);
    assert.equal(vm.url, 'http://g1.hutch.test/');
    const proxies = (await alice.call<Msg>('ListProxies', { vm_name: 'g1' })).proxies as Msg[];
    assert.deepEqual(
      proxies.map((p) => [p.name, p.is_default, p.port_display]),
      [['g1', true, 'auto']],
    );
    await alice.call('DestroyVm', { vm_id: 'g1' });
    assert.deepEqual((await alice.call<Msg>('ListProxies', { vm_name: '' })).proxies, []);
  });
});
