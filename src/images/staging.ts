import { createHash } from 'node:crypto';
import { chmodSync, lstatSync, mkdirSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runCapture, runLogged } from './run-command.js';

/**
 * Helpers that turn a root filesystem tree into a bootable ext4 image. The tree may come from a
 * hostile OCI image, so nothing here follows a symlink found in it: every path is walked one
 * component at a time with lstat, files are created with O_EXCL (which never follows a link),
 * and anything in the way that is not what we expect is removed rather than written through.
 * Staging trees are hard-linked copies of a cache entry, so files are only ever replaced
 * (unlink + create), never modified in place.
 */

/** A short content hash of the parts, for cache keys. */
export function contentHash(...parts: (string | Buffer)[]): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p).update('\0');
  return h.digest('hex').slice(0, 16);
}

export function fileHash(...paths: string[]): string {
  return contentHash(...paths.map((p) => readFileSync(p)));
}

const lstatOrUndefined = (p: string): ReturnType<typeof lstatSync> | undefined => {
  try {
    return lstatSync(p);
  } catch {
    return undefined;
  }
};

function components(rel: string): string[] {
  const parts = rel.split('/').filter((c) => c !== '' && c !== '.');
  if (parts.length === 0 || parts.includes('..')) throw new Error(`bad staging path ${JSON.stringify(rel)}`);
  return parts;
}

/**
 * The real directory `rel` under `root`, creating missing components. Returns undefined when a
 * component exists but is not a directory (a symlink, say): the caller skips what it wanted to
 * put there rather than write through the link.
 */
function realDir(root: string, rel: string[]): string | undefined {
  let dir = root;
  for (const c of rel) {
    dir = join(dir, c);
    const st = lstatOrUndefined(dir);
    if (!st) mkdirSync(dir, { mode: 0o755 });
    else if (!st.isDirectory()) return undefined;
  }
  return dir;
}

/**
 * Writes a fresh file at `rel` under `root`. Whatever was at that name (a file, a symlink, a
 * device) is removed first; a directory there is left alone and nothing is written. Returns
 * false when the file was not written (a parent is not a real directory, or a directory is in
 * the way).
 */
export function stagePut(root: string, rel: string, content: string | Buffer, mode: number): boolean {
  const parts = components(rel);
  const dir = realDir(root, parts.slice(0, -1));
  if (!dir) return false;
  const p = join(dir, parts[parts.length - 1]!);
  const st = lstatOrUndefined(p);
  if (st?.isDirectory()) return false;
  if (st) unlinkSync(p);
  // 'wx' is O_CREAT|O_EXCL: fails on any existing name, a dangling symlink included.
  writeFileSync(p, content, { mode, flag: 'wx' });
  chmodSync(p, mode); // the umask must not weaken or widen what we asked for
  return true;
}

/**
 * Makes a top-level `name` a real directory: a symlink or file there is removed (a directory the
 * agent mounts over, or writes to, must not lead anywhere else). An existing directory is kept.
 */
export function stageTopDir(root: string, name: string, mode: number): void {
  const [c, ...rest] = components(name);
  if (!c || rest.length > 0) throw new Error(`not a top-level name: ${name}`);
  const p = join(root, c);
  const st = lstatOrUndefined(p);
  if (st?.isDirectory()) return;
  if (st) unlinkSync(p);
  mkdirSync(p, { mode });
  chmodSync(p, mode);
}

/**
 * Replaces the top-level `name` with a fresh, empty directory, whatever was there (a directory
 * from the image, or a symlink: rmSync removes a link itself, never what it points to).
 */
export function stageFreshTopDir(root: string, name: string, mode: number): string {
  const [c, ...rest] = components(name);
  if (!c || rest.length > 0) throw new Error(`not a top-level name: ${name}`);
  const p = join(root, c);
  rmSync(p, { recursive: true, force: true });
  mkdirSync(p, { mode });
  chmodSync(p, mode);
  return p;
}

/** The small files every hutch guest gets (the agent sets hostname and machine-id at boot). */
export function stageGuestFiles(root: string): string[] {
  const skipped: string[] = [];
  const files: [string, string, number][] = [
    ['etc/hostname', 'hutch\n', 0o644],
    ['etc/hosts', '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n', 0o644],
    ['etc/resolv.conf', '', 0o644],
    ['etc/fstab', '# the agent (PID 1) mounts what the machine needs\n', 0o644],
    ['etc/machine-id', '', 0o444],
  ];
  for (const [rel, content, mode] of files) if (!stagePut(root, rel, content, mode)) skipped.push(rel);
  return skipped;
}

/** Disk use (KiB) and inode count of a tree, hard links counted once. */
export async function treeUsage(dir: string): Promise<{ kib: number; inodes: number }> {
  const kib = Number((await runCapture('du', ['-sxk', dir])).split('\t')[0]);
  const inodes = Number((await runCapture('du', ['-sx', '--inodes', dir])).split('\t')[0]);
  if (!Number.isFinite(kib) || !Number.isFinite(inodes)) throw new Error(`du ${dir}: unexpected output`);
  return { kib, inodes };
}

/** Builds an ext4 image of `sizeMb` (sparse) from the tree at `staging`, files owned as in the tree. */
export async function makeExt4(
  staging: string,
  image: string,
  sizeMb: number,
  logPath: string,
  minInodes?: number,
): Promise<void> {
  const inodes = minInodes && minInodes > sizeMb * 64 ? ['-N', String(minInodes)] : [];
  await runLogged(
    'mkfs.ext4',
    ['-q', '-F', '-L', 'hutch-root', '-E', 'root_owner=0:0', ...inodes, '-d', staging, image, `${sizeMb}M`],
    logPath,
  );
}

/**
 * The guest kernel command line for a root disk whose agent (PID 1) is at `init`. reboot=t:
 * the agent powers off by restarting, which makes QEMU (-no-reboot) exit; a triple fault
 * does that at once, where the default first probes a keyboard controller for seconds.
 * scsi_mod.scan=manual: the disk bus is not scanned at boot (256 targets, ~100 ms of every
 * boot under TCG, which init waits for even with async scanning); hot-plugged disks arrive by
 * the bus's own events, and the agent asks for the one target it mounts after a cold boot.
 */
export function guestCmdline(init: string): string {
  return `console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=${init} quiet panic=-1 cryptomgr.notests reboot=t scsi_mod.scan=manual`;
}
