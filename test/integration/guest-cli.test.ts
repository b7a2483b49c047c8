import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { type CliRun as Run, runHutch } from '../helpers/accounts.js';
import { cleanup, startDaemon, type TestDaemon } from '../helpers/daemon.js';

/**
 * `hutch` inside a machine (docs/guest-cli.md): the agent binary under that name, reaching the
 * daemon through the agent's tunnel and acting as the machine's owner, with no key in the
 * guest. Driven the way an agent would: the host CLI runs the guest CLI with `exec --json`.
 */

const cli = (d: TestDaemon, ...args: string[]): Promise<Run> => runHutch(d, ...args);

function doc<T>(text: string, what: string): T {
  try {
    return JSON.parse(text) as T;
  } catch {
    assert.fail(`${what}: not one JSON document: ${JSON.stringify(text)}`);
  }
}

interface ExecDoc {
  output: string;
  exit_code: number | null;
  stdout: string;
  stderr: string;
}

interface MachineDoc {
  id: string;
  name: string | null;
  owner: string;
  status: string;
  forked_from: string | null;
}

describe('hutch inside a machine', { timeout: 900_000 }, () => {
  let d: TestDaemon;
  let parent: MachineDoc;

  /** Runs a shell command in `machine` (from the host); its result document. */
  async function inside(machine: string, command: string): Promise<ExecDoc> {
    const r = await cli(d, 'exec', machine, '--json', command);
    const e = doc<ExecDoc>(r.stdout, `exec ${command}`);
    assert.equal(r.status, e.exit_code ?? 1, r.stderr);
    return e;
  }

  before(async () => {
    d = await startDaemon();
    const r = await cli(d, 'new', '--name', 'parent', '--json');
    assert.equal(r.status, 0, r.stderr);
    parent = doc<MachineDoc>(r.stdout, 'new');
  });
  after(async () => cleanup(d));

  test('list, new, exec, fork, destroy: as the owner, with nothing stored in the guest', async () => {
    const t0 = Date.now();
    const which = await inside('parent', 'command -v hutch && readlink /usr/local/bin/hutch');
    assert.match(which.output, /^\/usr\/local\/bin\/hutch\n(\/usr)?\/sbin\/hutch-agent\n$/);

    const list = await inside('parent', 'hutch list --json');
    assert.equal(list.exit_code, 0, list.stderr);
    const seen = doc<MachineDoc[]>(list.stdout, 'list');
    assert.deepEqual(
      seen.map((m) => m.id),
      [parent.id],
    );

    const made = await inside('parent', 'hutch new --name sib --json');
    assert.equal(made.exit_code, 0, made.stderr);
    const sib = doc<MachineDoc>(made.stdout, 'new');
    assert.equal(sib.name, 'sib');
    assert.equal(sib.status, 'running');
    assert.equal(sib.owner, parent.owner, "a guest's machines are its owner's");
    const hostList = doc<MachineDoc[]>((await cli(d, 'list', '--json')).stdout, 'host list');
    assert.deepEqual(hostList.map((m) => m.name).sort(), ['parent', 'sib']);

    // The inner exec's document, nested in the outer one's output.
    const ran = await inside('parent', `hutch exec sib --json 'echo hi'`);
    assert.equal(ran.exit_code, 0, ran.stderr);
    const inner = doc<ExecDoc>(ran.stdout, 'inner exec');
    assert.deepEqual([inner.output, inner.exit_code], ['hi\n', 0]);
    const code = await inside('parent', `hutch exec sib 'echo out; echo err >&2; exit 5'`);
    assert.deepEqual([code.exit_code, code.stdout, code.stderr], [5, 'out\n', 'err\n']);

    const forked = await inside('parent', 'hutch fork sib --name=sib-2 --json');
    assert.equal(forked.exit_code, 0, forked.stderr);
    const child = doc<MachineDoc>(forked.stdout, 'fork');
    assert.equal(child.forked_from, sib.id);

    for (const name of ['sib-2', 'sib']) {
      const gone = await inside('parent', `hutch destroy ${name} --json`);
      assert.equal(gone.exit_code, 0, gone.stderr);
      assert.deepEqual(doc(gone.stdout, 'destroy'), { removed: [name] });
    }
    const left = doc<MachineDoc[]>((await cli(d, 'list', '--json')).stdout, 'host list');
    assert.deepEqual(
      left.map((m) => m.id),
      [parent.id],
    );
    console.log(`inside: ${Date.now() - t0} ms`);
  });

  test('errors are JSON documents with a non-zero exit', async () => {
    const missing = await inside('parent', 'hutch get nope --json');
    assert.equal(missing.exit_code, 1);
    assert.equal(doc<{ code: string }>(missing.stdout, 'get').code, 'MACHINE_NOT_FOUND');
    const bad = await inside('parent', 'hutch new --name "Not Valid" --json');
    assert.equal(bad.exit_code, 1);
    assert.equal(doc<{ code: string }>(bad.stdout, 'new').code, 'INVALID_ARGUMENT');
    const usage = await inside('parent', 'hutch frobnicate --json');
    assert.equal(usage.exit_code, 2);
    assert.equal(doc<{ code: string }>(usage.stdout, 'usage').code, 'USAGE');
    // Without --json: the line on stderr, nothing on stdout.
    const plain = await inside('parent', 'hutch get nope');
    assert.deepEqual([plain.exit_code, plain.stdout], [1, '']);
    assert.match(plain.stderr, /^hutch: MACHINE_NOT_FOUND: /);
  });

  test('a fork of a machine has hutch too, and its tunnel is its own', async () => {
    const r = await cli(d, 'fork', 'parent', '--name', 'parent-fork', '--json');
    assert.equal(r.status, 0, r.stderr);
    const fork = doc<MachineDoc>(r.stdout, 'fork');
    const list = await inside('parent-fork', 'hutch list --json');
    assert.equal(list.exit_code, 0, list.stderr);
    assert.deepEqual(
      doc<MachineDoc[]>(list.stdout, 'list')
        .map((m) => m.id)
        .sort(),
      [parent.id, fork.id].sort(),
    );
    assert.equal((await cli(d, 'destroy', 'parent-fork')).status, 0);
  });

  test('a box from an OCI image has hutch on its PATH', async () => {
    const made = await cli(
      d,
      'box',
      'create',
      'debian:bookworm',
      '--socket',
      d.boxesSocket,
      '--name',
      'gbox',
      '--json',
    );
    assert.equal(made.status, 0, made.stderr);
    try {
      const r = await cli(
        d,
        'box',
        'exec',
        '--socket',
        d.boxesSocket,
        'gbox',
        '--',
        'hutch',
        'list',
        '--json',
      );
      assert.equal(r.status, 0, r.stderr);
      assert.ok(doc<MachineDoc[]>(r.stdout, 'box list').some((m) => m.id === parent.id));
    } finally {
      await cli(d, 'box', 'rm', '--socket', d.boxesSocket, '--force', 'gbox');
    }
  });
});
