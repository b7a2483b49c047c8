import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  closeSync,
  existsSync,
  fsyncSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readdirSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/**
 * Every machine's RAM is a file of its own on tmpfs, mapped by QEMU with share=on. The file
 * *is* the guest's memory, so a branch or a suspend saves only the device state (x-ignore-shared,
 * ~60 KB) and copies the file, instead of pushing all of RAM through a migration stream.
 *
 * The file is a resource the machine owns, like its run dir: it outlives the daemon (QEMU keeps
 * running and mapping it across a restart) and goes when the machine's QEMU goes. It lives on
 * tmpfs rather than in the run dir because a shared mapping of a disk file would make every guest
 * write a disk write-back.
 *
 * Copies are sparse: only the source's data extents are read (SEEK_DATA/SEEK_HOLE) and zero
 * pages inside them are left as holes, so a copy costs what the guest actually touched.
 */

export interface FileOwner {
  uid: number;
  gid: number;
}

const tmpfsRoot = '/dev/shm/hutch';

/**
 * The directory this daemon keeps its machines' memory files in: one per state dir, so daemons
 * sharing a host (tests, several instances) only ever sweep their own. Falls back to the state
 * dir when the host has no /dev/shm (the files then live on disk: correct, slower).
 */
export function memoryDirOf(stateDir: string): string {
  const tag = createHash('sha256').update(stateDir).digest('hex').slice(0, 12);
  return existsSync('/dev/shm') ? join(tmpfsRoot, tag) : join(stateDir, 'mem');
}

/** Creates the directory: only the daemon (and QEMU's group, to reach its file) may enter. */
export function prepareMemoryDir(dir: string, owner: FileOwner | undefined): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (owner) {
    chownSync(dir, process.getuid?.() ?? 0, owner.gid);
    chmodSync(dir, 0o710);
  } else {
    chmodSync(dir, 0o700);
  }
}

export function memoryFileOf(dir: string, machineId: string): string {
  return join(dir, `${machineId}.ram`);
}

/**
 * A fresh, empty (all holes) memory file of `bytes`, readable by nobody but QEMU's user: it
 * will hold the guest's whole memory. Replaces any file left at that path.
 */
export function createMemoryFile(path: string, bytes: number, owner: FileOwner | undefined): void {
  rmSync(path, { force: true });
  const fd = openSync(path, 'wx', 0o600);
  try {
    ftruncateSync(fd, bytes);
    if (owner) chownSync(path, owner.uid, owner.gid);
  } finally {
    closeSync(fd);
  }
}

export interface CopyOptions {
  owner?: FileOwner | undefined;
  /** Cap on the write rate (bytes/s), for copies to a disk shared with others; 0/undefined: none. */
  bytesPerSecond?: number | undefined;
  /** fsync before the rename: the copy must survive a host crash (suspend to disk). */
  durable?: boolean;
  /** Checked while a throttled copy runs: the copy stops (and throws) once it returns false. */
  stillWanted?: () => boolean;
  /**
   * cgroup.procs files the copying process joins first, so the pages it writes are charged to
   * the machine that will own them (tmpfs pages stay charged to whoever wrote them first).
   */
  chargeTo?: string[] | undefined;
}

/**
 * Copies a memory file sparsely to `dst`, written beside it and renamed into place, so a crash
 * never leaves a file at `dst` that looks complete. Returns the bytes allocated in the copy.
 */
export async function copyMemoryFile(src: string, dst: string, opts: CopyOptions = {}): Promise<number> {
  const tmp = `${dst}.partial`;
  // Made first with the final mode and owner: cp writes into an existing file without
  // changing either, so the guest's memory is never readable by anyone else, not even briefly.
  createMemoryFile(tmp, 0, opts.owner);
  try {
    if (opts.bytesPerSecond) await throttledSparseCopy(src, tmp, opts.bytesPerSecond, opts.stillWanted);
    else await sparseCopy(src, tmp, opts.chargeTo ?? []);
    if (opts.durable) {
      const fd = openSync(tmp, 'r');
      try {
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    }
    renameSync(tmp, dst);
    return allocatedBytes(dst);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw new Error(`copying memory file ${src}: ${stderrOf(e)}`);
  }
}

/**
 * cp does the sparse copy (SEEK_DATA/SEEK_HOLE, zero blocks left as holes): Node has no lseek.
 * Started through sh when it must first join the machine's cgroup.
 */
async function sparseCopy(src: string, dst: string, chargeTo: string[]): Promise<void> {
  const cp = ['--sparse=always', '--reflink=never', '-T', src, dst];
  if (!chargeTo.length) {
    await run('cp', cp);
    return;
  }
  const joinThenCopy = 'for f in $HUTCH_CGROUPS; do echo $$ > "$f" || exit 1; done; exec cp "$@"';
  await run('sh', ['-c', joinThenCopy, 'sh', ...cp], {
    env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', HUTCH_CGROUPS: chargeTo.join(' ') },
  });
}

const page = 4096;
const chunk = 1024 * 1024;

/**
 * The copy for a rate-capped suspend: Node has no SEEK_DATA, so holes are read (as zeros, which
 * costs no allocation on tmpfs) and every all-zero page is skipped, which leaves the same holes.
 */
async function throttledSparseCopy(
  src: string,
  dst: string,
  bytesPerSecond: number,
  stillWanted: (() => boolean) | undefined,
): Promise<void> {
  const size = statSync(src).size;
  const zero = Buffer.alloc(page);
  const buf = Buffer.allocUnsafe(chunk);
  const inFd = openSync(src, 'r');
  const outFd = openSync(dst, 'r+');
  try {
    ftruncateSync(outFd, size);
    const t0 = performance.now();
    let written = 0;
    for (let pos = 0; pos < size; pos += chunk) {
      if (stillWanted && !stillWanted()) throw new Error('copy abandoned: its machine is gone');
      const n = readSync(inFd, buf, 0, Math.min(chunk, size - pos), pos);
      for (let off = 0; off < n; off += page) {
        const len = Math.min(page, n - off);
        if (buf.compare(zero, 0, len, off, off + len) === 0) continue;
        writeSync(outFd, buf, off, len, pos + off);
        written += len;
      }
      const due = (written / bytesPerSecond) * 1000 - (performance.now() - t0);
      if (due > 0) await new Promise((r) => setTimeout(r, due));
    }
  } finally {
    closeSync(inFd);
    closeSync(outFd);
  }
}

/** Bytes the file really occupies (its data pages; holes cost nothing). */
export function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

export function removeMemoryFile(path: string): void {
  rmSync(path, { force: true });
  rmSync(`${path}.partial`, { force: true });
}

/**
 * Removes memory files whose machine `keep` does not claim (after a daemon restart: machines it
 * did not adopt, copies cut short). Returns the machine ids removed.
 */
export function sweepMemoryFiles(dir: string, keep: (machineId: string) => boolean): string[] {
  const removed: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return removed;
  }
  for (const name of names) {
    const id = name.replace(/\.ram(\.partial)?$/, '');
    if (keep(id) && !name.endsWith('.partial')) continue;
    rmSync(join(dir, name), { force: true });
    removed.push(id);
  }
  return removed;
}

function stderrOf(e: unknown): string {
  const err = e as { stderr?: string; message?: string };
  return (err.stderr?.trim() || err.message) ?? String(e);
}

/** Starts a QEMU on a memory file made for it; the file goes again if the start throws. */
export function launchOrForget(memoryFile: string, launch: () => number): number {
  try {
    return launch();
  } catch (e) {
    removeMemoryFile(memoryFile);
    throw e;
  }
}
