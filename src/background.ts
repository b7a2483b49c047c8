/**
 * Work nobody awaits (timers, sweeps, socket callbacks, fire-and-forget promises) must never
 * take the daemon down: its failure is logged with what it was doing, and the process-wide
 * handlers catch whatever still slips through, logging it as the bug it is.
 */
export type Log = (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

/** Runs `work` in the background; a throw or rejection is logged as `what` failing, with `fields`. */
export function inBackground(
  log: Log,
  what: string,
  fields: Record<string, unknown>,
  work: () => unknown,
): void {
  const failed = (e: unknown): void => log('error', `${what} failed`, { ...fields, error: describe(e) });
  try {
    const r = work();
    if (r instanceof Promise) r.catch(failed);
  } catch (e) {
    failed(e);
  }
}

/**
 * Keeps the daemon up through an error nothing handled: a client or a guest must not be able to
 * kill every machine's API by finding one missed path. The log line names it as a bug (the
 * hostile suite fails on it), and the process carries on.
 */
export function installFaultHandlers(log: Log): void {
  process.on('unhandledRejection', (e) =>
    log('error', 'unhandled rejection (a bug; the daemon carries on)', { error: describe(e) }),
  );
  process.on('uncaughtException', (e, origin) =>
    log('error', 'uncaught exception (a bug; the daemon carries on)', { origin, error: describe(e) }),
  );
}

function describe(e: unknown): string {
  if (e instanceof Error) return e.stack ?? `${e.name}: ${e.message}`;
  return String(e);
}
