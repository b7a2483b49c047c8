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
 * It also admits the calls that hold something while they run only while fewer than their
 * class's cap run (`CallCap`): a client opening thousands gets RESOURCE_EXHAUSTED instead of
 * the daemon holding thousands of guest sessions, or of 64 MiB messages.
 */
export interface CallCap {
  /** What the refusal names: "streaming", "file-transfer". */
  what: string;
  methods: ReadonlySet<string>;
  /** Across the server. */
  max: number;
  /** Per user, so one user cannot take every slot from the others. */
  perUser: number;
}

export interface InterceptorOptions {
  authenticator: Authenticator;
  log: Log;
  caps: CallCap[];
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

export function authInterceptor(opts: InterceptorOptions): ServerInterceptor {
  const running = new Map<CallCap, number>(opts.caps.map((c) => [c, 0]));
  const runningOf = new Map<string, number>();
  const key = (c: CallCap, user: string): string => `${c.what}\0${user}`;
  const add = (c: CallCap, user: string, d: number): void => {
    running.set(c, (running.get(c) ?? 0) + d);
    const k = key(c, user);
    const n = (runningOf.get(k) ?? 0) + d;
    if (n > 0) runningOf.set(k, n);
    else runningOf.delete(k);
  };
  const intercept = (
    method: { path: string },
    call: ServerInterceptingCallInterface,
  ): ServerInterceptingCall => {
    const prefix = `/${serviceName}/`;
    if (!method.path.startsWith(prefix)) return new ServerInterceptingCall(call);
    const name = method.path.slice(prefix.length);
    const cap = opts.caps.find((c) => c.methods.has(name));
    let heldBy: string | undefined;
    const release = (): void => {
      if (heldBy !== undefined && cap) add(cap, heldBy, -1);
      heldBy = undefined;
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
                if (cap) {
                  const mine = runningOf.get(key(cap, p.user)) ?? 0;
                  const all = running.get(cap) ?? 0;
                  if (mine >= cap.perUser || all >= cap.max) {
                    fail(
                      new HutchError(
                        'RESOURCE_EXHAUSTED',
                        mine >= cap.perUser
                          ? `you have ${mine} ${cap.what} calls running, the most one user may; retry later`
                          : `this server runs at most ${cap.max} ${cap.what} calls at once; retry later`,
                      ),
                    );
                    return;
                  }
                  add(cap, p.user, 1);
                  heldBy = p.user;
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
  return intercept as ServerInterceptor;
}
