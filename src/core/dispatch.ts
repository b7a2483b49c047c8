import type { AgentActions } from '../agents/agent-actions.js';
import type { Log } from '../background.js';
import type { DesktopActions } from '../desktop/desktop-actions.js';
import type { DiskActions } from '../engine/disk-actions.js';
import type { Engine } from '../engine/engine.js';
import type { NetRouting } from '../engine/net-routing.js';
import type { VolumeActions } from '../engine/volume-actions.js';
import { HutchError } from '../errors.js';
import type { GatewayActions } from '../gateway/gateway-actions.js';
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
  listNetworks: { audit: false, on: 'net' },
  createNetwork: { audit: true, on: 'net' },
  defaultNetwork: { audit: false, on: 'net' },
  listProxies: { audit: false, on: 'net' },
  createProxy: { audit: true, on: 'net' },
  createDefaultProxy: { audit: true, on: 'net' },
  deleteProxy: { audit: true, on: 'net' },
  setProxyPort: { audit: true, on: 'net' },
  bindDomain: { audit: true, on: 'net' },
  unbindDomain: { audit: true, on: 'net' },
  listDomains: { audit: false, on: 'net' },
  createDisk: { audit: true, on: 'disks' },
  listDisks: { audit: false, on: 'disks' },
  getDisk: { audit: false, on: 'disks' },
  destroyDisk: { audit: true, on: 'disks' },
  attachDisk: { audit: true, on: 'disks' },
  detachDisk: { audit: true, on: 'disks' },
  disksOf: { audit: false, on: 'disks' },
  createVolume: { audit: true, on: 'volumes' },
  listVolumes: { audit: false, on: 'volumes' },
  getVolume: { audit: false, on: 'volumes' },
  deleteVolume: { audit: true, on: 'volumes' },
  listVolumeFiles: { audit: false, on: 'volumes' },
  putVolumeFile: { audit: true, on: 'volumes' },
  getVolumeFile: { audit: false, on: 'volumes' },
  saveMachine: { audit: true, on: 'volumes' },
  // Reads of a screen: an agent takes one per step.
  screenshot: { audit: false, on: 'desktop' },
  input: { audit: true, on: 'desktop' },
  openVnc: { audit: true, on: 'desktop' },
  // The model gateway: nothing here changes hutch's state, and every call is already a row of
  // gateway.db (user, model, provider, tokens, status, time), the record billing reads; an audit
  // line per completion would say the same thing a second time, in the noisiest place.
  chatCompletions: { audit: false, on: 'gateway' },
  listModels: { audit: false, on: 'gateway' },
  getModel: { audit: false, on: 'gateway' },
  usage: { audit: false, on: 'gateway' },
  anthropicMessages: { audit: false, on: 'gateway' },
  startAgent: { audit: true, on: 'agents' },
} as const satisfies Record<string, { audit: boolean; on?: keyof ActionTargets }>;

/**
 * Who serves each action: the engine itself (no `on`), or one of the action classes each
 * capability keeps in its own folder, so no one class grows into all of them.
 */
export interface ActionTargets {
  engine: Engine;
  disks: DiskActions;
  volumes: VolumeActions;
  desktop: DesktopActions;
  gateway: GatewayActions;
  agents: AgentActions;
  net: NetRouting;
}

export type ActionName = keyof typeof actionTable;

type Bound<F> = F extends (p: Principal, ...args: infer A) => infer R ? (...args: A) => R : never;
type TargetOf<K extends ActionName> = (typeof actionTable)[K] extends {
  on: infer T extends keyof ActionTargets;
}
  ? ActionTargets[T]
  : Engine;
type MethodOf<K extends ActionName> = K extends keyof TargetOf<K> ? TargetOf<K>[K] : never;

/** The actions, bound to one caller: what a transport's handler is given. */
export type Actions = { [K in ActionName]: Bound<MethodOf<K>> };

/**
 * The one way in: binds every action to `principal`. Authorization (another owner's object
 * is NOT_FOUND) and the caller's quota are decided by the engine from the principal; this adds
 * the audit line.
 */
export function actionsFor(engine: Engine, principal: Principal, log: Log): Actions {
  const out: Record<string, unknown> = {};
  const targets = engine.actionTargets();
  for (const name of Object.keys(actionTable) as ActionName[]) {
    const entry: { audit: boolean; on?: keyof ActionTargets } = actionTable[name];
    const target = targets[entry.on ?? 'engine'] as unknown as Record<string, unknown>;
    const fn = target[name] as (p: Principal, ...args: unknown[]) => unknown;
    if (typeof fn !== 'function')
      throw new Error(`action ${name}: ${entry.on ?? 'engine'} has no such method`);
    out[name] = (...args: unknown[]) => {
      if (!entry.audit) return fn.call(target, principal, ...args);
      const t0 = performance.now();
      const object = typeof args[0] === 'string' ? args[0] : undefined;
      const audit = (outcome: string, extra: Record<string, unknown> = {}): void =>
        log('info', 'audit', {
          user: principal.user,
          via: principal.via,
          action: name,
          ...(object ? { target: object } : {}),
          outcome,
          ms: Math.round(performance.now() - t0),
          ...extra,
        });
      let result: unknown;
      try {
        result = fn.call(target, principal, ...args);
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
