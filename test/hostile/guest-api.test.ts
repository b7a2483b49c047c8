/**
 * A hostile guest and its API tunnel (docs/agent-protocol.md, "Guest API"): root in a machine
 * of user alice tries to act as someone else, to exceed alice's quota, to exhaust the daemon
 * with API connections, garbage and huge bodies, and to open streams behind the agent's back on
 * its port. Each attempt is tallied; the daemon must stay up and bounded, other machines served.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { authed, userWithToken } from '../helpers/accounts.js';
import { api, cleanup, sleep, startDaemon, type TestDaemon, waitFor } from '../helpers/daemon.js';
import { bugLines, memoryOf, processAlive, Tally } from '../helpers/hostile.js';

/** Runs in the guest: the attacks on /run/hutch/api.sock, and raw API_OPEN frames on the port. */
const attacks = `
import ctypes, os, socket, struct, sys, time
SOCK = '/run/hutch/api.sock'
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCK)
    return s
mode = sys.argv[1]
if mode == 'hold':
    # Hundreds of connections, each a request cut short, held open.
    # Non-blocking connects: past the agent's backlog they fail instead of waiting.
    held = []
    for i in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(SOCK)
            try: s.send(b'GET /v1/machines HTTP/1.1\\r\\nHost: x\\r\\n')
            except OSError: pass
            held.append(s)
        except OSError:
            s.close()
    time.sleep(float(sys.argv[3]))
    print(len(held))
elif mode == 'garbage':
    n = 0
    for i in range(int(sys.argv[2])):
        s = conn()
        try:
            s.sendall(os.urandom(65536)); s.settimeout(10); s.recv(4096); n += 1
        except OSError:
            pass
        s.close()
    print(n)
elif mode == 'huge':
    s = conn()
    s.sendall(b'POST /v1/machines HTTP/1.1\\r\\nHost: x\\r\\ncontent-type: application/json\\r\\ncontent-length: 10000000000\\r\\n\\r\\n')
    sent, block = 0, b'[' * 65536
    s.settimeout(20)
    try:
        while sent < 200 * 1024 * 1024:
            s.sendall(block); sent += len(block)
    except OSError:
        pass
    try: answer = s.recv(4096)
    except OSError: answer = b''
    print(sent, answer.split(b'\\r\\n')[0].decode())
elif mode == 'forged':
    s = conn()
    s.sendall(b'GET /v1/machines HTTP/1.1\\r\\nHost: x\\r\\nauthorization: Bearer a.b.c\\r\\nconnection: close\\r\\n\\r\\n')
    s.settimeout(20); out = b''
    while True:
        b = s.recv(65536)
        if not b: break
        out += b
    print(out.split(b'\\r\\n')[0].decode())
elif mode == 'port':
    # Behind the agent's back: API_OPEN frames with any ids, written straight into the port.
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(1)
    port = next(int(f) for f in os.listdir('/proc/1/fd') if os.readlink(f'/proc/1/fd/{f}').startswith('/dev/vport'))
    fd = libc.syscall(438, pidfd, port, 0)
    frames = b''.join(struct.pack('>IBI', 5, 0x28, (0x80000000 | i) if i % 3 else i) for i in range(20000))
    os.write(fd, frames)
    print(len(frames))
`;

describe('hostile guest: the API tunnel', () => {
  let d: TestDaemon;
  let token: string;
  let victim: string;
  let bystander: string;
  const tally = new Tally('guest-api');

  /** A shell command in alice's machine (through the host API, as alice). */
  async function inAlice(
    cmd: string,
    timeoutMs = 60_000,
  ): Promise<{ exit_code: number; stdout: string; stderr: string }> {
    const r = await authed(
      d.url,
      'POST',
      `/v1/machines/${victim}/exec`,
      { token },
      { cmd, timeout_ms: timeoutMs },
    );
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return r.body as unknown as { exit_code: number; stdout: string; stderr: string };
  }

  before(async () => {
    d = await startDaemon();
    ({ token } = await userWithToken(d, 'alice', ['--max-vms', '2']));
    const m = await authed(d.url, 'POST', '/v1/machines', { token }, { ttl_seconds: 900 });
    assert.equal(m.status, 201, JSON.stringify(m.body));
    victim = String(m.body.id);
    // Another user's machine (the local admin's).
    bystander = String((await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 900 })).body.id);
    const up = await fetch(new URL(`/v1/machines/${victim}/upload`, d.url), {
      method: 'POST',
      headers: { 'x-filename': 'attack.py', authorization: `Bearer ${token}` },
      body: attacks,
    });
    assert.equal(up.status, 200, await up.text());
  });
  after(async () => cleanup(d));

  test('a guest acts as its owner and no one else', async () => {
    const list = await inAlice('hutch list --json');
    const ids = (JSON.parse(list.stdout) as { id: string; owner: string }[]).map((m) => m.id);
    tally.record("guest lists only its owner's machines", ids.length === 1 && ids[0] === victim, list.stdout);
    const other = await inAlice(`hutch get ${bystander} --json`);
    tally.record(
      "another user's machine does not exist for it",
      other.exit_code === 1 && /MACHINE_NOT_FOUND/.test(other.stdout),
      other.stdout,
    );
    const del = await inAlice(`hutch destroy ${bystander}`);
    const still = await api(d.url, 'GET', `/v1/machines/${bystander}`);
    tally.record("it cannot destroy another user's machine", del.exit_code !== 0 && still.status === 200);
    const forged = await inAlice('python3 /root/attack.py forged');
    tally.record(
      'a forged bearer token is refused, not served as anyone',
      /^HTTP\/1.1 401/.test(forged.stdout),
      forged.stdout,
    );
  });

  test("a guest's machines count against its owner's quota", async () => {
    const first = await inAlice('hutch new --name=q1 --json');
    const second = await inAlice('hutch new --name=q2 --json');
    const code = second.stdout ? (JSON.parse(second.stdout) as { code?: string }).code : undefined;
    tally.record('a sibling within the quota is made', first.exit_code === 0, first.stdout.slice(0, 200));
    tally.record(
      'past the quota (2 machines) it is refused',
      second.exit_code === 1 && code === 'RESOURCE_EXHAUSTED',
      second.stdout,
    );
    const q1 = JSON.parse(first.stdout) as { id: string; owner: string };
    tally.record("the sibling is its owner's", q1.owner === 'alice', q1.owner);
    await authed(d.url, 'DELETE', `/v1/machines/${q1.id}`, { token });
  });

  test('hundreds of held connections, garbage, a huge body: the daemon stays up and serves others', async () => {
    const pid = d.proc.pid as number;
    const rss0 = memoryOf(pid).rssMb;
    // In the background: 400 connections held 20 s.
    // 400 connections tried, those accepted held 15 s: the guest starves only its own API.
    const hold = await inAlice('nohup python3 /root/attack.py hold 400 15 > /root/hold.out 2>&1 &');
    assert.equal(hold.exit_code, 0);
    await sleep(3000);
    let bystanderOk = 0;
    let victimOk = 0;
    for (let i = 0; i < 10; i++) {
      const b = await api(d.url, 'POST', `/v1/machines/${bystander}/exec`, { cmd: ['true'] });
      if (b.body.exit_code === 0) bystanderOk++;
      // Host → guest streams of the same machine are not held up by its API streams.
      const v = await inAlice('true');
      if (v.exit_code === 0) victimOk++;
      await sleep(300);
    }
    tally.record('held connections: another machine is served', bystanderOk === 10, `${bystanderOk}/10`);
    tally.record(
      'held connections: the machine itself still runs commands',
      victimOk === 10,
      `${victimOk}/10`,
    );
    await waitFor(
      'the holder to let go',
      async () => ((await inAlice('cat /root/hold.out')).stdout.trim() !== '' ? true : undefined),
      60_000,
    );

    const garbage = await inAlice('python3 /root/attack.py garbage 200', 120_000);
    tally.record(
      '200 connections of random bytes are answered or closed',
      garbage.exit_code === 0,
      garbage.stdout + garbage.stderr,
    );
    const huge = await inAlice('python3 /root/attack.py huge', 120_000);
    tally.record(
      'a body of 10 GB announced is refused early',
      / 413 /.test(huge.stdout) || /^\d+ $/.test(huge.stdout.trim()) || /HTTP\/1.1 4\d\d/.test(huge.stdout),
      huge.stdout + huge.stderr,
    );
    const rss = memoryOf(pid).rssMb;
    tally.record('daemon memory bounded', rss - rss0 < 150, `RSS ${rss0} → ${rss} MiB`);
    tally.record('daemon alive', processAlive(pid));
    await tally.check('the guest is served again once it lets go', async () => {
      await waitFor(
        'hutch list inside',
        async () => ((await inAlice('hutch list --json')).exit_code === 0 ? true : undefined),
        60_000,
      );
      return undefined;
    });
    console.log(`held/garbage/huge: RSS ${rss0} → ${rss} MiB; huge: ${huge.stdout.trim()}`);
  });

  test('API_OPEN frames written straight into the port', async () => {
    const pid = d.proc.pid as number;
    // The exec that writes them loses its link with the rest: the host closes it.
    await authed(
      d.url,
      'POST',
      `/v1/machines/${victim}/exec`,
      { token },
      { cmd: 'python3 /root/attack.py port' },
    );
    await tally.check('port: the link is closed as broken, not served', async () => {
      await waitFor(
        'the link closed for its API_OPEN',
        async () => (/API_OPEN on stream/.test(d.log()) ? true : undefined),
        30_000,
      );
      return undefined;
    });
    await sleep(2000);
    const b = await api(d.url, 'POST', `/v1/machines/${bystander}/exec`, { cmd: ['true'] });
    tally.record('port: another machine is served', b.body.exit_code === 0);
    tally.record('port: daemon alive', processAlive(pid));
    await tally.check('port: the machine recovers, tunnel included', async () => {
      await waitFor(
        'a working hutch inside',
        async () => {
          const v = await authed(
            d.url,
            'POST',
            `/v1/machines/${victim}/exec`,
            { token },
            { cmd: 'hutch list --json' },
          );
          return v.status === 200 && (v.body as { exit_code?: number }).exit_code === 0 ? true : undefined;
        },
        90_000,
      );
      return undefined;
    });
  });

  test('what held', () => {
    tally.record(
      'no unhandled error in the daemon log',
      bugLines(d.log()).length === 0,
      bugLines(d.log()).join('\n'),
    );
    tally.report();
  });
});
