// The public types and errors of the agent connection (docs/agent-protocol.md). They are
// re-exported by agent-connection.ts, which is what callers import.

import type { Readable } from 'node:stream';
import type { FeatureName } from './protocol.js';
import type { ConfigureNet } from './protocol-messages.js';

// ---------------------------------------------------------------------------------------
// Public types

export interface ExecRequest {
  argv: string[];
  env?: Record<string, string>;
  cwd?: string;
  /** true: the host sends stdin (write/end); false/absent: the child reads /dev/null. */
  stdin?: boolean;
  pty?: { cols: number; rows: number };
  /** Enforced by the agent (SIGKILL to the process group); 0 or absent = none. */
  timeoutMs?: number;
}

export interface ExecResult {
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
}

export interface StreamStats {
  /** Payload bytes received from the agent on this stream. */
  received: number;
  /** Payload bytes handed to the consumer (and credited back to the agent). */
  consumed: number;
  /** Payload bytes waiting in the host's queue for the consumer. */
  queued: number;
  /** Payload bytes sent to the agent (stdin / file data). */
  sent: number;
}

export interface ExecHandle {
  readonly id: number;
  readonly started: Promise<{ pid: number }>;
  readonly stdout: Readable;
  readonly stderr: Readable;
  /** Sends stdin bytes, waiting for the agent's window; resolves once they are on the wire. */
  write(data: Buffer | string): Promise<void>;
  /** Closes the child's stdin (after the pending writes). */
  end(): Promise<void>;
  /** Sends a signal to the child's process group. */
  signal(signal: number): void;
  resize(cols: number, rows: number): void;
  /** SIGKILLs the process group; the output is dropped from now on. */
  cancel(): void;
  readonly result: Promise<ExecResult>;
  stats(): StreamStats;
}

/** A share of a bytes budget: `take` grants what is left of n (maybe 0), `release` gives it back. */
export interface ByteAllowance {
  take(n: number): number;
  release(n: number): void;
}

export interface ExecCollectResult extends ExecResult {
  stdout: Buffer;
  stderr: Buffer;
  truncated: boolean;
}

export interface ReadFileHandle {
  readonly stream: Readable;
  readonly done: Promise<{ size: number; mode: number }>;
}

/**
 * A restored machine's own identity (CONFIGURE). Every field is optional; the agent applies
 * them in the order hostname, machineId, entropy, timeNs.
 */
export interface ConfigureOptions {
  /** Shares to mount (needs the configure-volumes feature). */
  volumes?: readonly { tag: string; path: string; readonly: boolean }[];
  /** Grow / to its disk first (needs configure-grow-root; a version-1 agent always does). */
  growRoot?: boolean;
  /** 1–64 bytes of [A-Za-z0-9.-]; set with sethostname() and written to /etc/hostname. */
  hostname?: string;
  /** Unix epoch nanoseconds for the guest's CLOCK_REALTIME. */
  timeNs?: bigint;
  /** 1–512 bytes (from the host's CSPRNG) mixed into the guest kernel's RNG, which reseeds. */
  entropy?: Buffer;
  /** 32 lower-case hex digits, written to /etc/machine-id. */
  machineId?: string;
  /** The NIC's IPv4 address, default route, MTU and DNS server (needs the net feature). */
  net?: ConfigureNet;
}

export interface ConnectionStats {
  openStreams: number;
  ignoredFrames: number;
  /** Frames of a type this host does not know, skipped (and answered with UNSUPPORTED). */
  unknownFrames: number;
}

/** What the agent said it speaks in the handshake (version 1: it did not answer HELLO). */
export interface AgentFeatures {
  version: number;
  /** Every bit announced, including bits this host has no name for. */
  bits: bigint;
  /** The announced features this host knows. */
  names: ReadonlySet<FeatureName>;
}

/** An ERROR frame from the agent (`code` is e.g. ENOENT, EACCES, EINVAL). */
export class AgentError extends Error {
  readonly code: string;
  readonly agentMessage: string;
  constructor(code: string, agentMessage: string, context: string) {
    super(`${context}: ${code}${agentMessage ? `: ${agentMessage}` : ''}`);
    this.name = 'AgentError';
    this.code = code;
    this.agentMessage = agentMessage;
  }
}

/** Why an operation could not complete: the connection is gone. `cause` tells why. */
export class AgentClosedError extends Error {
  readonly code = 'EAGENTCLOSED';
  constructor(reason: Error | undefined) {
    super(
      `agent connection closed${reason ? `: ${reason.message}` : ''}`,
      reason ? { cause: reason } : undefined,
    );
    this.name = 'AgentClosedError';
  }
}

/** The host gave up on an operation (cancel(), a consumer that went away, a host timeout). */
export class AgentCancelledError extends Error {
  readonly code = 'ECANCELED';
  constructor(message: string) {
    super(message);
    this.name = 'AgentCancelledError';
  }
}

export class AgentTimeoutError extends Error {
  readonly code = 'ETIMEDOUT';
  constructor(message: string) {
    super(message);
    this.name = 'AgentTimeoutError';
  }
}
