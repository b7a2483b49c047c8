import { createHash } from 'node:crypto';
import { isAbsolute } from 'node:path';
import { type Volume, validateVolumes, volumeDeviceArgs } from './volumes.js';

/**
 * A machine described, not hard-coded: its size and its devices. `allocate` gives every device
 * its transport from one fixed slot table, the same for cold boots, snapshots and restores, so a
 * saved machine's device state always fits a machine built from the same description.
 *
 * Devices have a guest side (what the guest sees: the kind, the transport, a 9p mount tag, a port
 * name) and a host side (the backend: a disk path, a socket, a shared directory). Only the guest
 * side is the layout: a restore may change every backend, never the layout.
 */
export type DeviceSpec =
  /** The machine's own writable disk (a qcow2 overlay); its drive is `root` (block_resize names it). */
  | { kind: 'root-disk'; path: string }
  /** virtio-serial with the agent's port, `org.hutch.agent.0`, served on a Unix socket. */
  | { kind: 'agent-port'; socket: string }
  /**
   * The virtio-scsi controller (`scsi0`) every machine has: attachable disks are SCSI disks on
   * it, hot-plugged into a running machine (microvm has no other hot-plug, and its transports are
   * all taken). It took the virtio-rng's transport: guests seed their CRNG from RDRAND (`-cpu
   * max` under TCG, `host` under KVM) and from the entropy CONFIGURE sends after every boot and
   * restore.
   */
  | { kind: 'disk-bus' }
  /** The ISA serial port (ttyS0), served on a Unix socket. */
  | { kind: 'console'; socket: string }
  /**
   * A host directory over virtio-9p (src/vmm/volumes.ts). `placeholder`: an empty read-only
   * directory holding a volume slot the guest never mounts, so a snapshot taken with every slot
   * filled restores into machines with any number of volumes (9p only blocks a migration while
   * the guest has the share mounted).
   */
  | { kind: 'volume'; volume: Volume; placeholder?: true }
  /**
   * A virtio-net NIC on a tap device. The tap lives in the machine's own network namespace
   * (src/net/), which QEMU is started in; the MAC is the same in every guest (a snapshot
   * restores into any machine's network), so it is guest-visible and part of the layout.
   */
  | { kind: 'nic'; tap: string; mac: string }
  /**
   * An attachable disk (a sparse ext4 image on the host, src/storage/disks/) at SCSI target
   * `target` of the disk bus. Guest-visible: its target; the file and read-only are backends.
   * Its node and device are both named `disk<target>`, so attach and detach over QMP find them.
   */
  | { kind: 'disk'; path: string; format: 'raw' | 'qcow2'; target: number; readOnly: boolean }
  /**
   * A screen: virtio-gpu at `width`x`height` (guest-visible: the mode the guest's driver
   * offers), with a virtio keyboard and tablet (the host's QMP input and VNC viewers type and
   * point through them; a tablet, so pointer positions are absolute and exact). Its backend is
   * QEMU's own VNC server on a Unix socket, never on a port. It takes three transports: a
   * machine with a display has room for one volume (desktop machines have none).
   */
  | { kind: 'display'; width: number; height: number; vncSocket: string };

export type DeviceKind = DeviceSpec['kind'];

export interface MachineSpec {
  vcpus: number;
  memoryMb: number;
  devices: DeviceSpec[];
}

/** Where a device is plugged in: a virtio-mmio transport, or the board's ISA serial port. */
export type Transport =
  | { kind: 'virtio-mmio'; bus: number }
  | { kind: 'isa-serial' }
  | { kind: 'scsi'; target: number };

export interface AllocatedDevice {
  device: DeviceSpec;
  transport: Transport;
}

export interface AllocatedMachine {
  vcpus: number;
  memoryMb: number;
  devices: AllocatedDevice[];
}

/**
 * The board: QEMU microvm without ACPI (our kernel has none), which has 8 virtio-mmio transports,
 * bus N on GSI 5+N. acpi=off: QEMU then lists the devices on the kernel command line
 * (VIRTIO_MMIO_CMDLINE_DEVICES). rtc=on explicitly: its default is off under KVM, and a boot
 * without it spends ~1.8 s in RTC probing. docs/architecture.md ("Machines") and
 * images/kernel/README.md have the measurements, and why this is not yet the 24-transport board.
 */
export const boardOptions = 'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,memory-backend=mem';
/** Modern virtio-mmio: vhost-user devices (virtiofs) refuse legacy transports. Guest-visible. */
export const boardGlobals = ['virtio-mmio.force-legacy=false'] as const;
export const virtioTransports = 8;
/**
 * Bus 3 is GSI 8, the RTC's IRQ: a device there takes the IRQ from the RTC. A disk there cost
 * every boot ~2 s; the NIC sits there (measured: no boot cost, the guest needs no RTC interrupt
 * once CONFIGURE has set its clock). No other kind may use it.
 */
export const unusableTransports: readonly number[] = [];

/**
 * The slot table: which transports each kind may use, in order. Fixed, so the nth volume is on
 * the same transport in every machine whatever else it has. Today's devices and 4 volumes take
 * all 7 usable transports: the kinds to come have no room on this board yet (a spec with one is
 * refused), and get theirs here when the board grows (see docs/architecture.md).
 */
export const slotTable: Readonly<Record<DeviceKind, readonly number[] | 'isa-serial' | 'scsi'>> = {
  console: 'isa-serial',
  'root-disk': [7],
  'agent-port': [6],
  'disk-bus': [5],
  volume: [0, 1, 2, 4],
  nic: [3],
  disk: 'scsi',
  display: [0],
};

/** The display's keyboard and tablet: the transports after its GPU's, taken from the volumes'. */
export const displayInputBuses: readonly number[] = [1, 2];

/** Screen sizes a display may have (pixels); virtio-gpu's own limit is far above. */
export const displayLimits = { minWidth: 320, maxWidth: 2560, minHeight: 240, maxHeight: 1600 } as const;

/**
 * Disks a machine may have attached at once: SCSI targets 0…15 of the disk bus (virtio-scsi
 * allows 256; a guest with more than a handful of mounted disks is a misuse worth refusing).
 */
export const maxDisks = 16;

/** How many devices of each kind fit on a machine (with or without a display). */
export function slotsFor(kind: DeviceKind, display = false): number {
  const s = slotsOn(kind, display);
  if (s === 'scsi') return maxDisks;
  return s === 'isa-serial' ? 1 : s.length;
}

/** A kind's transports on a machine: a display's GPU, keyboard and tablet are no one else's. */
function slotsOn(kind: DeviceKind, display: boolean): readonly number[] | 'isa-serial' | 'scsi' {
  const s = slotTable[kind];
  if (!display || kind === 'display' || typeof s === 'string') return s;
  const taken = new Set([...(slotTable.display as readonly number[]), ...displayInputBuses]);
  return s.filter((bus) => !taken.has(bus));
}

/**
 * Gives each device its transport: the nth device of a kind takes the kind's nth slot. Throws,
 * naming the kind and its room, when a spec has more devices of a kind than the layout holds.
 */
export function allocate(spec: MachineSpec): AllocatedMachine {
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1) throw new Error(`vcpus ${spec.vcpus}: at least 1`);
  if (!Number.isInteger(spec.memoryMb) || spec.memoryMb < 1)
    throw new Error(`memoryMb ${spec.memoryMb}: a positive number of MiB`);
  const used = new Map<DeviceKind, number>();
  const display = spec.devices.some((d) => d.kind === 'display');
  const devices = spec.devices.map((device): AllocatedDevice => {
    const n = used.get(device.kind) ?? 0;
    used.set(device.kind, n + 1);
    const slots = slotsOn(device.kind, display);
    if (slots === 'scsi') {
      if (device.kind !== 'disk') throw new Error(`${device.kind} cannot sit on the disk bus`);
      if (!Number.isInteger(device.target) || device.target < 0 || device.target >= maxDisks)
        throw new Error(`disk target ${device.target}: 0-${maxDisks - 1}`);
      if (!spec.devices.some((d) => d.kind === 'disk-bus'))
        throw new Error('the machine spec does not fit: a disk needs the disk bus');
      return { device, transport: { kind: 'scsi', target: device.target } };
    }
    if (slots === 'isa-serial') {
      if (n > 0) throw new Error(`the machine spec does not fit: more than one ${device.kind}`);
      return { device, transport: { kind: 'isa-serial' } };
    }
    const bus = slots[n];
    if (bus === undefined)
      throw new Error(
        `the machine spec does not fit: ${count(spec, device.kind)} ${device.kind} devices, the layout has room for ${slots.length}`,
      );
    return { device, transport: { kind: 'virtio-mmio', bus } };
  });
  validateVolumes(volumesOf(spec));
  const targets = spec.devices.flatMap((d) => (d.kind === 'disk' ? [d.target] : []));
  if (new Set(targets).size !== targets.length) throw new Error('two disks on one SCSI target');
  for (const d of spec.devices)
    if (d.kind === 'disk' && (!isAbsolute(d.path) || d.path.includes(',')))
      throw new Error(`disk ${d.target}: its path must be absolute, without ','`);
  for (const d of spec.devices)
    if (d.kind === 'display') {
      const { minWidth, maxWidth, minHeight, maxHeight } = displayLimits;
      if (!Number.isInteger(d.width) || d.width < minWidth || d.width > maxWidth || d.width % 2)
        throw new Error(`display width ${d.width}: an even number of pixels, ${minWidth}-${maxWidth}`);
      if (!Number.isInteger(d.height) || d.height < minHeight || d.height > maxHeight || d.height % 2)
        throw new Error(`display height ${d.height}: an even number of pixels, ${minHeight}-${maxHeight}`);
      if (!isAbsolute(d.vncSocket) || d.vncSocket.includes(','))
        throw new Error(`display: its VNC socket path must be absolute, without ','`);
    }
  const tags = spec.devices.flatMap((d) => (d.kind === 'volume' ? [d.volume.tag] : []));
  if (new Set(tags).size !== tags.length) throw new Error('a volume placeholder reuses a volume tag');
  return { vcpus: spec.vcpus, memoryMb: spec.memoryMb, devices };
}

function count(spec: MachineSpec, kind: DeviceKind): number {
  return spec.devices.filter((d) => d.kind === kind).length;
}

/** The volumes the guest mounts (placeholders left out). */
export function volumesOf(spec: Pick<MachineSpec, 'devices'>): Volume[] {
  return spec.devices.flatMap((d) => (d.kind === 'volume' && !d.placeholder ? [d.volume] : []));
}

/** The tag of the volume in slot `i`: a slot's tag is guest-visible, so it is the slot's, not the volume's. */
export function volumeTag(i: number): string {
  return `vol${i}`;
}

/**
 * The devices every hutch machine has, then its volumes (each on its fixed slot). With
 * `emptyVolume` (an empty directory QEMU's user can read), the volume slots left are filled
 * with read-only placeholders over it: every such machine has the same layout, volumes or not.
 */
export function standardMachine(m: {
  vcpus: number;
  memoryMb: number;
  disk: string;
  agentSocket: string;
  consoleSocket: string;
  volumes?: readonly Volume[];
  emptyVolume?: string;
  /** A NIC on this tap (in the machine's namespace), with the MAC every guest has. */
  nic?: { tap: string; mac: string };
  /** Attached disks (a cold boot, a resume or a branch's clone: they are in its saved state). */
  disks?: readonly { path: string; format: 'raw' | 'qcow2'; target: number; readOnly: boolean }[];
  /** A screen of this size, served by QEMU's VNC server on `vncSocket`. */
  display?: { width: number; height: number; vncSocket: string };
}): MachineSpec {
  const volumes = m.volumes ?? [];
  const empty = m.emptyVolume;
  const placeholders = empty
    ? Array.from(
        { length: Math.max(0, slotsFor('volume', m.display !== undefined) - volumes.length) },
        (_, i): DeviceSpec => ({
          kind: 'volume',
          volume: {
            tag: volumeTag(volumes.length + i),
            hostPath: empty,
            guestPath: '/unused',
            readonly: true,
          },
          placeholder: true,
        }),
      )
    : [];
  return {
    vcpus: m.vcpus,
    memoryMb: m.memoryMb,
    devices: [
      { kind: 'console', socket: m.consoleSocket },
      { kind: 'root-disk', path: m.disk },
      { kind: 'agent-port', socket: m.agentSocket },
      { kind: 'disk-bus' },
      ...(m.display ? [{ kind: 'display', ...m.display } as DeviceSpec] : []),
      ...(m.nic ? [{ kind: 'nic', ...m.nic } as DeviceSpec] : []),
      ...volumes.map((volume): DeviceSpec => ({ kind: 'volume', volume })),
      ...placeholders,
      ...[...(m.disks ?? [])]
        .sort((a, b) => a.target - b.target)
        .map((d): DeviceSpec => ({ kind: 'disk', ...d })),
    ],
  };
}

export const agentPortName = 'org.hutch.agent.0';

/**
 * The layout: the guest side of an allocated machine (board, size, each device's kind, transport
 * and what the guest reads from it), without any host-side backend. A saved device state fits
 * exactly the machines with an equal layout.
 */
export interface Layout {
  board: string;
  vcpus: number;
  memoryMb: number;
  devices: { kind: DeviceKind; transport: string; guest?: Record<string, string> }[];
}

export function layoutOf(m: AllocatedMachine): Layout {
  return {
    board: [boardOptions, ...boardGlobals].join(' '),
    vcpus: m.vcpus,
    memoryMb: m.memoryMb,
    devices: m.devices.map(({ device, transport }) => {
      const guest = guestSide(device);
      return { kind: device.kind, transport: transportName(transport), ...(guest ? { guest } : {}) };
    }),
  };
}

/** What the guest can read from the device itself (config space), apart from its kind. */
function guestSide(d: DeviceSpec): Record<string, string> | undefined {
  if (d.kind === 'volume') return { mountTag: d.volume.tag };
  if (d.kind === 'agent-port') return { port: agentPortName };
  if (d.kind === 'nic') return { mac: d.mac };
  if (d.kind === 'display')
    return {
      resolution: `${d.width}x${d.height}`,
      inputs: displayInputBuses.map((b) => `virtio-mmio-bus.${b}`).join(' '),
    };
  return undefined;
}

function transportName(t: Transport): string {
  if (t.kind === 'scsi') return `scsi0.0:${t.target}`;
  return t.kind === 'isa-serial' ? 'isa-serial' : `virtio-mmio-bus.${t.bus}`;
}

/** A short hash of the layout (snapshot keys): equal layouts, equal fingerprints, whatever the backends. */
export function layoutFingerprint(layout: Layout): string {
  return createHash('sha256').update(JSON.stringify(layout)).digest('hex').slice(0, 16);
}

/**
 * Throws unless `actual` equals the layout a saved state was taken with, naming the first
 * difference: QEMU would otherwise fail mid-stream, or worse, load a state into other devices.
 */
export function checkSameLayout(saved: Layout, actual: Layout): void {
  const diff = layoutDiff(saved, actual);
  if (diff) throw new Error(`the saved machine's device layout differs from this machine's: ${diff}`);
}

export function layoutDiff(a: Layout, b: Layout): string | undefined {
  if (a.board !== b.board) return `board ${a.board} vs ${b.board}`;
  if (a.vcpus !== b.vcpus) return `${a.vcpus} vs ${b.vcpus} vCPUs`;
  if (a.memoryMb !== b.memoryMb) return `${a.memoryMb} vs ${b.memoryMb} MiB of memory`;
  const n = Math.max(a.devices.length, b.devices.length);
  for (let i = 0; i < n; i++) {
    const x = JSON.stringify(a.devices[i] ?? null);
    const y = JSON.stringify(b.devices[i] ?? null);
    if (x !== y) return `device ${i}: ${x} vs ${y}`;
  }
  return undefined;
}

/** The board and device part of QEMU's command line, from an allocated machine. */
export function machineArgs(m: AllocatedMachine): string[] {
  return [
    '-M',
    boardOptions,
    ...boardGlobals.flatMap((g) => ['-global', g]),
    '-smp',
    String(m.vcpus),
    '-m',
    `${m.memoryMb}M`,
    ...m.devices.flatMap(deviceArgs),
  ];
}

function deviceArgs({ device: d, transport: t }: AllocatedDevice): string[] {
  if (t.kind === 'isa-serial') {
    if (d.kind !== 'console') throw new Error(`${d.kind} cannot sit on the ISA serial port`);
    return ['-chardev', `socket,id=ser0,path=${d.socket},server=on,wait=off`, '-serial', 'chardev:ser0'];
  }
  if (t.kind === 'scsi') {
    if (d.kind !== 'disk') throw new Error(`${d.kind} cannot sit on the disk bus`);
    const a = diskQmpArgs(d);
    return ['-blockdev', JSON.stringify(a.blockdev), '-device', JSON.stringify(a.device)];
  }
  const bus = `bus=virtio-mmio-bus.${t.bus}`;
  switch (d.kind) {
    case 'root-disk':
      return [
        '-drive',
        `id=root,file=${d.path},format=qcow2,if=none,discard=unmap,cache=writeback`,
        '-device',
        `virtio-blk-device,drive=root,${bus}`,
      ];
    case 'agent-port':
      return [
        '-device',
        `virtio-serial-device,max_ports=2,${bus}`,
        '-chardev',
        `socket,id=agent,path=${d.socket},server=on,wait=off`,
        '-device',
        `virtserialport,chardev=agent,name=${agentPortName}`,
      ];
    case 'disk-bus':
      return ['-device', `virtio-scsi-device,id=scsi0,num_queues=1,${bus}`];
    case 'volume':
      return volumeDeviceArgs(d.volume, t.bus);
    case 'console':
      throw new Error('the console sits on the ISA serial port');
    case 'nic':
      return [
        '-netdev',
        `tap,id=net0,ifname=${d.tap},script=no,downscript=no`,
        '-device',
        `virtio-net-device,netdev=net0,mac=${d.mac},${bus}`,
      ];
    case 'disk':
      throw new Error('a disk sits on the disk bus');
    case 'display': {
      const [keyboard, tablet] = displayInputBuses;
      return [
        '-device',
        `virtio-gpu-device,xres=${d.width},yres=${d.height},${bus}`,
        '-device',
        `virtio-keyboard-device,bus=virtio-mmio-bus.${keyboard}`,
        '-device',
        `virtio-tablet-device,bus=virtio-mmio-bus.${tablet}`,
        // Shared: every viewer sees and drives the screen, none disconnects another. No
        // password: the socket is reached only by the daemon, whose auth is in front.
        '-vnc',
        `unix:${d.vncSocket},share=force-shared`,
      ];
    }
  }
}

/**
 * A disk's block node and SCSI device, as QMP blockdev-add/device_add arguments (hot-plug) and,
 * JSON-encoded, as -blockdev/-device (a launch with the disk attached): one description, so a
 * machine restored with its disks has exactly the devices it was saved with. Raw, host page
 * cache (cache.direct off: native speed for small writes; the guest's flushes reach the file
 * with fdatasync), discard passed through so deletes in the guest free the sparse file's blocks.
 */
export function diskQmpArgs(d: {
  path: string;
  format: 'raw' | 'qcow2';
  target: number;
  readOnly: boolean;
}): {
  blockdev: Record<string, unknown>;
  device: Record<string, unknown>;
} {
  const name = `disk${d.target}`;
  return {
    blockdev: {
      driver: d.format,
      'node-name': name,
      'read-only': d.readOnly,
      discard: 'unmap',
      file: { driver: 'file', filename: d.path, 'read-only': d.readOnly, cache: { direct: false } },
    },
    device: {
      driver: 'scsi-hd',
      id: name,
      drive: name,
      bus: 'scsi0.0',
      channel: 0,
      'scsi-id': d.target,
      lun: 0,
      // A serial the guest can read (/sys/block/sdX/device/…/vpd) naming the target.
      serial: `hutch-${name}`,
    },
  };
}
