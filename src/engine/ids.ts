import { randomBytes } from 'node:crypto';

export function newMachineId(): string {
  return `m-${randomBytes(4).toString('hex')}`;
}

export const machineIdPattern = /^m-[0-9a-f]{8}$/;
