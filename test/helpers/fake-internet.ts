import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { root } from './daemon.js';

/**
 * A small "internet" in a network namespace, routed from the host: the only place guests can
 * reach in the tests (the machine itself has no internet). 198.18.0.0/15 is the benchmarking
 * range (RFC 2544): public as far as the guests' firewall is concerned, never routed for real.
 *   198.18.0.53   DNS (authoritative for *.test; records below)
 *   198.18.0.54   another resolver (a guest must not be able to use it) and a DoT port (853)
 *   198.18.1.10   HTTP: pypi.test (a PEP 503 index with one wheel), files.test (/big: 32 MiB)
 *   198.18.1.11   HTTP: other.test (same content)
 */
export interface FakeInternet {
  /** The host-side link: the daemon's uplink (HUTCH_NET_UPLINK). */
  link: string;
  netns: string;
  dns: string;
  /** Names the fake DNS answers, to use in assertions. */
  records: Record<string, string[]>;
  /** The daemon environment that routes guests here. */
  env: Record<string, string>;
  /** Requests the HTTP servers saw (path + client address), for "did it reach the server". */
  requests(): string;
  close(): Promise<void>;
}

export const packageName = 'hello-hutch';

/** A guest command that prints the body at `url` (python3's stdlib: every template has it). */
export const guestFetch = (url: string): string =>
  `python3 -c "import urllib.request as u; print(u.urlopen('${url}', timeout=10).read().decode().strip())"`;

export async function startFakeInternet(): Promise<FakeInternet> {
  const tag = randomBytes(2).toString('hex');
  const netns = `hutchtest-inet-${tag}`;
  const link = `hti${tag}`;
  const dir = mkdtempSync(join(tmpdir(), 'hutch-inet-'));
  const records: Record<string, string[]> = {
    'pypi.test': ['198.18.1.10'],
    'files.test': ['198.18.1.10'],
    'other.test': ['198.18.1.11'],
    'www.allowed.test': ['198.18.1.11'],
    'rebind.test': ['10.0.0.5'],
    'metadata.test': ['169.254.169.254'],
    'loopback.test': ['127.0.0.1'],
  };
  const sh = (cmd: string): void => {
    execFileSync('sh', ['-c', cmd], { stdio: ['ignore', 'ignore', 'pipe'] });
  };
  const procs: ChildProcess[] = [];
  let log = '';
  const close = async (): Promise<void> => {
    for (const p of procs) p.kill('SIGKILL');
    await Promise.all(
      procs.map((p) => new Promise((r) => (p.exitCode !== null ? r(null) : p.once('exit', r)))),
    );
    for (const args of [
      ['netns', 'del', netns],
      ['link', 'del', link],
      ['route', 'del', '198.18.1.0/24', 'dev', link],
    ])
      try {
        execFileSync('ip', args, { stdio: 'ignore' });
      } catch {
        // gone already
      }
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    sh(`ip netns add ${netns}`);
    sh(`ip link add ${link} type veth peer name eth0 netns ${netns}`);
    sh(`ip addr add 198.18.0.1/24 dev ${link} && ip link set ${link} up`);
    sh(`ip route replace 198.18.1.0/24 via 198.18.0.2 dev ${link}`);
    const ns = (cmd: string): void => sh(`ip netns exec ${netns} sh -c '${cmd}'`);
    ns('ip link set lo up && ip link set eth0 up && ip addr add 198.18.0.2/24 dev eth0');
    ns('ip addr add 198.18.0.53/32 dev lo && ip addr add 198.18.0.54/32 dev lo');
    ns('ip addr add 198.18.1.10/32 dev lo && ip addr add 198.18.1.11/32 dev lo');
    ns('ip route add default via 198.18.0.1');

    // The package index: one pure-python wheel, made here (a wheel is a zip with metadata).
    const www = join(dir, 'www');
    mkdirSync(join(www, 'simple', packageName), { recursive: true });
    mkdirSync(join(www, 'packages'), { recursive: true });
    execFileSync('python3', ['-c', wheelScript, join(www, 'packages')]);
    writeFileSync(
      join(www, 'simple', 'index.html'),
      `<!DOCTYPE html><html><body><a href="/simple/${packageName}/">${packageName}</a></body></html>\n`,
    );
    writeFileSync(
      join(www, 'simple', packageName, 'index.html'),
      `<!DOCTYPE html><html><body><a href="/packages/hello_hutch-0.1-py3-none-any.whl">hello_hutch-0.1-py3-none-any.whl</a></body></html>\n`,
    );
    writeFileSync(join(www, 'index.html'), 'hello from the fake internet\n');
    execFileSync('dd', ['if=/dev/urandom', `of=${join(www, 'big')}`, 'bs=1M', 'count=32'], {
      stdio: 'ignore',
    });

    const asTable = (r: Record<string, string[]>): string =>
      JSON.stringify(Object.fromEntries(Object.entries(r).map(([n, a]) => [n, { a, ttl: 60 }])));
    writeFileSync(join(dir, 'records.json'), asTable(records));
    writeFileSync(join(dir, 'other-records.json'), asTable({ 'only-other.test': ['198.18.1.11'] }));
    const inNs = (args: string[]): ChildProcess => {
      const p = spawn('ip', ['netns', 'exec', netns, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
      p.stdout?.on('data', (b: Buffer) => {
        log += b.toString();
      });
      p.stderr?.on('data', (b: Buffer) => {
        log += b.toString();
      });
      procs.push(p);
      return p;
    };
    const fakeDns = join(root, 'dist', 'test', 'helpers', 'fake-dns.js');
    inNs(['node', fakeDns, '--host', '198.18.0.53', '--port', '53', '--records', join(dir, 'records.json')]);
    inNs([
      'node',
      fakeDns,
      '--host',
      '198.18.0.54',
      '--port',
      '53',
      '--records',
      join(dir, 'other-records.json'),
    ]);
    for (const ip of ['198.18.1.10', '198.18.1.11'])
      inNs(['python3', '-m', 'http.server', '--bind', ip, '80', '--directory', www]);
    // Something listening on DoT's port, so a refusal is the firewall's, not an absent server's.
    inNs(['python3', '-c', dotScript]);
    // Ready when every server answers.
    const deadline = Date.now() + 20_000;
    for (;;) {
      try {
        ns(
          'python3 -c "import socket; [socket.create_connection((h, p), 1).close() for h, p in ((\\"198.18.1.10\\", 80), (\\"198.18.1.11\\", 80), (\\"198.18.0.54\\", 853))]"',
        );
        break;
      } catch {
        if (Date.now() > deadline) throw new Error(`the fake internet did not start:\n${log}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  } catch (e) {
    await close();
    throw e;
  }
  return {
    link,
    netns,
    dns: '198.18.0.53',
    records,
    env: { HUTCH_NET_UPLINK: link, HUTCH_NET_DNS: '198.18.0.53' },
    requests: () => log,
    close,
  };
}

const wheelScript = `
import sys, zipfile, hashlib, base64
out = sys.argv[1] + "/hello_hutch-0.1-py3-none-any.whl"
files = {
  "hello_hutch/__init__.py": "GREETING = 'hello from the fake index'\\n",
  "hello_hutch-0.1.dist-info/METADATA": "Metadata-Version: 2.1\\nName: hello-hutch\\nVersion: 0.1\\n",
  "hello_hutch-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\\nGenerator: hutch-test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
}
record = []
with zipfile.ZipFile(out, "w") as z:
  for name, text in files.items():
    data = text.encode()
    z.writestr(name, data)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(data)}")
  record.append("hello_hutch-0.1.dist-info/RECORD,,")
  z.writestr("hello_hutch-0.1.dist-info/RECORD", "\\n".join(record) + "\\n")
`;

const dotScript = `
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.18.0.54", 853)); s.listen(16)
while True:
  c, _ = s.accept(); c.sendall(b"DOT-SERVER\\n"); c.close()
`;
