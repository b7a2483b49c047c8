import type {
  Metadata,
  ServerDuplexStream,
  ServerUnaryCall,
  ServerWritableStream,
  sendUnaryData,
  UntypedHandleCall,
} from '@grpc/grpc-js';
import type { Accounts } from '../../auth/authenticator.js';
import type { Log } from '../../background.js';
import { type Actions, actionsFor } from '../../core/dispatch.js';
import type { Principal } from '../../core/principal.js';
import type { Engine } from '../../engine/engine.js';
import { principalOf } from './auth.js';
import { toStatus } from './errors.js';

/** What every handler of the gRPC API may use: the engine only through `act`. */
export interface GrpcApp {
  engine: Engine;
  accounts: Accounts;
  log: Log;
  /** CreateVm's image when image_ref is empty (GetConfig.default_image). */
  defaultImage: string;
  /** Largest file UploadFile takes and DownloadFile returns, bytes. */
  maxFileBytes: number;
}

/** One call's context: who it is for and their actions (each one audited by actionsFor). */
export interface Cx {
  app: GrpcApp;
  principal: Principal;
  act: Actions;
  method: string;
}

type Unary = { kind: 'unary'; run: (req: unknown, cx: Cx) => unknown };
type ServerStream = {
  kind: 'serverStream';
  run: (call: ServerWritableStream<unknown, unknown>, cx: Cx) => Promise<void>;
};
type Bidi = { kind: 'bidi'; run: (call: ServerDuplexStream<unknown, unknown>, cx: Cx) => Promise<void> };
export type Rpc = Unary | ServerStream | Bidi;

/** A request → response method; the request is the decoded message (every field present). */
export function unary<Req, Res>(run: (req: Req, cx: Cx) => Promise<Res> | Res): Rpc {
  return { kind: 'unary', run: run as unknown as Unary['run'] };
}

export function serverStream<Req, Res>(
  run: (call: ServerWritableStream<Req, Res>, cx: Cx) => Promise<void>,
): Rpc {
  return { kind: 'serverStream', run: run as unknown as ServerStream['run'] };
}

export function bidi<Req, Res>(run: (call: ServerDuplexStream<Req, Res>, cx: Cx) => Promise<void>): Rpc {
  return { kind: 'bidi', run: run as unknown as Bidi['run'] };
}

function contextOf(app: GrpcApp, metadata: Metadata, method: string): Cx {
  const principal = principalOf(metadata);
  return { app, principal, act: actionsFor(app.engine, principal, app.log), method };
}

/**
 * The table as grpc-js handlers: each builds the caller's context (the interceptor verified the
 * token), runs, and answers with the result or the error's status. Nothing a handler throws or
 * rejects with escapes: it becomes the call's status.
 */
export function bindHandlers(table: Record<string, Rpc>, app: GrpcApp): Record<string, UntypedHandleCall> {
  const out: Record<string, UntypedHandleCall> = {};
  for (const [method, rpc] of Object.entries(table)) {
    const fail = (e: unknown) => toStatus(e, app.log, method);
    if (rpc.kind === 'unary')
      out[method] = (call: ServerUnaryCall<unknown, unknown>, cb: sendUnaryData<unknown>): void => {
        Promise.resolve()
          .then(() => rpc.run(call.request, contextOf(app, call.metadata, method)))
          .then(
            (res) => cb(null, res),
            (e: unknown) => cb(fail(e)),
          );
      };
    else if (rpc.kind === 'serverStream')
      out[method] = (call: ServerWritableStream<unknown, unknown>): void => {
        Promise.resolve()
          .then(() => rpc.run(call, contextOf(app, call.metadata, method)))
          .then(
            () => call.end(),
            (e: unknown) => {
              if (!call.cancelled) call.emit('error', fail(e));
            },
          );
      };
    else
      out[method] = (call: ServerDuplexStream<unknown, unknown>): void => {
        Promise.resolve()
          .then(() => rpc.run(call, contextOf(app, call.metadata, method)))
          .then(
            () => call.end(),
            (e: unknown) => {
              if (!call.cancelled) call.emit('error', fail(e));
            },
          );
      };
  }
  return out;
}
