import { chmodSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { type ClientCredentialsEnv, clientCredentialsEnv } from '../config.js';

/** What `hutch login` keeps per server: the API key, and the last token it was exchanged for. */
interface Saved {
  api_key: string;
  user_id?: string;
  token?: string;
  expires_at?: number;
}

interface CredentialsFile {
  servers: Record<string, Saved>;
}

function read(path: string): CredentialsFile {
  try {
    const f = JSON.parse(readFileSync(path, 'utf8')) as CredentialsFile;
    return f && typeof f.servers === 'object' ? f : { servers: {} };
  } catch {
    return { servers: {} };
  }
}

function write(path: string, f: CredentialsFile): void {
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  // Written whole and renamed into place, owner-only from the first byte: it holds an API key.
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(f, null, 2)}\n`, { mode: 0o600 });
  chmodSync(tmp, 0o600);
  renameSync(tmp, path);
}

/** The server's key as written in the file: its origin (`http://host:port`). */
function serverKey(url: string): string {
  return new URL(url).origin;
}

export function saveLogin(url: string, saved: Saved, env = clientCredentialsEnv()): string {
  const path = env.file;
  const f = read(path);
  f.servers[serverKey(url)] = saved;
  write(path, f);
  return path;
}

/** Forgets a server's credentials; whether there were any. */
export function removeLogin(url: string, env = clientCredentialsEnv()): boolean {
  const path = env.file;
  const f = read(path);
  const key = serverKey(url);
  if (!f.servers[key]) return false;
  delete f.servers[key];
  write(path, f);
  return true;
}

/** Exchanges an API key at the server: `POST /api/v1/auth/token`. */
export async function exchangeApiKey(
  url: string,
  apiKey: string,
): Promise<{ token: string; expires_at: number; user_id: string }> {
  const res = await fetch(new URL('/api/v1/auth/token', url), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ api_key: apiKey }),
  });
  const body = (await res.json().catch(() => ({}))) as Record<string, unknown>;
  if (!res.ok)
    throw Object.assign(new Error(String(body.message ?? res.statusText)), {
      status: res.status,
      code: String(body.code ?? `HTTP_${res.status}`),
    });
  return body as { token: string; expires_at: number; user_id: string };
}

/**
 * The `authorization` header value for requests to `url`, or undefined to send none (the local
 * admin on a loopback daemon): `$HUTCH_TOKEN` as is, else `$HUTCH_API_KEY` exchanged, else the
 * login saved for that server, its token reused until a minute before it expires.
 */
export function bearerFor(
  url: string,
  env: ClientCredentialsEnv = clientCredentialsEnv(),
): () => Promise<string | undefined> {
  let cached: { token: string; expires_at: number } | undefined;
  const fresh = (t: { expires_at: number } | undefined): boolean =>
    t !== undefined && t.expires_at - 60 > Date.now() / 1000;
  return async () => {
    if (env.token) return `Bearer ${env.token}`;
    if (cached && fresh(cached)) return `Bearer ${cached.token}`;
    if (env.apiKey) {
      cached = await exchangeApiKey(url, env.apiKey);
      return `Bearer ${cached.token}`;
    }
    const saved = read(env.file).servers[serverKey(url)];
    if (!saved) return undefined;
    if (saved.token && saved.expires_at !== undefined && fresh({ expires_at: saved.expires_at })) {
      cached = { token: saved.token, expires_at: saved.expires_at };
      return `Bearer ${saved.token}`;
    }
    cached = await exchangeApiKey(url, saved.api_key);
    try {
      saveLogin(url, { ...saved, token: cached.token, expires_at: cached.expires_at }, env);
    } catch {
      // A read-only home: the token is still good for this run.
    }
    return `Bearer ${cached.token}`;
  };
}
