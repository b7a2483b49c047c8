import { createWriteStream, readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { installFaultHandlers } from '../background.js';
import { bearerFor } from '../client/credentials.js';
import { ApiError, HutchClient } from '../client/http-client.js';
import { clientUrl, loadConfig } from '../config.js';
import { jsonLogger, startDaemon } from '../daemon.js';
import { ttlBounds } from '../engine/engine.js';
import { type BuildProgress, TemplateBuilder } from '../images/builder.js';
import { collectCacheGarbage, type GcReport } from '../images/cache-gc.js';
import { ImageStore } from '../images/oci.js';
import { accountsCommand, accountsUsage } from './accounts.js';
import { boxCommand, boxUsage } from './box.js';
import {
  attachTerminal,
  envFlags,
  type Flags,
  fail,
  parseCommand,
  printJson,
  setJsonErrors,
  terminal,
  wantsJson,
  writeOut,
} from './common.js';
import { diskCommand, disksUsage } from './disks.js';
import { volumeCommand, volumeUsage } from './volume.js';

/** The server's longest exec timeout: an agent's task (`claude -p …`) takes minutes, not the API's default 60 s. */
const defaultExecTimeoutMs = 3_600_000;

interface EgressJson {
  rules: { allow: string[]; deny: string[] };
  denied: Record<string, number>;
  recent: {
    reason: string;
    destination: string;
    protocol?: string;
    port?: number;
    detail?: string;
    count: number;
    last_seen: string;
  }[];
}

/** --allow/--deny as an egress body; undefined when neither was given. */
function egressFlags(flags: Record<string, unknown>): { allow: string[]; deny: string[] } | undefined {
  const allow = (flags.allow as string[] | undefined) ?? [];
  const deny = (flags.deny as string[] | undefined) ?? [];
  return allow.length || deny.length ? { allow, deny } : undefined;
}

const usage = `hutch: real computers over an API

  hutch serve [--host H] [--port P] [--state-dir D] [--image-dir D] [--accel auto|kvm|tcg] [--config F]
  hutch new [--template python] [--ttl SECONDS] [--persistent] [--name NAME] [--net]
            [--allow CIDR|NAME]... [--deny CIDR|NAME]... [--volume ID] [--json]
                                   without --ttl: persistent where the server allows it, else
                                   the server's longest TTL (${ttlBounds.max} s), so an agent task outlives it;
                                   --net: internet behind its firewall (--allow/--deny: egress rules)
  hutch egress ID [--allow CIDR|NAME]... [--deny CIDR|NAME]... [--open] [--json]
                                   show a networked machine's rules and what they refused;
                                   with --allow/--deny/--open, replace its rules first
  hutch ls|list [--json]
  hutch get ID [--json]
  hutch exec [-i] [--env K=V]... [--cwd DIR] [--timeout MS] [--json] ID -- CMD [ARG...]
  hutch exec [...] ID 'SHELL COMMAND'  one argument: run with /bin/sh -c
                                   (output streams live; exits with the command's exit code;
                                   --timeout defaults to ${defaultExecTimeoutMs / 60_000} min; --json prints one document:
                                   {output, exit_code, signal, timed_out, stdout, stderr, truncated,
                                   duration_ms}, output = stdout then stderr, so exactly stdout
                                   when stderr is empty)
  hutch fork ID [--name NAME] [--ttl SECONDS] [--json]   a live clone (disk, memory, processes);
                                   without --ttl it keeps the source's lifetime
  hutch attach ID [--shell /bin/bash] [--term xterm-256color]   interactive shell (a PTY)
  hutch tty ID                     the serial console (Ctrl-] leaves)
  hutch upload ID FILE [--name NAME]           FILE to /root/NAME (default: its base name)
  hutch download ID PATH [-o FILE]             to FILE, or to stdout
  hutch rm|destroy ID... [--json]
  hutch health [--json]
  hutch template build [NAME] [--image-dir D]
  hutch image pull REF... [--image-dir D] [--json]   pull (debian:* builds locally) into the image cache
  hutch cache gc [--dry-run] [--min-age SECONDS] [--state-dir D] [--image-dir D] [--json]
                                   remove templates, images and snapshots nothing uses (no daemon needed)

Client commands talk to --url or $HUTCH_URL (default http://127.0.0.1:8080). ID is a machine's
id or its name. With --json every answer is one JSON document on stdout, errors included:
{"code","message"} (the API's code, or USAGE / CLI_ERROR) with a non-zero exit code.

${accountsUsage}

${disksUsage}
${volumeUsage}

Boxes (the boxes API, on the daemon's Unix socket or TCP):
${boxUsage}`;

/** Progress for template builds: one line per step; on a terminal the running step shows a live timer. */
export function progressPrinter(): (p: BuildProgress) => void {
  const tty = process.stderr.isTTY;
  let timer: NodeJS.Timeout | undefined;
  return (p) => {
    if (timer) {
      clearInterval(timer);
      timer = undefined;
      if (tty) process.stderr.write('\n');
    }
    const tag = `[${p.step}]`.padEnd(9);
    if (p.state === 'start') {
      const t0 = Date.now();
      if (tty) {
        const draw = (): void => {
          const s = Math.round((Date.now() - t0) / 1000);
          process.stderr.write(
            `\r${tag} ${p.message} … ${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`,
          );
        };
        draw();
        timer = setInterval(draw, 1000);
      } else {
        process.stderr.write(`${tag} ${p.message} …\n`);
      }
    } else {
      const secs = p.seconds !== undefined ? ` (${p.seconds.toFixed(1)} s)` : '';
      process.stderr.write(`${tag} ${p.state === 'cached' ? '✓' : 'done'} ${p.message}${secs}\n`);
    }
  };
}

async function serve(flags: Flags): Promise<void> {
  const config = loadConfig(
    {
      host: flags.host as string | undefined,
      port: flags.port as string | undefined,
      stateDir: flags['state-dir'] as string | undefined,
      imageDir: flags['image-dir'] as string | undefined,
      accel: flags.accel as 'auto' | 'kvm' | 'tcg' | undefined,
    },
    undefined,
    flags.config as string | undefined,
  );
  const log = jsonLogger(config.logLevel);
  installFaultHandlers(log);
  const daemon = await startDaemon(config, { log, onProgress: progressPrinter() });
  process.stderr.write(
    `hutch is serving ${daemon.http.url} (accelerator: ${daemon.engine.health().accel})\n`,
  );
  if (daemon.boxes.endpoints.length)
    process.stderr.write(`boxes API on ${daemon.boxes.endpoints.join(' and ')}\n`);
  if (daemon.grpc) process.stderr.write(`gRPC API on ${daemon.grpc.address}\n`);
  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    log('info', 'stopping; running machines keep running and are adopted by the next start');
    void daemon.close().then(() => process.exit(0));
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

interface MachineJson {
  id: string;
  name: string | null;
  status: string;
  template: string;
  mode: string;
  boot_ms: number | null;
  expires_at: string | null;
  accel: string;
  error: string | null;
}

function machineLine(m: MachineJson): string {
  return [
    m.id,
    m.name ?? '-',
    m.status,
    m.template,
    m.mode,
    m.boot_ms === null ? '-' : `${m.boot_ms}ms`,
    m.expires_at ?? 'never',
    m.error ?? '',
  ]
    .join('\t')
    .trimEnd();
}

/** What `hutch exec --json` prints (the guest's `hutch` prints the same document). */
interface ExecJson {
  exit_code: number | null;
  signal: number | null;
  timed_out: boolean;
  stdout: string;
  stderr: string;
  truncated: boolean;
  duration_ms: number;
}

/** A whole number of seconds from a flag, or a usage error. */
function ttlFlag(v: string | boolean | string[] | undefined): number | undefined {
  if (v === undefined) return undefined;
  const ttl = Number(v);
  if (typeof v !== 'string' || !Number.isInteger(ttl))
    fail(`--ttl must be a whole number of seconds, got ${JSON.stringify(v)}`);
  return ttl;
}

async function main(argv: string[]): Promise<void> {
  const [cmd, ...rest] = argv;
  setJsonErrors(wantsJson(rest));
  if (!cmd || cmd === 'help' || cmd === '--help' || cmd === '-h') {
    process.stdout.write(`${usage}\n`);
    return;
  }
  if (cmd === 'box') return boxCommand(rest);
  if (cmd === 'disk') return diskCommand(rest);
  if (['user', 'api-key', 'token', 'login', 'logout', 'whoami'].includes(cmd))
    return accountsCommand(cmd, rest);
  const { flags, positionals, trailing } = parseCommand(
    rest,
    {
      json: { type: 'boolean' },
      url: { type: 'string' },
      host: { type: 'string' },
      port: { type: 'string' },
      'state-dir': { type: 'string' },
      'image-dir': { type: 'string' },
      accel: { type: 'string' },
      config: { type: 'string' },
      template: { type: 'string' },
      ttl: { type: 'string' },
      persistent: { type: 'boolean' },
      net: { type: 'boolean' },
      allow: { type: 'string', multiple: true },
      deny: { type: 'string', multiple: true },
      open: { type: 'boolean' },
      name: { type: 'string' },
      env: { type: 'string', multiple: true },
      cwd: { type: 'string' },
      timeout: { type: 'string' },
      interactive: { type: 'boolean', short: 'i' },
      shell: { type: 'string' },
      term: { type: 'string' },
      output: { type: 'string', short: 'o' },
      'dry-run': { type: 'boolean' },
      'min-age': { type: 'string' },
      volume: { type: 'string' },
      mode: { type: 'string' },
    },
    usage,
  );
  const json = flags.json === true;
  const url = clientUrl(flags.url as string | undefined);
  const client = new HutchClient(url, bearerFor(url));

  switch (cmd) {
    case 'serve':
      return serve(flags);
    case 'template': {
      if (positionals[0] !== 'build') fail('usage: hutch template build [NAME]');
      const config = loadConfig({ imageDir: flags['image-dir'] as string | undefined });
      const builder = new TemplateBuilder(config.imageDir);
      builder.on('progress', progressPrinter());
      const names = positionals.length > 1 ? positionals.slice(1) : config.templates;
      const built = [];
      for (const n of names) built.push(await builder.build(n));
      if (json) printJson(built);
      return;
    }
    case 'image': {
      if (positionals[0] !== 'pull' || !positionals[1]) fail('usage: hutch image pull REF... [--json]');
      const config = loadConfig({ imageDir: flags['image-dir'] as string | undefined });
      const builder = new TemplateBuilder(config.imageDir);
      builder.on('progress', progressPrinter());
      const store = new ImageStore(config.imageDir, {
        insecureRegistries: config.insecureRegistries,
        builder,
        log: (msg) => process.stderr.write(`${'[image]'.padEnd(9)} ${msg}\n`),
      });
      const manifests = [];
      for (const ref of positionals.slice(1)) {
        const t0 = Date.now();
        const m = await store.resolve(ref);
        manifests.push(m);
        if (!json)
          process.stdout.write(
            `${m.canonical}\t${m.digest}\t${m.source}\t${m.diskSizeMb} MB\t${((Date.now() - t0) / 1000).toFixed(1)} s\n`,
          );
      }
      if (json) printJson(manifests.length === 1 ? manifests[0] : manifests);
      return;
    }
    case 'cache': {
      if (positionals[0] !== 'gc' || positionals.length > 1)
        fail('usage: hutch cache gc [--dry-run] [--min-age SECONDS] [--json]');
      const config = loadConfig({
        stateDir: flags['state-dir'] as string | undefined,
        imageDir: flags['image-dir'] as string | undefined,
      });
      const minAge = flags['min-age'] === undefined ? config.cacheMinAgeSeconds : Number(flags['min-age']);
      if (!Number.isInteger(minAge) || minAge < 0)
        fail(`--min-age must be a whole number of seconds, got ${JSON.stringify(flags['min-age'])}`);
      const r = await collectCacheGarbage({
        imageDir: config.imageDir,
        stateDir: config.stateDir,
        minAgeMs: minAge * 1000,
        dryRun: flags['dry-run'] === true,
      });
      if (json) printJson(r);
      else printGcReport(r);
      return;
    }
    case 'new': {
      const body: Record<string, unknown> = { template: (flags.template as string | undefined) ?? 'python' };
      const ttl = ttlFlag(flags.ttl);
      if (ttl !== undefined) body.ttl_seconds = ttl;
      if (flags.persistent) body.persistent = true;
      if (ttl === undefined && !flags.persistent) {
        // The API's default TTL (60 s) would end an agent's task mid-run: ask for a machine that
        // stays until destroyed, which a server that does not allow it turns into its longest TTL.
        body.persistent = true;
        body.ttl_seconds = ttlBounds.max;
      }
      if (flags.name) body.name = flags.name;
      if (flags.net) body.net = true;
      if (flags.volume) body.volume = flags.volume;
      const rules = egressFlags(flags);
      if (rules) body.egress = rules;
      const m = await client.createMachine<MachineJson>(body);
      if (json) printJson(m);
      else process.stdout.write(`${m.id}\n`);
      return;
    }
    case 'volume':
      return volumeCommand(client, positionals, flags);
    case 'save': {
      const id = positionals[0];
      const volume = flags.volume as string | undefined;
      if (!id || !volume || positionals.length > 1) fail('usage: hutch save MACHINE --volume ID [--json]');
      const r = await client.saveMachine<{
        volume: { id: string; generation: number };
        files: number;
        bytes: number;
      }>(id, volume);
      if (json) printJson(r);
      else
        process.stdout.write(`${r.volume.id}\tv${r.volume.generation}\t${r.files} files\t${r.bytes} bytes\n`);
      return;
    }
    case 'egress': {
      const id = positionals[0];
      if (!id || positionals.length > 1)
        fail('usage: hutch egress ID [--allow X]... [--deny X]... [--open] [--json]');
      const rules = egressFlags(flags) ?? (flags.open ? {} : undefined);
      const path = `/v1/machines/${encodeURIComponent(id)}/egress`;
      const e = rules
        ? await client.request<EgressJson>('PUT', path, rules)
        : await client.request<EgressJson>('GET', path);
      if (json) printJson(e);
      else {
        process.stdout.write(
          `allow: ${e.rules.allow.join(' ') || '(the internet)'}\ndeny: ${e.rules.deny.join(' ') || '-'}\n`,
        );
        process.stdout.write(
          `refused: ${Object.entries(e.denied)
            .map(([k, v]) => `${k} ${v}`)
            .join(', ')}\n`,
        );
        for (const r of e.recent)
          process.stdout.write(
            `  ${r.last_seen} ${r.reason} ${r.destination}${r.port ? `:${r.port}/${r.protocol}` : ''}${r.detail ? ` (${r.detail})` : ''} ×${r.count}\n`,
          );
      }
      return;
    }
    case 'fork': {
      const id = positionals[0];
      if (!id || positionals.length > 1) fail('usage: hutch fork ID [--name NAME] [--ttl SECONDS] [--json]');
      const body: Record<string, unknown> = {};
      const ttl = ttlFlag(flags.ttl);
      if (ttl !== undefined) body.ttl_seconds = ttl;
      if (flags.name) body.name = flags.name;
      const m = await client.branch<MachineJson>(id, body);
      if (json) printJson(m);
      else process.stdout.write(`${m.id}\n`);
      return;
    }
    case 'list':
    case 'ls': {
      const r = await client.listMachines<{ machines: MachineJson[] }>();
      if (json) printJson(r.machines);
      else for (const m of r.machines) process.stdout.write(`${machineLine(m)}\n`);
      return;
    }
    case 'get': {
      if (!positionals[0]) fail('usage: hutch get ID');
      const m = await client.getMachine<MachineJson>(positionals[0]);
      if (json) printJson(m);
      else process.stdout.write(`${machineLine(m)}\n`);
      return;
    }
    case 'health': {
      const h = await client.health();
      printJson(h);
      return;
    }
    case 'destroy':
    case 'rm': {
      if (positionals.length === 0) fail(`usage: hutch ${cmd} ID...`);
      const removed: string[] = [];
      for (const id of positionals) {
        await client.destroyMachine(id);
        removed.push(id);
        if (!json) process.stdout.write(`${id}\n`);
      }
      if (json) printJson({ removed });
      return;
    }
    case 'exec': {
      const id = positionals[0];
      const command = trailing.length ? trailing : positionals.slice(1);
      if (!id || command.length === 0)
        fail("usage: hutch exec ID -- CMD [ARG...]  or  hutch exec ID 'SHELL COMMAND'");
      const env = envFlags(flags.env as string[] | undefined);
      // One argument without `--` is a shell command line (`hutch exec box 'make && ./run'`).
      const body: Record<string, unknown> = {
        cmd: trailing.length === 0 && command.length === 1 ? command[0] : command,
      };
      if (env) body.env = env;
      if (flags.cwd) body.cwd = flags.cwd;
      body.timeout_ms = flags.timeout === undefined ? defaultExecTimeoutMs : Number(flags.timeout);
      if (flags.interactive) body.stdin = readFileSync(0, 'utf8');
      if (!json) {
        process.exitCode = await streamExec(client, id, body);
        return;
      }
      const r = await client.exec<ExecJson>(id, body);
      // `output` first, then the API's answer as it is: the guest's C `hutch` builds the same
      // document by splicing the two strings into the response body.
      printJson({ output: r.stdout + r.stderr, ...r });
      process.exitCode = r.exit_code ?? 128 + (r.signal ?? 9);
      return;
    }
    case 'attach': {
      const id = positionals[0];
      if (!id) fail('usage: hutch attach ID [--shell PATH] [--term TERM]');
      const shell = flags.shell as string | undefined;
      process.exitCode = await attachTerminal(
        (size) =>
          client.openChannel(id, 'attach', {
            cols: String(size.cols),
            rows: String(size.rows),
            term: size.term,
            ...(shell ? { shell } : {}),
          }),
        flags.term as string | undefined,
      );
      return;
    }
    case 'tty': {
      const id = positionals[0];
      if (!id) fail('usage: hutch tty ID');
      const ws = await client.openChannel(id, 'tty');
      if (process.stdin.isTTY) process.stderr.write(`hutch: console of ${id}; Ctrl-] leaves\r\n`);
      process.exitCode = await terminal(ws, { resize: false, escape: 0x1d });
      return;
    }
    case 'upload': {
      const [id, file] = positionals;
      if (!id || !file) fail('usage: hutch upload ID FILE [--name NAME]');
      const r = await client.upload(id, (flags.name as string | undefined) ?? basename(file), file);
      if (json) printJson(r);
      else process.stdout.write(`${r.path}\t${r.size}\n`);
      return;
    }
    case 'download': {
      const [id, path] = positionals;
      if (!id || !path) fail('usage: hutch download ID PATH [-o FILE]');
      const r = await client.download(id, path);
      const out = flags.output as string | undefined;
      await pipeline(r.stream, out && out !== '-' ? createWriteStream(out) : process.stdout);
      return;
    }
    default:
      fail(`unknown command ${JSON.stringify(cmd)}\n\n${usage}`);
  }
}

const mib = (bytes: number): string => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

function printGcReport(r: GcReport): void {
  const verb = r.dry_run ? 'would remove' : 'removed';
  for (const e of r.removed) process.stdout.write(`${verb}\t${e.kind}\t${mib(e.bytes)}\t${e.path}\n`);
  for (const [kind, k] of Object.entries(r.kinds))
    if (k.removed > 0 || k.kept > 0)
      process.stdout.write(`${kind.padEnd(12)} ${verb} ${k.removed} (${mib(k.bytes)}), kept ${k.kept}\n`);
  process.stdout.write(
    `${r.dry_run ? 'would free' : 'freed'} ${mib(r.freed.bytes)} in ${r.freed.count} entries\n`,
  );
  for (const w of r.warnings) process.stderr.write(`hutch: ${w}\n`);
}

/** Runs a command over the streaming endpoint: output live, bytes exact; returns its exit code. */
async function streamExec(client: HutchClient, id: string, body: Record<string, unknown>): Promise<number> {
  for await (const e of client.execStream(id, body)) {
    if (e.type === 'stdout') await writeOut(process.stdout, e.data);
    else if (e.type === 'stderr') await writeOut(process.stderr, e.data);
    else if (e.type === 'exit') {
      if (e.timed_out) process.stderr.write('hutch: command timed out\n');
      return e.exit_code ?? 128 + (e.signal ?? 9);
    } else if (e.type === 'error') {
      process.stderr.write(`hutch: ${e.code}: ${e.message}\n`);
      return 1;
    }
  }
  process.stderr.write('hutch: the output stream ended without an exit status\n');
  return 1;
}

main(process.argv.slice(2)).catch((e: unknown) => {
  if (e instanceof ApiError) {
    // The document for the caller's parser; the line on stderr for whoever watches.
    if (wantsJson(process.argv.slice(2))) printJson({ code: e.code, message: e.message });
    process.stderr.write(`hutch: ${e.code}: ${e.message}\n`);
    process.exit(1);
  }
  fail((e as Error).stack ?? String(e), 1, 'INTERNAL');
});
