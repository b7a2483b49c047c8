import { realpathSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Principal } from '../../core/principal.js';
import {
  checkScreen,
  defaultScreen,
  type ScreenSize,
  screenText,
  snapshotScreens,
} from '../../desktop/screen-size.js';
import { HutchError } from '../../errors.js';
import type { AgentConnection } from '../../guest/agent-connection.js';
import { templateRecipes } from '../../images/recipes.js';
import type { TemplateSnapshot } from '../../images/snapshots.js';
import { type EgressInput, type EgressRules, parseEgress } from '../../net/egress.js';
import { volumeTag } from '../../vmm/machine-spec.js';
import { type Volume, validateVolumes } from '../../vmm/volumes.js';
import { type BoxSpec, type BoxVolume, boxSpecOf } from '../box-view.js';
import { newBoxId, newMachineId } from '../ids.js';
import type { BootImage } from '../images.js';
import type { Machine } from '../machine.js';
import type { MachineRow } from '../store.js';
import { parseRestartPolicy, startBoxCmd } from './box-cmd.js';
import { boxSnapshot, boxSnapshotDiskBytes, ensureBoxSnapshot } from './box-snapshot.js';
import { boxLifetime, checkNameFree, clampTtl, type FlowContext, lifetime, newRow } from './context.js';
import { fromTemplate } from './templates.js';

export interface CreateMachine {
  template: string;
  name?: string;
  ttlSeconds?: number;
  persistent?: boolean;
  net?: boolean;
  /** Egress rules of a networked machine (net/egress.ts). */
  egress?: EgressInput;
  /** One of the owner's networks (id or name); absent: their default network. */
  networkId?: string;
  /** `cold` forces a full boot; `snapshot` requires a snapshot; absent: pool, then snapshot, then cold. */
  mode?: 'cold' | 'snapshot';
  autoSuspendSeconds?: number;
  /** The screen of a desktop machine; absent: 1024x768. Refused for templates without a display. */
  screen?: ScreenSize;
}

export interface CreateBox {
  image: string;
  name?: string;
  cpu: number;
  memoryMb: number;
  diskSizeGb: number;
  network: boolean;
  /** Egress rules of a networked box (net/egress.ts). */
  egress?: EgressInput;
  /** One of the owner's networks (id or name); absent: their default network. */
  networkId?: string;
  /** Absent: the image's WorkingDir, else /root. */
  workdir?: string;
  env: Record<string, string> | null;
  volumes: BoxVolume[] | null;
  /** Started in the background after every boot, its output on the console (flows/box-cmd.ts). */
  cmd?: string[];
  /** no (default), always, on-failure: what happens when `cmd` exits. */
  restartPolicy?: string;
  /** Idle seconds before the box is suspended (it wakes on use); absent or 0: never. */
  autoSuspendSeconds?: number;
  /** Seconds until the box is removed; absent or 0: never. */
  autoDestroySeconds?: number;
}

/**
 * A create as an adapter may ask for it: from a user template (its image and size are the
 * defaults), or with the boxes API's defaults for what it leaves out.
 */
export type CreateBoxRequest = Omit<
  CreateBox,
  'image' | 'cpu' | 'memoryMb' | 'diskSizeGb' | 'network' | 'env' | 'volumes'
> &
  Partial<Pick<CreateBox, 'image' | 'cpu' | 'memoryMb' | 'diskSizeGb' | 'network' | 'env' | 'volumes'>> & {
    /** A user template's name or id (flows/templates.ts). */
    template?: string;
  };

export { boxSnapshotDiskBytes };

/** Creates a machine from a template: a pooled one if any, else from its snapshot, else cold. */
export async function createMachine(
  cx: FlowContext,
  principal: Principal,
  req: CreateMachine,
): Promise<MachineRow> {
  const { rt, config } = cx;
  const t0 = performance.now();
  if (rt.d.closing()) throw new HutchError('AGENT_UNAVAILABLE', 'the daemon is shutting down');
  if (!templateRecipes[req.template])
    throw new HutchError(
      'TEMPLATE_NOT_FOUND',
      `no template named ${JSON.stringify(req.template)}; known: ${Object.keys(templateRecipes).join(', ')}`,
    );
  const manifest = cx.templates.get(req.template);
  if (!manifest) throw new HutchError('TEMPLATE_NOT_READY', `template ${req.template} is not built yet`);
  const recipe = templateRecipes[req.template];
  if (req.screen && !recipe?.display)
    throw new HutchError(
      'INVALID_ARGUMENT',
      `template ${req.template} has no display: "screen" is for desktop machines`,
    );
  const screen = recipe?.display ? checkScreen(req.screen ?? defaultScreen) : undefined;
  const customScreen = screen !== undefined && screenText(screen) !== screenText(defaultScreen);
  // A desktop is a connected machine when the server has networking (unless asked otherwise).
  const net = req.net ?? (recipe?.display === true && rt.d.net !== undefined);
  const egress = net ? checkNetwork(cx, req.egress) : undefined;
  if (!net && (req.egress || req.networkId))
    throw new HutchError('INVALID_ARGUMENT', 'egress rules and network_id need "net": true');
  const networkId = net && req.networkId ? networkOf(cx, principal, req.networkId) : undefined;
  checkNameFree(cx, principal.user, req.name);

  const persistent = req.persistent === true && config.allowPersistent;
  const ttl = clampTtl(req.ttlSeconds);
  // The pool holds machines as this template makes them by default: a desktop with its network
  // (given the caller's rules and network at hand-out) and the default screen.
  const pooled =
    req.mode === 'cold' || net !== rt.templateNet(req.template) || customScreen
      ? undefined
      : cx.pool.take(req.template);
  if (pooled)
    return cx.pool.handOut(
      pooled,
      principal,
      {
        name: req.name ?? null,
        ...lifetime(persistent, ttl),
        auto_suspend_seconds: req.autoSuspendSeconds ?? null,
      },
      t0,
      egress ? { rules: egress, networkId } : undefined,
    );
  // The template's own size when its recipe declares one, else the server's defaults.
  const size = rt.templateSize(req.template);
  const snapParams = rt.snapshotParams(manifest, size, false, net, screen);
  let snap = req.mode === 'cold' ? undefined : cx.snapshots.get(manifest, snapParams);
  // The first desktop of a common screen size takes that size's snapshot (a cold boot and ~1 s
  // to save) and restores from it, like every later one; if that fails it boots cold. Other
  // sizes always boot cold: one snapshot (~200 MB) per size a client names would let clients
  // fill the host's disk.
  if (!snap && customScreen && snapshotScreens.has(screenText(screen)) && req.mode !== 'cold')
    snap = await cx.snapshots.ensure(manifest, snapParams).catch(() => undefined);
  if (req.mode === 'snapshot' && !snap)
    throw new HutchError(
      'SNAPSHOT_NOT_READY',
      `template ${req.template} has no snapshot yet (${cx.snapshots.status(manifest, snapParams)}); omit "mode" to cold-boot`,
    );
  const id = newMachineId();
  const row = newRow(rt.d.runRoot, {
    id,
    owner: principal.user,
    name: req.name ?? null,
    template: req.template,
    template_hash: manifest.hash,
    mode: snap ? 'snapshot' : 'cold',
    accel: rt.d.accel.accel,
    vcpus: size.vcpus,
    memory_mb: size.memoryMb,
    ...lifetime(persistent, ttl),
    auto_suspend_seconds: req.autoSuspendSeconds ?? null,
    kind: 'machine',
    net: net ? 1 : 0,
    display: screen ? screenText(screen) : null,
  });

  await cx.admission.insert(row, cx.admission.diskBytesOf(row), principal.quota);
  // Recorded once the machine exists (a refused insert leaves nothing), before it boots.
  if (egress) rt.d.net?.saveRules(id, egress);
  if (networkId) rt.d.net?.directory.setNetwork(id, networkId);
  const m = rt.machine(row);
  return m.lock.run(async () => {
    try {
      rt.own(m, 'machine');
      const disk = join(row.run_dir, 'disk.qcow2');
      if (snap) {
        await rt.d.hv.createOverlay(snap.disk, disk, 'qcow2', rt.d.runAs);
        const { vm } = await rt.restoreInto(m, row, manifest, snap.state, {
          memoryFrom: snap.mem,
          fromSnapshot: true,
          ignoreShared: true,
          layout: snap.layout,
        });
        if (vm.agent) await rt.giveIdentity(vm.agent, id);
      } else {
        await rt.d.hv.createOverlay(manifest.rootfs, disk, 'raw', rt.d.runAs);
        const vm = await rt.launch(m, row, manifest, {});
        vm.agent = await rt.waitForAgent(m, vm);
        await rt.giveIdentity(vm.agent, id, [], { net });
        await rt.runStartup(vm.agent, req.template);
      }
      return rt.markRunning(m, Math.round(performance.now() - t0));
    } catch (e) {
      return rt.bootFailed(m, 'machine', e);
    }
  });
}

/** The id of one of the caller's networks, by id or name (NETWORK_NOT_FOUND otherwise). */
function networkOf(cx: FlowContext, principal: Principal, idOrName: string): string {
  const net = cx.rt.d.net;
  if (!net) throw new HutchError('NETWORK_UNAVAILABLE', 'guest networking is off on this server');
  return net.directory.network(principal.user, idOrName).id;
}

/** Refuses a network on a server without one, and checks egress rules (INVALID_ARGUMENT). */
function checkNetwork(cx: FlowContext, egress?: EgressInput): EgressRules {
  if (!cx.rt.d.net)
    throw new HutchError('NETWORK_UNAVAILABLE', 'guest networking is off on this server (HUTCH_NET=off)');
  return parseEgress(egress ?? {});
}

/** The limits one box may ask for, as GET /v1/info reports them. */
export function boxLimits(cx: FlowContext): {
  max_cpu: number;
  max_memory_mb: number;
  max_disk_size_gb: number;
  max_boxes: number;
  volume_roots: string[];
} {
  return {
    max_cpu: cx.config.maxBoxCpu,
    max_memory_mb: cx.config.maxBoxMemoryMb,
    max_disk_size_gb: cx.config.maxBoxDiskGb,
    max_boxes: cx.config.maxMachines,
    volume_roots: cx.config.volumeRoots,
  };
}

/** Checks what a box asks for against the limits and the volume allow-list; throws, changes nothing. */
function checkBoxRequest(cx: FlowContext, req: CreateBox): BoxVolume[] | null {
  const lim = boxLimits(cx);
  const over = (what: string, v: number, max: number, unit = ''): HutchError =>
    new HutchError('LIMIT_EXCEEDED', `${what} ${v}${unit} is over this server's limit of ${max}${unit}`);
  if (req.cpu > lim.max_cpu) throw over('cpu', req.cpu, lim.max_cpu);
  if (req.memoryMb > lim.max_memory_mb) throw over('memory_mb', req.memoryMb, lim.max_memory_mb, ' MiB');
  if (req.diskSizeGb > lim.max_disk_size_gb)
    throw over('disk_size_gb', req.diskSizeGb, lim.max_disk_size_gb, ' GiB');
  if (!req.network && req.egress)
    throw new HutchError('INVALID_ARGUMENT', 'egress rules need "network": true');
  if (req.network) checkNetwork(cx, req.egress);
  if (!req.volumes?.length) return req.volumes;
  const seen = new Set<string>();
  const roots = cx.config.volumeRoots;
  const checked = req.volumes.map((v) => {
    let real: string;
    try {
      real = realpathSync(v.host_path);
    } catch {
      throw new HutchError('INVALID_ARGUMENT', `volume host_path ${v.host_path} does not exist`);
    }
    if (!statSync(real).isDirectory())
      throw new HutchError('INVALID_ARGUMENT', `volume host_path ${v.host_path} is not a directory`);
    // The resolved path, so a symlink inside an allowed root cannot lead outside it.
    if (!roots.some((root) => real === root || real.startsWith(`${root}/`)))
      throw new HutchError(
        'VOLUME_NOT_ALLOWED',
        `volume host_path ${v.host_path} is not inside an allowed root (${roots.join(', ') || 'none configured: set HUTCH_VOLUME_ROOTS'})`,
      );
    if (seen.has(v.guest_path))
      throw new HutchError('INVALID_ARGUMENT', `two volumes mount at ${v.guest_path}`);
    seen.add(v.guest_path);
    return { ...v, host_path: real };
  });
  try {
    validateVolumes(toVmVolumes(checked));
  } catch (e) {
    throw new HutchError('INVALID_ARGUMENT', (e as Error).message);
  }
  return checked;
}

/**
 * Creates a box from an image (or a user template) and boots it: from the image's snapshot
 * when one fits, else cold. A template's snapshot is waited for: its promise is a restore.
 */
export async function createBox(
  cx: FlowContext,
  principal: Principal,
  request: CreateBoxRequest,
): Promise<MachineRow> {
  const { rt } = cx;
  const t0 = performance.now();
  if (rt.d.closing()) throw new HutchError('AGENT_UNAVAILABLE', 'the daemon is shutting down');
  const { req, image: templateImage, templateId } = fromTemplate(cx, principal, request);
  const volumes = checkBoxRequest(cx, req);
  const networkId = req.network && req.networkId ? networkOf(cx, principal, req.networkId) : undefined;
  const restartPolicy = parseRestartPolicy(req.restartPolicy);
  checkNameFree(cx, principal.user, req.name);
  if (!cx.images) throw new HutchError('INTERNAL', 'this daemon has no image store');
  const image = templateImage ?? (await cx.images.resolve(req.image));
  const diskBytes = req.diskSizeGb * 1024 ** 3;
  const baseBytes = statSync(image.rootfs).size;
  if (baseBytes > diskBytes)
    throw new HutchError(
      'INVALID_ARGUMENT',
      `image ${req.image} needs a disk of at least ${Math.ceil(baseBytes / 1024 ** 3)} GiB (disk_size_gb ${req.diskSizeGb})`,
    );
  // Box snapshots have every volume slot filled with an empty placeholder: a box with volumes
  // restores from the same one, its volumes in the placeholders' place, mounted by CONFIGURE.
  const snap = templateId
    ? await templateSnapshot(cx, image, req, diskBytes)
    : boxSnapshot(cx, image, req.cpu, req.memoryMb, diskBytes, req.network);
  const id = newBoxId();
  const spec: BoxSpec = {
    image: req.image,
    manifest: image,
    digest: image.digest,
    disk_size_gb: req.diskSizeGb,
    network: req.network,
    workdir: req.workdir ?? image.workdir ?? '/root',
    env: req.env,
    volumes,
    image_env: image.env,
    cmd: req.cmd?.length ? req.cmd : null,
    restart_policy: restartPolicy,
    template_id: templateId ?? null,
    slots: snap !== undefined,
  };
  const row = newRow(rt.d.runRoot, {
    id,
    owner: principal.user,
    name: req.name ?? null,
    template: req.image,
    template_hash: image.hash,
    mode: snap ? 'snapshot' : 'cold',
    accel: rt.d.accel.accel,
    vcpus: req.cpu,
    memory_mb: req.memoryMb,
    // Boxes live until they are removed (or collected once stopped), or their auto-destroy.
    ...boxLifetime(req.autoDestroySeconds),
    auto_suspend_seconds: req.autoSuspendSeconds ?? 0,
    kind: 'box',
    spec: JSON.stringify(spec),
    net: req.network ? 1 : 0,
  });
  await cx.admission.insert(row, diskBytes, principal.quota);
  if (req.network) rt.d.net?.saveRules(id, parseEgress(req.egress ?? {}));
  if (networkId) rt.d.net?.directory.setNetwork(id, networkId);
  const m = rt.machine(row);
  return m.lock.run(async () => {
    try {
      rt.own(m, 'box');
      const disk = join(row.run_dir, 'disk.qcow2');
      if (snap) {
        await rt.d.hv.createOverlay(snap.disk, disk, 'qcow2', rt.d.runAs, boxSnapshotDiskBytes);
        const vmVolumes = toVmVolumes(volumes ?? []);
        const { vm } = await rt.restoreInto(m, row, image, snap.state, {
          memoryFrom: snap.mem,
          fromSnapshot: true,
          ignoreShared: true,
          layout: snap.layout,
          volumes: vmVolumes,
          volumeSlots: true,
        });
        // The guest learns of a bigger disk from the resize; CONFIGURE then grows its filesystem.
        if (diskBytes > boxSnapshotDiskBytes) {
          await (await rt.qmpOf(m)).execute('block_resize', { device: 'root', size: diskBytes });
          if (vm.agent) await guestSeesDiskSize(vm.agent, diskBytes);
        }
        if (vm.agent) await identifyBox(cx, vm.agent, id, vmVolumes);
      } else {
        // The agent grows the root filesystem to the disk at boot.
        await rt.d.hv.createOverlay(image.rootfs, disk, 'raw', rt.d.runAs, diskBytes);
        await bootBox(cx, m, row, image);
      }
      await startBoxCmd(cx, row, m.vm?.agent);
      return rt.markRunning(m, Math.round(performance.now() - t0));
    } catch (e) {
      return rt.bootFailed(m, 'box', e);
    }
  });
}

/**
 * A template's snapshot, loaded (after a restart it is on disk, not yet in memory) or taken again
 * (the cache collector may have removed it). A box is still made when that fails (no room for
 * the snapshot's QEMU, a broken image): it boots cold, and the log says why.
 */
async function templateSnapshot(
  cx: FlowContext,
  image: BootImage,
  req: CreateBox,
  diskBytes: number,
): Promise<TemplateSnapshot | undefined> {
  try {
    return await ensureBoxSnapshot(cx, image, req.cpu, req.memoryMb, diskBytes, req.network);
  } catch (e) {
    cx.rt.d.log('warn', 'template snapshot unavailable; the box boots cold', {
      image: image.ref,
      error: (e as Error).message,
    });
    return undefined;
  }
}

/** Boots a box's VM cold on its own disk, with its volumes mounted. */
export async function bootBox(cx: FlowContext, m: Machine, row: MachineRow, image: BootImage): Promise<void> {
  const spec = boxSpecOf(row);
  const volumes = toVmVolumes(spec.volumes ?? []);
  const vm = await cx.rt.launch(m, row, image, volumes.length ? { volumes } : {});
  vm.agent = await cx.rt.waitForAgent(m, vm);
  await identifyBox(cx, vm.agent, row.id, volumes, row.net === 1);
  // Its attached disks were plugged in at launch: the guest mounts them now.
  await cx.rt.d.disks?.mountAll(vm.agent, row.id);
}

/**
 * Waits until the guest kernel has taken a resized root disk's new size: it learns of it from a
 * config interrupt it handles in its own time, and a grow asked for before that grows the
 * filesystem to the old size (seen under load). Read through the agent: no guest binary needed.
 */
async function guestSeesDiskSize(agent: AgentConnection, bytes: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const h = agent.readFile('/sys/block/vda/size');
    const chunks: Buffer[] = [];
    for await (const c of h.stream) chunks.push(c as Buffer);
    await h.done;
    if (Number(Buffer.concat(chunks).toString('utf8').trim()) * 512 >= bytes) return;
    if (Date.now() > deadline)
      throw new HutchError(
        'BOOT_FAILED',
        `the guest did not see its disk grow to ${bytes} bytes within 10 s`,
      );
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** CONFIGURE for a box just booted or restored: its identity, its disk grown, its volumes mounted. */
async function identifyBox(
  cx: FlowContext,
  agent: AgentConnection,
  id: string,
  volumes: Volume[],
  /** Configure the NIC: a cold boot (a restored guest was configured before its snapshot). */
  net = false,
): Promise<void> {
  try {
    await cx.rt.giveIdentity(agent, id, volumes, { net });
  } catch (e) {
    if (!volumes.length) throw e;
    // The usual cause is a host directory the unprivileged QEMU user cannot open.
    const where = volumes.map((v) => `${v.hostPath} at ${v.guestPath}`).join(', ');
    throw new HutchError(
      'BOOT_FAILED',
      `the volumes (${where}) could not all be mounted: the VM user must be able to read (and for a writable volume, write) them: ${(e as Error).message}`,
    );
  }
}

/** A box's volumes as the VM sees them: the tags of their slots, vol0, vol1, … */
function toVmVolumes(volumes: BoxVolume[]): Volume[] {
  return volumes.map((v, i) => ({
    tag: volumeTag(i),
    hostPath: v.host_path,
    guestPath: v.guest_path,
    readonly: v.readonly,
  }));
}
