import { randomBytes } from 'node:crypto';

export function newMachineId(): string {
  return `m-${randomBytes(4).toString('hex')}`;
}

export const machineIdPattern = /^m-[0-9a-f]{8}$/;

/** Box and exec ids as the boxes API shows them: `box_…`, `exec_…` (12 hex digits). */
export function newBoxId(): string {
  return `box_${randomBytes(6).toString('hex')}`;
}

export function newExecId(): string {
  return `exec_${randomBytes(6).toString('hex')}`;
}
