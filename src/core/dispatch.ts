import type { Log } from '../background.js';
import type { Engine } from '../engine/engine.js';
import { HutchError } from '../errors.js';
import type { Principal } from './principal.js';

/**
 * Every operation a caller can ask for, once. Transports (REST machines, REST boxes, the CLI
 * through them, and the gRPC and MCP adapters to come) only parse a request into one of these
 * and write back what it returns; they never reach the engine any other way. `audit: true`
 * actions change something and leave an audit line (who, what, on which object, outcome, time).
 */
export const actionTable = {
  whoami: { audit: false },
  list: { audit: false },
  get: { audit: false },
  create: { audit: true },
  destroy: { audit: true },
  branch: { audit: true },
  pause: { audit: true },
  resume: { audit: true },
  suspend: { audit: true },
  setAutoSuspend: { audit: true },
  exec: { audit: true },
  openSession: { audit: true },
  consoleOf: { audit: true },
  // Reads: a preview proxy opens one per browser connection, which an audit line each would drown.
  openPort: { audit: false },
  listeningPorts: { audit: false },
  listBoxes: { audit: false },
  getBox: { audit: false },
  createBox: { audit: true },
  stopBox: { audit: true },
  startBox: { audit: true },
  removeBox: { audit: true },
  gcBoxes: { audit: true },
  startExec: { audit: true },
  listExecs: { audit: false },
  getExec: { audit: false },
  execEvents: { audit: false },
  cancelExec: { audit: true },
  openBoxSession: { audit: true },
  runOnce: { audit: true },
  forkBox: { audit: true },
  suspendBox: { audit: true },
  resumeBox: { audit: true },
  rebootBox: { audit: true },
  setBoxTimers: { audit: true },
  boxConsoleOf: { audit: true },
  createTemplate: { audit: true },
  listTemplates: { audit: false },
  getTemplate: { audit: false },
  deleteTemplate: { audit: true },
  egress: { audit: false },
  setEgress: { audit: true },
  listNetworks: { audit: false },
  createNetwork: { audit: true },
  defaultNetwork: { audit: false },
  listProxies: { audit: false },
  createProxy: { audit: true },
  createDefaultProxy: { audit: true },
  deleteProxy: { audit: true },
  setProxyPort: { audit: true },
  bindDomain: { audit: true },
  unbindDomain: { audit: true },
  listDomains: { audit: false },
  createDisk: { audit: true },
  listDisks: { audit: false },
  getDisk: { audit: false },
  destroyDisk: { audit: true },
  attachDisk: { audit: true },
  detachDisk: { audit: true },
  disksOf: { audit: false },
  createVolume: { audit: true },
  listVolumes: { audit: false },
  getVolume: { audit: false },
  deleteVolume: { audit: true },
  listVolumeFiles: { audit: false },
  putVolumeFile: { audit: true },
  getVolumeFile: { audit: false },
  saveMachine: { audit: true },
} as const satisfies Record<string, { audit: boolean }>;

export type ActionName = keyof typeof actionTable;

type Bound<F> = F extends (p: Principal, ...args: infer A) => infer R ? (...args: A) => R : never;

/** The actions, bound to one caller: what a transport's handler is given. */
export type Actions = { [K in ActionName]: Bound<Engine[K]> };

/**
 * The one way in: binds every action to `principal`. Authorization (another owner's object
 * is NOT_FOUND) and the caller's quota are decided by the engine from the principal; this adds
 * the audit line.
 */
export function actionsFor(engine: Engine, principal: Principal, log: Log): Actions {
  const out: Record<string, unknown> = {};
  for (const name of Object.keys(actionTable) as ActionName[]) {
    const fn = engine[name] as (p: Principal, ...args: unknown[]) => unknown;
    out[name] = (...args: unknown[]) => {
      if (!actionTable[name].audit) return fn.call(engine, principal, ...args);
      const t0 = performance.now();
      const target = typeof args[0] === 'string' ? args[0] : undefined;
      const audit = (outcome: string, extra: Record<string, unknown> = {}): void =>
        log('info', 'audit', {
          user: principal.user,
          via: principal.via,
          action: name,
          ...(target ? { target } : {}),
          outcome,
          ms: Math.round(performance.now() - t0),
          ...extra,
        });
      let result: unknown;
      try {
        result = fn.call(engine, principal, ...args);
      } catch (e) {
        audit('error', { code: e instanceof HutchError ? e.code : 'INTERNAL' });
        throw e;
      }
      if (result instanceof Promise)
        return result.then(
          (v: unknown) => {
            audit('ok', idOf(v));
            return v;
          },
          (e: unknown) => {
            audit('error', { code: e instanceof HutchError ? e.code : 'INTERNAL' });
            throw e;
          },
        );
      audit('ok', idOf(result));
      return result;
    };
  }
  return out as Actions;
}

/** The id of what an action made or touched, for the audit line. */
function idOf(v: unknown): Record<string, unknown> {
  if (v && typeof v === 'object' && 'id' in v && typeof (v as { id: unknown }).id === 'string')
    return { id: (v as { id: string }).id };
  return {};
}
