import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { WebSocket } from 'ws';
import { root, type TestDaemon } from './daemon.js';

/** Runs the real CLI; `env` is added to the test's environment. */
export function hutchCli(
  args: string[],
  env: Record<string, string> = {},
): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('node', [join(root, 'bin', 'hutch.js'), ...args], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
    timeout: 120_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** `hutch user add` + `hutch api-key create --json` on the daemon's state dir (no daemon involved). */
export function addUser(
  stateDir: string,
  name: string,
  quota: string[] = [],
): { id: string; api_key: string; expires_at: number } {
  const u = hutchCli(['user', 'add', name, '--state-dir', stateDir, '--json', ...quota]);
  if (u.status !== 0) throw new Error(`user add failed: ${u.stdout}${u.stderr}`);
  const k = hutchCli([
    'api-key',
    'create',
    '--user',
    name,
    '--name',
    'test',
    '--state-dir',
    stateDir,
    '--json',
  ]);
  if (k.status !== 0) throw new Error(`api-key create failed: ${k.stdout}${k.stderr}`);
  return JSON.parse(k.stdout) as { id: string; api_key: string; expires_at: number };
}

/** POST /api/v1/auth/token: the API key's JWT (the exchange every client does). */
export async function exchange(
  d: Pick<TestDaemon, 'url'>,
  apiKey: string,
): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(new URL('/api/v1/auth/token', d.url), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ api_key: apiKey }),
  });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** A user with a key and a fresh token. */
export async function userWithToken(
  d: Pick<TestDaemon, 'url' | 'stateDir'>,
  name: string,
  quota: string[] = [],
): Promise<{ user: string; apiKey: string; keyId: string; token: string }> {
  const k = addUser(d.stateDir, name, quota);
  const t = await exchange(d, k.api_key);
  if (t.status !== 200) throw new Error(`exchange failed: ${JSON.stringify(t.body)}`);
  return { user: name, apiKey: k.api_key, keyId: k.id, token: t.body.token as string };
}

/** A REST call with an optional bearer token (raw header value when `header` is given). */
export async function authed(
  base: string,
  method: string,
  path: string,
  auth: { token?: string; header?: string } = {},
  body?: unknown,
): Promise<{ status: number; body: Record<string, unknown> & { code?: string } }> {
  const headers: Record<string, string> = {};
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (auth.header !== undefined) headers.authorization = auth.header;
  else if (auth.token) headers.authorization = `Bearer ${auth.token}`;
  const res = await fetch(new URL(path, base), {
    method,
    headers,
    body: body === undefined ? null : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
}

/** `POST /v1/machines` as `token`'s user; the new machine's body (it must be 201). */
export async function createMachineAs(
  base: string,
  token: string,
  body: Record<string, unknown>,
): Promise<Record<string, unknown> & { id: string }> {
  const r = await authed(base, 'POST', '/v1/machines', { token }, body);
  if (r.status !== 201) throw new Error(`create failed (${r.status}): ${JSON.stringify(r.body)}`);
  return r.body as Record<string, unknown> & { id: string };
}

export interface CliRun {
  status: number | null;
  stdout: string;
  stderr: string;
}

/**
 * The real CLI against daemon `d`, without blocking the test's event loop (so several can run at
 * once, as a fan-out does); killed after 180 s.
 */
export function runHutch(d: Pick<TestDaemon, 'url'>, ...args: string[]): Promise<CliRun> {
  return new Promise((resolve, reject) => {
    const p = spawn('node', [join(root, 'bin', 'hutch.js'), ...args], {
      env: { ...process.env, HUTCH_URL: d.url },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (b: Buffer) => {
      stdout += b.toString();
    });
    p.stderr.on('data', (b: Buffer) => {
      stderr += b.toString();
    });
    const timer = setTimeout(() => p.kill('SIGKILL'), 180_000);
    p.on('error', reject);
    p.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}

/** The upgrade's answer: the HTTP status of a refusal, or 101 when it opened. */
export function upgradeStatus(url: string, headers: Record<string, string>): Promise<number> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { headers });
    ws.on('unexpected-response', (_req, res) => {
      resolve(res.statusCode ?? 0);
      ws.terminate();
    });
    ws.on('open', () => {
      resolve(101);
      ws.close();
    });
    ws.on('error', () => {});
  });
}
