import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import type { AgentConnection } from '../../src/guest/agent-connection.js';
import { isAlive } from '../../src/vmm/qemu.js';
import { AgentProcess } from '../helpers/agent-harness.js';

describe('RESET against the real agent', { timeout: 30000 }, () => {
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

  it('kills the processes of open streams and lets the same connection start new ones', async () => {
    const old = conn.exec({ argv: ['sleep', '100'] });
    const { pid } = await old.started;
    assert.ok(isAlive(pid));
    old.result.catch(() => {});
    await conn.reset();
    const deadline = Date.now() + 5000;
    while (isAlive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.equal(isAlive(pid), false, "the old stream's process is gone");
    const r = await conn.execCollect({ argv: ['echo', 'after reset'] }, { maxOutputBytes: 1024 });
    assert.equal(r.stdout.toString(), 'after reset\n');
  });
});
