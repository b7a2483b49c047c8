import { bearerFor } from '../client/credentials.js';
import { ApiError, HutchClient } from '../client/http-client.js';
import { clientUrl } from '../config.js';
import { HutchError } from '../errors.js';
import { parseCommand, printJson } from './common.js';

export const disksUsage = `Disks (ext4 disks on the daemon's host, attached to running machines; docs/storage.md):
  hutch disk create NAME [--size BYTES|10G|512M] [--json]
  hutch disk ls [--json]  |  hutch disk get DISK [--json]  |  hutch disk rm DISK
  hutch disk attach DISK MACHINE PATH [--ro] [--json]   mounted at PATH before this returns
  hutch disk detach DISK MACHINE [--json]               unmounted (written back) and unplugged
  DISK is a disk's id or name; MACHINE a machine's id or name (--box: a box's).`;

const flagSpec = {
  json: { type: 'boolean' },
  url: { type: 'string' },
  size: { type: 'string' },
  ro: { type: 'boolean' },
  box: { type: 'boolean' },
} as const;

interface DiskJson {
  disk_id: string;
  name: string;
  size_bytes: number;
  used_bytes: number;
  status: string;
  attachments: { vm_id: string; mount_path: string; mount_mode: string }[];
}

class Usage extends Error {
  readonly code = 'USAGE';
}

/** `hutch disk …`: one JSON document per command with --json, errors included. */
export async function diskCommand(argv: string[]): Promise<void> {
  const { flags, positionals } = parseCommand(argv, flagSpec, disksUsage);
  const json = flags.json === true;
  try {
    const url = clientUrl(flags.url as string | undefined);
    const client = new HutchClient(url, bearerFor(url));
    const owner = flags.box ? 'boxes' : 'machines';
    const [sub, ...pos] = positionals;
    const e = encodeURIComponent;
    const show = (d: DiskJson): void => {
      if (json) {
        printJson(d);
        return;
      }
      const at = d.attachments.map((a) => `${a.vm_id}:${a.mount_path}(${a.mount_mode})`).join(' ');
      process.stdout.write(`${d.disk_id}  ${d.name}  ${d.size_bytes}  ${d.status}${at ? `  ${at}` : ''}\n`);
    };
    switch (sub) {
      case 'create': {
        if (pos.length !== 1) throw new Usage('usage: hutch disk create NAME [--size BYTES]');
        const size = flags.size === undefined ? 0 : sizeOf(flags.size as string);
        return show(await client.request<DiskJson>('POST', '/v1/disks', { name: pos[0], size_bytes: size }));
      }
      case 'ls':
      case 'list': {
        const r = await client.request<{ disks: DiskJson[] }>('GET', '/v1/disks');
        if (json) return printJson(r);
        for (const d of r.disks) show(d);
        return;
      }
      case 'get':
        if (pos.length !== 1) throw new Usage('usage: hutch disk get DISK');
        return show(await client.request<DiskJson>('GET', `/v1/disks/${e(pos[0] as string)}`));
      case 'rm':
        if (pos.length !== 1) throw new Usage('usage: hutch disk rm DISK');
        await client.request('DELETE', `/v1/disks/${e(pos[0] as string)}`);
        if (json) printJson({ deleted: pos[0] });
        return;
      case 'attach': {
        if (pos.length !== 3) throw new Usage('usage: hutch disk attach DISK MACHINE PATH [--ro]');
        const [disk, vm, path] = pos as [string, string, string];
        return show(
          await client.request<DiskJson>('POST', `/v1/${owner}/${e(vm)}/disks`, {
            disk,
            mount_path: path,
            read_only: flags.ro === true,
          }),
        );
      }
      case 'detach': {
        if (pos.length !== 2) throw new Usage('usage: hutch disk detach DISK MACHINE');
        const [disk, vm] = pos as [string, string];
        return show(await client.request<DiskJson>('DELETE', `/v1/${owner}/${e(vm)}/disks/${e(disk)}`));
      }
      default:
        throw new Usage(disksUsage);
    }
  } catch (err) {
    const code =
      err instanceof HutchError || err instanceof ApiError || err instanceof Usage ? err.code : 'CLI_ERROR';
    const message = (err as Error).message;
    if (json) printJson({ code, message });
    else process.stderr.write(`hutch: ${message}\n`);
    process.exitCode = code === 'USAGE' ? 2 : 1;
  }
}

/** Bytes from `123`, `10G`, `512M`, `1T` (binary units). */
function sizeOf(v: string): number {
  const m = /^(\d+)([KMGT]?)i?B?$/i.exec(v.trim());
  if (!m) throw new Usage(`--size ${JSON.stringify(v)}: bytes, or a number with K, M, G or T`);
  const unit = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[(m[2] ?? '').toUpperCase()] ?? 1;
  return Number(m[1]) * unit;
}
