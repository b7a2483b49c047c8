import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { configureGuest } from '../../guest/guest-setup.js';
import type { TemplateManifest } from '../../images/builder.js';
import type { SnapshotParams } from '../../images/snapshots.js';
import { runPaths } from '../../vmm/qemu.js';
import { prepareRunDir } from '../../vmm/run-dir.js';
import { Machine } from '../machine.js';
import { guestNet, type Runtime } from '../runtime.js';
import type { MachineRow } from '../store.js';

/** Snapshot VMs are named `s-<builder pid>-…`: a restarted daemon kills those whose builder died. */
export function snapshotBuilderOf(vmId: string): number | undefined {
  const m = /^s-(\d+)-/.exec(vmId);
  return m ? Number(m[1]) : undefined;
}

/**
 * Takes a template's (or image's) snapshot in `dir`: a machine booted cold through the same
 * launch path as users' machines (jail, cgroup, cleanup stack), its RAM a shared memory file
 * so the device state can be saved without it (x-ignore-shared), warmed with what users start
 * first, then frozen. The VM is gone when this returns; images/snapshots.ts stores the result.
 */
export async function takeSnapshot(
  rt: Runtime,
  image: TemplateManifest,
  params: SnapshotParams & { warm: string[][] },
  dir: string,
): Promise<{ stateBytes: number; bootMs: number; saveMs: number }> {
  const id = `s-${process.pid}-${randomBytes(3).toString('hex')}`;
  const m = new Machine(id, dir);
  // Only what launch reads: a snapshot machine has no row.
  const row = {
    id,
    accel: params.accel,
    vcpus: params.vcpus,
    memory_mb: params.memoryMb,
    run_dir: dir,
    kind: 'machine',
    net: params.net ? 1 : 0,
    display: params.display ?? null,
  } as MachineRow;
  prepareRunDir(dir, rt.d.runAs);
  try {
    await rt.d.hv.createOverlay(image.rootfs, join(dir, 'disk.qcow2'), 'raw', rt.d.runAs, params.diskBytes);
    const t0 = performance.now();
    const vm = await rt.launch(m, row, image, {
      memory: { kind: 'file', path: join(dir, 'mem'), share: true },
      ...(params.volumeSlots ? { volumeSlots: true } : {}),
      layout: params.layout,
    });
    const agent = await rt.d.guest.connectBooting(vm.pid, dir, 120_000, () => '');
    vm.agent = agent;
    // Grown here, so clones restored onto a disk of the snapshot's size have nothing to do.
    await configureGuest(agent, {
      hostname: 'hutch',
      growRoot: true,
      ...(params.net ? { net: guestNet } : {}),
    });
    const bootMs = performance.now() - t0;
    // Warm the page cache with what users start first: a clone then finds python and node
    // in RAM instead of reading them from its disk.
    for (const argv of params.warm) {
      // A desktop's start is one of these: ~30 s under TCG.
      const r = await agent.execCollect({ argv, timeoutMs: 180_000 }, { maxOutputBytes: 65536 });
      if (r.exitCode !== 0) throw new Error(`warm-up ${argv.join(' ')} failed: ${r.stderr.toString()}`);
    }
    // Let the agent see the host leave, so every clone's agent starts with no stream open.
    agent.close();
    vm.agent = undefined;
    await new Promise((r) => setTimeout(r, 100));
    const qmp = await rt.qmpOf(m);
    await qmp.execute('stop');
    const saved = await rt.d.hv.saveState(qmp, runPaths(dir).migDir, join(dir, 'state'), {
      ignoreShared: true,
    });
    await qmp.execute('quit').catch(() => {});
    return { stateBytes: saved.bytes, bootMs, saveMs: saved.ms };
  } finally {
    // Its QEMU, cgroup and links; the directory is the snapshot store's to keep or remove.
    await rt.halt(m);
  }
}
