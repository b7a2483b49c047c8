import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { type CliRun as Run, runHutch } from '../helpers/accounts.js';
import { cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';

/**
 * The agent workflow of the docs (new, exec --json, fork, fan-out, list, destroy) with the real
 * CLI as a subprocess, the way a script or an agent drives it.
 */

const hutch = (d: TestDaemon, ...args: string[]): Promise<Run> => runHutch(d, ...args);

/** The one JSON document a --json command printed (the whole of stdout). */
function doc<T>(r: Run): T {
  try {
    return JSON.parse(r.stdout) as T;
  } catch {
    assert.fail(`not one JSON document (exit ${r.status}): ${r.stdout}\nstderr: ${r.stderr}`);
  }
}

interface MachineDoc {
  id: string;
  name: string | null;
  status: string;
  persistent: boolean;
  ttl_seconds: number | null;
  forked_from: string | null;
}

describe('the agent workflow from the CLI', () => {
  let d: TestDaemon;
  before(async () => {
    d = await startDaemon();
  });
  after(async () => cleanup(d));

  test('new, exec --json, fork, fan-out, list, destroy', async () => {
    const t0 = Date.now();
    const created = await hutch(d, 'new', '--name=task-1', '--json');
    assert.equal(created.status, 0, created.stderr);
    const m = doc<MachineDoc>(created);
    assert.equal(m.name, 'task-1');
    assert.equal(m.status, 'running');
    // The test daemon does not allow persistent machines: the server's longest TTL instead.
    assert.equal(m.persistent, false);
    assert.equal(m.ttl_seconds, 900);

    // A shell command as one argument; `.output` is exactly stdout when stderr is empty, so a
    // command's own JSON parses back out of it.
    const r = await hutch(
      d,
      'exec',
      'task-1',
      '--json',
      `printf '{"session_id":"abc"}' > /root/state.json && cat /root/state.json`,
    );
    assert.equal(r.status, 0, r.stderr);
    const e = doc<{ output: string; exit_code: number; stdout: string; stderr: string }>(r);
    assert.equal(e.exit_code, 0);
    assert.equal(e.stderr, '');
    assert.equal((JSON.parse(e.output) as { session_id: string }).session_id, 'abc');

    const failing = await hutch(d, 'exec', 'task-1', '--json', 'echo out; echo err >&2; exit 7');
    assert.equal(failing.status, 7, "the CLI exits with the command's code");
    const f = doc<{ output: string; exit_code: number; stdout: string; stderr: string }>(failing);
    assert.deepEqual([f.output, f.stdout, f.stderr, f.exit_code], ['out\nerr\n', 'out\n', 'err\n', 7]);

    // The existing argv form stays.
    const argv = await hutch(d, 'exec', 'task-1', '--', 'echo', 'a b');
    assert.deepEqual([argv.status, argv.stdout], [0, 'a b\n']);

    const forked = await hutch(d, 'fork', 'task-1', '--name', 'task-1-attempt-2', '--json');
    assert.equal(forked.status, 0, forked.stderr);
    const child = doc<MachineDoc>(forked);
    assert.equal(child.name, 'task-1-attempt-2');
    assert.equal(child.forked_from, m.id);
    const seen = doc<{ output: string }>(
      await hutch(d, 'exec', 'task-1-attempt-2', '--json', 'cat /root/state.json'),
    );
    assert.equal(seen.output, '{"session_id":"abc"}', "the fork has the parent's disk");

    // Fan-out: `for i in 1 2 3; do hutch new --name=try-$i --json & done; wait`.
    const tries = await Promise.all([1, 2, 3].map((i) => hutch(d, 'new', `--name=try-${i}`, '--json')));
    for (const [i, t] of tries.entries()) {
      assert.equal(t.status, 0, t.stderr);
      assert.equal(doc<MachineDoc>(t).name, `try-${i + 1}`);
    }

    const list = await hutch(d, 'list', '--json');
    assert.equal(list.status, 0, list.stderr);
    assert.deepEqual(
      doc<MachineDoc[]>(list)
        .map((x) => x.name)
        .sort(),
      ['task-1', 'task-1-attempt-2', 'try-1', 'try-2', 'try-3'],
    );

    for (const name of ['task-1', 'task-1-attempt-2', 'try-1', 'try-2', 'try-3']) {
      const gone = await hutch(d, 'destroy', name);
      assert.equal(gone.status, 0, gone.stderr);
    }
    assert.deepEqual(doc(await hutch(d, 'list', '--json')), []);
    console.log(`workflow: ${Date.now() - t0} ms`);
  });

  test('with --json, errors are one JSON document and a non-zero exit', async () => {
    const unknown = await hutch(d, 'exec', 'no-such-machine', '--json', 'true');
    assert.equal(unknown.status, 1);
    assert.equal(doc<{ code: string }>(unknown).code, 'MACHINE_NOT_FOUND');

    const fork = await hutch(d, 'fork', 'no-such-machine', '--json');
    assert.equal(fork.status, 1);
    assert.equal(doc<{ code: string }>(fork).code, 'MACHINE_NOT_FOUND');

    const destroy = await hutch(d, 'destroy', 'no-such-machine', '--json');
    assert.equal(destroy.status, 1);
    assert.equal(doc<{ code: string }>(destroy).code, 'MACHINE_NOT_FOUND');

    const usage = await hutch(d, 'exec', '--json');
    assert.equal(usage.status, 2);
    const u = doc<{ code: string; message: string }>(usage);
    assert.equal(u.code, 'USAGE');
    assert.match(u.message, /usage: hutch exec/);

    const badFlag = await hutch(d, 'new', '--json', '--bogus');
    assert.equal(badFlag.status, 2);
    assert.equal(doc<{ code: string }>(badFlag).code, 'USAGE');

    const badName = await hutch(d, 'new', '--json', '--name', 'Not Valid');
    assert.equal(badName.status, 1);
    assert.equal(doc<{ code: string }>(badName).code, 'INVALID_ARGUMENT');
  });
});
