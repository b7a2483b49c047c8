import { createServer, type Server as NetServer } from 'node:net';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import { ReflectionService } from '@grpc/reflection';
import type { Accounts, Authenticator } from '../../auth/authenticator.js';
import type { Log } from '../../background.js';
import type { Engine } from '../../engine/engine.js';
import { authInterceptor } from './auth.js';
import { boxdHandlers } from './handlers.js';
import { loadBoxdProto } from './proto.js';
import { bindHandlers, type GrpcApp } from './rpc.js';

/**
 * The gRPC API (boxd.api.v1.BoxdApi) over HTTP/2 cleartext, with server reflection, as one more
 * adapter over the engine's actions.
 *
 * Bounds, so a hostile client can neither kill the daemon nor grow its memory without end:
 * - Messages: UploadFile and DownloadFile move a file as one message, which grpc-js holds whole
 *   in memory, so a message may be at most 64 MiB of file plus room for the other fields. 64 MiB
 *   covers the files these RPCs are for (configs, scripts, artifacts); bigger ones go through
 *   Exec or the REST API, which stream. Every other message is far smaller.
 * - Connections: the listening socket is ours (connections are injected into grpc-js) so at
 *   most `maxConnections` are open at once, like the HTTP APIs; each allows
 *   `maxStreamsPerConnection` concurrent streams (HTTP/2 SETTINGS).
 * - Calls that hold something while they run are capped across the server: streams (a guest
 *   session each) at `maxStreamCalls`, file transfers at `maxTransferCalls` (each may hold its
 *   64 MiB message a few times over while it arrives and is joined and decoded: ~4× measured at
 *   peak, GC lag included, so transfers hold at most ~1 GiB); and per user at a quarter and half
 *   of that, so one user cannot take every slot from the others (nor more than ~0.5 GiB).
 * - Idle and dead peers: keepalive pings find dead connections, and connections without calls
 *   are closed after a while.
 */
export interface GrpcApi {
  /** host:port it listens on. */
  address: string;
  close(): Promise<void>;
}

export interface GrpcOptions {
  host: string;
  /** 0: any free port. */
  port: number;
  authenticator: Authenticator;
  accounts: Accounts;
  log: Log;
  maxConnections: number;
  defaultImage?: string;
}

export const maxFileBytes = 64 * 1024 * 1024;
/** A file's message: the file plus its path (≤ 4096 bytes) and vm_id, with room to spare. */
export const maxMessageBytes = maxFileBytes + 64 * 1024;
const maxStreamsPerConnection = 100;
const maxStreamCalls = 256;
const maxStreamCallsPerUser = 64;
const maxTransferCalls = 4;
const maxTransferCallsPerUser = 2;

export async function startGrpcApi(engine: Engine, opts: GrpcOptions): Promise<GrpcApi> {
  const proto = loadBoxdProto();
  const app: GrpcApp = {
    engine,
    accounts: opts.accounts,
    log: opts.log,
    defaultImage: opts.defaultImage ?? 'debian:bookworm',
    maxFileBytes,
  };
  const server = new Server({
    'grpc.max_receive_message_length': maxMessageBytes,
    'grpc.max_send_message_length': maxMessageBytes,
    'grpc.max_concurrent_streams': maxStreamsPerConnection,
    'grpc.keepalive_time_ms': 60_000,
    'grpc.keepalive_timeout_ms': 20_000,
    'grpc.max_connection_idle_ms': 10 * 60_000,
    interceptors: [
      authInterceptor({
        authenticator: opts.authenticator,
        log: opts.log,
        caps: [
          {
            what: 'streaming',
            methods: new Set(['Exec', 'StreamLogs']),
            max: maxStreamCalls,
            perUser: maxStreamCallsPerUser,
          },
          {
            what: 'file-transfer',
            methods: new Set(['UploadFile', 'DownloadFile']),
            max: maxTransferCalls,
            perUser: maxTransferCallsPerUser,
          },
        ],
      }),
    ],
  });
  server.addService(proto.service, bindHandlers(boxdHandlers, app));
  new ReflectionService(proto.packageDefinition).addToServer(server);
  const injector = server.createConnectionInjector(ServerCredentials.createInsecure());
  const tcp: NetServer = createServer({ noDelay: true }, (socket) => {
    // A reset by the peer is its business; an unhandled socket error would be ours.
    socket.on('error', () => {});
    injector.injectConnection(socket);
  });
  tcp.maxConnections = opts.maxConnections;
  await new Promise<void>((resolve, reject) => {
    tcp.once('error', reject);
    tcp.listen(opts.port, opts.host, () => {
      tcp.off('error', reject);
      resolve();
    });
  });
  tcp.on('error', (e) => opts.log('error', 'grpc listener error', { error: e.message }));
  const a = tcp.address();
  const address =
    a && typeof a === 'object'
      ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`
      : String(a);
  return {
    address,
    close: async () => {
      await new Promise<void>((resolve) => {
        tcp.close(() => resolve());
        // Open calls get a moment to finish, then their connections go.
        injector.drain(1000);
        setTimeout(() => {
          injector.destroy();
          server.forceShutdown();
        }, 1000).unref();
      });
    },
  };
}
