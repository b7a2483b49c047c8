import type { Qmp } from './hypervisor.js';

/** A disk of a running machine to copy: its device `disk<target>` into the qcow2 image at `path`. */
export interface DiskCopyJob {
  target: number;
  path: string;
}

const pollMs = 20;

/**
 * Starts point-in-time copies of a machine's disks (QMP blockdev-backup, sync=full, into
 * empty qcow2 images): call it while the machine's vCPUs are stopped, and let them continue at
 * once. QEMU's copy-before-write keeps each copy exactly as the disk was at this instant while
 * the guest goes on writing; zeros are not written to the copy, so it costs what the disk holds.
 * Resolves to a wait for all copies: it resolves once each is complete and closed (the images
 * are the caller's again), or rejects with the first job's error (every job is ended either way).
 */
export async function startDiskCopies(
  qmp: Qmp,
  jobs: readonly DiskCopyJob[],
  tag: string,
): Promise<() => Promise<void>> {
  const names: string[] = [];
  const end = async (name: string): Promise<void> => {
    await qmp.execute('job-cancel', { id: name }).catch(() => {});
    await qmp.execute('job-dismiss', { id: name }).catch(() => {});
    await qmp.execute('blockdev-del', { 'node-name': name }).catch(() => {});
  };
  try {
    for (const j of jobs) {
      const name = `copy${j.target}-${tag}`;
      await qmp.execute('blockdev-add', {
        driver: 'qcow2',
        'node-name': name,
        discard: 'unmap',
        file: { driver: 'file', filename: j.path },
      });
      names.push(name);
      await qmp.execute('blockdev-backup', {
        'job-id': name,
        device: `disk${j.target}`,
        target: name,
        sync: 'full',
        'auto-dismiss': false,
      });
    }
  } catch (e) {
    for (const n of names) await end(n);
    throw e;
  }
  return async () => {
    let failure: Error | undefined;
    const left = new Set(names);
    while (left.size > 0) {
      const list =
        await qmp.execute<{ device: string; status: string; error?: string }[]>('query-block-jobs');
      for (const n of [...left]) {
        const j = list.find((x) => x.device === n);
        if (j && j.status !== 'concluded') continue;
        if (!j) failure ??= new Error(`disk copy ${n} vanished`);
        else if (j.error) failure ??= new Error(`disk copy ${n} failed: ${j.error}`);
        left.delete(n);
        await qmp.execute('job-dismiss', { id: n }).catch(() => {});
        await qmp.execute('blockdev-del', { 'node-name': n });
      }
      if (left.size > 0) await new Promise((r) => setTimeout(r, pollMs));
    }
    if (failure) throw failure;
  };
}
