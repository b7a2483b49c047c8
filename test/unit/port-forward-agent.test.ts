// Forwarded ports (PORT_OPEN) between AgentConnection and the real agent in --connect mode,
// whose loopback is this host's: a server started here is what the agent connects to. Also
// CONFIGURE's net field on the wire, and the /proc/net/tcp parser listeningPorts uses.

import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { after, before, describe, it } from 'node:test';
import { HutchError } from '../../src/errors.js';
import { type AgentConnection, AgentError } from '../../src/guest/agent-connection.js';
import { configureGuest } from '../../src/guest/guest-setup.js';
import { parseListeningPorts } from '../../src/guest/port-forward.js';
import {
  ConfigureTag,
  canonicalText,
  decodeFrame,
  decodeMessage,
  FrameType,
  LEGACY_FEATURES,
} from '../../src/guest/protocol.js';
import { decodeNetField, encodeConfigure, encodeNetField } from '../../src/guest/protocol-messages.js';
import { AgentProcess, FakeAgent } from '../helpers/agent-harness.js';

function listen(server: net.Server, host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, () => resolve((server.address() as net.AddressInfo).port));
  });
}

function readAll(d: Duplex): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    d.on('data', (c: Buffer) => chunks.push(c));
    d.once('end', () => resolve(Buffer.concat(chunks)));
    d.once('error', reject);
  });
}

async function freePort(): Promise<number> {
  const s = net.createServer();
  const port = await listen(s);
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

describe('openPort against the real agent', { timeout: 60000 }, () => {
  let agent: AgentProcess;
  let conn: AgentConnection;
  let web: http.Server;
  let webPort: number;
  let echo: net.Server;
  let echoPort: number;
  const echoSockets = new Set<net.Socket>();

  before(async () => {
    agent = await AgentProcess.start();
    conn = await agent.connect();
    web = http.createServer((req, res) => res.end(`hello from ${req.url}`));
    webPort = await listen(web);
    // Echoes, and answers "bye" once the other side has ended (half-close).
    echo = net.createServer({ allowHalfOpen: true }, (s) => {
      echoSockets.add(s);
      s.on('close', () => echoSockets.delete(s));
      s.on('error', () => {});
      s.on('data', (c) => s.write(c));
      s.on('end', () => s.end('bye'));
    });
    echoPort = await listen(echo);
  });

  after(async () => {
    conn.close();
    await agent.stop();
    web.close();
    echo.close();
    for (const s of echoSockets) s.destroy();
  });

  it('an HTTP GET through the stream gets the page', async () => {
    const d = await conn.openPort(webPort);
    const body = readAll(d);
    d.end(`GET /preview HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    const text = (await body).toString();
    assert.match(text, /^HTTP\/1\.1 200 OK\r\n/);
    assert.match(text, /hello from \/preview$/);
  });

  it('half-close: our end reaches the server, which answers and closes: end', async () => {
    const d = await conn.openPort(echoPort);
    const body = readAll(d);
    const closed = once(d, 'close');
    d.write('ping ');
    d.end('pong');
    assert.equal((await body).toString(), 'ping pongbye');
    await closed;
    assert.equal(conn.stats.openStreams, 0);
  });

  it('moves 4 MB each way with backpressure', async () => {
    const d = await conn.openPort(echoPort);
    const data = Buffer.alloc(4 * 1024 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31 + (i >> 10)) & 0xff;
    const body = readAll(d);
    d.end(data);
    const got = await body;
    assert.equal(got.length, data.length + 3);
    assert.ok(got.subarray(0, data.length).equals(data));
  });

  it('a refused port is PORT_NOT_LISTENING; other ports still work', async () => {
    const port = await freePort();
    await assert.rejects(
      conn.openPort(port),
      (e: unknown) =>
        e instanceof HutchError &&
        e.code === 'PORT_NOT_LISTENING' &&
        e.message === `nothing listens on port ${port} in the machine` &&
        e.details?.errno === 'ECONNREFUSED',
    );
    await assert.rejects(
      conn.openPort(0),
      (e: unknown) => e instanceof HutchError && e.code === 'INVALID_ARGUMENT',
    );
    const d = await conn.openPort(webPort);
    d.destroy();
  });

  it('destroy() cancels: the server sees its connection closed', async () => {
    const d = await conn.openPort(echoPort);
    d.write('x');
    await once(d, 'data');
    const [server] = [...echoSockets];
    assert.ok(server);
    const closed = once(server, 'close');
    d.destroy();
    await closed;
  });

  it('the 65th connection is refused, the others undisturbed; 100 open/close cycles leak nothing', async () => {
    const open: Duplex[] = [];
    for (let i = 0; i < 64; i++) open.push(await conn.openPort(echoPort));
    await assert.rejects(
      conn.openPort(echoPort),
      (e: unknown) =>
        e instanceof HutchError && e.code === 'RESOURCE_EXHAUSTED' && e.details?.errno === 'EMFILE',
    );
    const probe = open[7]!;
    probe.write('alive');
    const [chunk] = (await once(probe, 'data')) as [Buffer];
    assert.equal(chunk.toString(), 'alive');
    for (const d of open) d.destroy();
    for (let i = 0; i < 100; i++) {
      const d = await conn.openPort(echoPort);
      d.destroy();
    }
    const again: Duplex[] = [];
    for (let i = 0; i < 64; i++) again.push(await conn.openPort(echoPort));
    // The agent freed every socket of the cycles, or these 64 would hit its cap.
    for (const d of again) d.destroy();
  });

  it('configure with net: parsed and validated by the agent (--connect applies nothing)', async () => {
    await conn.configure({
      net: { address: '10.0.2.15', prefix: 24, gateway: '10.0.2.2', mtu: 1500, dns: '10.0.2.3' },
    });
    await configureGuest(conn, {
      net: { address: '192.168.7.9', prefix: 16, gateway: '192.168.0.1', mtu: 9000, dns: '1.1.1.1' },
    });
    await assert.rejects(
      conn.configure({
        net: { address: '10.0.2.15', prefix: 24, gateway: '10.0.3.1', mtu: 1500, dns: '10.0.2.3' },
      }),
      (e: unknown) => e instanceof AgentError && e.code === 'EINVAL' && /gateway/.test(e.agentMessage),
    );
  });
});

describe('an agent without the features', { timeout: 20000 }, () => {
  it('openPort is NOT_SUPPORTED and net is refused, nothing sent', async () => {
    const fake = await FakeAgent.start({ hello: { version: 3, features: LEGACY_FEATURES } });
    try {
      await assert.rejects(
        fake.conn.openPort(80),
        (e: unknown) => e instanceof HutchError && e.code === 'NOT_SUPPORTED',
      );
      const net1 = { address: '10.0.2.15', prefix: 24, gateway: '10.0.2.2', mtu: 1500, dns: '10.0.2.3' };
      await assert.rejects(
        configureGuest(fake.conn, { net: net1 }),
        (e: unknown) => e instanceof AgentError && e.code === 'EOPNOTSUPP',
      );
      await assert.rejects(
        fake.conn.configure({ net: net1 }),
        (e: unknown) => e instanceof AgentError && e.code === 'EOPNOTSUPP',
      );
      await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(
        fake.received.map((f) => f.type),
        [],
      );
    } finally {
      await fake.stop();
    }
  });
});

describe('CONFIGURE net field encoding', () => {
  it('round-trips and has the documented layout', () => {
    const n = { address: '10.0.2.15', prefix: 24, gateway: '10.0.2.2', mtu: 1500, dns: '10.0.2.3' };
    const b = encodeNetField(n);
    assert.equal(b.toString('hex'), '0a00020f180a00020205dc0a000203');
    assert.deepEqual(decodeNetField(b), n);
    const msg = decodeMessage(decodeFrame(encodeConfigure(5, { hostname: 'vm', net: n })));
    const f = msg.fields.find((x) => x.tag === ConfigureTag.NET);
    assert.ok(f && f.kind === 'bytes');
    assert.deepEqual(decodeNetField(f.value), n);
    assert.equal(msg.type, FrameType.CONFIGURE);
    assert.match(canonicalText(msg), / net="\\x0a\\x00\\x02\\x0f\\x18/);
    assert.throws(() => encodeNetField({ ...n, address: '10.0.2' }), TypeError);
    assert.throws(() => encodeNetField({ ...n, mtu: 70000 }), RangeError);
  });
});

describe('parseListeningPorts', () => {
  it('takes LISTEN rows of tcp and tcp6, any address, sorted and unique', () => {
    const tcp = [
      '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
      '   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0',
      '   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0',
      '   2: 0100007F:1F40 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0',
      '   3: 0100007F:2328 00000000:0000 06 00000000:00000000 00:00000000 00000000     0        0 0 1 0',
      '',
    ].join('\n');
    const tcp6 = [
      '  sl  local_address                         remote_address                        st tx_queue rx_queue',
      '   0: 00000000000000000000000000000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000',
      '   1: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000',
    ].join('\n');
    assert.deepEqual(parseListeningPorts(tcp, tcp6), [22, 3000, 8000]);
    assert.deepEqual(parseListeningPorts('', ''), []);
  });
});
