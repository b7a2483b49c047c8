import { HutchError } from '../../errors.js';
import type { AgentConnection } from '../../guest/agent-connection.js';
import { execEnv } from '../box-execs.js';
import { boxSpecOf, type RestartPolicy, restartPolicies } from '../box-view.js';
import type { MachineRow } from '../store.js';
import type { FlowContext } from './context.js';

/**
 * The supervisor loop, run by the guest's /bin/sh: the command (argv as positional parameters,
 * so nothing is quoted or re-parsed), then per policy: `always` runs it again, `on-failure`
 * again only after a non-zero exit, `no` stops. A second between runs keeps a command that
 * fails at once from spinning a vCPU. Its exits are announced on the console, where the logs
 * of a VM are read from.
 */
const loop = [
  'p=$1; shift',
  'while :; do',
  '  "$@"; rc=$?',
  '  echo "hutch: cmd exited with status $rc" >&2',
  '  case $p in always) ;; on-failure) [ "$rc" -ne 0 ] || break ;; *) break ;; esac',
  '  sleep 1',
  'done',
].join('\n');

/**
 * Starts the loop detached, and returns at once. The agent kills an exec's process group when
 * its stream is cut (the host leaves, a suspend), so the loop gets a session of its own
 * (setsid, when the image has it) and no descriptor of the exec's: stdin from /dev/null, output
 * to /dev/console, the serial console the host records.
 */
const launch = [
  'if command -v setsid >/dev/null 2>&1; then s=setsid; else s=; fi',
  '$s /bin/sh -c "$0" hutch-cmd "$@" </dev/null >/dev/console 2>&1 &',
].join('\n');

/** A request's restart policy: absent or empty is `no`; Docker's `unless-stopped` is `always` here. */
export function parseRestartPolicy(p: string | undefined | null): RestartPolicy {
  if (p === undefined || p === null || p === '') return 'no';
  if (p === 'unless-stopped') return 'always';
  if ((restartPolicies as readonly string[]).includes(p)) return p as RestartPolicy;
  throw new HutchError(
    'INVALID_ARGUMENT',
    `restart_policy ${JSON.stringify(p)} is not one of ${restartPolicies.join(', ')}, unless-stopped`,
  );
}

/**
 * Starts a box's `cmd` (if it has one) after a boot: create, start, reboot. Not after a resume
 * or in a fork: their processes, the command's included, are already there. A command that
 * cannot be started does not fail the boot: the box is up and its owner can look; the cause is
 * logged and shown on the console.
 */
export async function startBoxCmd(
  cx: FlowContext,
  row: MachineRow,
  agent: AgentConnection | undefined,
): Promise<void> {
  const spec = boxSpecOf(row);
  if (!spec.cmd?.length || !agent) return;
  try {
    const r = await agent.execBuffered(
      {
        argv: ['/bin/sh', '-c', launch, loop, spec.restart_policy ?? 'no', ...spec.cmd],
        env: execEnv(spec, undefined),
        cwd: spec.workdir,
        timeoutMs: 10_000,
      },
      { maxOutputBytes: 4096 },
    );
    if (r.exitCode !== 0)
      throw new Error(
        `the launcher exited with ${r.exitCode ?? `signal ${r.signal}`}: ${r.stderr.concat().toString('utf8').trim()}`,
      );
    cx.rt.d.log('info', 'box cmd started', { id: row.id, cmd: spec.cmd[0], restart: spec.restart_policy });
  } catch (e) {
    cx.rt.d.log('warn', 'box cmd could not be started', { id: row.id, error: (e as Error).message });
  }
}
