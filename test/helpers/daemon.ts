import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AuthService, authDbPath } from '../../src/auth/auth-service.js';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { loadConfig } from '../../src/config.js';
import { daemonTag } from '../../src/net/addressing.js';
import { repoRoot } from '../../src/paths.js';
import { memoryDirOf } from '../../src/vmm/memory-file.js';

export const root = repoRoot();
export const imageDir = process.env.HUTCH_IMAGE_DIR ?? '/var/lib/hutch/images';

export interface TestDaemon {
  url: string;
  stateDir: string;
  /** The boxes API's Unix socket, and its TCP URL when HUTCH_BOXES_LISTEN was set. */
  boxesSocket: string;
  boxesUrl: string | undefined;
  /** host:port of the gRPC API, unless HUTCH_GRPC_PORT=off. */
  grpcAddress: string | undefined;
  proc: ChildProcess;
  log: () => string;
  /** Stops the daemon (machines keep running, as in production). */
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Starts the real daemon (`hutch serve`) on a free port and a fresh state directory, sharing the
 * image cache so the template is built once per test run.
 */
export async function startDaemon(
  opts: {
    env?: Record<string, string>;
    stateDir?: string;
    /** A command the daemon runs under (it must exec its arguments: the pid stays node's). */
    wrap?: string[];
  } = {},
): Promise<TestDaemon> {
  const stateDir = opts.stateDir ?? mkdtempSync(join(tmpdir(), 'hutch-test-'));
  const argv = ['node', join(root, 'bin', 'hutch.js'), 'serve', '--port', '0', '--state-dir', stateDir];
  const [cmd = 'node', ...args] = [...(opts.wrap ?? []), ...argv];
  const proc = spawn(cmd, args, {
    // No warm pool unless a test asks for one: pooled QEMUs would compete for the 2 cores and
    // show up in the per-daemon process counts the tests check.
    env: {
      ...process.env,
      HUTCH_IMAGE_DIR: imageDir,
      HUTCH_LOG_LEVEL: 'info',
      HUTCH_POOL_SIZE: '0',
      // Test daemons run side by side: the gRPC API on a free port, not the default 9443.
      HUTCH_GRPC_PORT: '0',
      // The shared cache serves test runs of other checkouts too: a test daemon never prunes it.
      HUTCH_CACHE_GC_ON_START: '0',
      // Only the headless template unless a test asks for the desktop: its snapshots (cold
      // boots of ~30 s under TCG) would compete with every other test for the 2 cores.
      HUTCH_TEMPLATES: 'python',
      // Tests never reach real model providers, whatever keys the environment holds
      // (test/helpers/mock-llm.ts gatewayEnv points a daemon at the mock).
      HUTCH_ANTHROPIC_KEY: '',
      HUTCH_OPENROUTER_KEY: '',
      BORING_OPENROUTER_KEY: '',
      ...opts.env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout?.on('data', (b: Buffer) => {
    out += b.toString();
  });
  proc.stderr?.on('data', (b: Buffer) => {
    out += b.toString();
  });
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon did not start in 120 s:\n${out}`)), 120_000);
    const check = (): void => {
      const m = /hutch is serving (http:\/\/\S+)/.exec(out);
      // The boxes API line follows (unless its socket is off): wait for it too.
      const boxesReady = /boxes API on .*\n/.test(out) || opts.env?.HUTCH_BOXES_SOCKET === 'off';
      const grpcReady = /gRPC API on .*\n/.test(out) || opts.env?.HUTCH_GRPC_PORT === 'off';
      if (m?.[1] && boxesReady && grpcReady) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    };
    proc.stderr?.on('data', check);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`daemon exited (${code}) during start:\n${out}`));
    });
  });
  const boxesLine = /boxes API on (.*)/.exec(out)?.[1] ?? '';
  return {
    url,
    stateDir,
    boxesSocket: /unix:(\S+)/.exec(boxesLine)?.[1] ?? join(stateDir, 'boxes.sock'),
    boxesUrl: /(http:\/\/\S+)/.exec(boxesLine)?.[1],
    grpcAddress: /gRPC API on (\S+)/.exec(out)?.[1],
    proc,
    log: () => out,
    stop: (signal: NodeJS.Signals = 'SIGTERM') =>
      new Promise<void>((resolve) => {
        if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
        proc.once('exit', () => resolve());
        proc.kill(signal);
      }),
  };
}

export interface Json {
  status: number;
  body: Record<string, unknown>;
}

export async function api(
  base: string,
  method: string,
  path: string,
  body?: unknown,
  raw?: string,
): Promise<Json> {
  const res = await fetch(new URL(path, base), {
    method,
    headers: body === undefined && raw === undefined ? {} : { 'content-type': 'application/json' },
    body: raw ?? (body === undefined ? null : JSON.stringify(body)),
  });
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
}

/** QEMU processes whose command line mentions this state directory. */
export function qemusOf(stateDir: string): number[] {
  const pids: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const cmd = readFileSync(`/proc/${e}/cmdline`, 'utf8');
      if (cmd.includes('qemu-system') && cmd.includes(stateDir)) pids.push(Number(e));
    } catch {
      // exited meanwhile
    }
  }
  return pids;
}

/** The daemon's machines' RAM files (on tmpfs): one per machine whose QEMU runs. */
export function memoryFilesOf(stateDir: string): string[] {
  try {
    return readdirSync(memoryDirOf(stateDir)).sort();
  } catch {
    return [];
  }
}

/**
 * Headers that act as each user of the daemon's state dir: none for the local admin, a bearer
 * token (a cleanup key made on the state dir, exchanged) for every other user.
 */
async function everyUser(d: TestDaemon): Promise<Record<string, string>[]> {
  const out: Record<string, string>[] = [{}];
  if (!existsSync(authDbPath(d.stateDir))) return out;
  const auth = AuthService.open(d.stateDir, loadConfig({ stateDir: d.stateDir }, {}));
  try {
    for (const u of auth.store.users()) {
      if (u.name === 'local') continue;
      const k = auth.createApiKeyFor(u.name, 'test cleanup', 0);
      const res = await fetch(new URL('/api/v1/auth/token', d.url), {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ api_key: k.api_key }),
      });
      const t = (await res.json()) as { token?: string };
      if (t.token) out.push({ authorization: `Bearer ${t.token}` });
    }
  } finally {
    auth.close();
  }
  return out;
}

/**
 * Deletes every machine, stops the daemon, and fails if any QEMU process, run dir or memory
 * file is left.
 */
export async function cleanup(d: TestDaemon): Promise<void> {
  try {
    // Every user's machines and boxes: each user sees only their own, so each gets a token.
    for (const headers of await everyUser(d)) {
      const r = await fetch(new URL('/v1/machines', d.url), { headers });
      const body = (await r.json()) as { machines?: { id: string }[] };
      for (const m of body.machines ?? [])
        await (await fetch(new URL(`/v1/machines/${m.id}`, d.url), { method: 'DELETE', headers })).text();
      const boxes = new BoxesClient({ socketPath: d.boxesSocket }, headers);
      for (const b of (await boxes.list<{ boxes: { id: string }[] }>()).boxes) await boxes.remove(b.id, true);
    }
  } catch {
    // daemon already gone: the orphan check below still runs
  }
  await d.stop();
  const left = qemusOf(d.stateDir);
  for (const pid of left) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  let runDirs: string[] = [];
  try {
    runDirs = readdirSync(join(d.stateDir, 'run'));
  } catch {
    // no run dir
  }
  const memoryFiles = memoryFilesOf(d.stateDir);
  const net = networkLeftovers(d.stateDir);
  rmSync(d.stateDir, { recursive: true, force: true });
  rmSync(memoryDirOf(d.stateDir), { recursive: true, force: true });
  if (left.length) throw new Error(`orphan qemu processes left: ${left.join(', ')}`);
  if (runDirs.length) throw new Error(`orphan run dirs left: ${runDirs.join(', ')}`);
  if (memoryFiles.length) throw new Error(`orphan memory files left: ${memoryFiles.join(', ')}`);
  if (net.length) throw new Error(`network leftovers: ${net.join(', ')}`);
}

/** A networked machine's namespace end: the address its network mates and the world see it as. */
export function outsideAddress(stateDir: string, id: string): string {
  const netns = `hutch-${daemonTag(stateDir)}-${id}`;
  const j = JSON.parse(
    execFileSync('ip', ['-n', netns, '-j', '-4', 'addr', 'show', 'veth0'], { encoding: 'utf8' }),
  ) as { addr_info: { local: string }[] }[];
  return j[0]?.addr_info[0]?.local ?? '';
}

/**
 * What a daemon with this state dir left of guest networking: namespaces, host links, its host
 * firewall table (removed by a daemon stopping with no networked machine running) and slots.
 */
export function networkLeftovers(stateDir: string): string[] {
  const tag = daemonTag(stateDir);
  const out: string[] = [];
  if (existsSync('/run/netns'))
    for (const n of readdirSync('/run/netns')) if (n.startsWith(`hutch-${tag}-`)) out.push(`netns ${n}`);
  for (const l of readdirSync('/sys/class/net')) if (l.startsWith(`hv${tag}`)) out.push(`link ${l}`);
  try {
    execFileSync('nft', ['list', 'table', 'inet', `hutch-${tag}`], { stdio: 'ignore' });
    out.push(`nft table inet hutch-${tag}`);
  } catch {
    // no table: good
  }
  if (existsSync('/run/hutch/net-slots'))
    for (const f of readdirSync('/run/hutch/net-slots')) {
      try {
        if (readFileSync(join('/run/hutch/net-slots', f), 'utf8').startsWith(`hutch-${tag}-`))
          out.push(`slot ${f}`);
      } catch {
        // released meanwhile
      }
    }
  return out;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function waitFor<T>(
  what: string,
  fn: () => Promise<T | undefined>,
  timeoutMs: number,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

/** Waits until a synchronous condition holds (polling like waitFor). */
export async function until(what: string, cond: () => boolean, timeoutMs = 30_000): Promise<void> {
  await waitFor(what, async () => (cond() ? true : undefined), timeoutMs);
}

/** Waits until the daemon's warm pool holds `n` ready machines of `template` (GET /healthz). */
export function poolReady(
  d: Pick<TestDaemon, 'url'>,
  template: string,
  n: number,
  timeoutMs: number,
): Promise<true> {
  return waitFor(
    `a pool of ${n} ${template}`,
    async () => {
      const h = (await api(d.url, 'GET', '/healthz')).body as { pool: Record<string, { ready: number }> };
      return h.pool[template]?.ready === n ? true : undefined;
    },
    timeoutMs,
  );
}
