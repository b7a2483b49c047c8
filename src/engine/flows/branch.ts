import { rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Principal } from '../../core/principal.js';
import { HutchError, orStorageFull } from '../../errors.js';
import { runPaths } from '../../vmm/qemu.js';
import { newMachineId } from '../ids.js';
import { checkTransition } from '../lifecycle.js';
import type { Machine } from '../machine.js';
import type { MachineRow } from '../store.js';
import { clampTtl, type FlowContext, lifetime } from './context.js';

/**
 * Forks a running (or paused) machine into a live clone: same memory, processes and files,
 * its own id, TTL and disk from then on. The source is stopped only while its state is
 * written and its disk copied, then continues with everything it had; its open execs go on.
 *
 * Disk: the clone gets a copy of the source's own overlay (what the source wrote since it
 * started), on the same read-only image below. A copy, not a shared frozen layer: every
 * machine owns its whole writable disk, so deleting a parent can never break a child. The
 * copy is a reflink where the filesystem can (O(1)), else proportional to what was written.
 */
export async function branchMachine(
  cx: FlowContext,
  principal: Principal,
  source: MachineRow,
  req: { name?: string; ttlSeconds?: number },
): Promise<MachineRow & { pause_ms: number }> {
  const { rt } = cx;
  const t0 = performance.now();
  const manifest = cx.templates.get(source.template);
  if (!manifest) throw new HutchError('TEMPLATE_NOT_READY', `template ${source.template} is not loaded`);
  checkTransition(source, 'branch');
  if (req.name !== undefined && rt.store.findByName(principal.user, req.name))
    throw new HutchError('NAME_TAKEN', `a machine named ${JSON.stringify(req.name)} already exists`);
  const id = newMachineId();
  const ttl = clampTtl(req.ttlSeconds ?? source.ttl_seconds ?? undefined);
  const persistent = req.ttlSeconds === undefined && source.persistent === 1;
  const row: MachineRow = {
    ...source,
    id,
    owner: principal.user,
    name: req.name ?? null,
    state: 'starting',
    mode: 'branch',
    ...lifetime(persistent, ttl),
    boot_ms: null,
    pid: null,
    run_dir: join(rt.d.runRoot, id),
    error: null,
    jail: null,
    parent_id: source.id,
  };
  await cx.admission.insert(row, cx.admission.diskBytesOf(row), principal.quota);
  const m = rt.machine(row);
  const src = rt.machine(source);
  return m.lock.run(async () => {
    const stateFile = join(row.run_dir, 'branch.state');
    try {
      rt.own(m, 'machine');
      m.cleanup.push('branch state', new Set(['destroy', 'halt']), () => rmSync(stateFile, { force: true }));
      const pauseMs = await src.lock.run(() => snapshotSource(cx, src, row, stateFile));
      const { vm } = await rt.restoreInto(m, row, manifest, stateFile, {
        memory: { kind: 'ram' },
        ignoreShared: false,
      });
      if (vm.agent) await rt.giveIdentity(vm.agent, id);
      rmSync(stateFile, { force: true });
      const done = rt.markRunning(m, Math.round(performance.now() - t0));
      return { ...done, pause_ms: Math.round(pauseMs * 10) / 10 };
    } catch (e) {
      await rt.end(m, 'deleted');
      if (e instanceof HutchError) throw e;
      throw orStorageFull(e, 'BOOT_FAILED', `branch of ${source.id} failed: ${(e as Error).message}`);
    }
  });
}

/** Writes the source's state and copies its disk while its vCPUs are stopped; returns how long. */
async function snapshotSource(
  cx: FlowContext,
  src: Machine,
  clone: MachineRow,
  stateFile: string,
): Promise<number> {
  const { rt } = cx;
  const now = rt.store.get(src.id);
  if (!now) throw new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(src.id)}`);
  checkTransition(now, 'branch');
  const qmp = await rt.qmpOf(src);
  const wasRunning = now.state === 'running';
  const p0 = performance.now();
  if (wasRunning) await qmp.execute('stop');
  try {
    // A completed migration has flushed the source's disk, so the copy is consistent.
    await rt.d.hv.saveState(qmp, runPaths(now.run_dir).migDir, stateFile, {
      ignoreShared: false,
      maxBytesPerSecond: cx.config.migrationMaxMBps * 1e6,
    });
    rt.d.hv.copyDisk(join(now.run_dir, 'disk.qcow2'), join(clone.run_dir, 'disk.qcow2'), rt.d.runAs);
  } finally {
    if (wasRunning) await qmp.execute('cont');
    src.touch();
  }
  return performance.now() - p0;
}
