import { createWriteStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import type { HutchClient } from '../client/http-client.js';
import type { FileView } from '../storage/volumes/volume-service.js';
import { type Flags, fail, printJson } from './common.js';

export const volumeUsage = `Volumes (persistent, outlive machines; docs/volumes.md):
  hutch volume create [--ttl SECONDS] [--json]    prints the volume's id (default TTL: 7 days)
  hutch volume ls [--json]
  hutch volume get ID [--json]
  hutch volume files ID [--json]
  hutch volume put ID PATH [FILE|-] [--mode 0644] [--json]   FILE (default/-: stdin) to PATH in the volume
  hutch volume cat ID PATH [-o FILE]               to FILE, or to stdout
  hutch volume rm ID... [--json]
  hutch save MACHINE --volume ID [--json]          the machine's /root as the volume's new version
  hutch new … --volume ID                          a machine with the volume restored into /root`;

interface VolumeJson {
  id: string;
  created_at: string;
  expires_at: string;
  bytes: number;
  files: number;
  generation: number;
}

/** A file as GET /v1/volumes/{id}/files lists it. */
type FileJson = FileView;

function volumeLine(v: VolumeJson): string {
  return [v.id, `${v.bytes}B`, `${v.files} files`, `v${v.generation}`, v.created_at, v.expires_at].join('\t');
}

/** `hutch volume VERB …` (flags already parsed by the main command line). */
export async function volumeCommand(client: HutchClient, positionals: string[], flags: Flags): Promise<void> {
  const json = flags.json === true;
  const [verb, id, ...rest] = positionals;
  switch (verb) {
    case 'create': {
      const body: Record<string, unknown> = {};
      if (flags.ttl !== undefined) {
        const ttl = Number(flags.ttl);
        if (typeof flags.ttl !== 'string' || !Number.isInteger(ttl))
          fail(`--ttl must be a whole number of seconds, got ${JSON.stringify(flags.ttl)}`);
        body.ttl_seconds = ttl;
      }
      const v = await client.createVolume<VolumeJson>(body);
      if (json) printJson(v);
      else process.stdout.write(`${v.id}\n`);
      return;
    }
    case 'ls':
    case 'list': {
      const r = await client.listVolumes<{ volumes: VolumeJson[] }>();
      if (json) printJson(r.volumes);
      else for (const v of r.volumes) process.stdout.write(`${volumeLine(v)}\n`);
      return;
    }
    case 'get': {
      if (!id) fail('usage: hutch volume get ID');
      const v = await client.getVolume<VolumeJson>(id);
      if (json) printJson(v);
      else process.stdout.write(`${volumeLine(v)}\n`);
      return;
    }
    case 'files': {
      if (!id) fail('usage: hutch volume files ID');
      const r = await client.volumeFiles<{ files: FileJson[] }>(id);
      if (json) printJson(r.files);
      else
        for (const f of r.files)
          process.stdout.write(
            `${f.type.padEnd(7)} ${f.mode} ${f.uid}:${f.gid}\t${f.size}\t${f.mtime}\t${f.path}${f.target !== undefined ? ` -> ${f.target}` : ''}\n`,
          );
      return;
    }
    case 'put': {
      const [path, file] = rest;
      if (!id || !path || rest.length > 2) fail('usage: hutch volume put ID PATH [FILE|-] [--mode 0644]');
      const source = file === undefined || file === '-' ? process.stdin : file;
      const r = await client.putVolumeFile(id, path, source, flags.mode as string | undefined);
      if (json) printJson(r);
      else process.stdout.write(`${r.path}\t${r.size}\n`);
      return;
    }
    case 'cat': {
      const [path] = rest;
      if (!id || !path) fail('usage: hutch volume cat ID PATH [-o FILE]');
      const r = await client.getVolumeFile(id, path);
      const out = flags.output as string | undefined;
      await pipeline(r.stream, out && out !== '-' ? createWriteStream(out) : process.stdout);
      return;
    }
    case 'rm':
    case 'delete': {
      const ids = positionals.slice(1);
      if (ids.length === 0) fail('usage: hutch volume rm ID...');
      for (const v of ids) {
        await client.deleteVolume(v);
        if (!json) process.stdout.write(`${v}\n`);
      }
      if (json) printJson({ removed: ids });
      return;
    }
    default:
      fail(`unknown volume command ${JSON.stringify(verb ?? '')}\n\n${volumeUsage}`);
  }
}
