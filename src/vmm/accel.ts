import { spawn } from 'node:child_process';
import { accessSync, constants, readFileSync, writeFileSync } from 'node:fs';
import type { Accel } from './qemu.js';

export interface AccelChoice {
  accel: Accel;
  /** Why: "forced by config", "kvm probe booted in 412 ms", "kvm probe failed: …". */
  reason: string;
}

/**
 * Chooses the accelerator by booting the real guest kernel under KVM, not by looking for
 * /dev/kvm: on PVM-based hosts /dev/kvm exists but stock kernels die with an emulation failure.
 * The probe boots with no root disk; reaching the "cannot mount root" panic proves the kernel ran
 * its whole early boot (timers, SMP, virtio probing) under KVM.
 */
export async function chooseAccel(opts: {
  forced: 'auto' | 'kvm' | 'tcg';
  qemu: string;
  kernel: string;
  timeoutMs?: number;
  /** Remembers the probe's answer for this host boot and kernel, so restarts don't pay for it again. */
  cacheFile?: string;
}): Promise<AccelChoice> {
  if (opts.forced !== 'auto') return { accel: opts.forced, reason: 'forced by config' };
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return { accel: 'tcg', reason: '/dev/kvm is not available' };
  }
  const key = `${bootId()} ${opts.qemu} ${opts.kernel}`;
  if (opts.cacheFile) {
    try {
      const cached = JSON.parse(readFileSync(opts.cacheFile, 'utf8')) as { key: string; choice: AccelChoice };
      if (cached.key === key)
        return { ...cached.choice, reason: `${cached.choice.reason} (probed earlier this boot)` };
    } catch {
      // no cache yet
    }
  }
  const r = await probeKvm(opts.qemu, opts.kernel, opts.timeoutMs ?? 8000);
  const choice: AccelChoice = r.ok
    ? { accel: 'kvm', reason: `kvm probe booted in ${r.ms} ms` }
    : { accel: 'tcg', reason: `kvm probe failed: ${r.why}` };
  if (opts.cacheFile) writeFileSync(opts.cacheFile, JSON.stringify({ key, choice }));
  return choice;
}

function bootId(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown';
  }
}

function probeKvm(
  qemu: string,
  kernel: string,
  timeoutMs: number,
): Promise<{ ok: boolean; ms: number; why: string }> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    const child = spawn(
      qemu,
      [
        '-M',
        'microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off',
        '-accel',
        'kvm',
        '-cpu',
        'host',
        '-m',
        '128M',
        '-smp',
        '1',
        '-nodefaults',
        '-no-user-config',
        '-display',
        'none',
        '-no-reboot',
        '-serial',
        'stdio',
        '-kernel',
        kernel,
        '-append',
        'console=ttyS0 panic=-1 root=/dev/vda',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let done = false;
    const finish = (ok: boolean, why: string): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      resolve({ ok, ms: Date.now() - t0, why });
    };
    const onData = (b: Buffer): void => {
      out = (out + b.toString('latin1')).slice(-16_384);
      if (/Kernel panic|VFS: Unable to mount root|Cannot open root device/.test(out)) finish(true, '');
      else if (/KVM internal error|emulation failure|failed to initialize kvm|KVM: entry failed/i.test(out))
        finish(
          false,
          (
            /(KVM internal error[^\n]*|emulation failure[^\n]*|failed to initialize kvm[^\n]*)/i.exec(
              out,
            )?.[1] ?? 'KVM error'
          ).trim(),
        );
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', (e) => finish(false, e.message));
    child.on('close', (code) =>
      finish(
        false,
        `qemu exited (${code}) before the kernel finished booting: ${out.trim().split('\n').slice(-2).join(' | ')}`,
      ),
    );
    const timer = setTimeout(() => finish(false, `no boot within ${timeoutMs} ms`), timeoutMs);
  });
}
