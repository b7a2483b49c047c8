import { rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Principal } from '../../core/principal.js';
import { HutchError, orStorageFull } from '../../errors.js';
import { cloneDisks } from '../../storage/disks/disk-service.js';
import { startDiskCopies } from '../../vmm/disk-copy.js';
import { branchTimings, type MachineSaved } from '../../vmm/migration.js';
import { runPaths } from '../../vmm/qemu.js';
import { ends } from '../cleanup-stack.js';
import { newBoxId, newMachineId } from '../ids.js';
import { checkTransition } from '../lifecycle.js';
import type { Machine } from '../machine.js';
import type { MachineRow } from '../store.js';
import { boxLifetime, checkNameFree, clampTtl, type FlowContext, lifetime, newRow } from './context.js';
import { refuseIfVolumes, restoreTarget } from './restore-target.js';

/**
 * Forks a running (or paused) machine or box into a live clone: same memory, processes and
 * files, its own id, TTL and disk from then on. A box's clone is a box with its source's spec
 * (image, size, env, cmd, timers); a box mounting host directories cannot be forked. The source is stopped only while its state is
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
  const { image: manifest, devices } = restoreTarget(cx, source);
  checkTransition(source, 'branch');
  refuseIfVolumes(source, 'forked');
  checkNameFree(cx, principal.user, req.name);
  const box = source.kind === 'box';
  const id = box ? newBoxId() : newMachineId();
  const ttl = clampTtl(req.ttlSeconds ?? source.ttl_seconds ?? undefined);
  const persistent = req.ttlSeconds === undefined && source.persistent === 1;
  const row = newRow(rt.d.runRoot, {
    ...source,
    id,
    owner: principal.user,
    name: req.name ?? null,
    mode: 'branch',
    // A box lives until removed unless it has an auto-destroy timeout: the clone's counts from now.
    ...(box ? boxLifetime(source.ttl_seconds) : lifetime(persistent, ttl)),
    parent_id: source.id,
  });

  await cx.admission.insert(row, cx.admission.diskBytesOf(row), principal.quota);
  // A clone keeps its source's firewall.
  if (source.net) {
    rt.d.net?.copyRules(source.id, id);
    // On its source's network (the owner's default one when the source has no record).
    const network = rt.d.net?.directory.memberOf(source.id);
    if (network) rt.d.net?.directory.setNetwork(id, network);
  }
  const m = rt.machine(row);
  const src = rt.machine(source);
  return m.lock.run(async () => {
    const stateFile = join(row.run_dir, 'branch.state');
    try {
      rt.own(m, source.kind);
      m.cleanup.push('branch state', new Set(['destroy', 'halt']), () => rmSync(stateFile, { force: true }));
      // The clone's RAM file is the source's, copied while the source is stopped.
      m.cleanup.push('ram copy', ends.vm, () => rt.d.hv.ram.remove(rt.d.hv.ram.fileOf(id)));
      const s = await src.lock.run(() => snapshotSource(cx, src, row, stateFile));
      // Outside the source's lock: its calls are not held up while QEMU copies its disks.
      await s.disksCopied();
      const r0 = performance.now();
      const { vm, restoredUs, agentUs } = await rt.restoreInto(m, row, manifest, stateFile, {
        ignoreShared: s.saved.ignoreShared,
        ...devices,
      });
      const r1 = performance.now();
      if (vm.agent) await rt.giveIdentity(vm.agent, id);
      rmSync(stateFile, { force: true });
      rt.d.log('info', `${source.kind} branched`, {
        id,
        source: source.id,
        ...branchTimings({
          t0,
          r0,
          r1,
          pauseMs: s.pauseMs,
          diskMs: s.diskMs,
          restoredUs,
          agentUs,
          saved: s.saved,
        }),
        identity_ms: Math.round((performance.now() - r1) * 10) / 10,
      });
      const done = rt.markRunning(m, Math.round(performance.now() - t0));
      return { ...done, pause_ms: Math.round(s.pauseMs * 10) / 10 };
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
): Promise<{ pauseMs: number; diskMs: number; saved: MachineSaved; disksCopied: () => Promise<void> }> {
  const { rt } = cx;
  const now = rt.store.get(src.id);
  if (!now)
    throw clone.kind === 'box'
      ? new HutchError('BOX_NOT_FOUND', `no box ${JSON.stringify(src.id)}`)
      : new HutchError('MACHINE_NOT_FOUND', `no machine ${JSON.stringify(src.id)}`);
  checkTransition(now, 'branch');
  const qmp = await rt.qmpOf(src);
  const wasRunning = now.state === 'running';
  const p0 = performance.now();
  let diskMs = 0;
  let saved: MachineSaved;
  let disksCopied = async (): Promise<void> => {};
  if (wasRunning) await qmp.execute('stop');
  try {
    // Device state plus a copy of the source's RAM file, which becomes the clone's own; its
    // files live only until the clone starts, so they are not fsynced.
    saved = await rt.d.hv.saveMachine(qmp, runPaths(now.run_dir).migDir, {
      state: stateFile,
      memory: rt.ramCopy(src, rt.d.hv.ram.fileOf(clone.id), { chargeTo: rt.chargeTo(clone) }),
      maxBytesPerSecond: cx.config.migrationMaxMBps * 1e6,
      durable: false,
    });
    // A completed migration has flushed the source's disk, so the copy is consistent.
    const d0 = performance.now();
    rt.d.hv.copyDisk(join(now.run_dir, 'disk.qcow2'), join(clone.run_dir, 'disk.qcow2'), rt.d.runAs);
    // Its attached disks: shared when read-only; copied when read-write, by QEMU as of this
    // instant while the source runs on (docs/disks.md).
    if (rt.d.disks)
      disksCopied = await startDiskCopies(
        qmp,
        await cloneDisks(rt.d.disks, src.id, clone.id, clone.owner),
        clone.id,
      );
    diskMs = performance.now() - d0;
  } finally {
    if (wasRunning) await qmp.execute('cont');
    src.touch();
  }
  return { pauseMs: performance.now() - p0, diskMs, saved, disksCopied };
}
