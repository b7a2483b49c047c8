/**
 * Boot-time features of a machine, on a bare QEMU started through src/vmm (no daemon): host
 * directories shared over virtio-9p (read-write and read-only), and the root ext4 grown to
 * fill a disk larger than the template's image. Runs QEMU as root dropping to hutch-vm, like
 * the engine; skipped when not root. Every QEMU started here is killed in `after`.
 */
import assert from 'node:assert/strict';
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { type AgentConnection, connectAgent } from '../../src/guest/agent-connection.js';
import { configureGuest } from '../../src/guest/guest-setup.js';
import { TemplateBuilder, type TemplateManifest } from '../../src/images/builder.js';
import { createOverlay } from '../../src/vmm/disk.js';
import { tcgTimingArgs } from '../../src/vmm/host.js';
import { standardMachine } from '../../src/vmm/machine-spec.js';
import { isAlive, killAndWait, launchQemu, runPaths } from '../../src/vmm/qemu.js';
import { QmpClient } from '../../src/vmm/qmp.js';
import { prepareRunDir } from '../../src/vmm/run-dir.js';
import type { Volume } from '../../src/vmm/volumes.js';
import { imageDir } from '../helpers/daemon.js';

const GiB = 2 ** 30;
const diskSize = 4 * GiB;

function lookupUser(name: string): { user: string; uid: number; gid: number } | undefined {
  const line = readFileSync('/etc/passwd', 'utf8')
    .split('\n')
    .find((l) => l.startsWith(`${name}:`));
  if (!line) return undefined;
  const [, , uid, gid] = line.split(':');
  return { user: name, uid: Number(uid), gid: Number(gid) };
}

interface Booted {
  pid: number;
  agent: AgentConnection;
  bootMs: number;
  /** Everything the serial console printed so far. */
  console: () => string;
}

const started = new Set<number>();

async function boot(
  manifest: TemplateManifest,
  runDir: string,
  disk: string,
  runAs: { user: string; uid: number; gid: number },
  volumes: Volume[],
  extraCmdline = '',
): Promise<Booted> {
  prepareRunDir(runDir, runAs);
  const p = runPaths(runDir);
  const t0 = performance.now();
  const pid = launchQemu('qemu-system-x86_64', {
    id: `voltest-${process.pid}-${started.size}`,
    accel: 'tcg',
    machine: standardMachine({
      vcpus: 1,
      memoryMb: 256,
      disk,
      agentSocket: p.agent,
      consoleSocket: p.console,
      volumes,
    }),
    kernel: manifest.kernel,
    cmdline: `${manifest.cmdline} ${tcgTimingArgs(manifest.kernelHz)}${extraCmdline}`,
    runDir,
    runAs: runAs.user,
  });
  started.add(pid);
  let out = '';
  // Tap the serial console (the agent logs there). Its socket may exist a moment before QEMU
  // listens on it: retry until connected.
  let sock: Socket | undefined;
  const deadline = Date.now() + 10_000;
  const tap = (): void => {
    const s = connect(p.console);
    s.on('connect', () => {
      sock = s;
    });
    s.on('data', (b) => {
      out += b.toString('latin1');
    });
    s.on('error', () => {
      if (!sock && Date.now() < deadline) setTimeout(tap, 5);
    });
    s.unref();
  };
  tap();
  let agent: AgentConnection;
  try {
    agent = await connectAgent(p.agent, { timeoutMs: 120_000 });
    // What the engine does after every boot: / grown and the volumes mounted by CONFIGURE.
    await configureGuest(agent, { hostname: 'voltest', growRoot: true, volumes });
  } catch (e) {
    await new Promise((r) => setTimeout(r, 500)); // let a failing QEMU finish its log
    const log = existsSync(p.qemuLog) ? readFileSync(p.qemuLog, 'utf8') : '';
    throw new Error(`${(e as Error).message}\nqemu.log: ${log}\nconsole: ${out.slice(-2000)}`);
  }
  return { pid, agent, bootMs: performance.now() - t0, console: () => out };
}

async function sh(vm: Booted, cmd: string): Promise<{ code: number | null; out: string; err: string }> {
  const r = await vm.agent.execCollect(
    { argv: ['sh', '-c', cmd], timeoutMs: 60_000 },
    { maxOutputBytes: 1 << 20 },
  );
  return { code: r.exitCode, out: r.stdout.toString(), err: r.stderr.toString() };
}

async function ok(vm: Booted, cmd: string): Promise<string> {
  const r = await sh(vm, cmd);
  assert.equal(r.code, 0, `${cmd}: ${r.err}`);
  return r.out;
}

async function stop(vm: Booted | undefined): Promise<void> {
  if (!vm) return;
  vm.agent.close();
  await killAndWait(vm.pid);
  started.delete(vm.pid);
}

const runAs = process.getuid?.() === 0 ? lookupUser('hutch-vm') : undefined;

describe('volumes and a root disk grown to its size', {
  skip: runAs ? false : 'needs root and the hutch-vm user',
}, () => {
  let manifest: TemplateManifest;
  let work: string;
  let rw: string;
  let ro: string;
  let disk: string;
  let vm: Booted | undefined;
  const user = runAs ?? { user: 'hutch-vm', uid: -1, gid: -1 };

  before(async () => {
    manifest = await new TemplateBuilder(imageDir).build('python');
    work = mkdtempSync(join(tmpdir(), 'hutch-volumes-'));
    // hutch-vm must reach the run dir and the shared directories (QEMU opens them after -runas).
    chmodSync(work, 0o711);
    rw = join(work, 'rw');
    ro = join(work, 'ro');
    mkdirSync(rw, { mode: 0o755 });
    chownSync(rw, user.uid, user.gid);
    mkdirSync(ro, { mode: 0o755 });
    writeFileSync(join(ro, 'readme'), 'read only\n', { mode: 0o644 });
    writeFileSync(join(rw, 'before-boot'), 'from the host\n');
    symlinkSync('/etc/shadow', join(rw, 'hostlink'));
    disk = join(work, 'disk.qcow2');
    await createOverlay(manifest.rootfs, disk, 'raw', user, diskSize);
    vm = await boot(manifest, join(work, 'run1'), disk, user, [
      { tag: 'rw', hostPath: rw, guestPath: '/mnt/host rw', readonly: false },
      { tag: 'ro', hostPath: ro, guestPath: '/srv/ro', readonly: true },
    ]);
  });

  after(async () => {
    await stop(vm);
    for (const pid of started) await killAndWait(pid);
    for (const pid of started) assert.ok(!isAlive(pid), `QEMU ${pid} is gone`);
    if (work && !process.env.KEEP) rmSync(work, { recursive: true, force: true });
  });

  test('both volumes are mounted where asked, read-only as asked', async (t) => {
    assert.ok(vm);
    t.diagnostic(`boot with 2 volumes and a 2 -> 4 GiB resize: ${vm.bootMs.toFixed(0)} ms`);
    const mounts = await ok(vm, 'grep " 9p " /proc/mounts');
    assert.match(
      mounts,
      /^rw \/mnt\/host\\040rw 9p rw,.*\bnosuid,nodev,.*\bmmap,.*\bmsize=512000,trans=virtio/m,
    );
    assert.match(mounts, /^ro \/srv\/ro 9p ro,.*\bnosuid,nodev,/m);
  });

  test('rw: the host and the guest see each other’s files', async () => {
    assert.ok(vm);
    assert.equal(await ok(vm, 'cat "/mnt/host rw/before-boot"'), 'from the host\n');
    writeFileSync(join(rw, 'after-boot'), 'written while running\n');
    assert.equal(await ok(vm, 'cat "/mnt/host rw/after-boot"'), 'written while running\n');
    await ok(
      vm,
      'echo from the guest > "/mnt/host rw/guest-file" && mkdir "/mnt/host rw/d" && chown 1234 "/mnt/host rw/d"',
    );
    assert.equal(readFileSync(join(rw, 'guest-file'), 'utf8'), 'from the guest\n');
    // mapped-xattr: on the host, plain files of hutch-vm with fmode/dmode; the guest's view
    // of ownership (chown to 1234 works) lives in xattrs.
    const st = lstatSync(join(rw, 'guest-file'));
    assert.equal(st.uid, user.uid);
    assert.equal(st.mode & 0o7777, 0o644);
    assert.equal(lstatSync(join(rw, 'd')).uid, user.uid);
    assert.equal((await ok(vm, 'stat -c %u "/mnt/host rw/d"')).trim(), '1234');
    // A change on the host shows at once (cache=mmap keeps no page cache).
    writeFileSync(join(rw, 'guest-file'), 'changed by the host\n');
    assert.equal(await ok(vm, 'cat "/mnt/host rw/guest-file"'), 'changed by the host\n');
  });

  test('ro: writes fail in the guest, even after a remount, and the host dir is unchanged', async () => {
    assert.ok(vm);
    const guest = vm;
    assert.equal(await ok(guest, 'cat /srv/ro/readme'), 'read only\n');
    const before = readdirSync(ro).sort();
    const refused = async (cmds: string[]): Promise<void> => {
      for (const cmd of cmds) {
        const r = await sh(guest, cmd);
        assert.notEqual(r.code, 0, cmd);
        assert.match(r.err, /Read-only file system|Permission denied/, cmd);
      }
    };
    await refused([
      'echo x > /srv/ro/new',
      'echo x >> /srv/ro/readme',
      'rm /srv/ro/readme',
      'mkdir /srv/ro/d',
    ]);
    // The guest is root and may drop its own read-only flag: QEMU still refuses every write.
    await ok(vm, 'mount -o remount,rw /srv/ro');
    await refused([
      'echo x > /srv/ro/new',
      'echo x >> /srv/ro/readme',
      'rm /srv/ro/readme',
      'touch /srv/ro/readme',
    ]);
    assert.deepEqual(readdirSync(ro).sort(), before);
    assert.equal(readFileSync(join(ro, 'readme'), 'utf8'), 'read only\n');
  });

  test('the guest cannot reach outside the shared directory', async () => {
    assert.ok(vm);
    const hostShadow = readFileSync('/etc/shadow', 'utf8');
    const guestShadow = await ok(vm, 'cat /etc/shadow');
    // A symlink the guest makes is resolved by the guest, in the guest: x/etc/shadow is its own.
    await ok(vm, 'ln -s / "/mnt/host rw/x"');
    const viaLink = await ok(vm, 'cat "/mnt/host rw/x/etc/shadow"');
    assert.equal(viaLink, guestShadow);
    assert.notEqual(viaLink, hostShadow);
    // On the host it is no symlink at all (mapped-xattr stores the target in a plain file).
    assert.ok(lstatSync(join(rw, 'x')).isFile());
    // A real symlink made on the host is not followed at all: mapped-xattr reads a symlink's
    // target from a plain file, and QEMU opens it with O_NOFOLLOW (ELOOP).
    const hostLink = await sh(vm, 'cat "/mnt/host rw/hostlink"');
    assert.notEqual(hostLink.code, 0);
    assert.match(hostLink.err, /Too many levels of symbolic links/);
    assert.doesNotMatch(hostLink.out, /\S/);
    // `..` from the share's root is the guest's parent directory.
    assert.equal(
      await ok(vm, 'stat -c %d:%i "/mnt/host rw/.." /mnt'),
      await ok(vm, 'stat -c %d:%i /mnt /mnt'),
    );
    // Hard links across into the share, and device nodes on the host, are refused.
    assert.notEqual((await sh(vm, 'ln /etc/passwd "/mnt/host rw/p"')).code, 0);
    await sh(vm, 'mknod "/mnt/host rw/null" c 1 3');
    if (existsSync(join(rw, 'null')))
      assert.ok(lstatSync(join(rw, 'null')).isFile(), 'a device node is a plain file on the host');
  });

  test('the RTC still works with volumes on their transports', async () => {
    assert.ok(vm);
    const epoch = Number((await ok(vm, 'cat /sys/class/rtc/rtc0/since_epoch')).trim());
    assert.ok(Math.abs(epoch - Date.now() / 1000) < 120, `rtc0 reads ${epoch}`);
    // Every virtio device has an IRQ of its own, none on 8.
    const irqs = (await ok(vm, 'cat /proc/interrupts'))
      .split('\n')
      .filter((l) => /virtio/.test(l))
      .map((l) => l.trim().split(':')[0]);
    assert.equal(irqs.length, 5, `5 virtio devices: ${irqs.join(',')}`);
    assert.equal(new Set(irqs).size, irqs.length);
    assert.ok(!irqs.includes('8'));
  });

  test('/ fills the 4 GiB disk after boot', async (t) => {
    assert.ok(vm);
    const [size] = (await ok(vm, 'df -B1 --output=size / | tail -1')).trim().split(/\s+/);
    assert.ok(Number(size) > 3.8 * GiB && Number(size) <= diskSize, `df / says ${size}`);
    const grew = /grew \/ from \d+ to \d+ blocks of \d+ in (\d+) ms/.exec(vm.console());
    assert.ok(grew, `the agent logged the resize: ${vm.console().slice(-1500)}`);
    t.diagnostic(`resize 2 -> 4 GiB: ${grew[1]} ms`);
  });

  test('throughput: 9p against the root disk', async (t) => {
    assert.ok(vm);
    const dd = async (cmd: string): Promise<string> => {
      const r = await ok(vm as Booted, `${cmd} 2>&1 | tail -1`);
      return /, ([\d.]+ [kMG]?B\/s)/.exec(r)?.[1] ?? r.trim();
    };
    const mb = 64;
    const results: string[] = [];
    for (const [name, dir] of [
      ['9p', '/mnt/host rw'],
      ['root', '/root'],
    ] as const) {
      const f = `"${dir}/big"`;
      const w = await dd(`dd if=/dev/zero of=${f} bs=1M count=${mb} conv=fsync`);
      const r = await dd(`sync; echo 3 > /proc/sys/vm/drop_caches; dd if=${f} of=/dev/null bs=1M`);
      await ok(vm, `rm ${f}`);
      results.push(`${name}: write ${w}, read ${r}`);
    }
    t.diagnostic(`${mb} MiB dd, TCG: ${results.join('; ')}`);
  });

  test('without volumes the machine boots as before; a full-size / is not grown again; hutch.vol= is ignored', async (t) => {
    await stop(vm);
    vm = undefined;
    // Two volume arguments with no device behind them: one malformed, one naming no 9p share.
    const bogus = ' hutch.vol=bad hutch.vol=nodev:2f6e6f2f646576:rw';
    vm = await boot(manifest, join(work, 'run2'), disk, user, [], bogus);
    t.diagnostic(`boot without volumes, disk already full size: ${vm.bootMs.toFixed(0)} ms`);
    assert.equal((await sh(vm, 'grep -c " 9p " /proc/mounts')).out.trim(), '0');
    assert.equal(await ok(vm, 'cat "/mnt/host rw/guest-file" 2>/dev/null || echo absent'), 'absent\n');
    const [size] = (await ok(vm, 'df -B1 --output=size / | tail -1')).trim().split(/\s+/);
    assert.ok(Number(size) > 3.8 * GiB, `df / says ${size}`);
    // The console tap works (the agent logs each host connection), and said nothing of growing.
    for (let i = 0; i < 200 && !/host connected/.test(vm.console()); i++)
      await new Promise((r) => setTimeout(r, 10));
    assert.match(vm.console(), /host connected/);
    assert.doesNotMatch(vm.console(), /grew \//);
    // hutch.vol= is for protocol-1 agents: this one neither mounts nor parses it.
    assert.doesNotMatch(vm.console(), /hutch\.vol|volume nodev/);
    assert.equal(await ok(vm, 'python3 -c "print(6*7)"'), '42\n');
  });

  test('CONFIGURE grows / when the disk grew since boot (a restore onto a larger disk)', async (t) => {
    assert.ok(vm);
    const booted = vm;
    // 6 GiB and 1 MiB: the last 1 MiB cannot hold a block group's inode table, so the kernel
    // stops at 6 GiB, and a later check must not try (or report) again.
    const size = 6 * GiB + 2 ** 20;
    const qmp = await QmpClient.connect(runPaths(join(work, 'run2')).qmp);
    try {
      await qmp.execute('block_resize', { device: 'root', size });
    } finally {
      qmp.close();
    }
    assert.equal((await ok(booted, 'cat /sys/block/vda/size')).trim(), String(size / 512));
    const t0 = performance.now();
    await booted.agent.configure({ growRoot: true, timeNs: BigInt(Date.now()) * 1_000_000n });
    t.diagnostic(`CONFIGURE with a 4 -> 6 GiB resize: ${(performance.now() - t0).toFixed(0)} ms`);
    const [fs] = (await ok(booted, 'df -B1 --output=size / | tail -1')).trim().split(/\s+/);
    assert.ok(Number(fs) > 5.7 * GiB && Number(fs) <= 6 * GiB, `df / says ${fs}`);
    const t1 = performance.now();
    await booted.agent.configure({ growRoot: true, timeNs: BigInt(Date.now()) * 1_000_000n });
    t.diagnostic(`CONFIGURE, / already as large as it gets: ${(performance.now() - t1).toFixed(0)} ms`);
    await new Promise((r) => setTimeout(r, 200)); // let the console catch up
    const grew = booted.console().match(/grew \/ from \d+ to (\d+) blocks/g) ?? [];
    assert.deepEqual(grew, [`grew / from ${GiB / 1024} to ${(6 * GiB) / 4096} blocks`]);
  });
});
