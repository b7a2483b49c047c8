import { chmodSync, mkdirSync } from 'node:fs';
import { isAbsolute } from 'node:path';

/**
 * A host directory shared into the guest over virtio-9p. The agent (PID 1) mounts it when
 * CONFIGURE asks (src/guest/guest-setup.ts); a protocol-1 agent did at boot, from `hutch.vol=`
 * (docs/agent-protocol.md "Boot parameters").
 *
 * QEMU opens the directory after it has dropped to hutch-vm (-runas), under seccomp, so the
 * host side must prepare it: every parent searchable by hutch-vm (o+x or an ACL), the directory
 * readable by it, and for a read-write volume writable (`chown hutch-vm`, or
 * `setfacl -m u:hutch-vm:rwx,d:u:hutch-vm:rwx`), on a filesystem with user xattrs (ext4, xfs,
 * btrfs, tmpfs since Linux 6.6). Files hutch-vm may not read stay unreadable to the guest, root
 * or not. QEMU resolves every path inside the share without following symlinks (openat with
 * O_NOFOLLOW from the share's root); symlinks the guest makes are followed by the guest, in the
 * guest, and real symlinks put there by the host are not followed at all (ELOOP).
 */
export interface Volume {
  /** The 9p mount tag: [A-Za-z0-9_-], 1–31 bytes (virtio-9p's limit), unique per machine. */
  tag: string;
  /** An existing directory on the host, absolute. QEMU's user (hutch-vm) must be able to reach and use it. */
  hostPath: string;
  /** Where the guest mounts it: absolute, normalised, not `/`. */
  guestPath: string;
  /** Enforced by QEMU (the 9p server refuses every write), and mounted read-only in the guest too. */
  readonly: boolean;
}

/** Volumes per machine: the volume slots of the machine layout (src/vmm/machine-spec.ts). */
export const maxVolumes = 4;

/**
 * The guest reads /proc/cmdline into 4 KiB, and x86 kernels keep at most 2048 bytes of command
 * line: a guest path is capped so that four volumes (hex doubles the length) still fit.
 */
export const maxGuestPathBytes = 160;

/**
 * msize: the largest 9p message. Linux 6.1's virtio transport caps it at (128 - 3) pages =
 * 512000 bytes (a larger value is clamped with a warning), so this is the largest that counts.
 */
export const volumeMsize = 512_000;

/** Throws a clear error for the first invalid volume (or a clash between two). */
export function validateVolumes(volumes: readonly Volume[]): void {
  if (volumes.length > maxVolumes) throw new Error(`at most ${maxVolumes} volumes per machine`);
  const tags = new Set<string>();
  const paths = new Set<string>();
  for (const v of volumes) {
    if (!/^[A-Za-z0-9_-]{1,31}$/.test(v.tag))
      throw new Error(`volume tag ${JSON.stringify(v.tag)}: 1-31 of [A-Za-z0-9_-]`);
    if (tags.has(v.tag)) throw new Error(`volume tag ${v.tag} used twice`);
    tags.add(v.tag);
    // QEMU's option parser splits on ',' (',,' escapes it); refusing beats escaping a path
    // that ends up on a command line.
    if (!isAbsolute(v.hostPath) || v.hostPath.includes(',') || v.hostPath.includes('\0'))
      throw new Error(`volume ${v.tag}: host path must be absolute, without ',' or NUL`);
    checkGuestPath(v.tag, v.guestPath);
    if (paths.has(v.guestPath)) throw new Error(`volume ${v.tag}: guest path ${v.guestPath} used twice`);
    paths.add(v.guestPath);
  }
}

function checkGuestPath(tag: string, p: string): void {
  const bytes = Buffer.byteLength(p);
  const parts = p.split('/').slice(1);
  if (
    !p.startsWith('/') ||
    p === '/' ||
    p.includes('\0') ||
    bytes > maxGuestPathBytes ||
    parts.some((s) => s === '' || s === '.' || s === '..')
  )
    throw new Error(
      `volume ${tag}: guest path ${JSON.stringify(p)} must be absolute, normalised, not /, at most ${maxGuestPathBytes} bytes`,
    );
  if (/^\/(proc|sys|dev|run)(\/|$)/.test(p))
    throw new Error(`volume ${tag}: guest path ${p} is the system's`);
}

/**
 * The QEMU arguments for one volume: a -fsdev and a virtio-9p-device on the transport the
 * machine layout gave it (src/vmm/machine-spec.ts).
 *
 * security_model=mapped-xattr: the guest's view of ownership, modes, device nodes and symlinks
 * lives in user.virtfs.* xattrs; on the host every file the guest makes is a plain file or
 * directory owned by hutch-vm with fmode/dmode (0644/0755). So a guest's chown works (as the
 * guest sees it) and a guest cannot plant a setuid binary, a device node or a real symlink on
 * the host. `none`/`passthrough` would apply the guest's modes for real (setuid files owned by
 * hutch-vm) and, as hutch-vm cannot chown, show the guest files owned by uid 999. The host
 * directory's filesystem must support user xattrs for guest writes (ext4, xfs, btrfs do).
 */
export function volumeDeviceArgs(v: Volume, bus: number): string[] {
  return [
    '-fsdev',
    `local,id=fs-${v.tag},path=${v.hostPath},security_model=mapped-xattr,fmode=0644,dmode=0755,readonly=${v.readonly ? 'on' : 'off'}`,
    '-device',
    `virtio-9p-device,fsdev=fs-${v.tag},mount_tag=${v.tag},bus=virtio-mmio-bus.${bus}`,
  ];
}

/**
 * The kernel arguments that tell a protocol-1 agent to mount the volumes at boot (a box whose
 * disk predates protocol 2 still runs one; a protocol-2 agent ignores them):
 * `hutch.vol=<tag>:<guest path, hex>:<ro|rw>` each. Hex, because a kernel argument ends at a
 * space and quoting rules differ between bootloaders; hex survives any byte.
 */
export function volumeCmdline(volumes: readonly Volume[]): string {
  validateVolumes(volumes);
  return volumes
    .map((v) => `hutch.vol=${v.tag}:${Buffer.from(v.guestPath).toString('hex')}:${v.readonly ? 'ro' : 'rw'}`)
    .join(' ');
}

/**
 * The empty directory volume placeholders share (src/vmm/machine-spec.ts): root's, read-only for
 * everyone, so QEMU's user can open it and nobody writes into it (QEMU also exports it read-only).
 */
export function prepareEmptyVolume(dir: string): string {
  mkdirSync(dir, { recursive: true, mode: 0o555 });
  chmodSync(dir, 0o555);
  return dir;
}
