import { Metadata, type StatusObject, status } from '@grpc/grpc-js';
import type { Log } from '../../background.js';
import { errorTable, HutchError } from '../../errors.js';

/**
 * A failure as a gRPC status: a HutchError through the one error table (its message is written
 * for clients: human readable and safe), anything else INTERNAL with a generic message while the
 * real one goes to the log, since an unexpected exception may carry host paths or internals.
 */
export function toStatus(e: unknown, log: Log, method: string): StatusObject {
  const metadata = new Metadata();
  if (e instanceof HutchError) {
    metadata.set('hutch-error-code', e.code);
    return { code: status[errorTable[e.code].grpc], details: e.message, metadata };
  }
  log('error', 'grpc call failed unexpectedly (a bug)', { method, error: describe(e) });
  metadata.set('hutch-error-code', 'INTERNAL');
  return { code: status.INTERNAL, details: 'internal error (the server log has details)', metadata };
}

function describe(e: unknown): string {
  return e instanceof Error ? (e.stack ?? e.message) : String(e);
}
