import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { standardMachine } from '../../src/vmm/machine-spec.js';
import { qemuArgs, type VmSpec } from '../../src/vmm/qemu.js';
import { type Volume, validateVolumes, volumeCmdline, volumeDeviceArgs } from '../../src/vmm/volumes.js';

const rw: Volume = { tag: 'vol0', hostPath: '/srv/data', guestPath: '/work/my dir', readonly: false };
const ro: Volume = { tag: 'vol1', hostPath: '/srv/ref', guestPath: '/ref', readonly: true };

const machine = (volumes: Volume[] = []): VmSpec['machine'] =>
  standardMachine({
    vcpus: 1,
    memoryMb: 256,
    disk: '/d.qcow2',
    agentSocket: '/run/x/agent.sock',
    consoleSocket: '/run/x/console.sock',
    volumes,
  });

const spec: VmSpec = {
  id: 'm-test',
  accel: 'tcg',
  machine: machine(),
  kernel: '/k',
  cmdline: 'console=ttyS0 root=/dev/vda',
  runDir: '/run/x',
};

describe('volumes', () => {
  test('kernel arguments: tag, hex guest path, mode', () => {
    assert.equal(
      volumeCmdline([rw, ro]),
      'hutch.vol=vol0:2f776f726b2f6d7920646972:rw hutch.vol=vol1:2f726566:ro',
    );
    assert.equal(volumeCmdline([]), '');
    const utf8: Volume = { ...rw, guestPath: '/données' };
    assert.equal(volumeCmdline([utf8]), `hutch.vol=vol0:${Buffer.from('/données').toString('hex')}:rw`);
  });

  test('QEMU devices: mapped-xattr, read-only by QEMU, on the transport given', () => {
    assert.deepEqual(volumeDeviceArgs(rw, 3), [
      '-fsdev',
      'local,id=fs-vol0,path=/srv/data,security_model=mapped-xattr,fmode=0644,dmode=0755,readonly=off',
      '-device',
      'virtio-9p-device,fsdev=fs-vol0,mount_tag=vol0,bus=virtio-mmio-bus.3',
    ]);
    assert.match(String(volumeDeviceArgs(ro, 4)[1]), /readonly=on$/);
  });

  test('qemuArgs carries devices and kernel arguments together; no volumes, no change', () => {
    const plain = qemuArgs(spec);
    assert.ok(!plain.some((x) => x.includes('9p')));
    assert.equal(plain[plain.indexOf('-append') + 1], spec.cmdline);
    const withVols = qemuArgs({ ...spec, machine: machine([rw]) });
    assert.equal(
      withVols[withVols.indexOf('-append') + 1],
      `${spec.cmdline} hutch.vol=vol0:2f776f726b2f6d7920646972:rw`,
    );
    assert.ok(withVols.includes('virtio-9p-device,fsdev=fs-vol0,mount_tag=vol0,bus=virtio-mmio-bus.0'));
    // Every device's transport is distinct, and none sits on bus 3 (GSI 8, the RTC).
    const used = withVols.filter((x) => x.includes('bus=virtio-mmio-bus.')).map((x) => x.split('bus=')[1]);
    assert.equal(new Set(used).size, used.length);
    assert.ok(!used.includes('virtio-mmio-bus.3'));
  });

  test('invalid volumes are refused with a reason', () => {
    const bad: [Partial<Volume>, RegExp][] = [
      [{ tag: '' }, /tag/],
      [{ tag: 'a b' }, /tag/],
      [{ tag: 'x'.repeat(32) }, /tag/],
      [{ hostPath: 'rel/dir' }, /host path/],
      [{ hostPath: '/a,b' }, /host path/],
      [{ guestPath: '/' }, /guest path/],
      [{ guestPath: 'rel' }, /guest path/],
      [{ guestPath: '/a/../b' }, /guest path/],
      [{ guestPath: '/a/' }, /guest path/],
      [{ guestPath: '/a//b' }, /guest path/],
      [{ guestPath: `/${'a'.repeat(200)}` }, /guest path/],
      [{ guestPath: '/proc/x' }, /system/],
      [{ guestPath: '/dev' }, /system/],
    ];
    for (const [patch, re] of bad)
      assert.throws(() => validateVolumes([{ ...rw, ...patch }]), re, JSON.stringify(patch));
    assert.throws(() => validateVolumes([rw, { ...ro, tag: 'vol0' }]), /twice/);
    assert.throws(() => validateVolumes([rw, { ...ro, guestPath: rw.guestPath }]), /twice/);
    const five = ['a', 'b', 'c', 'd', 'e'].map((t) => ({ ...ro, tag: t, guestPath: `/${t}` }));
    assert.throws(() => validateVolumes(five), /at most 4/);
    assert.throws(
      () => qemuArgs({ ...spec, machine: machine(five) }),
      /does not fit: 5 volume devices, the layout has room for 4/,
    );
  });
});
