import { isIPv4 } from 'node:net';
import {
  ConfigureTag,
  DiskMountTag,
  DiskUnmountTag,
  ExecTag,
  encodeFrame,
  encodeTlv,
  FileReadTag,
  FileWriteTag,
  FrameType,
  HelloTag,
  MAX_NONCE,
  MAX_PAYLOAD,
  type Message,
  PortOpenTag,
  ProtocolError,
  type Tlv,
  UnsupportedTag,
  writeUint,
} from './protocol.js';

/**
 * The typed side of the agent protocol: builders for the frames the host sends (exec, files,
 * configure, flow control, handshake) and parsers for the agent's replies (exit, error, done,
 * hello, unsupported). protocol.ts keeps the wire format they stand on: framing, TLV fields,
 * the message codec and the handshake scanner.
 */

export interface ExecRequestFields {
  argv: readonly string[];
  env?: Readonly<Record<string, string>>;
  cwd?: string;
  pty?: { cols: number; rows: number };
  timeoutMs?: number;
  stdin?: boolean;
}

function noNul(what: string, s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.includes(0)) throw new TypeError(`${what} must not contain NUL`);
  return b;
}

function u16(what: string, n: number): Buffer {
  if (!Number.isInteger(n) || n < 0 || n > 0xffff) throw new RangeError(`${what} must be a u16, got ${n}`);
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(n, 0);
  return b;
}

function u32(what: string, n: number): Buffer {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff)
    throw new RangeError(`${what} must be a u32, got ${n}`);
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n, 0);
  return b;
}

function u8(what: string, n: number): Buffer {
  if (!Number.isInteger(n) || n < 0 || n > 0xff) throw new RangeError(`${what} must be a u8, got ${n}`);
  return Buffer.from([n]);
}

function frameWithPayload(type: number, stream: number, payload: Buffer, what: string): Buffer {
  if (payload.length > MAX_PAYLOAD) {
    throw new RangeError(
      `${what} request of ${payload.length} bytes exceeds the ${MAX_PAYLOAD}-byte frame limit`,
    );
  }
  return encodeFrame(type, stream, payload);
}

/**
 * The most an EXEC payload for this argv, env and cwd can take (every optional field counted),
 * so a request can be checked against MAX_PAYLOAD before it is built: one that fits here always
 * encodes.
 */
export function execPayloadBound(req: Pick<ExecRequestFields, 'argv' | 'env' | 'cwd'>): number {
  const tlv = 5;
  let n = 0;
  for (const a of req.argv) n += tlv + Buffer.byteLength(a, 'utf8');
  for (const [k, v] of Object.entries(req.env ?? {}))
    n += tlv + Buffer.byteLength(k, 'utf8') + 1 + Buffer.byteLength(v, 'utf8');
  if (req.cwd !== undefined) n += tlv + Buffer.byteLength(req.cwd, 'utf8');
  // PTY (cols, rows), TIMEOUT_MS (u32), STDIN (u8)
  return n + (tlv + 4) + (tlv + 4) + (tlv + 1);
}

export function encodeExec(stream: number, req: ExecRequestFields): Buffer {
  if (req.argv.length < 1) throw new TypeError('argv must have at least one element');
  const fields: Tlv[] = [];
  for (const a of req.argv) fields.push({ tag: ExecTag.ARG, value: noNul('argv element', a) });
  for (const [k, v] of Object.entries(req.env ?? {})) {
    if (k.length === 0 || k.includes('='))
      throw new TypeError(`bad environment variable name: ${JSON.stringify(k)}`);
    fields.push({ tag: ExecTag.ENV, value: noNul('environment', `${k}=${v}`) });
  }
  if (req.cwd !== undefined) fields.push({ tag: ExecTag.CWD, value: noNul('cwd', req.cwd) });
  if (req.pty !== undefined) {
    fields.push({
      tag: ExecTag.PTY,
      value: Buffer.concat([u16('pty cols', req.pty.cols), u16('pty rows', req.pty.rows)]),
    });
  }
  if (req.timeoutMs !== undefined)
    fields.push({ tag: ExecTag.TIMEOUT_MS, value: u32('timeoutMs', req.timeoutMs) });
  fields.push({ tag: ExecTag.STDIN, value: u8('stdin', req.stdin ? 1 : 0) });
  return frameWithPayload(FrameType.EXEC, stream, encodeTlv(fields), 'EXEC');
}

export function encodeFileWrite(
  stream: number,
  path: string,
  opts: { mode?: number; mkdirs?: boolean },
): Buffer {
  const fields: Tlv[] = [{ tag: FileWriteTag.PATH, value: noNul('path', path) }];
  if (opts.mode !== undefined) fields.push({ tag: FileWriteTag.MODE, value: u32('mode', opts.mode) });
  if (opts.mkdirs) fields.push({ tag: FileWriteTag.MKDIRS, value: u8('mkdirs', 1) });
  return frameWithPayload(FrameType.FILE_WRITE, stream, encodeTlv(fields), 'FILE_WRITE');
}

export function encodeFileRead(stream: number, path: string): Buffer {
  return frameWithPayload(
    FrameType.FILE_READ,
    stream,
    encodeTlv([{ tag: FileReadTag.PATH, value: noNul('path', path) }]),
    'FILE_READ',
  );
}

/** A virtio-9p share for CONFIGURE to mount (the same rules as src/vmm/volumes.ts). */
export interface ConfigureVolume {
  /** The share's mount_tag: 1–31 bytes of [A-Za-z0-9_-]. */
  tag: string;
  /** Absolute, normalised, not `/`, at most 255 bytes. */
  path: string;
  readonly: boolean;
}

/**
 * A guest's configuration after boot or restore (docs/agent-protocol.md, CONFIGURE). Send
 * `volumes` and `growRoot` only to an agent that announced configure-volumes /
 * configure-grow-root: an older one skips the fields it does not know.
 */
export interface ConfigureRequestFields {
  /** 1–64 bytes of [A-Za-z0-9.-]: sethostname() and /etc/hostname. */
  hostname?: string;
  /** Unix epoch nanoseconds (u64): the guest's CLOCK_REALTIME. */
  timeNs?: bigint;
  /** 1–512 bytes mixed into the guest kernel's RNG, which then reseeds. */
  entropy?: Uint8Array;
  /** 32 lower-case hex digits: /etc/machine-id. */
  machineId?: string;
  /** Shares to mount (at most 8), each field `TAG NUL PATH NUL ro|rw`. */
  volumes?: readonly ConfigureVolume[];
  /** Grow / to fill its disk before anything else. */
  growRoot?: boolean;
  /** The NIC's address, route and resolver (the agent must announce `net`). */
  net?: ConfigureNet;
}

/** The guest's IPv4 network (docs/agent-protocol.md, "Network"): dotted quads. */
export interface ConfigureNet {
  address: string;
  /** Prefix length of the guest's subnet, 1–32. */
  prefix: number;
  /** The default route's next hop, in the guest's subnet. */
  gateway: string;
  /** The NIC's MTU, 68–65535. */
  mtu: number;
  /** Written to /etc/resolv.conf as the one nameserver. */
  dns: string;
}

/** Bytes of CONFIGURE's net field. */
export const NET_FIELD_SIZE = 15;

function ipv4(what: string, s: string): Buffer {
  if (!isIPv4(s)) throw new TypeError(`${what} must be an IPv4 address, got ${JSON.stringify(s)}`);
  return Buffer.from(s.split('.').map(Number));
}

/**
 * CONFIGURE's net field: address (4 bytes), prefix (u8), gateway (4), mtu (u16 BE), dns (4).
 * Only what cannot be put on the wire is refused here; the agent judges the values (a gateway
 * outside the subnet, a prefix of 0 or an MTU under 68 are EINVAL there).
 */
export function encodeNetField(net: ConfigureNet): Buffer {
  return Buffer.concat([
    ipv4('net address', net.address),
    u8('net prefix', net.prefix),
    ipv4('net gateway', net.gateway),
    u16('net mtu', net.mtu),
    ipv4('net dns', net.dns),
  ]);
}

/** The inverse of encodeNetField (undefined unless exactly NET_FIELD_SIZE bytes). */
export function decodeNetField(b: Buffer): ConfigureNet | undefined {
  if (b.length !== NET_FIELD_SIZE) return undefined;
  const ip = (off: number): string => [...b.subarray(off, off + 4)].join('.');
  return { address: ip(0), prefix: b[4]!, gateway: ip(5), mtu: b.readUInt16BE(9), dns: ip(11) };
}

/**
 * Encodes CONFIGURE. Only what cannot be put on the wire is refused here (a time that is not
 * a u64, a request over 64 KiB); the agent alone judges the values (one set of rules for
 * every host), answering ERROR EINVAL for a bad hostname, entropy size or machine id.
 */
export function encodeConfigure(stream: number, req: ConfigureRequestFields): Buffer {
  const fields: Tlv[] = [];
  if (req.hostname !== undefined) {
    if (typeof req.hostname !== 'string') throw new TypeError('hostname must be a string');
    fields.push({ tag: ConfigureTag.HOSTNAME, value: Buffer.from(req.hostname, 'utf8') });
  }
  if (req.timeNs !== undefined) {
    if (typeof req.timeNs !== 'bigint') throw new TypeError('timeNs must be a bigint');
    fields.push({ tag: ConfigureTag.TIME_NS, value: writeUint(req.timeNs, 8) });
  }
  if (req.entropy !== undefined) {
    if (!(req.entropy instanceof Uint8Array)) throw new TypeError('entropy must be a Buffer');
    fields.push({ tag: ConfigureTag.ENTROPY, value: Buffer.from(req.entropy) });
  }
  if (req.machineId !== undefined) {
    if (typeof req.machineId !== 'string') throw new TypeError('machineId must be a string');
    fields.push({ tag: ConfigureTag.MACHINE_ID, value: Buffer.from(req.machineId, 'utf8') });
  }
  for (const v of req.volumes ?? []) {
    const value = Buffer.concat([
      noNul('volume tag', v.tag),
      Buffer.from([0]),
      noNul('volume path', v.path),
      Buffer.from([0]),
      Buffer.from(v.readonly ? 'ro' : 'rw'),
    ]);
    fields.push({ tag: ConfigureTag.VOLUME, value });
  }
  if (req.growRoot) fields.push({ tag: ConfigureTag.GROW_ROOT, value: u8('growRoot', 1) });
  if (req.net !== undefined) fields.push({ tag: ConfigureTag.NET, value: encodeNetField(req.net) });
  return frameWithPayload(FrameType.CONFIGURE, stream, encodeTlv(fields), 'CONFIGURE');
}

/** PORT_OPEN: connect to `port` on the guest's loopback (127.0.0.1, else ::1). */
export function encodePortOpen(stream: number, port: number): Buffer {
  if (!Number.isInteger(port) || port < 1 || port > 0xffff)
    throw new RangeError(`port must be 1 to 65535, got ${port}`);
  return encodeFrame(
    FrameType.PORT_OPEN,
    stream,
    encodeTlv([{ tag: PortOpenTag.PORT, value: u16('port', port) }]),
  );
}

/** A SCSI target the host attaches disks at: one virtio-scsi bus, targets 0–255, LUN 0. */
export const MAX_DISK_TARGET = 255;

function diskTarget(target: number): Buffer {
  if (!Number.isInteger(target) || target < 0 || target > MAX_DISK_TARGET)
    throw new RangeError(`disk target must be 0 to ${MAX_DISK_TARGET}, got ${target}`);
  return u16('disk target', target);
}

/**
 * DISK_MOUNT: wait for the disk at SCSI target `target` and mount its ext4 at `path`
 * (read-only with `noload`). The agent judges the path (absolute, normalised, not `/`, at most
 * 255 bytes: EINVAL otherwise); only what cannot be put on the wire is refused here.
 */
export function encodeDiskMount(
  stream: number,
  req: { target: number; path: string; readOnly: boolean },
): Buffer {
  const fields: Tlv[] = [
    { tag: DiskMountTag.TARGET, value: diskTarget(req.target) },
    { tag: DiskMountTag.PATH, value: noNul('disk path', req.path) },
  ];
  if (req.readOnly) fields.push({ tag: DiskMountTag.READ_ONLY, value: u8('readOnly', 1) });
  return frameWithPayload(FrameType.DISK_MOUNT, stream, encodeTlv(fields), 'DISK_MOUNT');
}

/** DISK_UNMOUNT: unmount `path`, which must be the disk at SCSI target `target`. */
export function encodeDiskUnmount(stream: number, req: { target: number; path: string }): Buffer {
  return frameWithPayload(
    FrameType.DISK_UNMOUNT,
    stream,
    encodeTlv([
      { tag: DiskUnmountTag.PATH, value: noNul('disk path', req.path) },
      { tag: DiskUnmountTag.TARGET, value: diskTarget(req.target) },
    ]),
    'DISK_UNMOUNT',
  );
}

export function encodeCredit(stream: number, bytes: number): Buffer {
  return encodeFrame(FrameType.CREDIT, stream, u32('credit', bytes));
}

export function encodeSignal(stream: number, signal: number): Buffer {
  return encodeFrame(FrameType.SIGNAL, stream, u8('signal', signal));
}

export function encodeResize(stream: number, cols: number, rows: number): Buffer {
  return encodeFrame(FrameType.RESIZE, stream, Buffer.concat([u16('cols', cols), u16('rows', rows)]));
}

/** HELLO: this side's protocol version and features (host -> agent and agent -> host). */
export function encodeHello(version: number, features: bigint): Buffer {
  return encodeFrame(
    FrameType.HELLO,
    0,
    encodeTlv([
      { tag: HelloTag.VERSION, value: u32('version', version) },
      { tag: HelloTag.FEATURES, value: writeUint(features, 8) },
    ]),
  );
}

/** UNSUPPORTED: the answer to a frame of a type this side does not know (always stream 0). */
export function encodeUnsupported(type: number, stream: number): Buffer {
  const fields: Tlv[] = [{ tag: UnsupportedTag.TYPE, value: u8('type', type) }];
  if (stream !== 0) fields.push({ tag: UnsupportedTag.STREAM, value: u32('stream', stream) });
  return encodeFrame(FrameType.UNSUPPORTED, 0, encodeTlv(fields));
}

export function encodePing(nonce: Uint8Array): Buffer {
  if (nonce.length > MAX_NONCE) throw new RangeError(`nonce longer than ${MAX_NONCE} bytes`);
  return encodeFrame(FrameType.PING, 0, nonce);
}

// ---------------------------------------------------------------------------------------
// Parsers for agent -> host frames (on top of decodeMessage's validation)

export interface ExitInfo {
  exitCode: number | null;
  signal: number | null;
  timedOut: boolean;
}

export interface ErrorInfo {
  code: string;
  message: string;
}

export interface DoneInfo {
  size: number;
  mode: number;
}

function uintField(msg: Message, key: string): bigint | undefined {
  let found: bigint | undefined;
  for (const f of msg.fields) if (f.kind === 'uint' && f.key === key) found = f.value;
  return found;
}

function bytesField(msg: Message, key: string): Buffer | undefined {
  let found: Buffer | undefined;
  for (const f of msg.fields) if (f.kind === 'bytes' && f.key === key) found = f.value;
  return found;
}

/** The single u32 of STARTED / CREDIT (and u8 of SIGNAL). */
export function fixedValue(msg: Message): number {
  const f = msg.fields[0];
  if (f === undefined || f.kind !== 'uint') throw new ProtocolError('truncated', `${msg.name} has no value`);
  return Number(f.value);
}

export function parseExit(msg: Message): ExitInfo {
  const code = uintField(msg, 'code');
  const signal = uintField(msg, 'signal');
  const timedOut = uintField(msg, 'timed_out');
  return {
    exitCode: code === undefined ? null : Number(code),
    signal: signal === undefined ? null : Number(signal),
    timedOut: timedOut !== undefined && timedOut !== 0n,
  };
}

export function parseError(msg: Message): ErrorInfo {
  return {
    code: (bytesField(msg, 'code') ?? Buffer.from('EUNKNOWN')).toString('utf8'),
    message: (bytesField(msg, 'message') ?? Buffer.alloc(0)).toString('utf8'),
  };
}

export function parseDone(msg: Message): DoneInfo {
  const size = uintField(msg, 'size') ?? 0n;
  if (size > BigInt(Number.MAX_SAFE_INTEGER))
    throw new ProtocolError('too-large', `DONE size ${size} is absurd`);
  return { size: Number(size), mode: Number(uintField(msg, 'mode') ?? 0n) };
}

export interface HelloInfo {
  /** 0 when the peer left the field out. */
  version: number;
  /** Every bit the peer announced, unknown ones included. */
  features: bigint;
}

export function parseHello(msg: Message): HelloInfo {
  return {
    version: Number(uintField(msg, 'version') ?? 0n),
    features: uintField(msg, 'features') ?? 0n,
  };
}

export interface UnsupportedInfo {
  type: number;
  /** 0 when the unknown frame was on stream 0 (or the field is missing). */
  stream: number;
}

export function parseUnsupported(msg: Message): UnsupportedInfo {
  return {
    type: Number(uintField(msg, 'type') ?? 0n),
    stream: Number(uintField(msg, 'stream') ?? 0n),
  };
}
