/**
 * The request fuzzer: every route of both REST APIs, taken from the route tables and their zod
 * schemas (a new route is fuzzed without touching this file), against a real daemon with one
 * running machine and one running box. Machines over TCP; boxes over the Unix socket and TCP.
 *
 * Every answer must be a `{"code","message"}` error with a 4xx status and the code's status, or a
 * documented success of a route that changes nothing; never a 5xx, never a hung request. Bad
 * input is only ever sent where the server's own validators (the zod schemas, uploadDest,
 * uploadName) say it is bad, so a 2xx on a route that changes state is a failure, not a surprise.
 * Afterwards the daemon is alive, its memory within bounds, the machine and the box still run
 * commands, nothing was created or removed, and no upload spool is left behind.
 *
 * Deterministic (seeded), bounded in count and time; talks only to 127.0.0.1 and Unix sockets.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { z } from 'zod';
import { uploadDest } from '../../src/api/boxes-channels.js';
import { boxRoutes } from '../../src/api/boxes-routes.js';
import type { ApiRoute } from '../../src/api/http/routes.js';
import { uploadName } from '../../src/api/machine-channels.js';
import { machineRoutes } from '../../src/api/routes.js';
import { BoxesClient } from '../../src/client/boxes-client.js';
import { type ErrorCode, errorTable } from '../../src/errors.js';
import { api, cleanup, qemusOf, sleep, startDaemon, type TestDaemon } from '../helpers/daemon.js';
import { memoryOf, processAlive, Tally } from '../helpers/hostile.js';
import { prng } from '../helpers/prng.js';
import {
  type Endpoint,
  exchange,
  type Outcome,
  rawRequest,
  tcpEndpoint,
  unixEndpoint,
  type Write,
} from '../helpers/raw-http.js';

/** The daemon's limits under test: short, so the slow-client attacks take seconds. */
const idleMs = 1500;
const maxConnections = 32;
/** No single request may take longer than this (a hung request fails). */
const answerWithinMs = 30_000;
/** The daemon's memory: peak and growth over the run, MiB. */
const peakRssBoundMb = 256;
const rssGrowthBoundMb = 96;

// ---- the routes, from the tables ----------------------------------------------------------------

type Api = 'machines' | 'boxes';

interface FuzzRoute {
  api: Api;
  method: string;
  path: string;
  /** The JSON body schema, when the route reads one. */
  body: z.ZodType | undefined;
  /** What the route reads besides its path: a JSON body, raw bytes, multipart, or an upgrade. */
  input: 'none' | 'json' | 'raw' | 'multipart' | 'websocket';
  /** Changes nothing: a 2xx is a documented success whatever the input. */
  readOnly: boolean;
  headerParams: string[];
  queryParams: string[];
}

interface DocParam {
  name: string;
  in: string;
}

/** What a route reads besides its path, from its table entry (kind, schemas, documented body). */
function inputOf(r: ApiRoute<unknown>): FuzzRoute['input'] {
  if (r.kind === 'websocket') return 'websocket';
  if (r.body) return 'json';
  if (r.kind === 'json' || r.kind === 'sse') return 'none';
  const content = (r.doc.requestBody as { content?: Record<string, unknown> } | undefined)?.content ?? {};
  if ('multipart/form-data' in content) return 'multipart';
  return 'application/octet-stream' in content ? 'raw' : 'none';
}

/** Whether a route changes nothing: a GET, or a download (a POST only to carry its JSON body). */
function readOnlyOf(r: ApiRoute<unknown>): boolean {
  if (r.method === 'GET') return true;
  const ok = r.kind === 'raw' ? (r.doc.responses['200'] as { content?: Record<string, unknown> }) : undefined;
  return ok?.content !== undefined && 'application/octet-stream' in ok.content;
}

function routesFromTables(): FuzzRoute[] {
  const docParams = (r: ApiRoute<unknown>, where: string): string[] =>
    r.kind === 'json' || r.kind === 'websocket'
      ? []
      : ((r.doc.parameters ?? []) as DocParam[]).filter((p) => p.in === where).map((p) => p.name);
  const tables: [Api, ApiRoute<unknown>[]][] = [
    ['machines', machineRoutes as ApiRoute<unknown>[]],
    ['boxes', boxRoutes as ApiRoute<unknown>[]],
  ];
  return tables.flatMap(([api, table]) =>
    table.map((r) => ({
      api,
      method: r.method,
      path: r.path,
      body: r.body,
      input: inputOf(r),
      readOnly: readOnlyOf(r),
      headerParams: docParams(r, 'header'),
      queryParams: [...Object.keys(r.query?.shape ?? {}), ...docParams(r, 'query')],
    })),
  );
}

const routes = routesFromTables();

// ---- deterministic choices ----------------------------------------------------------------------

const random = prng(0x5eed0008);
/** Up to n items of a list, chosen by the seeded generator (in list order). */
function sample<T>(list: T[], n: number): T[] {
  if (list.length <= n) return list;
  const picked = new Set<number>();
  while (picked.size < n) picked.add(Math.floor(random() * list.length));
  return [...picked].sort((a, b) => a - b).map((i) => list[i] as T);
}

// ---- inputs ---------------------------------------------------------------------------------------

/** Strings no sane client sends: NUL, overlong and lone-surrogate forms, RTL, emoji, long. */
const oddStrings = [
  '\u0000',
  'a\u0000b',
  '\ud800',
  'x\udfffy',
  '\u202etxt.exe',
  '😀',
  '\u0301\u0301',
  '\uffff',
  '\r\n',
  '%zz',
  '$(id)',
  "'; DROP TABLE machines; --",
  'x'.repeat(5000),
];

/** Path segments as they appear on the request line: bad escapes, encoded NUL and traversal. */
const oddSegments = [
  '%zz',
  '%',
  '%4',
  '%E0%A4%A',
  '%C0%AF',
  '%C0%AE%C0%AE',
  '%ED%A0%80',
  '%ff%fe',
  '%00',
  'a%00b',
  '%F0%9F%98%80',
  '%E2%80%AEtxt',
  '..',
  '%2e%2e',
  '%2e%2e%2f%2e%2e%2fetc%2fpasswd',
  '..%2f..%2f',
  '%2F',
  '%25',
  '%u0041',
  '+',
  '%20',
  '%0d%0aX-Injected:%201',
  'x'.repeat(3000),
];

/** Raw bytes on the request line, which the HTTP parser itself has to refuse or pass on. */
const rawSegments = [
  Buffer.from([0x00]),
  Buffer.from([0x7f]),
  Buffer.from('€', 'utf8'),
  Buffer.from([0xc0, 0xaf]),
  Buffer.from([0xed, 0xa0, 0x80]),
  Buffer.from([0xff]),
  Buffer.from('\t'),
  Buffer.from('a b'),
];

const oddQueries = [
  '?%zz',
  '?a=%',
  '?a=%00',
  '?path=%2e%2e%2f%2e%2e%2fetc%2fpasswd',
  '?path=relative',
  '?path=%2Froot%00x',
  '?status=%E2%80%AE',
  '?status=sleeping',
  '?force=maybe',
  '?force=%00',
  '?cols=1e9&rows=-1',
  '?cols=%zz',
  '?term=%0a',
  '?shell=relative',
  '?shell=%2Fbin%2Fsh%00',
  '?%F0%9F%98%80=%ED%A0%80',
  '?=&&==',
  `?${'a=1&'.repeat(1500)}`,
];

/** Values no query parameter of either API takes (paths, sizes, terminals, shells, flags, states). */
const badParamValues = ['%00', '%zz', '%2F%00', 'a%20b', 'x'.repeat(5000)];

/** File paths aimed at traversal and odd names (upload names, upload dests, download paths). */
const oddFilePaths = [
  '../etc/passwd',
  '/root/../etc/passwd',
  '/root/%2e%2e%2fetc/passwd',
  '..',
  '.',
  '',
  '/',
  'relative',
  '/root/a\u0000b',
  '/root/\ud800',
  '/root/\u202etxt.exe',
  '/root/😀',
  `/root/${'x'.repeat(5000)}`,
  '//root//x',
  '/root/./x/../x',
  '\\root\\x',
];

/** Values of the wrong type (or out of range) for most fields, JSON-encodable. */
const wrongValues: unknown[] = [
  null,
  true,
  false,
  0,
  -1,
  1.5,
  1e308,
  2 ** 53 + 1,
  '',
  'str',
  ...oddStrings.slice(0, 6),
  [],
  [1],
  ['a\u0000b'],
  {},
  { a: 1 },
  { 'a=b': 'c' },
  'x'.repeat(70_000),
  ['x'.repeat(70_000)],
];

/** Candidates for a valid value of a field, to build an otherwise valid body around a bad one. */
const samples: unknown[] = [
  'python',
  'debian:bookworm',
  '/root',
  'fuzz',
  ['true'],
  1,
  128,
  0,
  true,
  false,
  {},
  [],
];

function shapeOf(schema: z.ZodType): Record<string, z.ZodType> {
  return (schema as unknown as { shape?: Record<string, z.ZodType> }).shape ?? {};
}

/** A body with a valid value for every required field (where a sample fits). */
function baseBody(schema: z.ZodType): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, f] of Object.entries(shapeOf(schema))) {
    if (f.safeParse(undefined).success) continue;
    const v = samples.find((s) => f.safeParse(s).success);
    if (v !== undefined) out[k] = v;
  }
  return out;
}

/**
 * Whether the server certainly refuses this body: not JSON, or JSON the schema rejects. An empty
 * body and `null` are never "certainly" refused: some routes read them as `{}`.
 */
function certainlyRefused(schema: z.ZodType, body: Buffer): boolean {
  const text = body.toString('utf8').trim();
  if (text === '') return false;
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return true;
  }
  if (value === null) return false;
  return !schema.safeParse(value).success;
}

interface BodyCase {
  what: string;
  body: Buffer;
}

/** The body attacks on one schema: generated from its fields, then the shapes no schema takes. */
function bodyCases(schema: z.ZodType): BodyCase[] {
  const base = baseBody(schema);
  const shape = shapeOf(schema);
  const json = (v: unknown): Buffer => Buffer.from(JSON.stringify(v));
  const cases: BodyCase[] = [];
  for (const [k, f] of Object.entries(shape)) {
    const wrong = wrongValues.filter((v) => !f.safeParse(v).success);
    for (const v of sample(wrong, 6))
      cases.push({ what: `${k}: ${JSON.stringify(v)?.slice(0, 40)}`, body: json({ ...base, [k]: v }) });
    if (!f.safeParse(undefined).success) {
      const { [k]: _, ...rest } = base;
      cases.push({ what: `${k} missing`, body: json(rest) });
    }
    // Odd strings in the field, with an unknown field beside so the body stays refused.
    for (const s of sample(oddStrings, 2))
      cases.push({
        what: `${k}: odd ${JSON.stringify(s).slice(0, 20)}`,
        body: json({ ...base, [k]: s, zz: 1 }),
      });
    // Deeply nested inside a field: refused at its first level.
    cases.push({
      what: `${k}: nested 20000 deep`,
      body: Buffer.from(`{"${k}":${'['.repeat(20000)}${']'.repeat(20000)}}`),
    });
  }
  cases.push(
    { what: 'unknown field', body: json({ ...base, zz_unknown: 1 }) },
    {
      what: '__proto__ field',
      body: Buffer.from(`{"__proto__":{"polluted":true},${JSON.stringify(base).slice(1)}`),
    },
    { what: 'constructor field', body: json({ ...base, constructor: { prototype: {} } }) },
    { what: 'an array', body: json([base]) },
    { what: 'a string', body: json('str') },
    { what: 'a number', body: json(1) },
    { what: 'true', body: json(true) },
    { what: 'unterminated object', body: Buffer.from('{') },
    { what: 'cut after a key', body: Buffer.from('{"a":') },
    { what: 'trailing garbage', body: Buffer.from(`${JSON.stringify(base)}x`) },
    { what: 'single quotes', body: Buffer.from("{'a':1}") },
    { what: 'trailing comma', body: Buffer.from('{"a":1,}') },
    { what: 'NaN', body: Buffer.from('NaN') },
    { what: 'NUL byte', body: Buffer.from([0]) },
    { what: 'invalid UTF-8', body: Buffer.from([0x7b, 0xff, 0xfe, 0x7d]) },
    { what: 'nested arrays 100000 deep', body: Buffer.from(`${'['.repeat(100_000)}${']'.repeat(100_000)}`) },
    {
      what: 'nested objects 50000 deep',
      body: Buffer.from(`${'{"a":'.repeat(50_000)}1${'}'.repeat(50_000)}`),
    },
    { what: '1.1 MiB body', body: json({ ...base, zz: 'x'.repeat(1_100_000) }) },
    { what: '4 MiB body', body: Buffer.alloc(4 * 1024 * 1024, 0x20) },
  );
  return cases.filter((c) => certainlyRefused(schema, c.body));
}

const wsKey = Buffer.from(Array.from({ length: 16 }, () => Math.floor(random() * 256))).toString('base64');
/** A valid WebSocket handshake: what is refused with it is refused for its path or query. */
const wsHandshake: [string, string][] = [
  ['connection', 'Upgrade'],
  ['upgrade', 'websocket'],
  ['sec-websocket-version', '13'],
  ['sec-websocket-key', wsKey],
];

/**
 * What no command may carry to the guest, whatever a schema says: NUL (argv, environment and
 * working directory are C strings there) and more than the one agent frame a command travels in
 * (64 KiB). For the routes that run a command in a machine or box of theirs (a `cmd` field and
 * an `{id}`): at worst, one of these runs a command.
 */
function commandCases(r: FuzzRoute): (BodyCase & { limit: boolean })[] {
  const shape = r.body ? shapeOf(r.body) : {};
  const cmd = shape.cmd;
  if (!cmd || !r.path.includes('{id}') || r.readOnly) return [];
  const dir = ['cwd', 'workdir'].find((k) => k in shape);
  const cases: { what: string; value: Record<string, unknown>; limit: boolean }[] = [
    { what: 'NUL in argv', value: { cmd: ['true', 'a\u0000b'] }, limit: false },
    { what: 'NUL in argv[0]', value: { cmd: ['tr\u0000ue'] }, limit: false },
    { what: 'NUL in an env value', value: { cmd: ['true'], env: { A: 'b\u0000c' } }, limit: false },
    { what: 'NUL in an env name', value: { cmd: ['true'], env: { 'A\u0000B': 'c' } }, limit: false },
    { what: 'an argument of 70 KB', value: { cmd: ['true', 'x'.repeat(70_000)] }, limit: true },
    {
      what: '3000 arguments',
      value: { cmd: ['true', ...Array<string>(3000).fill('x'.repeat(30))] },
      limit: true,
    },
    {
      what: 'an environment of 90 KB',
      value: {
        cmd: ['true'],
        env: Object.fromEntries(Array.from({ length: 2000 }, (_, i) => [`V${i}`, 'x'.repeat(40)])),
      },
      limit: true,
    },
  ];
  if (dir)
    cases.push({ what: `NUL in ${dir}`, value: { cmd: ['true'], [dir]: '/root\u0000x' }, limit: false });
  if (cmd.safeParse('true').success)
    cases.push(
      { what: 'NUL in a shell command', value: { cmd: 'true\u0000x' }, limit: false },
      { what: 'a shell command of 70 KB', value: { cmd: `true ${'x'.repeat(70_000)}` }, limit: true },
    );
  return cases.map((c) => ({ what: c.what, body: Buffer.from(JSON.stringify(c.value)), limit: c.limit }));
}

/** Percent-encodes the UTF-8 bytes of a string (encodeURIComponent throws on a lone surrogate). */
function pct(s: string): string {
  return [...Buffer.from(s, 'utf8')]
    .map((b) =>
      /[A-Za-z0-9\-._~]/.test(String.fromCharCode(b))
        ? String.fromCharCode(b)
        : `%${b.toString(16).padStart(2, '0')}`,
    )
    .join('');
}

// ---- judging answers --------------------------------------------------------------------------

const statuses = new Map<number, number>();

/**
 * Throws unless the outcome is a well-formed error (4xx, JSON `{"code","message"}` with a code of
 * the table and its status) or, when `success` allows it, a 2xx whose body matches its framing.
 */
function judge(o: Outcome, success: boolean, opts: { cutOk?: boolean } = {}): string {
  if (o.kind === 'timeout') throw new Error(`no answer within ${o.ms} ms (${o.bytes} bytes read)`);
  if (o.kind === 'closed') throw new Error(`closed without an answer (${o.bytes} bytes read)`);
  const { status, headers, body, extra, truncated } = o.res;
  statuses.set(status, (statuses.get(status) ?? 0) + 1);
  const text = body.toString('utf8').slice(0, 300);
  if (status >= 500) throw new Error(`${status}: ${text}`);
  if (status >= 200 && status < 300) {
    if (!success) throw new Error(`${status}, a success for input that must be refused: ${text}`);
    if (extra || (truncated && !opts.cutOk))
      throw new Error(`${status} whose body does not match its framing (${extra} extra bytes)`);
    return String(status);
  }
  if (status < 400) throw new Error(`unexpected ${status}`);
  if (!/^application\/json/.test(headers['content-type'] ?? ''))
    throw new Error(`${status} with content-type ${headers['content-type']}: ${text}`);
  let e: { code?: unknown; message?: unknown };
  try {
    e = JSON.parse(body.toString('utf8')) as typeof e;
  } catch {
    throw new Error(`${status} with a body that is not JSON: ${text}`);
  }
  if (typeof e.code !== 'string' || !(e.code in errorTable))
    throw new Error(`${status} with an unknown code: ${text}`);
  if (errorTable[e.code as ErrorCode].http !== status)
    throw new Error(`${status} for ${e.code}, whose status is ${errorTable[e.code as ErrorCode].http}`);
  if (typeof e.message !== 'string' || e.message.length === 0) throw new Error(`${status} without a message`);
  return `${status} ${e.code}`;
}

// ---- the suite ----------------------------------------------------------------------------------

describe('request fuzzer: every route of both REST APIs', { timeout: 900_000 }, () => {
  let d: TestDaemon;
  let pid: number;
  let spoolDir: string;
  let machines: Endpoint;
  let boxesUnix: Endpoint;
  let boxesTcp: Endpoint;
  let boxes: BoxesClient;
  const ids = { machine: '', box: '', eid: '' };
  let before0: { machines: string; boxes: string; machineProcs: string; boxProcs: string };
  let rss0 = 0;
  const tallies: Tally[] = [];

  const endpointsOf = (a: Api): Endpoint[] => (a === 'machines' ? [machines] : [boxesUnix, boxesTcp]);
  const realParams = (r: FuzzRoute): Record<string, string> => ({
    id: r.api === 'machines' ? ids.machine : ids.box,
    eid: ids.eid,
  });
  const unknownParams = (r: FuzzRoute): Record<string, string> => ({
    id: r.api === 'machines' ? 'm-00000000' : 'box_000000000000',
    eid: 'exec_000000000000',
  });
  /** The other API's real id: a machine route must not find a box, nor the reverse. */
  const crossParams = (r: FuzzRoute): Record<string, string> => ({
    id: r.api === 'machines' ? ids.box : ids.machine,
    eid: ids.eid,
  });
  const fill = (path: string, values: Record<string, string>): string =>
    path.replace(/\{(\w+)\+?\}/g, (_, n: string) => values[n] ?? 'x');

  async function attempt(
    t: Tally,
    what: string,
    ep: Endpoint,
    request: Buffer | Write[],
    success: boolean,
    opts: { cutOk?: boolean } = {},
  ): Promise<Outcome | undefined> {
    let out: Outcome | undefined;
    await t.check(`${ep.name} ${what}`, async () => {
      out = await exchange(ep, request, answerWithinMs);
      if (out.kind === 'response' && out.res.status === 101)
        throw new Error('101: an upgrade was accepted for input that must be refused');
      return judge(out, success, opts);
    });
    return out;
  }

  /** A command's stdout in the machine (JSON exec). */
  async function inMachine(cmd: string): Promise<string> {
    const r = await api(d.url, 'POST', `/v1/machines/${ids.machine}/exec`, { cmd });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    return String(r.body.stdout);
  }

  /** A command's stdout in the box (exec, then its events until exit). */
  async function inBox(cmd: string): Promise<string> {
    const e = await boxes.exec<{ id: string }>(ids.box, { cmd: ['sh', '-c', cmd] });
    let out = '';
    for await (const ev of boxes.events(ids.box, e.id))
      if (ev.event === 'log' && ev.data.stream === 'stdout')
        out += Buffer.from(ev.data.data, ev.data.encoding === 'base64' ? 'base64' : 'utf8').toString('utf8');
    return out;
  }

  // Processes with a command line (kernel threads have none): a shell left behind shows here.
  // The counting shell and its children are left out: with a pipeline, whether its last command
  // had been forked when the first listed /proc varied, so the same guest counted 4 or 5.
  const countProcs = [
    'n=0; for f in $(grep -l . /proc/[0-9]*/cmdline 2>/dev/null); do p=$(dirname $f);',
    '[ "$p" = /proc/$$ ] && continue; pp=;',
    'while read -r k v; do [ "$k" = PPid: ] && pp=$v && break; done 2>/dev/null < $p/status;',
    '[ -z "$pp" ] || [ "$pp" = $$ ] && continue; n=$((n+1)); done; echo $n',
  ].join(' ');
  /** What they are, for a failure's message. */
  const listProcs =
    'for p in /proc/[0-9]*; do c=$(tr \'\\0\' \' \' < $p/cmdline 2>/dev/null); [ -n "$c" ] && echo "$p $c"; done';

  async function snapshot(): Promise<typeof before0> {
    const ms = (await api(d.url, 'GET', '/v1/machines')).body.machines as { id: string; status: string }[];
    const bs = (await boxes.list<{ boxes: { id: string; status: string }[] }>()).boxes;
    return {
      machines: JSON.stringify(ms.map((m) => [m.id, m.status])),
      boxes: JSON.stringify(bs.map((b) => [b.id, b.status])),
      machineProcs: (await inMachine(countProcs)).trim(),
      boxProcs: (await inBox(countProcs)).trim(),
    };
  }

  before(async () => {
    // The daemon's temp dir is its own, so what it leaves there is its own too.
    spoolDir = mkdtempSync(join(tmpdir(), 'hutch-fuzz-tmp-'));
    d = await startDaemon({
      env: {
        HUTCH_BOXES_LISTEN: '127.0.0.1:0',
        HUTCH_BODY_IDLE_TIMEOUT_MS: String(idleMs),
        HUTCH_MAX_CONNECTIONS: String(maxConnections),
        TMPDIR: spoolDir,
      },
    });
    pid = d.proc.pid as number;
    assert.ok(d.boxesUrl, 'the boxes API has a TCP endpoint');
    machines = tcpEndpoint('machines', d.url);
    boxesUnix = unixEndpoint('boxes/unix', d.boxesSocket);
    boxesTcp = tcpEndpoint('boxes/tcp', d.boxesUrl);
    boxes = new BoxesClient({ socketPath: d.boxesSocket });
    const m = await api(d.url, 'POST', '/v1/machines', { ttl_seconds: 900 });
    assert.equal(m.status, 201, JSON.stringify(m.body));
    ids.machine = String(m.body.id);
    const b = await boxes.create<{ id: string }>({ image: 'debian:bookworm', cpu: 1, memory_mb: 256 });
    ids.box = b.id;
    const e = await boxes.exec<{ id: string }>(ids.box, { cmd: ['true'] });
    ids.eid = e.id;
    for await (const _ of boxes.events(ids.box, e.id)) {
      // until the exit event: the exec is finished, so its events end
    }
    before0 = await snapshot();
    rss0 = memoryOf(pid).rssMb;
  });

  after(async () => {
    for (const t of tallies) console.log(`  ${t.name}: ${t.attempts.length} tried`);
    try {
      if (d) await cleanup(d);
    } finally {
      rmSync(spoolDir, { recursive: true, force: true });
    }
  });

  const newTally = (name: string): Tally => {
    const t = new Tally(name);
    tallies.push(t);
    return t;
  };

  test('bodies: wrong types, missing and extra fields, invalid, huge and deep JSON', async () => {
    const t = newTally('fuzz bodies');
    for (const r of routes.filter((x) => x.body !== undefined && x.input === 'json')) {
      const schema = r.body as z.ZodType;
      const cases = bodyCases(schema);
      assert.ok(cases.length > 10, `${r.method} ${r.path}: only ${cases.length} body cases`);
      for (const ep of endpointsOf(r.api)) {
        const target = fill(r.path, realParams(r));
        for (const c of cases) {
          const req = rawRequest(r.method, target, [['content-type', 'application/json']], c.body);
          await attempt(t, `${r.method} ${r.path} ${c.what}`, ep, req, r.readOnly);
        }
        for (const c of commandCases(r)) {
          const req = rawRequest(r.method, target, [['content-type', 'application/json']], c.body);
          await t.check(`${ep.name} ${r.method} ${r.path} ${c.what}`, async () => {
            const o = await exchange(ep, req, answerWithinMs);
            const v = judge(o, false);
            // Over the frame limit: the answer says which limit.
            if (c.limit && o.kind === 'response' && !o.res.body.toString().includes('65536'))
              throw new Error(`${v} without naming the limit: ${o.res.body.toString().slice(0, 200)}`);
            return v;
          });
        }
        // The same on an unknown id, where anything (even a valid body) must be refused.
        if (r.path.includes('{id}'))
          for (const c of sample(cases, 5)) {
            const req = rawRequest(r.method, fill(r.path, unknownParams(r)), [], c.body);
            await attempt(t, `${r.method} ${r.path} (unknown id) ${c.what}`, ep, req, false);
          }
      }
    }
    t.report();
  });

  test('paths and queries: bad escapes, NUL, odd Unicode, traversal, unknown and crossed ids', async () => {
    const t = newTally('fuzz paths');
    for (const r of routes) {
      const hasParams = r.path.includes('{');
      for (const ep of endpointsOf(r.api)) {
        // A route that changes state is only ever addressed with ids that name nothing of its own.
        const safe = (values: Record<string, string>): boolean =>
          r.readOnly || values.id !== realParams(r).id;
        if (hasParams) {
          for (const seg of oddSegments) {
            const values = Object.fromEntries(Object.keys(realParams(r)).map((k) => [k, seg]));
            const req = rawRequest(r.method, fill(r.path, values), [], r.input === 'json' ? '{' : undefined);
            await attempt(t, `${r.method} ${r.path} with ${seg.slice(0, 30)}`, ep, req, false);
          }
          for (const values of [unknownParams(r), crossParams(r)]) {
            if (!safe(values)) continue;
            const req = rawRequest(r.method, fill(r.path, values), [], r.input === 'json' ? '{}' : undefined);
            await attempt(t, `${r.method} ${r.path} ${values.id}`, ep, req, false);
          }
        }
        // Raw bytes the request line should not hold, inside a path no route has: if the parser
        // took one for a separator, the request would still name nothing.
        for (const raw of rawSegments) {
          const target = Buffer.concat([
            Buffer.from(`${fill(r.path, unknownParams(r))}/x`),
            raw,
            Buffer.from('y'),
          ]);
          await attempt(
            t,
            `${r.method} ${r.path} raw ${raw.toString('hex')}`,
            ep,
            rawRequest(r.method, target),
            false,
          );
        }
        // Junk queries: on the real ids where nothing can change, else on unknown ones.
        const values = r.readOnly ? realParams(r) : unknownParams(r);
        const body = r.input === 'json' ? '{' : undefined;
        for (const q of oddQueries) {
          const req = rawRequest(r.method, fill(r.path, values) + q, [], body);
          await attempt(
            t,
            `${r.method} ${r.path}${q.slice(0, 30)}`,
            ep,
            req,
            r.readOnly && r.input !== 'websocket',
          );
        }
        // Bad values of each documented query parameter: refused, WebSocket handshake or not.
        for (const p of r.queryParams)
          for (const v of badParamValues) {
            // An agent's goal is free text: "a b" and "%zz" are goals like any other.
            if (p === 'goal' && (v === 'a%20b' || v === '%zz')) continue;
            const req = rawRequest(
              r.method,
              `${fill(r.path, values)}?${p}=${v}`,
              r.input === 'websocket' ? wsHandshake : [],
              body,
            );
            await attempt(t, `${r.method} ${r.path}?${p}=${v.slice(0, 20)}`, ep, req, false);
          }
      }
    }
    t.report();
  });

  test('methods: every method a path does not serve, and ones no client should send', async () => {
    const t = newTally('fuzz methods');
    const byPath = new Map<string, { api: Api; methods: Set<string>; route: FuzzRoute }>();
    for (const r of routes) {
      const key = `${r.api} ${r.path}`;
      const entry = byPath.get(key) ?? { api: r.api, methods: new Set<string>(), route: r };
      entry.methods.add(r.method);
      byPath.set(key, entry);
    }
    for (const { api: a, methods, route } of byPath.values()) {
      // Real ids: a method the path does not serve must never reach a handler.
      const target = fill(route.path, realParams(route));
      for (const m of [
        'GET',
        'POST',
        'DELETE',
        'PUT',
        'PATCH',
        'OPTIONS',
        'TRACE',
        'CONNECT',
        'FUZZ',
        'get',
      ]) {
        if (methods.has(m)) continue;
        for (const ep of endpointsOf(a)) {
          const req = rawRequest(
            m,
            m === 'CONNECT' ? 'localhost:1' : target,
            [],
            m === 'GET' ? undefined : '{}',
          );
          await attempt(t, `${m} ${route.path}`, ep, req, false);
        }
      }
    }
    t.report();
  });

  test('headers: malformed, oversized, lying framing, odd content types and expectations', async () => {
    const t = newTally('fuzz headers');
    const attacks: {
      what: string;
      headers: [string, string | Buffer][];
      body?: string;
      length?: number | null;
    }[] = [
      { what: 'NUL in a header value', headers: [['x-fuzz', Buffer.from('a\0b')]] },
      { what: 'CR in a header value', headers: [['x-fuzz', Buffer.from('a\rb')]] },
      { what: 'raw UTF-8 in a header value', headers: [['x-fuzz', Buffer.from('€😀\u202e', 'utf8')]] },
      { what: 'space in a header name', headers: [['x fuzz', 'a']] },
      { what: 'UTF-8 in a header name', headers: [['x-€', 'a']] },
      { what: 'headers over 16 KiB', headers: [['x-fuzz', 'a'.repeat(20_000)]] },
      {
        what: '300 headers',
        headers: Array.from({ length: 300 }, (_, i): [string, string] => [`x-f${i}`, 'a']),
      },
      { what: 'negative content-length', headers: [['content-length', '-1']], length: null },
      { what: 'content-length abc', headers: [['content-length', 'abc']], length: null },
      { what: 'content-length 2^64', headers: [['content-length', '18446744073709551616']], length: null },
      {
        what: 'two content-lengths',
        headers: [
          ['content-length', '1'],
          ['content-length', '2'],
        ],
        body: 'ab',
        length: null,
      },
      {
        what: 'content-length and chunked',
        headers: [
          ['transfer-encoding', 'chunked'],
          ['content-length', '3'],
        ],
        body: '3\r\nabc\r\n0\r\n\r\n',
        length: null,
      },
      {
        what: 'bad chunk size',
        headers: [['transfer-encoding', 'chunked']],
        body: 'zz\r\nabc\r\n0\r\n\r\n',
        length: null,
      },
      {
        what: 'unknown transfer-encoding',
        headers: [['transfer-encoding', 'gzip, chunked']],
        body: '0\r\n\r\n',
        length: null,
      },
      { what: 'content-type text/plain', headers: [['content-type', 'text/plain']], body: '{' },
      {
        what: 'form-encoded body',
        headers: [['content-type', 'application/x-www-form-urlencoded']],
        body: 'cmd=ls',
      },
      { what: 'expect 100-continue', headers: [['expect', '100-continue']], body: '{' },
      { what: 'unknown expectation', headers: [['expect', 'teapot']], body: '{' },
      { what: 'multipart without a boundary', headers: [['content-type', 'multipart/form-data']], body: '{' },
      {
        what: 'X-Filename with traversal',
        headers: [['x-filename', '%2e%2e%2f%2e%2e%2fetc%2fpasswd']],
        body: '{',
      },
      { what: 'X-Filename with a bad escape', headers: [['x-filename', '%zz']], body: '{' },
    ];
    // A request the route would refuse anyway, so a header the server wrongly accepts changes nothing.
    for (const r of routes) {
      for (const ep of endpointsOf(r.api)) {
        const values = r.readOnly ? realParams(r) : unknownParams(r);
        for (const a of sample(attacks, 8)) {
          // Without a body of its own, an attack on a JSON route carries one that is refused.
          const body = a.body ?? (r.input === 'json' ? '{' : undefined);
          const req = rawRequest(r.method, fill(r.path, values), a.headers, body, {
            contentLength: a.length,
          });
          // A success may be cut where the body's framing turns out to be broken: the server
          // can only drop a connection whose request it can no longer parse.
          await attempt(
            t,
            `${r.method} ${r.path} ${a.what}`,
            ep,
            req,
            r.readOnly && r.input !== 'websocket',
            {
              cutOk: a.length === null,
            },
          );
        }
      }
    }
    // Targets no route has: absolute form, asterisk, empty segments, an HTTP version from elsewhere.
    for (const ep of [machines, boxesUnix, boxesTcp]) {
      for (const target of ['http://evil.example/v1/nothing', '*', '//', '//[', '/\\\\evil', '/v1//x']) {
        await attempt(t, `GET ${target}`, ep, rawRequest('GET', target), false);
      }
      const bad = Buffer.from('GET /v1/nothing HTTP/9.9\r\nhost: x\r\nconnection: close\r\n\r\n');
      await attempt(t, 'HTTP/9.9', ep, bad, false);
      await attempt(t, 'no request line', ep, Buffer.from('\r\n\r\n\r\n'), false);
      await attempt(
        t,
        'binary garbage',
        ep,
        Buffer.from(Array.from({ length: 512 }, () => Math.floor(random() * 256))),
        false,
      );
    }
    t.report();
  });

  test('upgrades: on routes that are not WebSocket ones, malformed handshakes, plain GETs on channels', async () => {
    const t = newTally('fuzz upgrades');
    const good = wsHandshake;
    const without = (name: string): [string, string][] => good.filter(([k]) => k !== name);
    const malformed: { what: string; headers: [string, string][] }[] = [
      { what: 'no key', headers: without('sec-websocket-key') },
      { what: 'bad key', headers: [...without('sec-websocket-key'), ['sec-websocket-key', 'short']] },
      { what: 'no version', headers: without('sec-websocket-version') },
      { what: 'version 12', headers: [...without('sec-websocket-version'), ['sec-websocket-version', '12']] },
      { what: 'h2c', headers: [...without('upgrade'), ['upgrade', 'h2c']] },
      { what: 'bad subprotocols', headers: [...good, ['sec-websocket-protocol', 'a,,b']] },
      { what: 'duplicate subprotocols', headers: [...good, ['sec-websocket-protocol', 'a, a']] },
    ];
    for (const r of routes) {
      for (const ep of endpointsOf(r.api)) {
        if (r.input === 'websocket') {
          // Real ids: nothing may start for a handshake that cannot complete.
          for (const m of malformed)
            await attempt(
              t,
              `${r.path} ${m.what}`,
              ep,
              rawRequest('GET', fill(r.path, realParams(r)), m.headers),
              false,
            );
          await attempt(t, `${r.path} plain GET`, ep, rawRequest('GET', fill(r.path, realParams(r))), false);
          for (const values of [unknownParams(r), crossParams(r)])
            await attempt(
              t,
              `${r.path} ${values.id}`,
              ep,
              rawRequest('GET', fill(r.path, values), good),
              false,
            );
          await attempt(
            t,
            `POST ${r.path} upgrade`,
            ep,
            rawRequest('POST', fill(r.path, realParams(r)), good),
            false,
          );
        } else {
          const values = r.readOnly ? realParams(r) : unknownParams(r);
          await attempt(
            t,
            `${r.method} ${r.path} upgrade`,
            ep,
            rawRequest(r.method, fill(r.path, values), good),
            false,
          );
        }
      }
    }
    for (const ep of [machines, boxesUnix, boxesTcp])
      for (const target of ['//', '/%zz', '/v1/machines/%zz/tty', '/v1/boxes/%zz/attach'])
        await attempt(t, `upgrade ${target}`, ep, rawRequest('GET', target, good), false);
    t.report();
  });

  test('uploads: malformed multipart and names, traversal, early answers; nothing spooled is left', async () => {
    const t = newTally('fuzz uploads');
    const multipart = (
      parts: { name: string; filename?: string; value: string | Buffer }[],
      opts: { boundary?: string; close?: boolean } = {},
    ): { body: Buffer; ctype: string } => {
      const b = opts.boundary ?? 'fuzzboundary';
      const chunks: Buffer[] = [];
      for (const p of parts) {
        const disp = `form-data; name="${p.name}"${p.filename !== undefined ? `; filename="${p.filename}"` : ''}`;
        chunks.push(
          Buffer.from(`--${b}\r\ncontent-disposition: ${disp}\r\n\r\n`),
          Buffer.from(p.value),
          Buffer.from('\r\n'),
        );
      }
      if (opts.close !== false) chunks.push(Buffer.from(`--${b}--\r\n`));
      return { body: Buffer.concat(chunks), ctype: `multipart/form-data; boundary=${b}` };
    };
    const file = (size = 64, filename = 'f.txt'): { name: string; filename: string; value: Buffer } => ({
      name: 'file',
      filename,
      value: Buffer.alloc(size, 0x61),
    });
    const dest = (v: string): { name: string; value: string } => ({ name: 'dest', value: v });
    // Every dest that uploadDest refuses, before and after the file (the spool path), plus shapes.
    const badDests = oddFilePaths.filter((p) => {
      try {
        uploadDest(p, 'f.txt');
        return false;
      } catch {
        return true;
      }
    });
    const cases: { what: string; body: Buffer; ctype: string }[] = [];
    for (const p of badDests) {
      cases.push({
        what: `file, then dest ${JSON.stringify(p).slice(0, 30)}`,
        ...multipart([file(), dest(p)]),
      });
      cases.push({
        what: `dest ${JSON.stringify(p).slice(0, 30)}, then file`,
        ...multipart([dest(p), file()]),
      });
    }
    for (let i = 0; i < 5; i++)
      cases.push({ what: `file, then dest rel (#${i})`, ...multipart([file(), dest('rel')]) });
    cases.push(
      { what: 'file only', ...multipart([file()]) },
      { what: 'dest only', ...multipart([dest('/root/x')]) },
      { what: 'no parts', ...multipart([]) },
      { what: 'dest over 8 KiB', ...multipart([dest(`/root/${'x'.repeat(9000)}`), file()]) },
      { what: 'dir dest, file named ..', ...multipart([dest('/root/'), file(8, '..')]) },
      { what: 'dir dest, no file name', ...multipart([dest('/root/'), file(8, '')]) },
      { what: 'dir dest, name with NUL', ...multipart([dest('/root/'), file(8, 'a\0b')]) },
      { what: 'file part under another name', ...multipart([dest('/root/x'), { ...file(), name: 'other' }]) },
      { what: 'cut off inside the file', ...multipart([dest('rel'), file(4096)], { close: false }) },
      { what: 'cut off, file first', ...multipart([file(4096), dest('/root/x')], { close: false }) },
      { what: '2 MiB file, then bad dest', ...multipart([file(2 * 1024 * 1024), dest('rel')]) },
      { what: 'bad dest, then 2 MiB file', ...multipart([dest('rel'), file(2 * 1024 * 1024)]) },
      // The host holds a file sent before its dest: at most 64 MiB of it.
      { what: '80 MiB file before its dest', ...multipart([file(80 * 1024 * 1024), dest('/root/x')]) },
      {
        what: 'wrong boundary',
        body: multipart([dest('/root/x'), file()]).body,
        ctype: 'multipart/form-data; boundary=other',
      },
      {
        what: 'not multipart at all',
        body: Buffer.from('this is not multipart'),
        ctype: 'multipart/form-data; boundary=zzz',
      },
      { what: 'JSON instead', body: Buffer.from('{"dest":"/root/x"}'), ctype: 'application/json' },
      { what: 'empty boundary', body: Buffer.from('--\r\n'), ctype: 'multipart/form-data; boundary=' },
    );
    for (const r of routes.filter((x) => x.input === 'multipart'))
      for (const ep of endpointsOf(r.api))
        for (const c of cases) {
          const req = rawRequest(r.method, fill(r.path, realParams(r)), [['content-type', c.ctype]], c.body);
          await attempt(t, `${r.path} ${c.what}`, ep, req, false);
        }
    // Raw uploads: every name the route's own check (uploadName) refuses, in its documented header.
    // (Judged on the header as the server reads it: latin1, with NUL and line breaks escaped.)
    const badNames = [...oddFilePaths, ...oddSegments]
      .map((n) =>
        Buffer.from(
          n.replace(/[\0\r\n]/g, (c) => encodeURIComponent(c)),
          'utf8',
        ),
      )
      .filter((v) => {
        try {
          uploadName(v.toString('latin1'));
          return false;
        } catch {
          return true;
        }
      });
    for (const r of routes.filter((x) => x.input === 'raw'))
      for (const ep of endpointsOf(r.api))
        for (const h of r.headerParams)
          for (const v of badNames) {
            const req = rawRequest(r.method, fill(r.path, realParams(r)), [[h, v]], 'fuzz');
            await attempt(t, `${r.path} ${h}: ${v.toString('latin1').slice(0, 30)}`, ep, req, false);
          }
    t.report();
  });

  test('downloads: odd names and pseudo-files come back whole, with honest headers', async () => {
    const t = newTally('fuzz downloads');
    const names = [
      '€uro.txt',
      '\u202etxt.exe',
      '😀.txt',
      'quote"back\\slash.txt',
      'pct%41 sp.txt',
      "semi;colon'.txt",
    ];
    const make = `mkdir -p /root/odd && cd /root/odd && for f in "$@"; do printf '%s\\n' "$f" > "$f"; done`;
    const r = await api(d.url, 'POST', `/v1/machines/${ids.machine}/exec`, {
      cmd: ['sh', '-c', make, 'sh', ...names],
    });
    assert.equal(r.status, 200);
    const e = await boxes.exec<{ id: string }>(ids.box, { cmd: ['sh', '-c', make, 'sh', ...names] });
    for await (const _ of boxes.events(ids.box, e.id)) {
      // until it exits
    }
    const expectFile = (o: Outcome | undefined, content: string): void => {
      if (o?.kind !== 'response' || o.res.status !== 200) return;
      const cd = o.res.headers['content-disposition'] ?? '';
      if (!/filename\*=UTF-8''[A-Za-z0-9%!#$&+\-.^_`|~]+$/.test(cd))
        throw new Error(`content-disposition ${cd}`);
      const got = o.res.body.toString('utf8');
      if (got !== content)
        throw new Error(
          `got ${JSON.stringify(got.slice(0, 80))}, not ${JSON.stringify(content.slice(0, 80))}`,
        );
      const len = o.res.headers['content-length'];
      if (len !== undefined && Number(len) !== o.res.body.length) throw new Error(`content-length ${len}`);
    };
    const version = await inMachine('cat /proc/version');
    const boxVersion = await inBox('cat /proc/version');
    const files: [string, string, string][] = [
      ...names.map((n): [string, string, string] => [`/root/odd/${n}`, `${n}\n`, `${n}\n`]),
      ['/proc/version', version, boxVersion],
    ];
    // A machine's or box's own files (volume files are another store: storage-volumes tests).
    for (const r of routes.filter(
      (x) =>
        x.readOnly &&
        (x.queryParams.includes('path') || x.body !== undefined) &&
        /^\/v1\/(machines|boxes)\/\{id\}/.test(x.path),
    ))
      for (const ep of endpointsOf(r.api))
        for (const [path, inM, inB] of files) {
          const content = r.api === 'machines' ? inM : inB;
          const req =
            r.body !== undefined
              ? rawRequest(r.method, fill(r.path, realParams(r)), [], JSON.stringify({ path }))
              : rawRequest(r.method, `${fill(r.path, realParams(r))}?path=${pct(path)}`);
          await t.check(`${ep.name} ${r.path} ${path}`, async () => {
            const o = await exchange(ep, req, answerWithinMs);
            const verdict = judge(o, true);
            if (!verdict.startsWith('200')) throw new Error(verdict);
            expectFile(o, content);
            return verdict;
          });
        }
    // Every traversal or odd path: an error or a file, never a 5xx.
    for (const r of routes.filter(
      (x) => x.readOnly && (x.queryParams.includes('path') || x.body !== undefined),
    ))
      for (const ep of endpointsOf(r.api))
        for (const p of oddFilePaths) {
          const req =
            r.body !== undefined
              ? rawRequest(r.method, fill(r.path, realParams(r)), [], JSON.stringify({ path: p }))
              : rawRequest(r.method, `${fill(r.path, realParams(r))}?path=${pct(p)}`);
          await attempt(t, `${r.path} ${JSON.stringify(p).slice(0, 30)}`, ep, req, true);
        }
    t.report();
  });

  test(`slow bodies: cut off after ${idleMs} ms without a byte, never while bytes keep coming`, async () => {
    const t = newTally('slow bodies');
    const cut = (o: Outcome): string => {
      if (o.kind === 'timeout') throw new Error(`still open after ${o.ms} ms`);
      if (o.ms < idleMs * 0.9) throw new Error(`cut after ${o.ms} ms, before the idle time`);
      if (o.ms > idleMs + 3000) throw new Error(`cut only after ${o.ms} ms`);
      if (o.kind === 'closed') return `closed after ${o.ms} ms`;
      const v = judge(o, false);
      if (!v.includes('REQUEST_TIMEOUT')) throw new Error(`${v} instead of 408`);
      return `${v} after ${o.ms} ms`;
    };
    const stalled = (method: string, target: string, headers: [string, string][], first: string): Write[] => [
      { data: rawRequest(method, target, headers, first, { contentLength: 100_000 }) },
    ];
    const mp = '--b\r\ncontent-disposition: form-data; name="file"; filename="f"\r\n\r\nsome bytes';
    const stalls: {
      what: string;
      ep: () => Endpoint;
      method: string;
      path: string;
      headers: [string, string][];
      first: string;
    }[] = [];
    for (const r of routes) {
      const values = r.readOnly ? realParams(r) : realParams(r);
      if (r.input === 'json')
        stalls.push({
          what: `${r.method} ${r.path}`,
          ep: () => endpointsOf(r.api)[0] as Endpoint,
          method: r.method,
          path: fill(r.path, values),
          headers: [],
          first: '{"cmd":["tr',
        });
      if (r.input === 'multipart')
        stalls.push({
          what: `${r.path} (multipart, spooling)`,
          ep: () => endpointsOf(r.api)[1] as Endpoint,
          method: r.method,
          path: fill(r.path, values),
          headers: [['content-type', 'multipart/form-data; boundary=b']],
          first: mp,
        });
      if (r.input === 'raw')
        stalls.push({
          what: `${r.path} (raw)`,
          ep: () => endpointsOf(r.api)[0] as Endpoint,
          method: r.method,
          path: fill(r.path, values),
          headers: r.headerParams.map((h): [string, string] => [h, 'fuzz-stalled.bin']),
          first: 'partial',
        });
    }
    // Concurrently: each waits out the idle time on its own.
    await Promise.all(
      stalls.map((s) =>
        t.check(`${s.ep().name} stalled ${s.what}`, async () =>
          cut(await exchange(s.ep(), stalled(s.method, s.path, s.headers, s.first), idleMs + 10_000)),
        ),
      ),
    );
    // Headers that stop half-way.
    await Promise.all(
      [machines, boxesUnix, boxesTcp].map((ep) =>
        t.check(`${ep.name} stalled headers`, async () =>
          cut(await exchange(ep, 'POST /v1/machines HTTP/1.1\r\nhost: x\r\ncontent-', idleMs + 10_000)),
        ),
      ),
    );
    // A trickle (a byte every idle/3) lasting twice the idle time is slow, not stalled: answered
    // on its merits (these bodies are refused) once complete.
    const trickled = (method: string, target: string, body: string): Write[] => [
      {
        data: rawRequest(method, target, [['content-type', 'application/json']], '', {
          contentLength: body.length,
        }),
        thenWaitMs: idleMs / 3,
      },
      ...[...body].map((ch) => ({ data: ch, thenWaitMs: Math.floor(idleMs / 3) })),
    ];
    const body = '{"cmd":[],"zz":1}';
    const jsonRoutes = routes.filter((r) => r.input === 'json' && r.path.includes('exec') && !r.readOnly);
    await Promise.all(
      jsonRoutes.flatMap((r) =>
        endpointsOf(r.api).map((ep) =>
          t.check(`${ep.name} trickled ${r.method} ${r.path}`, async () => {
            const o = await exchange(
              ep,
              trickled(r.method, fill(r.path, realParams(r)), body),
              answerWithinMs,
            );
            const v = judge(o, false);
            if (!v.startsWith('400')) throw new Error(`${v} for a trickled body`);
            return `${v} after ${o.ms} ms`;
          }),
        ),
      ),
    );
    t.report();
  });

  test(`connections: at most ${maxConnections} per server, idle ones let go, service resumes`, async () => {
    const t = newTally('connections');
    const probe = (ep: Endpoint): Buffer => rawRequest('GET', ep === machines ? '/healthz' : '/v1/info');
    for (const ep of [machines, boxesUnix, boxesTcp]) {
      const socks: Socket[] = [];
      const closedAt: (number | undefined)[] = [];
      const t0 = Date.now();
      for (let i = 0; i < maxConnections * 3; i++) {
        const s = ep.connect();
        s.on('error', () => {});
        // Read (and drop) what the server says, so its closing the connection is seen.
        s.resume();
        s.on('close', () => {
          closedAt[i] = Date.now() - t0;
        });
        socks.push(s);
      }
      await sleep(300);
      const open = socks.filter((_, i) => closedAt[i] === undefined).length;
      t.record(
        `${ep.name}: ${socks.length} connections opened, ${open} kept`,
        open <= maxConnections && open > 0,
        `${open} kept`,
      );
      // Held connections that send nothing are let go (after the header timeout): the cap cannot
      // be held for ever by clients doing nothing.
      await sleep(idleMs * 2 + 1500);
      const still = socks.filter((_, i) => closedAt[i] === undefined).length;
      t.record(`${ep.name}: idle connections let go`, still === 0, `${still} still open`);
      for (const s of socks) s.destroy();
      await t.check(`${ep.name}: answers again`, async () => {
        const o = await exchange(ep, probe(ep), answerWithinMs);
        const v = judge(o, true);
        if (!v.startsWith('200')) throw new Error(v);
        return v;
      });
    }
    t.report();
  });

  test('afterwards: alive, memory bounded, the machine and the box work, nothing changed or left', async () => {
    const t = newTally('aftermath');
    const alive = processAlive(pid);
    t.record('daemon alive', alive, d.log().split('\n').slice(-15).join('\n'));
    if (!alive) return t.report();
    const mem = memoryOf(pid);
    t.record(
      `peak RSS ${mem.peakMb} MiB <= ${peakRssBoundMb}`,
      mem.peakMb <= peakRssBoundMb,
      JSON.stringify(mem),
    );
    t.record(
      `RSS ${mem.rssMb} MiB within ${rssGrowthBoundMb} MiB of ${rss0}`,
      mem.rssMb <= rss0 + rssGrowthBoundMb,
      JSON.stringify(mem),
    );
    // Give cut-off handlers a moment to finish their cleanup before looking at what is left.
    await sleep(1000);
    await t.check('nothing changed: machines, boxes; no process left in the guests', async () => {
      // A process a cut-off request's handler killed can take a moment to go under TCG: left
      // means still there after 10 s.
      let now = await snapshot();
      for (let i = 0; i < 20; i++) {
        if (
          Number(now.machineProcs) <= Number(before0.machineProcs) &&
          Number(now.boxProcs) <= Number(before0.boxProcs)
        )
          break;
        await sleep(500);
        now = await snapshot();
      }
      assert.deepEqual([now.machines, now.boxes], [before0.machines, before0.boxes]);
      // At most as many as before (a process of the guest's own may have ended meanwhile).
      assert.ok(
        Number(now.machineProcs) <= Number(before0.machineProcs),
        `machine: ${JSON.stringify([before0, now])}; its processes now: ${await inMachine(listProcs)}`,
      );
      assert.ok(Number(now.boxProcs) <= Number(before0.boxProcs), `box: ${JSON.stringify([before0, now])}`);
      return JSON.stringify(now);
    });
    await t.check('the machine runs a command', async () => {
      assert.equal(await inMachine('echo ok'), 'ok\n');
      return undefined;
    });
    await t.check('the box runs a command', async () => {
      assert.equal(await inBox('echo ok'), 'ok\n');
      return undefined;
    });
    await t.check('no stalled upload left a file in the machine', async () => {
      assert.equal(await inMachine('ls -a /root | grep -c fuzz-stalled || true'), '0\n');
      return undefined;
    });
    await t.check('no upload spool left', async () => {
      const left = readdirSync(spoolDir).filter((f) => f.startsWith('hutch-upload-'));
      assert.deepEqual(left, []);
      return undefined;
    });
    t.record(
      'QEMUs: the machine and the box',
      qemusOf(d.stateDir).length === 2,
      String(qemusOf(d.stateDir).length),
    );
    const internal = d
      .log()
      .split('\n')
      .filter((l) => /internal error|unhandled|uncaught/i.test(l));
    t.record('no internal errors logged', internal.length === 0, internal.slice(0, 3).join(' | '));
    const total = tallies.reduce((n, x) => n + x.attempts.length, 0);
    const held = tallies.reduce((n, x) => n + x.attempts.filter((a) => a.held).length, 0);
    const counts = [...statuses.entries()]
      .sort((a, b) => a[0] - b[0])
      .map(([s, n]) => `${s}×${n}`)
      .join(' ');
    t.report(
      `all classes ${total} tried, ${held} held; answers ${counts}; peak RSS ${mem.peakMb} MiB, now ${mem.rssMb} MiB, at start ${rss0} MiB`,
    );
  });
});
