import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { processAlive } from '../process-alive.js';
import { type Layout, layoutFingerprint } from '../vmm/machine-spec.js';
import type { Accel } from '../vmm/qemu.js';
import type { TemplateManifest } from './builder.js';
import { markUsed } from './cache-holders.js';
import { acquireFileLock } from './file-lock.js';

/**
 * Boots a machine from `manifest` in `dir`, warms it with `params.warm`, and leaves there its
 * disk (`disk.qcow2`), memory (`mem`) and device state (`state`), its VM gone. The engine
 * does this (engine/flows/snapshot.ts) with the same launch path as every machine; this
 * module only stores what it made.
 */
export type SnapshotTaker = (
  manifest: TemplateManifest,
  params: SnapshotParams & { warm: string[][] },
  dir: string,
) => Promise<{ stateBytes: number; bootMs: number; saveMs: number }>;

/** A template's snapshot: booted, agent ready, warmed, then frozen. Immutable once written. */
export interface TemplateSnapshot {
  template: string;
  key: string;
  dir: string;
  /** Guest RAM. Clones map it privately (copy-on-write): it is never written again. */
  mem: string;
  /** Device state, saved with x-ignore-shared (RAM is in `mem`). */
  state: string;
  /** The disk as it was at the snapshot; clones put their own overlay on top. */
  disk: string;
  memoryMb: number;
  vcpus: number;
  accel: Accel;
  cmdline: string;
  /** The device layout the state was saved with: a restore must build the same one. */
  layout: Layout;
  stateBytes: number;
  bootMs: number;
  saveMs: number;
  createdAt: string;
}

export interface SnapshotParams {
  qemu: string;
  accel: Accel;
  vcpus: number;
  memoryMb: number;
  /** Kernel command line as machines boot it (host-specific timing flags included). */
  cmdline: string;
  /**
   * The device layout of the machine the snapshot is taken on (and of every machine restored
   * from it): guest side only, so machines with other disk paths or sockets share the snapshot.
   */
  layout: Layout;
  /** The snapshot machine has every volume slot filled with placeholders (box snapshots). */
  volumeSlots?: boolean;
  /** The snapshot machine has a NIC, configured (networked machines restore from it). */
  net?: boolean;
  /** The snapshot machine's screen, `WIDTHxHEIGHT` (desktops; also in the layout). */
  display?: string;
  runAs: { user: string; uid: number; gid: number } | undefined;
  /** Commands run before the snapshot to warm the page cache; default: python and node. */
  warm?: string[][];
  /** Size of the snapshot's disk (the agent grows the root filesystem to it); default: the image's. */
  diskBytes?: number;
}

/** What templates warm before their snapshot: what users start first. */
const templateWarmUp = [
  ['python3', '-c', 'import json, os, sys, subprocess, random'],
  ['node', '-e', '0'],
  ['sh', '-c', 'ls / >/dev/null; sync'],
];

/** Bump when the snapshot procedure or the QEMU device model changes: old snapshots stop matching. */
export const snapshotFormat = '2';

/** <hash>-<accel>-<vcpus>-<memory>-<format>-<cmdline>-<layout>[-d<disk MiB>] (cache-gc.ts reads the format). */
export function snapshotKey(manifest: TemplateManifest, p: SnapshotParams): string {
  const key = [
    manifest.hash,
    p.accel,
    p.vcpus,
    p.memoryMb,
    snapshotFormat,
    hashOf(p.cmdline),
    layoutFingerprint(p.layout),
  ].join('-');
  return p.diskBytes ? `${key}-d${Math.round(p.diskBytes / 1024 ** 2)}` : key;
}

function hashOf(s: string): string {
  let h = 0;
  for (let i = 0; i < s.length; i++) h = (Math.imul(h, 31) + s.charCodeAt(i)) >>> 0;
  return h.toString(16);
}

/**
 * Creates (once) and finds template snapshots under <imageDir>/snapshots/. A snapshot is built
 * in a temporary directory and renamed into place with its meta.json last, so a crash mid-way
 * leaves nothing a later restore would use; a lock keeps daemons sharing the cache from
 * building the same one twice.
 */
export class SnapshotCache {
  private readonly building = new Map<string, Promise<TemplateSnapshot>>();
  private readonly ready = new Map<string, TemplateSnapshot>();
  private readonly failures = new Map<string, string>();

  constructor(
    private readonly imageDir: string,
    private readonly take: SnapshotTaker,
  ) {}

  /**
   * One template (or image) has a snapshot per machine it fits (size, layout, accelerator…): the
   * cache knows them by `<name>-<key>`, the directory they live in.
   */
  private slotOf(manifest: TemplateManifest, params: SnapshotParams): string {
    return `${manifest.name}-${snapshotKey(manifest, params)}`;
  }

  status(manifest: TemplateManifest, params: SnapshotParams): 'ready' | 'building' | 'failed' | 'none' {
    const slot = this.slotOf(manifest, params);
    if (this.ready.has(slot)) return 'ready';
    if (this.building.has(slot)) return 'building';
    if (this.failures.has(slot)) return 'failed';
    return 'none';
  }

  /** Snapshots being taken (or loaded) now: each may have a QEMU running. */
  inFlight(): number {
    return this.building.size;
  }

  /** Waits for every snapshot being taken to finish (or fail). */
  async settle(): Promise<void> {
    await Promise.allSettled([...this.building.values()]);
  }

  failure(manifest: TemplateManifest, params: SnapshotParams): string | undefined {
    return this.failures.get(this.slotOf(manifest, params));
  }

  /**
   * The snapshot ready for `template`. One the cache's garbage collector has since removed is
   * forgotten (the next ensure() takes it again); one in use is marked so, which keeps it.
   */
  get(manifest: TemplateManifest, params: SnapshotParams): TemplateSnapshot | undefined {
    const slot = this.slotOf(manifest, params);
    const s = this.ready.get(slot);
    if (s && !markUsed(s.dir)) {
      this.ready.delete(slot);
      return undefined;
    }
    return s;
  }

  ensure(manifest: TemplateManifest, params: SnapshotParams): Promise<TemplateSnapshot> {
    const cached = this.get(manifest, params);
    if (cached) return Promise.resolve(cached);
    const slot = this.slotOf(manifest, params);
    let p = this.building.get(slot);
    if (!p) {
      p = this.load(manifest, params)
        .then((s) => {
          this.ready.set(slot, s);
          this.failures.delete(slot);
          return s;
        })
        .catch((e: unknown) => {
          this.failures.set(slot, (e as Error).message);
          throw e;
        })
        .finally(() => this.building.delete(slot));
      this.building.set(slot, p);
    }
    return p;
  }

  private async load(manifest: TemplateManifest, params: SnapshotParams): Promise<TemplateSnapshot> {
    const key = snapshotKey(manifest, params);
    const dir = join(this.imageDir, 'snapshots', `${manifest.name}-${key}`);
    const meta = join(dir, 'meta.json');
    if (existsSync(meta) && markUsed(dir)) return JSON.parse(readFileSync(meta, 'utf8')) as TemplateSnapshot;
    mkdirSync(join(this.imageDir, 'snapshots'), { recursive: true });
    const release = await acquireFileLock(join(this.imageDir, 'snapshots', `.${manifest.name}.lock`));
    try {
      if (existsSync(meta)) return JSON.parse(readFileSync(meta, 'utf8')) as TemplateSnapshot;
      this.removeAbandoned();
      return await this.create(manifest, params, key, dir);
    } finally {
      release();
    }
  }

  /** Temporary dirs of snapshot builders that died mid-way (their pid is gone). */
  private removeAbandoned(): void {
    const root = join(this.imageDir, 'snapshots');
    for (const e of readdirSync(root)) {
      const m = /\.tmp-(\d+)/.exec(e);
      if (m && Number(m[1]) !== process.pid && !processAlive(Number(m[1])))
        rmSync(join(root, e), { recursive: true, force: true });
    }
  }

  private async create(
    manifest: TemplateManifest,
    params: SnapshotParams,
    key: string,
    dir: string,
  ): Promise<TemplateSnapshot> {
    // Short, not beside `dir`: QEMU's sockets live in it and a Unix socket path is < 108 bytes.
    const tmp = join(this.imageDir, 'snapshots', `.tmp-${process.pid}-${randomBytes(3).toString('hex')}`);
    rmSync(tmp, { recursive: true, force: true });
    try {
      const taken = await this.take(manifest, { ...params, warm: params.warm ?? templateWarmUp }, tmp);
      for (const f of ['qmp.sock', 'agent.sock', 'console.sock', 'qemu.pid', 'mig'])
        rmSync(join(tmp, f), { recursive: true, force: true });
      const snap: TemplateSnapshot = {
        template: manifest.name,
        key,
        dir,
        mem: join(dir, 'mem'),
        state: join(dir, 'state'),
        disk: join(dir, 'disk.qcow2'),
        memoryMb: params.memoryMb,
        vcpus: params.vcpus,
        accel: params.accel,
        cmdline: params.cmdline,
        layout: params.layout,
        stateBytes: taken.stateBytes,
        bootMs: Math.round(taken.bootMs),
        saveMs: Math.round(taken.saveMs),
        createdAt: new Date().toISOString(),
      };
      chmodSync(tmp, 0o755);
      writeFileSync(join(tmp, 'meta.json'), `${JSON.stringify(snap, null, 2)}\n`);
      rmSync(dir, { recursive: true, force: true });
      renameSync(tmp, dir);
      return snap;
    } catch (e) {
      rmSync(tmp, { recursive: true, force: true });
      throw new Error(`snapshot of template ${manifest.name} failed: ${(e as Error).message}`);
    }
  }
}
