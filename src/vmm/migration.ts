import {
  chmodSync,
  closeSync,
  createReadStream,
  createWriteStream,
  fsyncSync,
  openSync,
  renameSync,
  rmSync,
  statSync,
} from 'node:fs';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import type { Qmp } from './hypervisor.js';
import { type CopyOptions, copyMemoryFile } from './memory-file.js';

/**
 * Saving and loading a machine's device state (and, unless ignoreShared, its RAM) through QEMU
 * migration. The stream goes over a Unix socket that the daemon owns, not `exec:` or a file URI:
 * QEMU runs under seccomp with spawn=deny (so no `exec:cat`), and 7.2 has no `file:` URI.
 *
 * ignoreShared (x-ignore-shared): RAM in a shared file-backed memory backend is left out of the
 * stream, because the file already holds it. That makes a template snapshot's state ~200 KB.
 */
export interface MigrationResult {
  bytes: number;
  ms: number;
}

async function setCaps(qmp: Qmp, ignoreShared: boolean): Promise<void> {
  await qmp.execute('migrate-set-capabilities', {
    capabilities: [{ capability: 'x-ignore-shared', state: ignoreShared }],
  });
}

/**
 * Writes the stopped machine's state to `outFile` (atomically: a crash leaves no file that
 * looks complete). The caller stops the vCPUs first and decides whether to `cont` after.
 */
export async function saveState(
  qmp: Qmp,
  runDir: string,
  outFile: string,
  opts: {
    ignoreShared: boolean;
    timeoutMs?: number;
    maxBytesPerSecond?: number;
    /** fsync before the rename (default): off for a state only this run needs (a branch's). */
    durable?: boolean;
    /** Leave the result at `${outFile}.partial` for the caller to rename (default: renamed here). */
    commit?: boolean;
  },
): Promise<MigrationResult> {
  const t0 = performance.now();
  await setCaps(qmp, opts.ignoreShared);
  // QEMU throttles migration to 128 MiB/s by default, which would make a suspend of a busy
  // machine take seconds for no reason: the stream goes to a local file.
  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': opts.maxBytesPerSecond || 64 * 1024 ** 3 });
  const sockPath = join(runDir, 'mig-out.sock');
  rmSync(sockPath, { force: true });
  const tmp = `${outFile}.partial`;
  // The guest's whole memory: nobody but the daemon reads it.
  const out = createWriteStream(tmp, { mode: 0o600 });
  let received = false;
  let connected: () => void = () => {};
  const accepted = new Promise<void>((r) => {
    connected = r;
  });
  const server = createServer((s) => {
    received = true;
    connected();
    s.pipe(out);
  });
  const written = new Promise<void>((resolve, reject) => {
    out.on('finish', resolve);
    out.on('error', reject);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(sockPath, () => resolve());
  });
  // QEMU connects after dropping root; the directory (owned by QEMU's user) is the guard.
  chmodSync(sockPath, 0o666);
  try {
    await qmp.execute('migrate', { uri: `unix:${sockPath}` });
    await waitMigration(qmp, opts.timeoutMs ?? 60_000);
    // A small state (RAM left out) fits in the socket's buffer: QEMU can report the migration
    // complete before this side has even accepted the connection.
    await Promise.race([accepted, new Promise((r) => setTimeout(r, 5000).unref())]);
    if (!received) throw new Error('QEMU never connected to the migration socket');
    await written;
    if (opts.durable !== false) {
      const fd = openSync(tmp, 'r');
      fsyncSync(fd);
      closeSync(fd);
    }
    if (opts.commit === false) return { bytes: statSync(tmp).size, ms: performance.now() - t0 };
    renameSync(tmp, outFile);
    return { bytes: statSync(outFile).size, ms: performance.now() - t0 };
  } catch (e) {
    out.destroy();
    rmSync(tmp, { force: true });
    throw e;
  } finally {
    server.close();
    rmSync(sockPath, { force: true });
  }
}

async function waitMigration(qmp: Qmp, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const st = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (st.status === 'completed') return;
    if (st.status === 'failed' || st.status === 'cancelled')
      throw new Error(`migration ${st.status}${st['error-desc'] ? `: ${st['error-desc']}` : ''}`);
    if (Date.now() > deadline) {
      await qmp.execute('migrate_cancel').catch(() => {});
      throw new Error(`migration did not complete in ${timeoutMs} ms`);
    }
    await new Promise((r) => setTimeout(r, 2));
  }
}

/**
 * Loads `stateFile` into a QEMU started with `-incoming defer` (and -S, so it stays paused
 * until the caller says `cont`). Resolves when QEMU has the whole machine.
 */
export async function loadState(
  qmp: Qmp,
  runDir: string,
  stateFile: string,
  opts: { ignoreShared: boolean; timeoutMs?: number },
): Promise<MigrationResult> {
  const t0 = performance.now();
  await setCaps(qmp, opts.ignoreShared);
  const sockPath = join(runDir, 'mig-in.sock');
  rmSync(sockPath, { force: true });
  await qmp.execute('migrate-incoming', { uri: `unix:${sockPath}` });
  await new Promise<void>((resolve, reject) => {
    const s = connect(sockPath);
    s.once('connect', () => createReadStream(stateFile).pipe(s));
    s.once('close', () => resolve());
    s.once('error', reject);
  });
  const deadline = Date.now() + (opts.timeoutMs ?? 60_000);
  for (;;) {
    const st = await qmp.execute<{ status: string }>('query-status');
    if (st.status === 'paused' || st.status === 'running' || st.status === 'postmigrate') break;
    if (st.status === 'inmigrate' || st.status === 'prelaunch') {
      if (Date.now() > deadline) throw new Error('restoring the machine state timed out');
      await new Promise((r) => setTimeout(r, 1));
      continue;
    }
    throw new Error(`restore failed: QEMU is ${st.status}`);
  }
  rmSync(sockPath, { force: true });
  return { bytes: statSync(stateFile).size, ms: performance.now() - t0 };
}

export interface MachineSave {
  /** Device state file written (the commit marker: it is renamed into place last). */
  state: string;
  /**
   * The machine's RAM file (shared, file-backed) and where its copy goes. Without it the RAM is
   * anonymous or privately mapped (a machine started by an older daemon) and goes in the stream.
   */
  memory?: { from: string; to: string; copy: CopyOptions } | undefined;
  maxBytesPerSecond?: number;
  /** fsync what is written (a suspend); a branch's files live only until its clone starts. */
  durable: boolean;
}

export interface MachineSaved {
  stateBytes: number;
  stateMs: number;
  memoryBytes: number;
  memoryMs: number;
  /** Whether RAM was left out of the stream (the copy holds it): restore with x-ignore-shared. */
  ignoreShared: boolean;
}

/**
 * Saves a stopped machine: its device state and a copy of its RAM file, side by side (the
 * device state leaves RAM out, so the two do not wait for each other while the source is
 * stopped). The state file is renamed into place only once both are complete, so one that exists
 * always has its memory beside it. The vCPUs must stay stopped throughout: the copy and the
 * device state describe the same instant only if the guest writes nothing in between.
 */
export async function saveMachine(qmp: Qmp, migDir: string, save: MachineSave): Promise<MachineSaved> {
  const memory = save.memory;
  const ignoreShared = memory !== undefined;
  const copy = async (): Promise<{ bytes: number; ms: number }> => {
    if (!memory) return { bytes: 0, ms: 0 };
    const t0 = performance.now();
    const bytes = await copyMemoryFile(memory.from, memory.to, { ...memory.copy, durable: save.durable });
    return { bytes, ms: performance.now() - t0 };
  };
  const state = saveState(qmp, migDir, save.state, {
    ignoreShared,
    durable: save.durable,
    commit: false,
    ...(save.maxBytesPerSecond ? { maxBytesPerSecond: save.maxBytesPerSecond } : {}),
  });
  const [c, s] = await Promise.allSettled([copy(), state]);
  if (c.status === 'rejected' || s.status === 'rejected') {
    rmSync(`${save.state}.partial`, { force: true });
    if (memory && c.status === 'fulfilled') rmSync(memory.to, { force: true });
    throw c.status === 'rejected' ? c.reason : (s as PromiseRejectedResult).reason;
  }
  renameSync(`${save.state}.partial`, save.state);
  return {
    stateBytes: s.value.bytes,
    stateMs: s.value.ms,
    memoryBytes: c.value.bytes,
    memoryMs: c.value.ms,
    ignoreShared,
  };
}

/** Where a branch's time went (ms), for the log: the source's pause split, then the clone's start. */
export function branchTimings(t: {
  t0: number;
  r0: number;
  r1: number;
  pauseMs: number;
  diskMs: number;
  restoredUs: number;
  agentUs: number;
  saved: MachineSaved | undefined;
}): Record<string, number> {
  const ms = (x: number): number => Math.round(x * 10) / 10;
  return {
    before_pause_ms: ms(t.r0 - t.t0 - t.pauseMs),
    pause_ms: ms(t.pauseMs),
    memory_copy_ms: ms(t.saved?.memoryMs ?? 0),
    memory_copy_mb: ms((t.saved?.memoryBytes ?? 0) / 2 ** 20),
    state_save_ms: ms(t.saved?.stateMs ?? 0),
    state_kb: ms((t.saved?.stateBytes ?? 0) / 1024),
    disk_copy_ms: ms(t.diskMs),
    clone_launch_ms: ms(t.r1 - t.r0 - (t.restoredUs + t.agentUs) / 1000),
    clone_load_cont_ms: ms(t.restoredUs / 1000),
    clone_agent_ms: ms(t.agentUs / 1000),
  };
}
