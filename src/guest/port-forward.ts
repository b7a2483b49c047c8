// What the engine offers about a guest's TCP ports: a connection to one (web previews, proxies)
// and the list of those that listen. Both work on machines and boxes alike, through the agent
// only: no network device, and nothing run in the guest (an OCI image may have no `cat`, `ss`
// or `netstat`), so the list is read from /proc/net/tcp{,6} with FILE_READ.

import type { Duplex } from 'node:stream';
import { HutchError } from '../errors.js';
import { type AgentConnection, AgentError } from './agent-connection.js';
import type { GuestTarget } from './guest-ops.js';

/** A port as a caller gives it: INVALID_ARGUMENT unless an integer from 1 to 65535. */
export function checkPort(port: unknown): number {
  if (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535)
    throw new HutchError(
      'INVALID_ARGUMENT',
      `port must be an integer from 1 to 65535, got ${JSON.stringify(port)}`,
    );
  return port;
}

function unavailable(e: unknown, target: GuestTarget): HutchError {
  if (e instanceof HutchError) return e;
  return new HutchError(
    'AGENT_UNAVAILABLE',
    `${target.kind} ${target.id}: ${e instanceof Error ? e.message : String(e)}`,
  );
}

/**
 * Opens a connection to `port` on the guest's loopback. `release` (the caller's session) is
 * called once when the connection is over, or at once if it could not be opened.
 */
export async function openGuestPort(
  agent: AgentConnection,
  target: GuestTarget,
  port: number,
  release: () => void,
): Promise<Duplex> {
  let duplex: Duplex;
  try {
    duplex = await agent.openPort(port);
  } catch (e) {
    release();
    throw unavailable(e, target);
  }
  if (duplex.destroyed) release();
  else duplex.once('close', release);
  return duplex;
}

/** LISTEN in the `st` column of /proc/net/tcp and tcp6 (include/net/tcp_states.h). */
const TCP_LISTEN = '0A';

/**
 * The ports of the LISTEN rows of /proc/net/tcp or /proc/net/tcp6 text, whatever the address
 * (0.0.0.0, 127.0.0.1, ::, ::1 or another), sorted and without duplicates.
 */
export function parseListeningPorts(...tables: string[]): number[] {
  const ports = new Set<number>();
  for (const text of tables)
    for (const line of text.split('\n').slice(1)) {
      // sl local_address rem_address st …, e.g. "0: 0100007F:1F40 00000000:0000 0A …"
      const f = line.trim().split(/\s+/);
      const local = f[1];
      if (f[3] !== TCP_LISTEN || local === undefined) continue;
      const port = Number.parseInt(local.slice(local.lastIndexOf(':') + 1), 16);
      if (port > 0 && port <= 65535) ports.add(port);
    }
  return [...ports].sort((a, b) => a - b);
}

/** The largest /proc/net table read (a guest with thousands of sockets is answered, not fed on). */
const MAX_TABLE_BYTES = 8 * 1024 * 1024;

async function readTable(agent: AgentConnection, path: string): Promise<string> {
  const h = agent.readFile(path);
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const c of h.stream as AsyncIterable<Buffer>) {
      size += c.length;
      if (size > MAX_TABLE_BYTES) {
        h.stream.destroy();
        throw new HutchError('INTERNAL', `${path} in the guest is over ${MAX_TABLE_BYTES} bytes`);
      }
      chunks.push(c);
    }
    await h.done;
  } catch (e) {
    // A kernel without IPv6 has no tcp6.
    if (e instanceof AgentError && e.code === 'ENOENT') return '';
    throw e;
  }
  return Buffer.concat(chunks).toString('latin1');
}

/** The TCP ports something in the guest listens on, sorted. */
export async function guestListeningPorts(agent: AgentConnection, target: GuestTarget): Promise<number[]> {
  try {
    const [v4, v6] = await Promise.all([
      readTable(agent, '/proc/net/tcp'),
      readTable(agent, '/proc/net/tcp6'),
    ]);
    return parseListeningPorts(v4, v6);
  } catch (e) {
    throw unavailable(e, target);
  }
}
