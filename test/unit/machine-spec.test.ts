import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  allocate,
  checkSameLayout,
  type DeviceSpec,
  displayInputBuses,
  layoutFingerprint,
  layoutOf,
  type MachineSpec,
  machineArgs,
  slotsFor,
  slotTable,
  standardMachine,
  unusableTransports,
  virtioTransports,
  volumesOf,
} from '../../src/vmm/machine-spec.js';
import { maxVolumes, type Volume } from '../../src/vmm/volumes.js';

const vol = (i: number, hostPath = `/srv/v${i}`): Volume => ({
  tag: `vol${i}`,
  hostPath,
  guestPath: `/mnt/v${i}`,
  readonly: false,
});

const base = (volumes: Volume[] = [], run = '/run/a'): MachineSpec =>
  standardMachine({
    vcpus: 2,
    memoryMb: 512,
    disk: `${run}/disk.qcow2`,
    agentSocket: `${run}/agent.sock`,
    consoleSocket: `${run}/console.sock`,
    volumes,
  });

type Screen = Extract<DeviceSpec, { kind: 'display' }>;
const screen = (): Screen => ({ kind: 'display', width: 1024, height: 768, vncSocket: '/run/a/vnc.sock' });

const withDevices = (...devices: DeviceSpec[]): MachineSpec => ({
  ...base(),
  devices: [...base().devices, ...devices],
});
const times = <T>(n: number, f: (i: number) => T): T[] => Array.from({ length: n }, (_, i) => f(i));

/** Each device's transport, as `kind@transport`. */
const placed = (spec: MachineSpec): string[] =>
  layoutOf(allocate(spec)).devices.map((d) => `${d.kind}@${d.transport}`);

describe('machine spec: slot allocation', () => {
  const fits: [string, MachineSpec][] = [
    ['the standard machine', base()],
    ['4 volumes', base(times(4, vol))],
  ];
  for (const [what, spec] of fits)
    test(`fits: ${what}`, () => {
      const t = placed(spec);
      assert.equal(t.length, spec.devices.length);
      assert.equal(
        new Set(t.map((x) => x.split('@')[1])).size,
        t.length,
        'every device has its own transport',
      );
    });

  const tooMany: [string, MachineSpec, RegExp][] = [
    ['5 volumes', base(times(5, vol)), /does not fit: 5 volume devices, the layout has room for 4/],
    [
      '2 NICs',
      withDevices({ kind: 'nic', tap: 't', mac: 'm' }, { kind: 'nic', tap: 't', mac: 'm' }),
      /2 nic devices, the layout has room for 1/,
    ],
    [
      'two disks on one target',
      withDevices(
        { kind: 'disk', path: '/d/a.img', format: 'raw', target: 2, readOnly: false },
        { kind: 'disk', path: '/d/b.img', format: 'raw', target: 2, readOnly: true },
      ),
      /two disks on one SCSI target/,
    ],
    [
      'a disk past target 15',
      withDevices({ kind: 'disk', path: '/d/a.img', format: 'raw', target: 16, readOnly: false }),
      /0-15/,
    ],
    ['two displays', withDevices(screen(), screen()), /2 display devices, the layout has room for 1/],
    [
      'a display and two volumes',
      { ...base([vol(0), vol(1)]), devices: [...base([vol(0), vol(1)]).devices, screen()] },
      /2 volume devices, the layout has room for 1/,
    ],
    ['an odd screen width', withDevices({ ...screen(), width: 1023 }), /display width 1023/],
    ['a screen too tall', withDevices({ ...screen(), height: 4000 }), /display height 4000/],
    [
      '2 root disks',
      withDevices({ kind: 'root-disk', path: '/x' }),
      /2 root-disk devices, the layout has room for 1/,
    ],
    ['2 consoles', withDevices({ kind: 'console', socket: '/c' }), /more than one console/],
    ['0 vCPUs', { ...base(), vcpus: 0 }, /vcpus 0/],
  ];
  for (const [what, spec, error] of tooMany)
    test(`does not fit: ${what}`, () => assert.throws(() => allocate(spec), error));

  test('the nth device of a kind always gets the same transport, whatever else the machine has', () => {
    const alone = placed(base(times(2, vol)));
    // The same devices listed in another order, and with more volumes after them.
    const crowded = placed({ ...base(), devices: [...base(times(4, vol)).devices].reverse() });
    for (const d of alone) assert.ok(crowded.includes(d), `${d} moved`);
    assert.deepEqual(alone, [
      'console@isa-serial',
      'root-disk@virtio-mmio-bus.7',
      'agent-port@virtio-mmio-bus.6',
      'disk-bus@virtio-mmio-bus.5',
      'volume@virtio-mmio-bus.0',
      'volume@virtio-mmio-bus.1',
    ]);
  });

  test('the slot table fits the board and gives each transport to one kind (a display takes volume slots)', () => {
    const withoutDisplay = Object.entries(slotTable).filter(([kind]) => kind !== 'display');
    const buses = withoutDisplay.flatMap(([, s]) => (s === 'isa-serial' || s === 'scsi' ? [] : s));
    assert.equal(new Set(buses).size, buses.length);
    // A display's GPU, keyboard and tablet only ever take volume slots.
    const volumeBuses = slotTable.volume as readonly number[];
    assert.ok(
      [...(slotTable.display as readonly number[]), ...displayInputBuses].every((b) =>
        volumeBuses.includes(b),
      ),
    );
    assert.ok(buses.every((b) => b >= 0 && b < virtioTransports && !unusableTransports.includes(b)));
    assert.equal(slotsFor('volume'), maxVolumes);
  });
});

describe('machine spec: layout and fingerprint', () => {
  const fp = (spec: MachineSpec): string => layoutFingerprint(layoutOf(allocate(spec)));

  test('identical layouts, identical fingerprints; other backends change nothing', () => {
    assert.equal(fp(base(times(2, vol))), fp(base(times(2, vol))));
    // Other disk, sockets and shared directories: the guest sees the same machine.
    assert.equal(
      fp(base(times(2, vol), '/run/a')),
      fp(
        base(
          times(2, (i) => vol(i, `/elsewhere/${i}`)),
          '/run/b',
        ),
      ),
    );
    const ro = base([{ ...vol(0), readonly: true }]);
    assert.equal(fp(ro), fp(base([vol(0)])), 'read-only is enforced by the host side');
    checkSameLayout(
      layoutOf(allocate(base([vol(0)], '/run/a'))),
      layoutOf(allocate(base([vol(0, '/x')], '/run/b'))),
    );
  });

  const differs: [string, MachineSpec][] = [
    ['another vCPU count', { ...base(), vcpus: 4 }],
    ['more memory', { ...base(), memoryMb: 1024 }],
    ['one more volume', base([vol(0)])],
    ['another mount tag', base([{ ...vol(0), tag: 'data' }])],
    [
      'read-only placeholders in the volume slots',
      { ...base(), devices: [...base().devices, { kind: 'volume', volume: vol(0), placeholder: true }] },
    ],
  ];
  for (const [what, spec] of differs)
    test(`a different layout: ${what}`, () => {
      const ref = base(what.includes('tag') ? [vol(0)] : []);
      assert.notEqual(fp(spec), fp(ref));
      assert.throws(
        () => checkSameLayout(layoutOf(allocate(ref)), layoutOf(allocate(spec))),
        /device layout differs from this machine's: /,
      );
    });
});

describe('machine spec: volume placeholders', () => {
  const slotted = (volumes: Volume[], run = '/run/a'): MachineSpec => ({
    ...standardMachine({
      vcpus: 2,
      memoryMb: 512,
      disk: `${run}/disk.qcow2`,
      agentSocket: `${run}/agent.sock`,
      consoleSocket: `${run}/console.sock`,
      volumes,
      emptyVolume: '/var/lib/hutch/empty-volume',
    }),
  });
  const fp = (spec: MachineSpec): string => layoutFingerprint(layoutOf(allocate(spec)));

  test('with every slot filled, 0 to 4 volumes give one layout: one snapshot restores into any of them', () => {
    const prints = [0, 1, 2, 4].map((n) => fp(slotted(times(n, vol), `/run/${n}`)));
    assert.equal(new Set(prints).size, 1);
    assert.notEqual(prints[0], fp(base()), 'a machine without the slots is another layout');
  });

  test('placeholders are read-only, never mounted, and named by their slot', () => {
    const spec = slotted([vol(0)]);
    assert.deepEqual(volumesOf(spec), [vol(0)]);
    const args = machineArgs(allocate(spec));
    const nineP = args.filter((a) => a.startsWith('virtio-9p-device'));
    assert.deepEqual(
      nineP.map((a) => a.replace(/^.*mount_tag=/, '')),
      [
        'vol0,bus=virtio-mmio-bus.0',
        'vol1,bus=virtio-mmio-bus.1',
        'vol2,bus=virtio-mmio-bus.2',
        'vol3,bus=virtio-mmio-bus.4',
      ],
    );
    const fsdevs = args.filter((a) => a.startsWith('local,'));
    assert.ok(
      fsdevs
        .slice(1)
        .every((a) => a.includes('path=/var/lib/hutch/empty-volume,') && a.endsWith('readonly=on')),
    );
  });
});

describe('machine spec: QEMU arguments', () => {
  const args = machineArgs(allocate(base([vol(0)])));
  const after = (flag: string): string[] => args.flatMap((a, i) => (args[i - 1] === flag ? [a] : []));

  test('the board, its size and every device on its allocated transport', () => {
    assert.deepEqual(after('-M'), [
      'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off,memory-backend=mem',
    ]);
    assert.deepEqual(after('-smp'), ['2']);
    assert.deepEqual(after('-m'), ['512M']);
    assert.deepEqual(after('-device'), [
      'virtio-blk-device,drive=root,bus=virtio-mmio-bus.7',
      'virtio-serial-device,max_ports=2,bus=virtio-mmio-bus.6',
      'virtserialport,chardev=agent,name=org.hutch.agent.0',
      'virtio-scsi-device,id=scsi0,num_queues=1,bus=virtio-mmio-bus.5',
      'virtio-9p-device,fsdev=fs-vol0,mount_tag=vol0,bus=virtio-mmio-bus.0',
    ]);
    assert.deepEqual(after('-serial'), ['chardev:ser0']);
    assert.ok(after('-drive')[0]?.startsWith('id=root,file=/run/a/disk.qcow2,format=qcow2'));
    assert.ok(after('-chardev').some((c) => c.includes('path=/run/a/agent.sock')));
  });

  test('a display: GPU, keyboard and tablet on transports 0-2, VNC on its Unix socket, one volume slot left', () => {
    const m = standardMachine({
      vcpus: 2,
      memoryMb: 1024,
      disk: '/run/d/disk.qcow2',
      agentSocket: '/run/d/agent.sock',
      consoleSocket: '/run/d/console.sock',
      volumes: [vol(0)],
      display: { width: 1280, height: 800, vncSocket: '/run/d/vnc.sock' },
    });
    const args = machineArgs(allocate(m));
    const devices = after2(args, '-device');
    assert.ok(devices.includes('virtio-gpu-device,xres=1280,yres=800,bus=virtio-mmio-bus.0'));
    assert.ok(devices.includes('virtio-keyboard-device,bus=virtio-mmio-bus.1'));
    assert.ok(devices.includes('virtio-tablet-device,bus=virtio-mmio-bus.2'));
    // The one volume slot a display leaves.
    assert.ok(devices.some((d) => d.startsWith('virtio-9p-device') && d.endsWith('bus=virtio-mmio-bus.4')));
    assert.deepEqual(after2(args, '-vnc'), ['unix:/run/d/vnc.sock,share=force-shared']);
    assert.equal(slotsFor('volume', true), 1);
    // The screen size is guest-visible (part of the layout); the socket is not.
    const layout = (size: number, sock: string) =>
      layoutOf(allocate(withDevices({ ...screen(), width: size, vncSocket: sock })));
    assert.doesNotThrow(() => checkSameLayout(layout(1024, '/a/vnc.sock'), layout(1024, '/b/vnc.sock')));
    assert.throws(
      () => checkSameLayout(layout(1024, '/a/vnc.sock'), layout(1280, '/a/vnc.sock')),
      /1280x768/,
    );
  });

  test('a disk: a scsi-hd on the disk bus at its target, the same device QMP hot-plugs', () => {
    const disk = { kind: 'disk', path: '/d/x.img', format: 'raw', target: 3, readOnly: true } as const;
    const args = machineArgs(allocate(withDevices(disk)));
    const blockdev = JSON.parse(after2(args, '-blockdev')[0] ?? '{}');
    assert.equal(blockdev['node-name'], 'disk3');
    assert.equal(blockdev.file.filename, '/d/x.img');
    assert.equal(blockdev['read-only'], true);
    const devices = after2(args, '-device').filter((d) => d.startsWith('{'));
    assert.deepEqual(JSON.parse(devices[0] ?? '{}'), {
      driver: 'scsi-hd',
      id: 'disk3',
      drive: 'disk3',
      bus: 'scsi0.0',
      channel: 0,
      'scsi-id': 3,
      lun: 0,
      serial: 'hutch-disk3',
    });
    // Its target is guest-visible (layout), its file is not.
    const fp = (spec: MachineSpec): string => layoutFingerprint(layoutOf(allocate(spec)));
    assert.equal(fp(withDevices(disk)), fp(withDevices({ ...disk, path: '/other.img', readOnly: false })));
    assert.notEqual(fp(withDevices(disk)), fp(withDevices({ ...disk, target: 4 })));
    assert.throws(() => allocate({ ...base(), devices: [disk] }), /needs the disk bus/);
  });

  test('a NIC: bus 3, a tap backend, its MAC in the layout (not its tap)', () => {
    const nic = (tap: string, mac: string): MachineSpec => withDevices({ kind: 'nic', tap, mac });
    const fp = (spec: MachineSpec): string => layoutFingerprint(layoutOf(allocate(spec)));
    const args = machineArgs(allocate(nic('tap0', '02:00:00:00:00:01')));
    assert.ok(args.includes('virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,bus=virtio-mmio-bus.3'));
    assert.ok(args.includes('tap,id=net0,ifname=tap0,script=no,downscript=no'));
    assert.equal(fp(nic('tap0', '02:00:00:00:00:01')), fp(nic('tap9', '02:00:00:00:00:01')));
    assert.notEqual(fp(nic('tap0', '02:00:00:00:00:01')), fp(nic('tap0', '02:00:00:00:00:02')));
    assert.notEqual(fp(nic('tap0', '02:00:00:00:00:01')), fp(base()));
  });
});

function after2(args: string[], flag: string): string[] {
  return args.flatMap((a, i) => (args[i - 1] === flag ? [a] : []));
}
