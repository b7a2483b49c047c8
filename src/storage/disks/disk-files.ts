import {
  chmodSync,
  chownSync,
  closeSync,
  existsSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  rmSync,
  statSync,
} from 'node:fs';
import { join } from 'node:path';
import { runCapture } from '../../images/run-command.js';
import type { Owner } from '../../vmm/hypervisor.js';

/**
 * Disk images on this host: sparse raw files holding an ext4 filesystem, made by the host (so a
 * guest needs no mkfs, and an OCI image without e2fsprogs can use disks), owned by QEMU's user.
 */
export class DiskFiles {
  readonly dir: string;

  constructor(
    stateDir: string,
    private readonly owner: Owner | undefined,
  ) {
    this.dir = join(stateDir, 'disks');
    mkdirSync(this.dir, { recursive: true, mode: 0o711 });
    // QEMU runs as its own user: it opens a disk by path when it is attached (QMP blockdev-add),
    // so it must reach the directory, and nothing else may list it.
    chmodSync(this.dir, 0o711);
  }

  pathOf(id: string): string {
    return join(this.dir, `${id}.img`);
  }

  /**
   * A new disk of `bytes`, formatted. Lazy inode-table and journal init: mkfs writes only the
   * metadata it must (~tens of ms for a sparse 100 GiB file), the guest kernel zeroes the rest in
   * the background. No reserved blocks: the whole disk is the user's. O_EXCL: never over another.
   */
  async create(id: string, bytes: number, label: string): Promise<string> {
    const path = this.pathOf(id);
    const fd = openSync(path, 'wx', 0o600);
    try {
      ftruncateSync(fd, bytes);
    } finally {
      closeSync(fd);
    }
    try {
      await runCapture('mkfs.ext4', [
        '-q',
        '-F',
        '-m',
        '0',
        '-L',
        label.slice(0, 16),
        '-E',
        'lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0',
        path,
      ]);
      if (this.owner) chownSync(path, this.owner.uid, this.owner.gid);
    } catch (e) {
      rmSync(path, { force: true });
      throw e;
    }
    return path;
  }

  /**
   * An empty qcow2 image of `bytes` for QEMU to copy a disk into (a branch's backup job: zeros
   * it copies stay unallocated, so the copy costs what the disk holds), owned by QEMU's user.
   */
  async emptyFor(id: string, bytes: number): Promise<string> {
    const path = this.pathOf(id);
    if (existsSync(path)) throw new Error(`${path} exists`);
    try {
      await runCapture('qemu-img', ['create', '-q', '-f', 'qcow2', path, String(bytes)]);
      chmodSync(path, 0o600);
      if (this.owner) chownSync(path, this.owner.uid, this.owner.gid);
    } catch (e) {
      rmSync(path, { force: true });
      throw e;
    }
    return path;
  }

  remove(path: string): void {
    rmSync(path, { force: true });
  }

  /** Bytes the file holds on the host (what the guest wrote), not its size. */
  usedBytes(path: string): number {
    try {
      return statSync(path).blocks * 512;
    } catch {
      return 0;
    }
  }
}
