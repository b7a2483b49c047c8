import { HutchError } from '../../errors.js';
import { type Rpc, unary } from './rpc.js';

/**
 * RPCs whose engine actions (forkBox, suspendBox, resumeBox, rebootBox, setBoxTimers, the
 * template actions) are not in this build yet. They answer NOT_SERVED naming the action, until
 * the engine has it.
 */
const waitingOn: Record<string, string> = {
  ForkVm: 'forkBox',
  SuspendVm: 'suspendBox',
  ResumeVm: 'resumeBox',
  RebootVm: 'rebootBox',
  SetAutoSuspendTimeout: 'setBoxTimers',
  CreateTemplate: 'createTemplate',
  ListTemplates: 'listTemplates',
  DeleteTemplate: 'deleteTemplate',
  CreateVmFromTemplate: 'createBox with a template',
};

export const pendingRpcs: Record<string, Rpc> = Object.fromEntries(
  Object.entries(waitingOn).map(([name, action]) => [
    name,
    unary(() => {
      throw new HutchError('NOT_SERVED', `${name} is not served by this build yet (it needs ${action})`);
    }),
  ]),
);
