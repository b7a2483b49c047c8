import { accountRpcs } from './accounts.js';
import { diskRpcs } from './disks.js';
import { execRpcs } from './exec.js';
import { logsFilesRpcs } from './logs-files.js';
import { networkRpcs } from './networks.js';
import type { Rpc } from './rpc.js';
import { templateRpcs } from './templates.js';
import { vmCreateRpcs } from './vm-create.js';
import { vmRpcs } from './vms.js';

/**
 * Every method of boxd.api.v1.BoxdApi, by its proto name. A unit test checks this table against
 * spec/vm-api.proto: no method missing, none extra.
 */
export const boxdHandlers: Record<string, Rpc> = {
  ...vmRpcs,
  ...networkRpcs,
  ...execRpcs,
  ...logsFilesRpcs,
  ...accountRpcs,
  ...vmCreateRpcs,
  ...templateRpcs,
  ...diskRpcs,
};
