import {
  type Metadata,
  ServerInterceptingCall,
  type ServerInterceptingCallInterface,
  type ServerInterceptor,
} from '@grpc/grpc-js';
import type { Authenticator } from '../../auth/authenticator.js';
import type { Log } from '../../background.js';
import type { Principal } from '../../core/principal.js';
import { HutchError } from '../../errors.js';
import { toStatus } from './errors.js';
import { serviceName } from './proto.js';

/**
 * The gRPC server's interceptor: every BoxdApi call proves who it is with `authorization: Bearer
 * <jwt>` before anything else happens. It runs on the call's metadata, before the request
 * message is handed on, so an unauthenticated client never gets a handler run (nor a 64 MiB
 * upload kept for one). Server reflection (grpc.reflection.*) stays public: it describes the
 * schema, which the spec publishes anyway, and `grpcurl describe` works without a token.
 *
 * It also admits the calls that hold a guest session or a large message (streams, file
 * transfer) only while fewer than `maxHeavyCalls` run: a client opening thousands of them gets
 * RESOURCE_EXHAUSTED instead of the daemon holding thousands of sessions and buffers.
 */
export interface InterceptorOptions {
  authenticator: Authenticator;
  log: Log;
  /** Methods that count against maxHeavyCalls. */
  heavyMethods: ReadonlySet<string>;
  maxHeavyCalls: number;
}

/** The principal the interceptor verified for a call, keyed by the call's metadata object. */
const principals = new WeakMap<Metadata, Principal>();

/** Who a call is for; set only by the interceptor, so a client cannot put one there. */
export function principalOf(metadata: Metadata): Principal {
  const p = principals.get(metadata);
  if (!p) throw new HutchError('UNAUTHENTICATED', 'the call was not authenticated');
  return p;
}

/** The one `authorization` value of a call (several are as malformed as none). */
export function bearerOf(metadata: Metadata): string | undefined {
  const values = metadata.get('authorization');
  if (values.length > 1)
    throw new HutchError('UNAUTHENTICATED', 'the call carries more than one authorization header');
  const v = values[0];
  return typeof v === 'string' ? v : undefined;
}

export function authInterceptor(opts: InterceptorOptions): ServerInterceptor & { inFlight(): number } {
  let heavy = 0;
  const intercept = (
    method: { path: string },
    call: ServerInterceptingCallInterface,
  ): ServerInterceptingCall => {
    const prefix = `/${serviceName}/`;
    if (!method.path.startsWith(prefix)) return new ServerInterceptingCall(call);
    const name = method.path.slice(prefix.length);
    let held = false;
    const release = (): void => {
      if (held) {
        held = false;
        heavy--;
      }
    };
    let done = false;
    const ic: ServerInterceptingCall = new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, mdNext) => {
            const fail = (e: unknown): void => {
              if (done) return;
              ic.sendStatus(toStatus(e, opts.log, name));
            };
            let bearer: string | undefined;
            try {
              bearer = bearerOf(metadata);
            } catch (e) {
              fail(e);
              return;
            }
            opts.authenticator.verifyBearer(bearer).then(
              (p) => {
                if (done) return;
                if (opts.heavyMethods.has(name)) {
                  if (heavy >= opts.maxHeavyCalls) {
                    fail(
                      new HutchError(
                        'RESOURCE_EXHAUSTED',
                        `this server runs at most ${opts.maxHeavyCalls} streaming and file-transfer calls at once; retry later`,
                      ),
                    );
                    return;
                  }
                  heavy++;
                  held = true;
                }
                principals.set(metadata, p);
                mdNext(metadata);
              },
              (e: unknown) => fail(e),
            );
          },
          onCancel: () => {
            done = true;
            release();
          },
        }),
      sendStatus: (status, next) => {
        done = true;
        release();
        next(status);
      },
    });
    return ic;
  };
  return Object.assign(intercept as ServerInterceptor, { inFlight: () => heavy });
}
