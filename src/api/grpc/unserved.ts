import { HutchError } from '../../errors.js';
import { type Rpc, unary } from './rpc.js';

/**
 * Capabilities this version does not serve yet: their RPCs answer UNIMPLEMENTED (NOT_SERVED),
 * saying which capability, after authentication like every other call. These are the only RPCs
 * of the service that may answer UNIMPLEMENTED (the integration test checks it).
 */
export const unservedRpcNames = {
  disks: ['CreateDisk', 'ListDisks', 'AttachDisk', 'DetachDisk', 'DestroyDisk'],
} as const;

const why = {
  disks: 'disks are not served by this version yet (a VM has its one persistent disk; no detachable disks)',
};

export const unservedRpcs: Record<string, Rpc> = Object.fromEntries(
  (Object.keys(unservedRpcNames) as (keyof typeof unservedRpcNames)[]).flatMap((cap) =>
    unservedRpcNames[cap].map((name) => [
      name,
      unary(() => {
        throw new HutchError('NOT_SERVED', `${name}: ${why[cap]}`);
      }),
    ]),
  ),
);
