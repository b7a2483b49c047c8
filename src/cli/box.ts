import { createReadStream, createWriteStream, statSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { BoxesClient } from '../client/boxes-client.js';
import { clientBoxesEndpoint } from '../config.js';
import { attachTerminal, envFlags, type Flags, fail, parseCommand, printJson, writeOut } from './common.js';

export const boxUsage = `  hutch box create IMAGE [--name N] [--cpu N] [--memory MB] [--disk GB] [--env K=V]... [--workdir DIR]
                   [--volume HOST:GUEST[:ro]]... [--network] [--json]       prints the box's id
  hutch box ls [--status running|stopped] [--json]
  hutch box get ID [--json]
  hutch box stop ID... [--json]  |  hutch box start ID... [--json]
  hutch box rm [--force] ID... [--json]
  hutch box exec [--env K=V]... [--workdir DIR] [--timeout MS] [-d] [--json] ID -- CMD [ARG...]
                   output streams live, bytes exact; exits with the command's exit code (124: timed out;
                   Ctrl-C cancels the command); -d prints the exec's id and returns; --json prints the
                   exec, then each event, one JSON object a line
  hutch box logs ID EXEC [--json]  an exec's output (replayed, then live); exits with its exit code
  hutch box execs ID [--json]
  hutch box attach ID [--shell PATH] [--term TERM]      interactive shell (a PTY; default /bin/bash, else /bin/sh)
  hutch box run IMAGE [--cpu N] [--memory MB] [--env K=V]... [--volume ...] [--timeout MS] [--json] -- CMD [ARG...]
                   a box for one command: prints its output, exits with its exit code
  hutch box upload ID FILE [DEST]          FILE (- for stdin) to DEST (default /root/; a trailing / keeps the name)
  hutch box download ID PATH [-o FILE]     to FILE, or to stdout
  hutch box gc [--older-than SECONDS] [--json]    remove stopped boxes (default: every one)
  hutch box info [--json]

  Box commands talk to --socket PATH or --url http://HOST:PORT, else $HUTCH_BOXES_SOCKET or
  $HUTCH_BOXES_URL, else the daemon's default socket ($HUTCH_STATE_DIR or /var/lib/hutch)/boxes.sock.`;

interface BoxJson {
  id: string;
  name: string | null;
  status: string;
  image: string;
  cpu: number;
  memory_mb: number;
  disk_size_gb: number;
  created_at: string;
  error: string | null;
}

interface ExecJson {
  id: string;
  status: string;
  cmd: string[];
  exit_code: number | null;
  created_at: string;
  finished_at: string | null;
}

/** What the SSE exit event's data (a JSON string) holds. */
interface ExitData {
  exit_code: number | null;
  status: string;
  signal: number | null;
  error: string | null;
}

function boxLine(b: BoxJson): string {
  return [
    b.id,
    b.name ?? '-',
    b.status,
    b.image,
    `${b.cpu}cpu`,
    `${b.memory_mb}MB`,
    `${b.disk_size_gb}GB`,
    b.created_at,
    b.error ?? '',
  ]
    .join('\t')
    .trimEnd();
}

function intFlag(flags: Flags, name: string): number | undefined {
  const v = flags[name];
  if (v === undefined) return undefined;
  const n = Number(v);
  if (typeof v !== 'string' || !/^\d+$/.test(v) || !Number.isSafeInteger(n))
    fail(`--${name} must be a whole number, got ${JSON.stringify(v)}`);
  return n;
}

function volumeFlags(list: string[] | undefined): Record<string, unknown>[] | undefined {
  if (!list?.length) return undefined;
  return list.map((v) => {
    const parts = v.split(':');
    const readonly = parts.length === 3 && parts[2] === 'ro';
    if (parts.length < 2 || parts.length > 3 || (parts.length === 3 && !readonly) || !parts[0] || !parts[1])
      fail(`--volume wants HOST:GUEST or HOST:GUEST:ro, got ${JSON.stringify(v)}`);
    return { host_path: resolve(parts[0]), guest_path: parts[1], readonly };
  });
}

/** The exit status a shell would report: the code; 124 when timed out (as timeout(1)); 128+signal. */
function exitStatus(x: ExitData): number {
  if (x.status === 'timed_out') {
    process.stderr.write(`hutch: ${x.error ?? 'command timed out'}\n`);
    return 124;
  }
  if (x.exit_code !== null) return x.exit_code;
  if (x.signal !== null) return 128 + x.signal;
  process.stderr.write(`hutch: exec ${x.status}${x.error ? `: ${x.error}` : ''}\n`);
  return 1;
}

/**
 * Streams an exec's events: log bytes to stdout/stderr exactly (base64 events decoded), or each
 * event as a JSON line; returns the exit status.
 */
async function streamEvents(client: BoxesClient, id: string, eid: string, json: boolean): Promise<number> {
  for await (const e of client.events(id, eid)) {
    if (json) await writeOut(process.stdout, `${JSON.stringify(e)}\n`);
    if (e.event === 'log') {
      if (json) continue;
      const bytes = Buffer.from(e.data.data, e.data.encoding === 'base64' ? 'base64' : 'utf8');
      await writeOut(e.data.stream === 'stderr' ? process.stderr : process.stdout, bytes);
    } else if (e.event === 'exit') {
      return exitStatus(JSON.parse(e.data.data) as ExitData);
    }
  }
  process.stderr.write('hutch: the event stream ended without an exit event\n');
  return 1;
}

/** Ctrl-C while an exec streams cancels it (its exit event still arrives); a second one leaves. */
function cancelOnInterrupt(client: BoxesClient, id: string, eid: string): () => void {
  let interrupted = false;
  const onInt = (): void => {
    if (interrupted) process.exit(130);
    interrupted = true;
    client.cancel(id, eid).catch((e: unknown) => {
      process.stderr.write(`hutch: cancel failed: ${(e as Error).message}\n`);
      process.exit(130);
    });
  };
  process.on('SIGINT', onInt);
  return () => process.off('SIGINT', onInt);
}

export async function boxCommand(argv: string[]): Promise<void> {
  const [sub, ...rest] = argv;
  if (!sub || sub === 'help' || sub === '--help' || sub === '-h') {
    process.stdout.write(`${boxUsage}\n`);
    return;
  }
  const {
    flags,
    positionals: pos,
    trailing,
  } = parseCommand(
    rest,
    {
      json: { type: 'boolean' },
      socket: { type: 'string' },
      url: { type: 'string' },
      name: { type: 'string' },
      cpu: { type: 'string' },
      memory: { type: 'string' },
      disk: { type: 'string' },
      env: { type: 'string', multiple: true },
      workdir: { type: 'string' },
      volume: { type: 'string', multiple: true },
      network: { type: 'boolean' },
      status: { type: 'string' },
      force: { type: 'boolean', short: 'f' },
      timeout: { type: 'string' },
      detach: { type: 'boolean', short: 'd' },
      shell: { type: 'string' },
      term: { type: 'string' },
      'older-than': { type: 'string' },
      output: { type: 'string', short: 'o' },
    },
    boxUsage,
  );
  const json = flags.json === true;
  const client = new BoxesClient(
    clientBoxesEndpoint({ socket: flags.socket as string | undefined, url: flags.url as string | undefined }),
  );
  const env = envFlags(flags.env as string[] | undefined);
  const volumes = volumeFlags(flags.volume as string[] | undefined);
  const sizes = (): Record<string, unknown> => {
    const b: Record<string, unknown> = {};
    const cpu = intFlag(flags, 'cpu');
    const memory = intFlag(flags, 'memory');
    if (cpu !== undefined) b.cpu = cpu;
    if (memory !== undefined) b.memory_mb = memory;
    if (flags.network) b.network = true;
    if (env) b.env = env;
    if (volumes) b.volumes = volumes;
    return b;
  };
  const printBox = (b: BoxJson): void => {
    if (json) printJson(b);
    else process.stdout.write(`${boxLine(b)}\n`);
  };
  const ids = (usage: string): string[] => {
    if (pos.length === 0) fail(`usage: hutch box ${usage}`);
    return pos;
  };

  switch (sub) {
    case 'create': {
      const image = pos[0];
      if (!image || pos.length > 1) fail('usage: hutch box create IMAGE [--name N] [...]');
      const body: Record<string, unknown> = { image, ...sizes() };
      const disk = intFlag(flags, 'disk');
      if (disk !== undefined) body.disk_size_gb = disk;
      if (flags.name) body.name = flags.name;
      if (flags.workdir) body.workdir = flags.workdir;
      const b = await client.create<BoxJson>(body);
      if (json) printJson(b);
      else process.stdout.write(`${b.id}\n`);
      return;
    }
    case 'ls': {
      const status = flags.status as string | undefined;
      if (status !== undefined && status !== 'running' && status !== 'stopped')
        fail(`--status must be running or stopped, got ${JSON.stringify(status)}`);
      const r = await client.list<{ boxes: BoxJson[] }>(status);
      if (json) printJson(r);
      else for (const b of r.boxes) process.stdout.write(`${boxLine(b)}\n`);
      return;
    }
    case 'get': {
      if (pos.length !== 1) fail('usage: hutch box get ID');
      printBox(await client.get<BoxJson>(pos[0]!));
      return;
    }
    case 'stop':
    case 'start': {
      const done: BoxJson[] = [];
      for (const id of ids(`${sub} ID...`)) {
        const b = sub === 'stop' ? await client.stop<BoxJson>(id) : await client.start<BoxJson>(id);
        if (json) done.push(b);
        else process.stdout.write(`${boxLine(b)}\n`);
      }
      if (json) printJson(done.length === 1 ? done[0] : done);
      return;
    }
    case 'rm': {
      const removed: string[] = [];
      for (const id of ids('rm [--force] ID...')) {
        await client.remove(id, flags.force === true);
        removed.push(id);
        if (!json) process.stdout.write(`${id}\n`);
      }
      if (json) printJson({ removed });
      return;
    }
    case 'exec': {
      const id = pos[0];
      const cmd = trailing.length ? trailing : pos.slice(1);
      if (!id || cmd.length === 0) fail('usage: hutch box exec ID -- CMD [ARG...]');
      const body: Record<string, unknown> = { cmd };
      if (env) body.env = env;
      if (flags.workdir) body.workdir = flags.workdir;
      const timeout = intFlag(flags, 'timeout');
      if (timeout !== undefined) body.timeout_ms = timeout;
      const e = await client.exec<ExecJson>(id, body);
      if (flags.detach) {
        if (json) printJson(e);
        else process.stdout.write(`${e.id}\n`);
        return;
      }
      if (json) await writeOut(process.stdout, `${JSON.stringify(e)}\n`);
      const restore = cancelOnInterrupt(client, id, e.id);
      try {
        process.exitCode = await streamEvents(client, id, e.id, json);
      } finally {
        restore();
      }
      return;
    }
    case 'logs': {
      const [id, eid] = pos;
      if (!id || !eid || pos.length > 2) fail('usage: hutch box logs ID EXEC');
      process.exitCode = await streamEvents(client, id, eid, json);
      return;
    }
    case 'execs': {
      if (pos.length !== 1) fail('usage: hutch box execs ID');
      const r = await client.execs<{ execs: ExecJson[] }>(pos[0]!);
      if (json) printJson(r);
      else
        for (const x of r.execs)
          process.stdout.write(
            `${x.id}\t${x.status}\t${x.exit_code ?? '-'}\t${x.created_at}\t${JSON.stringify(x.cmd)}\n`,
          );
      return;
    }
    case 'attach': {
      const id = pos[0];
      if (!id || pos.length > 1) fail('usage: hutch box attach ID [--shell PATH] [--term TERM]');
      const shell = flags.shell as string | undefined;
      process.exitCode = await attachTerminal(
        (size) => client.openAttach(id, { ...size, ...(shell ? { shell } : {}) }),
        flags.term as string | undefined,
      );
      return;
    }
    case 'run': {
      const image = pos[0];
      const cmd = trailing.length ? trailing : pos.slice(1);
      if (!image || cmd.length === 0) fail('usage: hutch box run IMAGE -- CMD [ARG...]');
      const body: Record<string, unknown> = { image, cmd, ...sizes() };
      const timeout = intFlag(flags, 'timeout');
      if (timeout !== undefined) body.timeout_ms = timeout;
      const r = await client.run<{
        exit_code: number | null;
        stdout: string;
        stderr: string;
        error_message: string | null;
        status: ExitData['status'];
        signal: number | null;
      }>(body);
      if (json) printJson(r);
      else {
        await writeOut(process.stdout, r.stdout);
        await writeOut(process.stderr, r.stderr);
      }
      process.exitCode = exitStatus({ ...r, error: r.error_message });
      return;
    }
    case 'upload': {
      const [id, file, dest] = pos;
      if (!id || !file || pos.length > 3) fail('usage: hutch box upload ID FILE [DEST]');
      if (file !== '-' && !statSync(file, { throwIfNoEntry: false })?.isFile())
        fail(`${file}: no such file`, 1);
      const name = file === '-' ? 'stdin' : basename(file);
      const r = await client.upload(
        id,
        dest ?? '/root/',
        file === '-' ? process.stdin : createReadStream(file),
        name,
      );
      if (json) printJson(r);
      else process.stdout.write(`${r.dest}\t${r.size}\n`);
      return;
    }
    case 'download': {
      const [id, path] = pos;
      if (!id || !path || pos.length > 2) fail('usage: hutch box download ID PATH [-o FILE]');
      const res = await client.download(id, path);
      const out = flags.output as string | undefined;
      await pipeline(res, out && out !== '-' ? createWriteStream(out) : process.stdout);
      return;
    }
    case 'gc': {
      const r = await client.gc(intFlag(flags, 'older-than'));
      if (json) printJson(r);
      else process.stdout.write(`removed ${r.removed}\n`);
      return;
    }
    case 'info': {
      const r = await client.info();
      if (json) printJson(r);
      else for (const [k, v] of Object.entries(r)) process.stdout.write(`${k}\t${v}\n`);
      return;
    }
    default:
      fail(`unknown box command ${JSON.stringify(sub)}\n\n${boxUsage}`);
  }
}
