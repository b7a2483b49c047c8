import { readFileSync } from 'node:fs';
import { AuthService } from '../auth/auth-service.js';
import type { UserRow } from '../auth/auth-store.js';
import { bearerFor, exchangeApiKey, removeLogin, saveLogin } from '../client/credentials.js';
import { ApiError, HutchClient } from '../client/http-client.js';
import { clientCredentialsEnv, clientUrl, loadConfig } from '../config.js';
import { HutchError } from '../errors.js';
import { type Flags, parseCommand, printJson } from './common.js';

export const accountsUsage = `Accounts (user and api-key work on the state directory: no daemon or token needed, only its
file permissions):
  hutch user add NAME [--max-vms N] [--max-memory-mb N] [--max-vcpus N] [--json]
                                   default quota: 10 running machines/boxes/VMs (HUTCH_USER_MAX_VMS)
  hutch user list [--json]
  hutch user quota NAME [--max-vms N|none] [--max-memory-mb N|none] [--max-vcpus N|none] [--json]
  hutch api-key create --user NAME [--name LABEL] [--expires-in SECONDS] [--json]
                                   prints the key once: {"id","api_key","expires_at"}
  hutch api-key list --user NAME [--json]  |  hutch api-key delete --user NAME ID
                                   deleting a key revokes every token exchanged for it
  hutch api-key create|list|delete …  (without --user: your own keys, through the API)
  hutch token create [--expires-in S] | list | revoke JTI   your tokens, through the API
  hutch login --api-key KEY|- [--url U] [--json]   checks the key and saves it for this server
                                   (~/.config/hutch/credentials.json, or $HUTCH_CREDENTIALS)
  hutch logout [--url U]  |  hutch whoami [--url U] [--json]
  Requests carry $HUTCH_TOKEN, else $HUTCH_API_KEY (exchanged), else the saved login; with none,
  a loopback daemon takes them as its local admin.`;

const flagSpec = {
  json: { type: 'boolean' },
  url: { type: 'string' },
  'state-dir': { type: 'string' },
  config: { type: 'string' },
  user: { type: 'string' },
  name: { type: 'string' },
  'expires-in': { type: 'string' },
  'api-key': { type: 'string' },
  'max-vms': { type: 'string' },
  'max-memory-mb': { type: 'string' },
  'max-vcpus': { type: 'string' },
} as const;

/** `hutch user|api-key|login|logout|whoami …`: one JSON document per command with --json, errors included. */
export async function accountsCommand(cmd: string, argv: string[]): Promise<void> {
  const { flags, positionals } = parseCommand(argv, flagSpec, accountsUsage);
  const json = flags.json === true;
  try {
    await run(cmd, flags, positionals, json);
  } catch (e) {
    const { code, message } = describe(e);
    if (json) printJson({ code, message });
    else process.stderr.write(`hutch: ${message}\n`);
    process.exitCode = code === 'USAGE' ? 2 : 1;
  }
}

function describe(e: unknown): { code: string; message: string } {
  if (e instanceof HutchError || e instanceof ApiError) return { code: e.code, message: e.message };
  const err = e as { code?: unknown; message?: string };
  return { code: typeof err.code === 'string' ? err.code : 'ERROR', message: err.message ?? String(e) };
}

class Usage extends Error {
  readonly code = 'USAGE';
}

async function run(cmd: string, flags: Flags, pos: string[], json: boolean): Promise<void> {
  const url = clientUrl(flags.url as string | undefined);
  switch (cmd) {
    case 'user':
      return withAuth(flags, (auth) => userCommand(auth, flags, pos, json));
    case 'api-key':
      // With --user: on the state dir (bootstrap). Without: your own keys, through the API.
      if (flags.user === undefined) return remoteApiKeyCommand(url, flags, pos, json);
      return withAuth(flags, (auth) => apiKeyCommand(auth, flags, pos, json));
    case 'token':
      return tokenCommand(url, flags, pos, json);
    case 'login': {
      let key = (flags['api-key'] as string | undefined) ?? clientCredentialsEnv().apiKey;
      if (key === '-') key = readFileSync(0, 'utf8').trim();
      if (!key) throw new Usage('usage: hutch login --api-key KEY|- [--url U]');
      const t = await exchangeApiKey(url, key);
      const path = saveLogin(url, {
        api_key: key,
        user_id: t.user_id,
        token: t.token,
        expires_at: t.expires_at,
      });
      if (json) printJson({ user_id: t.user_id, url: new URL(url).origin, credentials: path });
      else process.stdout.write(`logged in to ${new URL(url).origin} as ${t.user_id} (saved in ${path})\n`);
      return;
    }
    case 'logout': {
      const had = removeLogin(url);
      if (json) printJson({ removed: had });
      else process.stdout.write(had ? 'logged out\n' : 'no saved login for this server\n');
      return;
    }
    case 'whoami': {
      const me = await new HutchClient(url, bearerFor(url)).request<{ user_id: string; via: string }>(
        'GET',
        '/v1/whoami',
      );
      if (json) printJson(me);
      else process.stdout.write(`${me.user_id} (${me.via})\n`);
      return;
    }
  }
  throw new Usage(`unknown command ${cmd}`);
}

/** Opens the state directory's accounts (auth.db) for a bootstrap command. */
function withAuth(flags: Flags, fn: (auth: AuthService) => void): void {
  const config = loadConfig(
    { stateDir: flags['state-dir'] as string | undefined },
    undefined,
    flags.config as string | undefined,
  );
  const auth = AuthService.open(config.stateDir, config);
  try {
    auth.ensureAdmin();
    fn(auth);
  } finally {
    auth.close();
  }
}

/** A quota flag: a whole number, `none` (no limit: null), or absent (undefined: unchanged/default). */
function quotaFlag(flags: Flags, name: string): number | null | undefined {
  const v = flags[name];
  if (v === undefined) return undefined;
  if (v === 'none') return null;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0)
    throw new Usage(`--${name} wants a whole number or "none", got ${String(v)}`);
  return n;
}

function quotaFlags(flags: Flags): Partial<Pick<UserRow, 'max_vms' | 'max_memory_mb' | 'max_vcpus'>> {
  const q: Partial<Pick<UserRow, 'max_vms' | 'max_memory_mb' | 'max_vcpus'>> = {};
  const vms = quotaFlag(flags, 'max-vms');
  const mem = quotaFlag(flags, 'max-memory-mb');
  const cpus = quotaFlag(flags, 'max-vcpus');
  if (vms !== undefined) q.max_vms = vms;
  if (mem !== undefined) q.max_memory_mb = mem;
  if (cpus !== undefined) q.max_vcpus = cpus;
  return q;
}

function userJson(u: UserRow): Record<string, unknown> {
  return {
    user_id: u.name,
    created_at: u.created_at,
    quota: { max_vms: u.max_vms, max_memory_mb: u.max_memory_mb, max_vcpus: u.max_vcpus },
  };
}

function userCommand(auth: AuthService, flags: Flags, pos: string[], json: boolean): void {
  const [sub, name] = pos;
  if (sub === 'add' && name) {
    const u = auth.addUser(name, quotaFlags(flags));
    if (json) printJson(userJson(u));
    else process.stdout.write(`${u.name}\n`);
    return;
  }
  if (sub === 'list' || sub === 'ls') {
    const users = auth.store.users().map(userJson);
    if (json) printJson({ users });
    else for (const u of users) process.stdout.write(`${u.user_id}\t${JSON.stringify(u.quota)}\n`);
    return;
  }
  if (sub === 'quota' && name) {
    const u = auth.setQuota(name, quotaFlags(flags));
    if (json) printJson(userJson(u));
    else process.stdout.write(`${u.name}\t${JSON.stringify(userJson(u).quota)}\n`);
    return;
  }
  throw new Usage('usage: hutch user add NAME | user list | user quota NAME [--max-vms N] …');
}

function client(url: string): HutchClient {
  return new HutchClient(url, bearerFor(url));
}

function expiresIn(flags: Flags): number {
  const exp = flags['expires-in'] === undefined ? 0 : Number(flags['expires-in']);
  if (!Number.isInteger(exp) || exp < 0)
    throw new Usage('--expires-in wants whole seconds (0 = the default)');
  return exp;
}

async function remoteApiKeyCommand(url: string, flags: Flags, pos: string[], json: boolean): Promise<void> {
  const c = client(url);
  const [sub, id] = pos;
  if (sub === 'create') {
    const k = await c.request<{ api_key: string }>('POST', '/api/v1/api-keys', {
      name: (flags.name as string | undefined) ?? '',
      expires_in_secs: expiresIn(flags),
    });
    if (json) printJson(k);
    else process.stdout.write(`${k.api_key}\n`);
    return;
  }
  if (sub === 'list' || sub === 'ls') {
    const r = await c.request<{ keys: { id: string; key_prefix: string; name: string }[] }>(
      'GET',
      '/api/v1/api-keys',
    );
    if (json) printJson(r);
    else for (const k of r.keys) process.stdout.write(`${k.id}\t${k.key_prefix}…\t${k.name}\n`);
    return;
  }
  if ((sub === 'delete' || sub === 'rm') && id) {
    await c.request('DELETE', `/api/v1/api-keys/${encodeURIComponent(id)}`);
    if (json) printJson({ deleted: id });
    return;
  }
  throw new Usage('usage: hutch api-key create [--name LABEL] [--expires-in S] | list | delete ID');
}

async function tokenCommand(url: string, flags: Flags, pos: string[], json: boolean): Promise<void> {
  const c = client(url);
  const [sub, jti] = pos;
  if (sub === 'create') {
    const t = await c.request<{ token: string }>('POST', '/api/v1/tokens', {
      expires_in_secs: expiresIn(flags),
    });
    if (json) printJson(t);
    else process.stdout.write(`${t.token}\n`);
    return;
  }
  if (sub === 'list' || sub === 'ls') {
    const r = await c.request<{ tokens: { jti: string; expires_at: number }[] }>('GET', '/api/v1/tokens');
    if (json) printJson(r);
    else
      for (const t of r.tokens)
        process.stdout.write(`${t.jti}\texpires ${new Date(t.expires_at * 1000).toISOString()}\n`);
    return;
  }
  if ((sub === 'revoke' || sub === 'rm') && jti) {
    await c.request('DELETE', `/api/v1/tokens/${encodeURIComponent(jti)}`);
    if (json) printJson({ revoked: jti });
    return;
  }
  throw new Usage('usage: hutch token create [--expires-in S] | list | revoke JTI');
}

function apiKeyCommand(auth: AuthService, flags: Flags, pos: string[], json: boolean): void {
  const user = flags.user as string | undefined;
  if (!user) throw new Usage('hutch api-key works on the state directory: name the user with --user NAME');
  const p = auth.principalFor(user, 'local');
  const [sub, id] = pos;
  if (sub === 'create') {
    const exp = flags['expires-in'] === undefined ? 0 : Number(flags['expires-in']);
    if (!Number.isInteger(exp) || exp < 0) throw new Usage('--expires-in wants whole seconds (0 = never)');
    const k = auth.createApiKeyFor(user, (flags.name as string | undefined) ?? '', exp);
    if (json) printJson(k);
    else process.stdout.write(`${k.api_key}\n`);
    return;
  }
  if (sub === 'list' || sub === 'ls') {
    if (!auth.store.user(user))
      throw new HutchError('USER_NOT_FOUND', `no user named ${JSON.stringify(user)}`);
    const keys = auth.listApiKeys(p);
    if (json) printJson({ keys });
    else for (const k of keys) process.stdout.write(`${k.id}\t${k.key_prefix}…\t${k.name}\n`);
    return;
  }
  if ((sub === 'delete' || sub === 'rm') && id) {
    auth.deleteApiKey(p, id);
    if (json) printJson({ deleted: id });
    return;
  }
  throw new Usage('usage: hutch api-key create|list|delete --user NAME …');
}
