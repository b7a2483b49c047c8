import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import os from 'node:os';
import { after, before, describe, it } from 'node:test';
import {
  AgentClosedError,
  type AgentConnection,
  AgentError,
  AgentTimeoutError,
} from '../../src/guest/agent-connection.js';
import {
  ConfigureTag,
  canonicalText,
  decodeFrame,
  decodeMessage,
  encodeFrame,
  encodeTlv,
  FrameType,
  ProtocolError,
  type Tlv,
} from '../../src/guest/protocol.js';
import { parseError } from '../../src/guest/protocol-messages.js';
import { AgentProcess, FakeAgent } from '../helpers/agent-harness.js';

/** What CONFIGURE would change on this machine if the agent applied it. */
function hostIdentity(): unknown {
  let machineId: unknown;
  try {
    const st = statSync('/etc/machine-id');
    machineId = [readFileSync('/etc/machine-id', 'utf8'), st.ino, st.mtimeMs];
  } catch (err) {
    machineId = (err as NodeJS.ErrnoException).code;
  }
  return { hostname: os.hostname(), machineId };
}

const isEinval =
  (field: RegExp) =>
  (e: unknown): boolean =>
    e instanceof AgentError && e.code === 'EINVAL' && field.test(e.agentMessage);

const field = (tag: number, value: string | Buffer): Tlv => ({
  tag,
  value: typeof value === 'string' ? Buffer.from(value) : value,
});

describe('configure against the real agent (--connect: validated, never applied)', { timeout: 30000 }, () => {
  let agent: AgentProcess;
  let conn: AgentConnection;

  before(async () => {
    agent = await AgentProcess.start();
    conn = await agent.connect();
  });

  after(async () => {
    conn.close();
    await agent.stop();
  });

  it('accepts a full identity, and leaves this host alone', async () => {
    const before = hostIdentity();
    const machineId = randomBytes(16).toString('hex');
    const timeNs = BigInt(Date.now()) * 1_000_000n + 3_600_000_000_000n; // an hour ahead
    assert.equal(
      await conn.configure(
        { hostname: 'clone-1.example', timeNs, entropy: randomBytes(256), machineId },
        5000,
      ),
      undefined,
    );
    await conn.configure({});
    await conn.configure({ hostname: 'A'.repeat(64), entropy: randomBytes(512) });
    await conn.configure({ hostname: 'x', entropy: Buffer.from([0]), timeNs: 0n });
    await conn.configure({ timeNs: (1n << 64n) - 1n, machineId: '0'.repeat(32) });
    assert.deepEqual(hostIdentity(), before);
    assert.equal(conn.stats.openStreams, 0);
  });

  it('rejects a bad hostname with EINVAL', async () => {
    for (const hostname of ['', 'a'.repeat(65), 'bad_name', 'a b', 'hôte', 'a\0b', 'x/y', 'end\n']) {
      await assert.rejects(
        conn.configure({ hostname, machineId: 'f'.repeat(32) }, 5000),
        isEinval(/hostname/),
      );
    }
    assert.equal(conn.stats.openStreams, 0);
    assert.ok((await conn.ping(2000)) >= 0);
  });

  it('rejects bad entropy and machine ids with EINVAL', async () => {
    await assert.rejects(conn.configure({ entropy: Buffer.alloc(0) }), isEinval(/entropy/));
    await assert.rejects(conn.configure({ entropy: randomBytes(513) }), isEinval(/entropy/));
    for (const machineId of ['', 'F'.repeat(32), 'f'.repeat(31), 'f'.repeat(33), `g${'0'.repeat(31)}`]) {
      await assert.rejects(conn.configure({ hostname: 'ok', machineId }), isEinval(/machine_id/));
    }
  });

  it('refuses what cannot be encoded before sending anything', async () => {
    await assert.rejects(conn.configure({ timeNs: -1n }), RangeError);
    await assert.rejects(conn.configure({ timeNs: 1n << 64n }), RangeError);
    await assert.rejects(conn.configure({ timeNs: 5 as unknown as bigint }), TypeError);
    await assert.rejects(conn.configure({ entropy: randomBytes(70000) }), RangeError);
    await assert.rejects(conn.configure({}, -1), RangeError);
    assert.equal(conn.stats.openStreams, 0);
  });

  it('rejects a repeated field with EINVAL (raw frames)', async () => {
    conn.close();
    const raw = await agent.connectRaw();
    try {
      const ns = Buffer.alloc(8);
      ns.writeBigUInt64BE(BigInt(Date.now()) * 1_000_000n);
      const mid = randomBytes(16).toString('hex');
      const repeats: Tlv[][] = [
        [field(ConfigureTag.HOSTNAME, 'a'), field(ConfigureTag.HOSTNAME, 'a')],
        [
          field(ConfigureTag.TIME_NS, ns),
          field(ConfigureTag.HOSTNAME, 'vm'),
          field(ConfigureTag.TIME_NS, ns),
        ],
        [field(ConfigureTag.ENTROPY, 'x'), field(ConfigureTag.ENTROPY, 'y')],
        [field(ConfigureTag.MACHINE_ID, mid), field(ConfigureTag.MACHINE_ID, mid)],
      ];
      let id = 1;
      for (const fields of repeats) {
        raw.send(encodeFrame(FrameType.CONFIGURE, id, encodeTlv(fields)));
        const msg = decodeMessage(await raw.next(id));
        assert.equal(msg.type, FrameType.ERROR, canonicalText(msg));
        assert.equal(parseError(msg).code, 'EINVAL');
        assert.match(parseError(msg).message, /twice/);
        id++;
      }
      // The same fields once each (and a tag from the future, skipped): DONE with no fields.
      raw.send(
        encodeFrame(
          FrameType.CONFIGURE,
          id,
          encodeTlv([
            field(0x7f, 'later'),
            field(ConfigureTag.HOSTNAME, 'a'),
            field(ConfigureTag.TIME_NS, ns),
            field(ConfigureTag.ENTROPY, 'x'),
            field(ConfigureTag.MACHINE_ID, mid),
          ]),
        ),
      );
      assert.equal(canonicalText(decodeMessage(await raw.next(id))), `DONE stream=${id}`);
    } finally {
      raw.close();
    }
    conn = await agent.connect();
    assert.ok((await conn.ping(2000)) >= 0);
  });
});

describe('configure against a fake agent', { timeout: 20000 }, () => {
  async function withFake(fn: (fake: FakeAgent) => Promise<void>): Promise<void> {
    const fake = await FakeAgent.start();
    try {
      await fn(fake);
    } finally {
      await fake.stop();
    }
  }

  it('sends one CONFIGURE and resolves on DONE', async () =>
    withFake(async (fake) => {
      const p = fake.conn.configure({
        machineId: 'ab'.repeat(16),
        entropy: Buffer.from([0, 0xff]),
        timeNs: 1732284000123456789n,
        hostname: 'vm-7',
      });
      const f = await fake.next(FrameType.CONFIGURE);
      assert.equal(
        canonicalText(decodeFrame(encodeFrame(f.type, f.stream, f.payload))),
        `CONFIGURE stream=${f.stream} hostname="vm-7" time_ns=1732284000123456789 entropy="\\x00\\xff"` +
          ` machine_id="${'ab'.repeat(16)}"`,
      );
      fake.send(encodeFrame(FrameType.DONE, f.stream));
      assert.equal(await p, undefined);
      assert.equal(fake.conn.stats.openStreams, 0);
    }));

  it('rejects with the AgentError of an ERROR', async () =>
    withFake(async (fake) => {
      const p = fake.conn.configure({ hostname: 'vm' });
      const f = await fake.next(FrameType.CONFIGURE);
      fake.send(
        encodeFrame(
          FrameType.ERROR,
          f.stream,
          encodeTlv([field(1, 'EROFS'), field(2, '/etc/hostname: Read-only file system')]),
        ),
      );
      await assert.rejects(
        p,
        (e: unknown) => e instanceof AgentError && e.code === 'EROFS' && /Read-only/.test(e.message),
      );
    }));

  it('times out, cancels, and absorbs a late answer', async () =>
    withFake(async (fake) => {
      const t0 = Date.now();
      const p = fake.conn.configure({ hostname: 'slow' }, 150);
      const f = await fake.next(FrameType.CONFIGURE);
      await assert.rejects(p, AgentTimeoutError);
      assert.ok(Date.now() - t0 < 2000);
      const cancel = await fake.next(FrameType.CANCEL);
      assert.equal(cancel.stream, f.stream);
      fake.send(encodeFrame(FrameType.DONE, f.stream));
      assert.ok((await fake.conn.ping(1000)) >= 0);
      assert.equal(fake.conn.stats.ignoredFrames, 0);
      assert.equal(fake.conn.isOpen, true);
    }));

  it('closes the connection on a frame a configure stream never carries', async () =>
    withFake(async (fake) => {
      const p = fake.conn.configure({});
      const f = await fake.next(FrameType.CONFIGURE);
      fake.send(encodeFrame(FrameType.DATA, f.stream, Buffer.from('?')));
      const reason = await fake.conn.closed;
      assert.ok(reason instanceof ProtocolError && reason.kind === 'unexpected', String(reason));
      await assert.rejects(p, AgentClosedError);
    }));
});
