import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { root, type TestDaemon } from './daemon.js';

/**
 * A gRPC client of a test daemon, made the way the spec's Node snippet makes one: the checked-in
 * proto loaded with @grpc/proto-loader, the service from loadPackageDefinition, insecure
 * credentials, and the JWT in `authorization` metadata.
 */
export const protoFile = join(root, 'spec', 'vm-api.proto');

export type Msg = Record<string, unknown>;

export interface BoxdClient {
  raw: grpc.Client & Record<string, (...args: unknown[]) => unknown>;
  meta(token?: string): grpc.Metadata;
  /** A unary call; rejects with the ServiceError. */
  call<T = Msg>(method: string, req: Msg, token?: string | null): Promise<T>;
  close(): void;
}

export function boxdClient(address: string, token: string, options: grpc.ChannelOptions = {}): BoxdClient {
  const def = protoLoader.loadSync(protoFile, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const proto = grpc.loadPackageDefinition(def) as unknown as {
    boxd: { api: { v1: { BoxdApi: grpc.ServiceClientConstructor } } };
  };
  const raw = new proto.boxd.api.v1.BoxdApi(address, grpc.credentials.createInsecure(), {
    // DownloadFile answers up to 64 MiB in one message (the client's default limit is 4 MiB).
    'grpc.max_receive_message_length': 80 * 1024 * 1024,
    'grpc.max_send_message_length': 80 * 1024 * 1024,
    // Each client its own connection: grpc-js otherwise shares one between clients of the same
    // address, and one client's streams would queue another's behind the server's stream limit.
    'grpc.use_local_subchannel_pool': 1,
    ...options,
  }) as BoxdClient['raw'];
  const meta = (t = token): grpc.Metadata => {
    const m = new grpc.Metadata();
    if (t !== '') m.set('authorization', `Bearer ${t}`);
    return m;
  };
  return {
    raw,
    meta,
    call: <T>(method: string, req: Msg, t: string | null = token) =>
      new Promise<T>((resolve, reject) => {
        const fn = raw[method] as (
          r: Msg,
          m: grpc.Metadata,
          o: grpc.CallOptions,
          cb: (e: grpc.ServiceError | null, v: T) => void,
        ) => void;
        fn.call(
          raw,
          req,
          t === null ? new grpc.Metadata() : meta(t),
          { deadline: Date.now() + 300_000 },
          (e, v) => (e ? reject(e) : resolve(v)),
        );
      }),
    close: () => raw.close(),
  };
}

/** Expects a call to fail with `code`; returns the error's message. */
export async function rejectsWith(p: Promise<unknown>, code: grpc.status): Promise<string> {
  try {
    await p;
  } catch (e) {
    const err = e as grpc.ServiceError;
    if (err.code !== code)
      throw new Error(`expected ${grpc.status[code]}, got ${grpc.status[err.code]}: ${err.details}`);
    return err.details;
  }
  throw new Error(`expected ${grpc.status[code]}, the call succeeded`);
}

/**
 * A token for `user` through the real flow: the user and an API key made by the CLI on the
 * daemon's state dir (`hutch user add`, `hutch api-key create --user --json`; they need no
 * daemon), then the key exchanged at POST /api/v1/auth/token.
 */
export async function tokenFor(d: TestDaemon, user: string): Promise<string> {
  const cli = (args: string[]) =>
    spawnSync('node', [join(root, 'bin', 'hutch.js'), ...args, '--state-dir', d.stateDir], {
      encoding: 'utf8',
    });
  const add = cli(['user', 'add', user, '--json']);
  // An existing user (the local admin) is fine: only its key is new.
  if (add.status !== 0 && !add.stdout.includes('USER_EXISTS'))
    throw new Error(`hutch user add ${user}: ${add.stdout}${add.stderr}`);
  const key = cli(['api-key', 'create', '--user', user, '--name', 'test', '--json']);
  if (key.status !== 0) throw new Error(`hutch api-key create: ${key.stdout}${key.stderr}`);
  const apiKey = (JSON.parse(key.stdout) as { api_key: string }).api_key;
  const r = await fetch(new URL('/api/v1/auth/token', d.url), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ api_key: apiKey }),
  });
  const body = (await r.json()) as { token?: string };
  if (r.status !== 200 || !body.token)
    throw new Error(`token exchange failed: ${r.status} ${JSON.stringify(body)}`);
  return body.token;
}
