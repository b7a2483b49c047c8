// Protocol versions (docs/agent-protocol.md, "Versions and features"): the handshake's HELLO,
// UNSUPPORTED in both directions, and a host of this version working with the previous agent,
// the real binary built from PREVIOUS_AGENT_COMMIT's sources.

import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { type AgentConnection, AgentError } from '../../src/guest/agent-connection.js';
import {
  decodeMessage,
  encodeFrame,
  Feature,
  FrameType,
  LEGACY_FEATURES,
  PROTOCOL_VERSION,
} from '../../src/guest/protocol.js';
import { encodeExec, parseUnsupported } from '../../src/guest/protocol-messages.js';
import {
  AgentProcess,
  FakeAgent,
  PREVIOUS_AGENT_COMMIT,
  previousAgentBinary,
  repoRoot,
} from '../helpers/agent-harness.js';

const identity = {
  hostname: 'vm-1',
  machineId: '0123456789abcdef0123456789abcdef',
  entropy: Buffer.alloc(32, 7),
  timeNs: 1_732_284_000_000_000_000n,
};

/** exec, file write and read, terminal: what a user of an adopted machine does with it. */
async function exercise(conn: AgentConnection): Promise<void> {
  const r = await conn.execCollect(
    { argv: ['sh', '-c', 'cat; echo err >&2'] },
    { stdin: 'in', maxOutputBytes: 1024 },
  );
  assert.deepEqual([r.exitCode, r.stdout.toString(), r.stderr.toString()], [0, 'in', 'err\n']);
  const file = `/tmp/hutch-versions-${process.pid}-${Date.now()}`;
  await conn.writeFile(file, Buffer.from('contents'), { mode: 0o600 });
  const h = conn.readFile(file);
  const chunks: Buffer[] = [];
  for await (const c of h.stream) chunks.push(c as Buffer);
  assert.deepEqual(await h.done, { size: 8, mode: 0o600 });
  assert.equal(Buffer.concat(chunks).toString(), 'contents');
  await conn.execCollect({ argv: ['rm', '-f', file] }, { maxOutputBytes: 0 });
  const tty = conn.exec({ argv: ['sh', '-c', 'tty -s && echo tty'], pty: { cols: 80, rows: 24 } });
  const out: Buffer[] = [];
  tty.stdout.on('data', (c: Buffer) => out.push(c));
  assert.equal((await tty.result).exitCode, 0);
  assert.match(Buffer.concat(out).toString(), /tty/);
}

describe(`the previous agent (${PREVIOUS_AGENT_COMMIT}, protocol 1)`, { timeout: 120_000 }, () => {
  let agent: AgentProcess;
  before(async () => {
    agent = await AgentProcess.start(previousAgentBinary());
  });
  after(async () => {
    await agent?.stop();
  });

  it('is recorded as protocol 1 with the legacy features, and everything it had still works', async () => {
    const conn = await agent.connect();
    try {
      assert.equal(conn.features.version, 1);
      assert.equal(conn.features.bits, LEGACY_FEATURES);
      assert.ok(conn.supports('exec') && conn.supports('files') && conn.supports('configure'));
      assert.ok(!conn.supports('configure-volumes') && !conn.supports('unsupported'));
      await conn.reset();
      await exercise(conn);
      // CONFIGURE as it knew it; growRoot is left out for it (it grows at every CONFIGURE).
      await conn.configure({ ...identity, growRoot: true }, 5000);
      await assert.rejects(
        conn.configure({ volumes: [{ tag: 'vol0', path: '/data', readonly: false }] }),
        (e: unknown) => e instanceof AgentError && e.code === 'EOPNOTSUPP',
      );
      assert.equal(conn.isOpen, true);
      await exercise(conn); // the refused request sent nothing
    } finally {
      conn.close();
    }
  });

  it('is adopted again after a host went away (a daemon restart)', async () => {
    const first = await agent.connect();
    const sleeper = first.exec({ argv: ['sleep', '30'] });
    await sleeper.started;
    await agent.hangUp(first);
    const conn = await agent.connect();
    try {
      assert.equal(conn.features.version, 1);
      await conn.reset();
      await exercise(conn);
    } finally {
      conn.close();
    }
  });
});

describe('this agent (protocol 3)', { timeout: 60_000 }, () => {
  let agent: AgentProcess;
  before(async () => {
    agent = await AgentProcess.start();
  });
  after(async () => {
    await agent?.stop();
  });

  it('announces its version and features in the handshake', async () => {
    const conn = await agent.connect();
    try {
      assert.equal(conn.features.version, PROTOCOL_VERSION);
      for (const f of Object.keys(Feature) as (keyof typeof Feature)[]) assert.ok(conn.supports(f), f);
      await exercise(conn);
      // Not PID 1: validated, answered, nothing mounted or grown.
      await conn.configure(
        { ...identity, growRoot: true, volumes: [{ tag: 'vol0', path: '/work/my dir', readonly: true }] },
        5000,
      );
      await assert.rejects(
        conn.configure({ volumes: [{ tag: 'bad tag', path: '/x', readonly: false }] }, 5000),
        (e: unknown) => e instanceof AgentError && e.code === 'EINVAL',
      );
    } finally {
      conn.close();
    }
  });

  it('answers frames of unknown types with UNSUPPORTED and keeps serving', async () => {
    const link = await agent.connectRaw();
    try {
      link.send(encodeFrame(0x7e, 0), encodeFrame(0x30, 7, Buffer.from('a request of the future')));
      const a = parseUnsupported(decodeMessage(await link.next(0)));
      const b = parseUnsupported(decodeMessage(await link.next(0)));
      assert.deepEqual(
        [a, b],
        [
          { type: 0x7e, stream: 0 },
          { type: 0x30, stream: 7 },
        ],
      );
      // Not a resynchronisation: the next request is served at once, on a fresh stream.
      link.send(encodeExec(8, { argv: ['true'] }));
      assert.equal((await link.next(8)).type, FrameType.STARTED);
      assert.equal((await link.next(8)).type, FrameType.EXIT);
    } finally {
      link.close();
    }
  });
});

describe('a host facing frames it does not know', () => {
  it('skips them, answers UNSUPPORTED once per type and stays up', async () => {
    const fake = await FakeAgent.start({ hello: { version: 3, features: LEGACY_FEATURES | (1n << 40n) } });
    try {
      assert.equal(fake.conn.features.version, 3);
      assert.equal(fake.conn.features.bits & (1n << 40n), 1n << 40n, 'unknown bits are kept');
      assert.deepEqual([...fake.conn.features.names].sort(), ['configure', 'exec', 'files', 'reset']);
      fake.send(encodeFrame(0x7e, 0, Buffer.from('news')));
      fake.send(encodeFrame(0x7e, 3, Buffer.alloc(1000)));
      fake.send(encodeFrame(0x31, 0));
      const u = await fake.next(FrameType.UNSUPPORTED);
      assert.deepEqual(parseUnsupported(decodeMessage(u)), { type: 0x7e, stream: 0 });
      const u2 = await fake.next(FrameType.UNSUPPORTED);
      assert.deepEqual(parseUnsupported(decodeMessage(u2)), { type: 0x31, stream: 0 });
      assert.equal(fake.conn.stats.unknownFrames, 3);
      assert.equal(fake.received.filter((f) => f.type === FrameType.UNSUPPORTED).length, 2);
      assert.equal(fake.conn.isOpen, true);
      const pong = fake.conn.ping(2000);
      assert.ok((await pong) >= 0);
    } finally {
      await fake.stop();
    }
  });

  it('fails only the operation the agent answers UNSUPPORTED', async () => {
    const fake = await FakeAgent.start();
    try {
      assert.equal(fake.conn.features.version, 1, 'no HELLO answer: protocol 1');
      const h = fake.conn.exec({ argv: ['new-thing'] });
      const f = await fake.next(FrameType.EXEC);
      fake.send(
        encodeFrame(
          FrameType.UNSUPPORTED,
          0,
          Buffer.concat([
            Buffer.from([1, 0, 0, 0, 1, FrameType.EXEC]),
            Buffer.from([2, 0, 0, 0, 4]),
            Buffer.from([
              f.stream >>> 24,
              (f.stream >>> 16) & 0xff,
              (f.stream >>> 8) & 0xff,
              f.stream & 0xff,
            ]),
          ]),
        ),
      );
      await assert.rejects(h.result, (e: unknown) => e instanceof AgentError && e.code === 'EOPNOTSUPP');
      assert.equal(fake.conn.isOpen, true);
    } finally {
      await fake.stop();
    }
  });
});

describe('the vectors of the previous protocol', () => {
  it(`are all still in spec/agent-protocol-vectors.txt, unchanged (${PREVIOUS_AGENT_COMMIT})`, () => {
    const lines = (text: string): string[] => text.split('\n').filter((l) => l !== '' && !l.startsWith('#'));
    const old = lines(
      execFileSync(
        'git',
        ['-C', repoRoot(), 'show', `${PREVIOUS_AGENT_COMMIT}:spec/agent-protocol-vectors.txt`],
        {
          encoding: 'utf8',
          maxBuffer: 16 * 1024 * 1024,
        },
      ),
    );
    const now = new Set(
      lines(readFileSync(path.join(repoRoot(), 'spec', 'agent-protocol-vectors.txt'), 'utf8')),
    );
    assert.ok(old.length > 100);
    for (const l of old) assert.ok(now.has(l), `missing or changed: ${l.split('\t')[0]}`);
  });
});
