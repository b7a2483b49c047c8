import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { daemonTag } from '../../src/net/addressing.js';
import { runHutch } from '../helpers/accounts.js';
import {
  api,
  cleanup,
  networkLeftovers,
  outsideAddress,
  qemusOf,
  startDaemon,
  type TestDaemon,
  waitFor,
} from '../helpers/daemon.js';
import { type FakeInternet, guestFetch, packageName, startFakeInternet } from '../helpers/fake-internet.js';
import { startGuestWebServer } from '../helpers/guest-web-server.js';

interface Exec {
  exit_code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * What a connection attempt from the guest came to: `connected`, `refused` (a reset or an ICMP
 * refusal: the firewall answered at once), `unreachable`, `timeout` (looked like a black hole).
 */
const probeScript = (host: string, port: number, timeout = 4): string => `python3 - <<'EOF'
import socket, errno
try:
    s = socket.create_connection((${JSON.stringify(host)}, ${port}), ${timeout})
    print("connected")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
except OSError as e:
    print("refused" if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM) and ${JSON.stringify(host)}.count(":") == 0 else "unreachable" if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL) else "error %s" % e)
EOF`;

async function exec(d: TestDaemon, id: string, cmd: string, timeoutMs = 120_000): Promise<Exec> {
  const r = await api(d.url, 'POST', `/v1/machines/${id}/exec`, { cmd, timeout_ms: timeoutMs });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body as unknown as Exec;
}

async function out(d: TestDaemon, id: string, cmd: string): Promise<string> {
  return (await exec(d, id, cmd)).stdout.trim();
}

async function createNet(d: TestDaemon, extra: Record<string, unknown> = {}): Promise<string> {
  const r = await api(d.url, 'POST', '/v1/machines', {
    template: 'python',
    net: true,
    ttl_seconds: 900,
    ...extra,
  });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  assert.equal(r.body.net, true);
  return r.body.id as string;
}

async function egress(d: TestDaemon, id: string, rules?: unknown): Promise<Record<string, unknown>> {
  const r = rules
    ? await api(d.url, 'PUT', `/v1/machines/${id}/egress`, rules)
    : await api(d.url, 'GET', `/v1/machines/${id}/egress`);
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body;
}

function hostAddresses(): string[] {
  return Object.values(networkInterfaces())
    .flat()
    .filter((a) => a && a.family === 'IPv4')
    .map((a) => a?.address ?? '')
    .filter((a) => a && !a.startsWith('127.'));
}

describe('networking: a guest on the internet behind its firewall', () => {
  let inet: FakeInternet;
  let d: TestDaemon;
  let id: string;
  let other: string;
  before(async () => {
    inet = await startFakeInternet();
    d = await startDaemon({ env: { ...inet.env, HUTCH_NET_MAX_CONNECTIONS: '24' } });
    id = await createNet(d);
    other = await createNet(d);
  });
  after(async () => {
    await cleanup(d);
    await inet.close();
  });

  test('a networked guest has one configured NIC and reaches the internet by name; a machine without net has no NIC', async () => {
    assert.match(await out(d, id, 'ip -4 -br addr show eth0'), /172\.31\.255\.2\/30/);
    assert.equal(await out(d, id, guestFetch('http://pypi.test/')), 'hello from the fake internet');
    const plain = await api(d.url, 'POST', '/v1/machines', { template: 'python', ttl_seconds: 300 });
    assert.equal(plain.status, 201);
    assert.equal(plain.body.net, false);
    assert.equal(await out(d, plain.body.id as string, 'ls /sys/class/net'), 'lo');
  });

  test('pip install from the index works with net: true, and with an allowlist naming it; an allowlist without it fails and says why', async () => {
    const pip = `pip install --trusted-host pypi.test --no-cache-dir --disable-pip-version-check --break-system-packages --force-reinstall --index-url http://pypi.test/simple/ ${packageName} && python3 -c "import hello_hutch; print(hello_hutch.GREETING)"`;
    let r = await exec(d, id, pip);
    assert.equal(r.exit_code, 0, r.stderr);
    assert.match(r.stdout, /hello from the fake index/);

    await egress(d, id, { allow: ['pypi.test'] });
    r = await exec(d, id, pip);
    assert.equal(r.exit_code, 0, r.stderr);

    await egress(d, id, { allow: ['*.allowed.test'] });
    r = await exec(d, id, pip.replace('--index-url', '--retries 0 --timeout 5 --index-url'));
    assert.notEqual(r.exit_code, 0);
    const e = await egress(d, id);
    const recent = e.recent as { reason: string; name?: string; detail?: string }[];
    assert.ok(
      recent.some((x) => x.reason === 'dns' && x.name === 'pypi.test' && x.detail === 'not-allowed'),
      JSON.stringify(e),
    );
    await egress(d, id, {});
  });

  test('every always-denied destination is refused at once: the host on all its addresses, private ranges, metadata, other guests, DoT', async () => {
    const port = Number(new URL(d.url).port);
    const grpcPort = Number(d.grpcAddress?.split(':').pop());
    const targets: [string, number][] = [
      ['10.0.0.1', 80],
      ['192.168.1.1', 80],
      ['172.16.0.1', 80],
      ['100.64.0.1', 80],
      ['169.254.169.254', 80],
      ['172.31.255.1', port],
      ['172.31.255.1', 22],
      [outsideAddress(d.stateDir, other), 22],
      ['198.18.0.54', 853],
    ];
    for (const a of [...hostAddresses(), '198.18.0.1'])
      for (const p of [port, grpcPort, 22]) targets.push([a, p]);
    const script = `python3 - <<'EOF'
import socket, errno
for h, p in ${JSON.stringify(targets)}:
    try:
        socket.create_connection((h, p), 4).close(); r = "connected"
    except ConnectionRefusedError: r = "refused"
    except socket.timeout: r = "timeout"
    except OSError as e: r = "refused" if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES) else "error %s" % e
    print("%s:%d %s" % (h, p, r))
EOF`;
    const lines = (await out(d, id, script)).split('\n');
    assert.equal(lines.length, targets.length, lines.join('\n'));
    for (const l of lines) assert.match(l, / refused$/, `${l} (all: ${lines.join('; ')})`);
    // IPv6 is not routed: it fails at once, never hangs.
    assert.match(await out(d, id, probeScript('2001:db8::1', 80)), /^(unreachable|refused)$/);
    const e = await egress(d, id);
    assert.ok(((e.denied as Record<string, number>).always ?? 0) >= 9, JSON.stringify(e.denied));
  });

  test("127.0.0.1 sent through the gateway does not reach the host's loopback services", async () => {
    const port = Number(new URL(d.url).port);
    // The guest is root: it can route loopback out of its NIC. The namespace must drop it.
    const r = await out(
      d,
      other,
      `sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1 && ip route del local 127.0.0.0/8 dev lo table local && ip route add 127.0.0.0/8 via 172.31.255.1 dev eth0 && ${probeScript('127.0.0.1', port, 3)}`,
    );
    assert.match(r, /^(refused|timeout|unreachable)$/);
    assert.notEqual(r, 'connected');
  });

  test("DNS: other resolvers are redirected to hutch's; rebinding, metadata and loopback answers are refused; refused names never reach upstream", async () => {
    // A resolver the guest names itself: its query lands at hutch's resolver, which knows nothing of it.
    const q = `python3 - <<'EOF'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
q = bytes.fromhex("abcd01000001000000000000") + b"\\x0aonly-other\\x04test\\x00\\x00\\x01\\x00\\x01"
s.sendto(q, ("198.18.0.54", 53))
r = s.recv(512)
print("rcode", r[3] & 15, "answers", r[7])
EOF`;
    assert.equal(await out(d, id, q), 'rcode 3 answers 0');
    for (const n of ['rebind.test', 'metadata.test', 'loopback.test'])
      assert.notEqual((await exec(d, id, `getent hosts ${n}`)).exit_code, 0, n);
    await egress(d, id, { allow: ['pypi.test'] });
    assert.notEqual((await exec(d, id, 'getent hosts secret-payload.exfil.test')).exit_code, 0);
    assert.doesNotMatch(inet.requests(), /exfil/);
    assert.match(inet.requests(), /fake-dns query pypi\.test/);
    await egress(d, id, {});
  });

  test('under a domain allowlist a hardcoded IP is refused; the allowed name opens its own addresses only', async () => {
    await egress(d, other, { allow: ['pypi.test'] });
    assert.equal(await out(d, other, probeScript('198.18.1.11', 80)), 'refused');
    assert.equal(await out(d, other, probeScript('198.18.1.10', 80)), 'refused');
    await out(d, other, 'getent hosts pypi.test');
    assert.equal(await out(d, other, probeScript('198.18.1.10', 80)), 'connected');
    assert.equal(await out(d, other, probeScript('198.18.1.11', 80)), 'refused');
    // The other machine resolved nothing: the address stays closed for it.
    await egress(d, id, { allow: ['other.test'] });
    assert.equal(await out(d, id, probeScript('198.18.1.10', 80)), 'refused');
    // Resolving and connecting at once (as every client does): the answer waits for the firewall.
    assert.equal(await out(d, id, probeScript('other.test', 80)), 'connected');
    await egress(d, id, {});
    await egress(d, other, {});
  });

  test('a rule changed at run time takes effect at once, on a connection already open', async () => {
    // A connection opened before the change, used after it.
    await exec(
      d,
      id,
      `rm -f /tmp/go /tmp/result; (python3 - >/tmp/result 2>&1 <<'EOF'
import socket, os, time
s = socket.create_connection(("198.18.1.11", 80), 5)
print("open", flush=True)
while not os.path.exists("/tmp/go"): time.sleep(0.05)
try:
    s.sendall(b"GET / HTTP/1.0\\r\\nHost: other.test\\r\\n\\r\\n"); s.settimeout(5)
    print("reply", len(s.recv(100)))
except OSError as e:
    print("cut", type(e).__name__)
EOF
) & sleep 1; cat /tmp/result`,
    );
    await egress(d, id, { deny: ['198.18.1.11'] });
    const r = await out(
      d,
      id,
      'touch /tmp/go; for i in $(seq 50); do grep -q "reply\\|cut" /tmp/result && break; sleep 0.1; done; cat /tmp/result',
    );
    assert.match(r, /open\ncut /, r);
    assert.equal(await out(d, id, probeScript('198.18.1.11', 80)), 'refused');
    assert.equal(await out(d, id, guestFetch('http://pypi.test/')), 'hello from the fake internet');
    const e = await egress(d, id);
    assert.ok(((e.denied as Record<string, number>).rule ?? 0) > 0);
    assert.deepEqual(e.rules, { allow: [], deny: ['198.18.1.11/32'] });
    await egress(d, id, {});
  });

  test('a guest cannot hold more connections than its cap; the refusals are counted', async () => {
    const r = await out(
      d,
      id,
      `python3 - <<'EOF'
import socket
held, refused = [], 0
for i in range(40):
    try: held.append(socket.create_connection(("198.18.1.11", 80), 3))
    except OSError: refused += 1
print(len(held), refused)
EOF`,
    );
    const [held, refused] = r.split(' ').map(Number);
    assert.ok((held ?? 99) <= 24 && (refused ?? 0) >= 16, r);
    const e = await egress(d, id);
    assert.ok(((e.denied as Record<string, number>).limit ?? 0) > 0, JSON.stringify(e.denied));
  });

  test('bad egress rules are refused and change nothing', async () => {
    await egress(d, id, { allow: ['pypi.test'] });
    for (const bad of [
      { allow: ['not a domain!'] },
      { deny: ['10.0.0.0/33'] },
      { allow: ['2001:db8::/32'] },
      { allow: 'x' },
    ]) {
      const r = await api(d.url, 'PUT', `/v1/machines/${id}/egress`, bad);
      assert.equal(r.status, 400, JSON.stringify(r.body));
      assert.equal(r.body.code, 'INVALID_ARGUMENT');
    }
    assert.deepEqual((await egress(d, id)).rules, { allow: ['pypi.test'], deny: [] });
    const plain = await api(d.url, 'POST', '/v1/machines', { template: 'python', ttl_seconds: 60 });
    const r = await api(d.url, 'PUT', `/v1/machines/${plain.body.id}/egress`, { allow: ['pypi.test'] });
    assert.equal(r.status, 409);
    assert.equal(r.body.code, 'NOT_SUPPORTED');
    const noNet = await api(d.url, 'POST', '/v1/machines', {
      template: 'python',
      egress: { allow: ['x.test'] },
    });
    assert.equal(noNet.status, 400);
    await egress(d, id, {});
  });

  test('the CLI: hutch new --net --allow, hutch egress shows and replaces the rules', async () => {
    const n = await runHutch(d, 'new', '--net', '--allow', 'pypi.test', '--ttl', '300', '--json');
    assert.equal(n.status, 0, n.stderr + n.stdout);
    const m = JSON.parse(n.stdout) as { id: string; net: boolean };
    assert.equal(m.net, true);
    const show = await runHutch(d, 'egress', m.id, '--json');
    assert.deepEqual((JSON.parse(show.stdout) as { rules: unknown }).rules, {
      allow: ['pypi.test'],
      deny: [],
    });
    const open = await runHutch(d, 'egress', m.id, '--open');
    assert.equal(open.status, 0, open.stderr);
    assert.match(open.stdout, /^allow: \(the internet\)$/m);
    const bad = await runHutch(d, 'egress', m.id, '--allow', 'not a name', '--json');
    assert.notEqual(bad.status, 0);
    assert.equal((JSON.parse(bad.stdout) as { code: string }).code, 'INVALID_ARGUMENT');
  });
});

describe('networking on a host just booted: no /run/netns yet', () => {
  // /run is a tmpfs: after a boot it has no netns directory until the first `ip netns add`. The
  // daemon's start-up sweep read it unguarded and the daemon died (found by CI on a fresh host).
  // Here the daemon runs in a mount namespace of its own whose /run is empty, except
  // /run/hutch, whose network slots are shared by every daemon on the host.
  const justBooted = [
    'unshare',
    '--mount',
    'sh',
    '-ec',
    [
      'mount --make-rprivate /',
      'mkdir -p /run/hutch',
      'keep=$(mktemp -d)',
      'mount --bind /run/hutch "$keep"',
      'mount -t tmpfs tmpfs /run',
      'mkdir /run/hutch',
      'mount --move "$keep" /run/hutch',
      'rmdir "$keep"',
      'test ! -e /run/netns',
      'exec "$@"',
    ].join('; '),
    'just-booted',
  ];
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon({ wrap: justBooted });
  });
  after(async () => {
    await cleanup(d);
  });

  test('the daemon starts, a networked machine gets its address, and its namespace goes with it', async () => {
    const inDaemonsMounts = (...cmd: string[]): string =>
      execFileSync('nsenter', [`--mount=/proc/${d.proc.pid}/ns/mnt`, '--', ...cmd], { encoding: 'utf8' });
    const id = await createNet(d, { ttl_seconds: 300 });
    assert.match(await out(d, id, 'ip -4 -o addr show dev eth0'), /inet \d+\.\d+\.\d+\.\d+\//);
    const mine = `hutch-${daemonTag(d.stateDir)}-${id}`;
    assert.ok(inDaemonsMounts('ip', 'netns', 'list').includes(mine), "its namespace, in the daemon's /run");
    assert.equal((await api(d.url, 'DELETE', `/v1/machines/${id}`)).status, 204);
    assert.ok(!inDaemonsMounts('ip', 'netns', 'list').includes(mine), 'no namespace left');
  });
});

describe('networking: snapshots, branches, suspend, restarts and crashes', () => {
  let inet: FakeInternet;
  let d: TestDaemon;
  before(async () => {
    inet = await startFakeInternet();
    d = await startDaemon({ env: inet.env });
  });
  after(async () => {
    await cleanup(d);
    await inet.close();
  });

  test('a networked machine restored from snapshot, its branch and its resume from suspend all reach the internet', async () => {
    // The networked snapshot is taken in the background after the template's.
    const id = await waitFor(
      'the networked snapshot',
      async () => {
        const r = await api(d.url, 'POST', '/v1/machines', {
          template: 'python',
          net: true,
          mode: 'snapshot',
          ttl_seconds: 900,
        });
        if (r.status === 201) return r.body.id as string;
        assert.equal(r.body.code, 'SNAPSHOT_NOT_READY', JSON.stringify(r.body));
        return undefined;
      },
      180_000,
    );
    assert.equal(await out(d, id, guestFetch('http://pypi.test/')), 'hello from the fake internet');
    const b = await api(d.url, 'POST', `/v1/machines/${id}/branch`, {});
    assert.equal(b.status, 201, JSON.stringify(b.body));
    const clone = b.body.id as string;
    assert.equal(await out(d, clone, guestFetch('http://other.test/')), 'hello from the fake internet');
    assert.equal(await out(d, id, guestFetch('http://other.test/')), 'hello from the fake internet');
    assert.notEqual(outsideAddress(d.stateDir, id), outsideAddress(d.stateDir, clone));
    const s = await api(d.url, 'POST', `/v1/machines/${clone}/suspend`, {});
    assert.equal(s.status, 200, JSON.stringify(s.body));
    assert.equal(
      existsSync(`/run/netns/hutch-${daemonTag(d.stateDir)}-${clone}`),
      false,
      'a suspended machine has no namespace',
    );
    const r = await api(d.url, 'POST', `/v1/machines/${clone}/resume`, {});
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.equal(await out(d, clone, guestFetch('http://pypi.test/')), 'hello from the fake internet');
    // Its preview works too (through the agent, not the network).
    assert.equal((await exec(d, clone, startGuestWebServer(8000))).exit_code, 0);
    const page = await fetch(new URL(`/v1/machines/${clone}/web/8000/`, d.url));
    assert.equal(await page.text(), 'hello from the guest');
  });

  test('kill -9 of the daemon and of a QEMU: the survivor keeps its network, the dead one leaves nothing once the daemon is back', async () => {
    const keep = await createNet(d);
    const dead = await createNet(d);
    const tag = daemonTag(d.stateDir);
    await d.stop('SIGKILL');
    const qemu = qemusOf(d.stateDir).find((pid) =>
      readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(`guest=hutch-${dead},`),
    );
    assert.ok(qemu, 'the QEMU of the machine to kill');
    process.kill(qemu, 'SIGKILL');
    // Leftovers the crash could leave, on top: 200 namespaces of machines this daemon never had.
    const fakes = Array.from(
      { length: 200 },
      (_, i) => `netns add hutch-${tag}-m-dead${String(i).padStart(4, '0')}`,
    );
    execFileSync('ip', ['-batch', '-'], { input: fakes.join('\n') });
    // The resolver's last port taken meanwhile: the restarted daemon listens elsewhere, and the
    // survivor's namespace must be pointed there.
    const lastDns = Number(readFileSync(join(d.stateDir, 'dns-port'), 'utf8'));
    const squatter = createSocket('udp4');
    await new Promise<void>((r) => squatter.bind(lastDns, '0.0.0.0', () => r()));
    d = await startDaemon({ env: inet.env, stateDir: d.stateDir });
    squatter.close();
    assert.notEqual(Number(readFileSync(join(d.stateDir, 'dns-port'), 'utf8')), lastDns);
    const left = readdirSync('/run/netns').filter((n) => n.startsWith(`hutch-${tag}-`));
    assert.ok(left.includes(`hutch-${tag}-${keep}`), left.join(' '));
    assert.ok(!left.includes(`hutch-${tag}-${dead}`), left.join(' '));
    assert.ok(!left.some((n) => n.includes('m-dead')), `${left.length} left`);
    assert.equal(await out(d, keep, guestFetch('http://pypi.test/')), 'hello from the fake internet');
    // It is still on its owner's network: a machine made after the restart reaches it.
    assert.equal(
      (await exec(d, keep, startGuestWebServer(8080).replace('("127.0.0.1"', '("0.0.0.0"'))).exit_code,
      0,
    );
    const fresh = await createNet(d);
    const keepAddress = outsideAddress(d.stateDir, keep);
    assert.equal(await out(d, fresh, guestFetch(`http://${keepAddress}:8080/`)), 'hello from the guest');
    await api(d.url, 'DELETE', `/v1/machines/${fresh}`);
    const del = await api(d.url, 'DELETE', `/v1/machines/${keep}`);
    assert.equal(del.status, 204);
    const gone = await api(d.url, 'GET', `/v1/machines/${dead}`);
    assert.ok(gone.status === 404 || gone.body.status === 'failed', JSON.stringify(gone.body));
    await api(d.url, 'DELETE', `/v1/machines/${dead}`);
    const leftovers = networkLeftovers(d.stateDir).filter((x) => x.includes(dead) || x.includes(keep));
    assert.deepEqual(leftovers, []);
  });

  test('boxes: "network": true gives a box the internet (its own firewall); without it a box has no NIC', async () => {
    const boxes = new BoxesClient({ socketPath: d.boxesSocket });
    // debian minbase has no curl or python: bash's /dev/tcp, which resolves through resolv.conf.
    const get =
      'exec 3<>/dev/tcp/pypi.test/80 && printf "GET / HTTP/1.0\\r\\nHost: pypi.test\\r\\n\\r\\n" >&3 && tail -n1 <&3';
    const on = await boxes.run<{ exit_code: number; stdout: string; stderr: string }>({
      image: 'debian:bookworm',
      network: true,
      cmd: ['bash', '-c', get],
    });
    assert.equal(on.exit_code, 0, on.stderr);
    assert.equal(on.stdout.trim(), 'hello from the fake internet');
    const denied = await boxes.run<{ exit_code: number; stdout: string }>({
      image: 'debian:bookworm',
      network: true,
      egress: { allow: ['other.test'] },
      cmd: ['bash', '-c', get],
    });
    assert.notEqual(denied.exit_code, 0);
    const off = await boxes.run<{ exit_code: number; stdout: string }>({
      image: 'debian:bookworm',
      cmd: ['ls', '/sys/class/net'],
    });
    assert.equal(off.stdout.trim(), 'lo');
  });
});
