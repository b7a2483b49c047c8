// Host side of the hutch host <-> agent wire protocol (docs/agent-protocol.md).
//
// Frame:  len: u32 BE | type: u8 | stream: u32 BE | payload: len - 5 bytes
// Fields: tag: u8 | len: u32 BE | value: len bytes
//
// Everything here is pure (no I/O): a one-frame codec, an incremental decoder that
// tolerates arbitrary chunk boundaries and never buffers more than one frame, a structured
// message layer (decode/encode with the fields in frame order, so a decoded message
// re-encodes to the same bytes), the canonical text used by the shared test vectors, and
// a scanner that finds the handshake PONG in a stream of stale bytes.

/** Bytes of `len` (u32) at the head of every frame. */
export const LEN_SIZE = 4;
/** Bytes of `type` + `stream` that `len` counts besides the payload. */
export const FRAME_OVERHEAD = 5;
/** Whole header: len + type + stream. */
export const HEADER_SIZE = LEN_SIZE + FRAME_OVERHEAD;
/** Largest payload of one frame (64 KiB). */
export const MAX_PAYLOAD = 65536;
/** Smallest legal value of `len`. */
export const MIN_FRAME_LEN = FRAME_OVERHEAD;
/** Largest legal value of `len`. */
export const MAX_FRAME_LEN = FRAME_OVERHEAD + MAX_PAYLOAD;
/** Largest frame on the wire, `len` included. */
export const MAX_FRAME_SIZE = LEN_SIZE + MAX_FRAME_LEN;
/** Initial flow-control window of every stream, in each direction. */
export const INITIAL_WINDOW = 262144;
/** Largest PING/PONG nonce. */
export const MAX_NONCE = 64;
/** Largest stream id. */
export const MAX_STREAM_ID = 0xffffffff;

export const FrameType = {
  PING: 0x01,
  PONG: 0x02,
  POWEROFF: 0x03,
  RESET: 0x04,
  HELLO: 0x06,
  UNSUPPORTED: 0x07,
  EXEC: 0x10,
  STARTED: 0x11,
  STDIN: 0x12,
  STDOUT: 0x13,
  STDERR: 0x14,
  SIGNAL: 0x15,
  RESIZE: 0x16,
  EXIT: 0x17,
  ERROR: 0x18,
  CREDIT: 0x19,
  FILE_WRITE: 0x20,
  FILE_READ: 0x21,
  DATA: 0x22,
  DONE: 0x23,
  CANCEL: 0x24,
  CONFIGURE: 0x25,
  /** agent→host: a stream the agent opens for a guest process's API connection (guest-api.ts). */
  API_OPEN: 0x28,
  /**
   * host→agent: a stream to a TCP port of the guest (port-stream.ts); agent→host on the same
   * stream, without fields: connected.
   */
  PORT_OPEN: 0x29,
  /** host→agent: mount the ext4 disk hot-plugged at a SCSI target (answered DONE size or ERROR). */
  DISK_MOUNT: 0x2a,
  /** host→agent: unmount a disk and let the guest release its SCSI device (DONE or ERROR). */
  DISK_UNMOUNT: 0x2b,
} as const;

export type FrameTypeName = keyof typeof FrameType;
export type FrameTypeCode = (typeof FrameType)[FrameTypeName];

const TYPE_NAMES = new Map<number, FrameTypeName>(
  (Object.keys(FrameType) as FrameTypeName[]).map((name) => [FrameType[name], name]),
);

/** The name of a frame type, or undefined when the type is unknown. */
export function frameTypeName(type: number): FrameTypeName | undefined {
  return TYPE_NAMES.get(type);
}

export function isKnownFrameType(type: number): type is FrameTypeCode {
  return TYPE_NAMES.has(type);
}

/** TLV tags of EXEC. */
export const ExecTag = { ARG: 0x01, ENV: 0x02, CWD: 0x03, PTY: 0x04, TIMEOUT_MS: 0x05, STDIN: 0x06 } as const;
/** TLV tags of EXIT. */
export const ExitTag = { CODE: 0x01, SIGNAL: 0x02, TIMED_OUT: 0x03 } as const;
/** TLV tags of ERROR. */
export const ErrorTag = { CODE: 0x01, MESSAGE: 0x02 } as const;
/** TLV tags of FILE_WRITE. */
export const FileWriteTag = { PATH: 0x01, MODE: 0x02, MKDIRS: 0x03 } as const;
/** TLV tags of FILE_READ. */
export const FileReadTag = { PATH: 0x01 } as const;
/** TLV tags of DONE. */
export const DoneTag = { SIZE: 0x01, MODE: 0x02 } as const;
/** TLV tags of CONFIGURE. */
export const ConfigureTag = {
  HOSTNAME: 0x01,
  TIME_NS: 0x02,
  ENTROPY: 0x03,
  MACHINE_ID: 0x04,
  VOLUME: 0x05,
  GROW_ROOT: 0x06,
  /** 15 bytes: address, prefix, gateway, mtu, dns (protocol-messages.ts encodeNetField). */
  NET: 0x07,
} as const;
/** TLV tags of PORT_OPEN. */
export const PortOpenTag = { PORT: 0x01 } as const;
/** TLV tags of DISK_MOUNT. */
export const DiskMountTag = { TARGET: 0x01, PATH: 0x02, READ_ONLY: 0x03 } as const;
/** TLV tags of DISK_UNMOUNT (path first: not the order of DISK_MOUNT). */
export const DiskUnmountTag = { PATH: 0x01, TARGET: 0x02 } as const;
/** TLV tags of HELLO. */
export const HelloTag = { VERSION: 0x01, FEATURES: 0x02 } as const;
/** TLV tags of UNSUPPORTED. */
export const UnsupportedTag = { TYPE: 0x01, STREAM: 0x02 } as const;

// ---------------------------------------------------------------------------------------
// Versions and features (docs/agent-protocol.md, "Versions and features")

/**
 * This side's protocol version. 1 is the protocol before HELLO existed: a peer that does not
 * answer HELLO speaks version 1 with LEGACY_FEATURES.
 */
export const PROTOCOL_VERSION = 3;

/**
 * One bit per capability a peer announces in HELLO. Bits are never reused or renumbered; a
 * peer ignores bits it does not know. A request a feature gates is sent only to a peer that
 * announced the feature, so an old peer is never handed a field it would skip.
 */
export const Feature = {
  /** EXEC and its stream frames (STDIN … EXIT, PTY, timeout). */
  exec: 1n << 0n,
  /** FILE_WRITE and FILE_READ. */
  files: 1n << 1n,
  /** RESET. */
  reset: 1n << 2n,
  /** CONFIGURE with hostname, time_ns, entropy, machine_id. */
  configure: 1n << 3n,
  /** CONFIGURE's volume field: mount virtio-9p shares (instead of `hutch.vol=` at boot). */
  'configure-volumes': 1n << 4n,
  /** CONFIGURE's grow_root field: grow / to its disk (instead of at every boot). */
  'configure-grow-root': 1n << 5n,
  /** Answers a frame of an unknown type with UNSUPPORTED instead of resynchronising. */
  unsupported: 1n << 6n,
  /** API_OPEN: guest processes reach the host's machines API through the agent (guest-api.ts). */
  'guest-api': 1n << 7n,
  /** PORT_OPEN: the host connects to a TCP port of the guest through the agent (port-stream.ts). */
  'port-forward': 1n << 8n,
  /** CONFIGURE's net field: the NIC's IPv4 address, default route, MTU and DNS server. */
  net: 1n << 9n,
  /** DISK_MOUNT and DISK_UNMOUNT: ext4 disks hot-plugged on the guest's virtio-scsi controller. */
  disks: 1n << 10n,
} as const;

export type FeatureName = keyof typeof Feature;

/** What a version-1 peer (no HELLO) can do: the agent of git 77b0647 and before, back to RESET. */
export const LEGACY_FEATURES: bigint = Feature.exec | Feature.files | Feature.reset | Feature.configure;

/** Every feature this build implements: what the host announces in its HELLO. */
export const ALL_FEATURES: bigint = (Object.values(Feature) as bigint[]).reduce((a, b) => a | b, 0n);

/** The names of the known bits set in `bits` (unknown bits are kept by the caller, not named). */
export function featureNames(bits: bigint): FeatureName[] {
  return (Object.keys(Feature) as FeatureName[]).filter((n) => (bits & Feature[n]) !== 0n);
}

// ---------------------------------------------------------------------------------------
// Errors

export type ProtocolErrorKind =
  /** `len` < 5. */
  | 'too-small'
  /** `len` > 5 + 64 KiB, or a payload longer than its type allows. */
  | 'too-large'
  /** Unknown frame type. */
  | 'bad-type'
  /** A TLV field or a fixed-size payload shorter than it must be, or an incomplete frame. */
  | 'truncated'
  /** A fixed-size value longer than it must be, or bytes after the one frame of a buffer. */
  | 'bad-length'
  /** The peer sent more payload bytes than the window it was granted. */
  | 'window'
  /** A frame that the host never expects from the agent, or at the wrong time. */
  | 'unexpected'
  /** Too many frames for unknown or finished streams. */
  | 'unknown-stream';

export class ProtocolError extends Error {
  readonly kind: ProtocolErrorKind;
  constructor(kind: ProtocolErrorKind, message: string) {
    super(`agent protocol error (${kind}): ${message}`);
    this.name = 'ProtocolError';
    this.kind = kind;
  }
}

export function isProtocolError(err: unknown): err is ProtocolError {
  return err instanceof ProtocolError;
}

// ---------------------------------------------------------------------------------------
// Frames

/** One frame; `payload` may be a view into a larger buffer. */
export interface Frame {
  type: number;
  stream: number;
  payload: Buffer;
}

function checkStream(stream: number): void {
  if (!Number.isInteger(stream) || stream < 0 || stream > MAX_STREAM_ID) {
    throw new RangeError(`stream id out of range: ${stream}`);
  }
}

/** Encodes one frame. Throws RangeError for an oversized payload or a bad type/stream. */
export function encodeFrame(type: number, stream: number, payload: Uint8Array = EMPTY): Buffer {
  if (!Number.isInteger(type) || type < 0 || type > 0xff) throw new RangeError(`bad frame type: ${type}`);
  checkStream(stream);
  if (payload.length > MAX_PAYLOAD) {
    throw new RangeError(`payload of ${payload.length} bytes exceeds ${MAX_PAYLOAD}`);
  }
  const out = Buffer.allocUnsafe(HEADER_SIZE + payload.length);
  out.writeUInt32BE(FRAME_OVERHEAD + payload.length, 0);
  out.writeUInt8(type, 4);
  out.writeUInt32BE(stream, 5);
  out.set(payload, HEADER_SIZE);
  return out;
}

const EMPTY = Buffer.alloc(0);

function checkLen(len: number): void {
  if (len < MIN_FRAME_LEN) throw new ProtocolError('too-small', `frame length ${len} < ${MIN_FRAME_LEN}`);
  if (len > MAX_FRAME_LEN) throw new ProtocolError('too-large', `frame length ${len} > ${MAX_FRAME_LEN}`);
}

function checkType(type: number): void {
  if (!isKnownFrameType(type)) {
    throw new ProtocolError('bad-type', `unknown frame type 0x${type.toString(16).padStart(2, '0')}`);
  }
}

/**
 * Decodes a buffer holding exactly one frame (length checks only; the type and the payload
 * are decodeMessage's). Throws ProtocolError: too-small/too-large as the stream decoder would,
 * `truncated` if the buffer ends early, `bad-length` if bytes follow the frame.
 */
export function decodeFrame(buf: Buffer): Frame {
  if (buf.length < LEN_SIZE) throw new ProtocolError('truncated', `${buf.length} bytes, no frame length`);
  const len = buf.readUInt32BE(0);
  checkLen(len);
  if (buf.length < LEN_SIZE + len) {
    throw new ProtocolError('truncated', `frame of ${LEN_SIZE + len} bytes, only ${buf.length} present`);
  }
  if (buf.length > LEN_SIZE + len) {
    throw new ProtocolError('bad-length', `${buf.length - LEN_SIZE - len} bytes after the frame`);
  }
  return { type: buf.readUInt8(4), stream: buf.readUInt32BE(5), payload: buf.subarray(HEADER_SIZE) };
}

/**
 * Incremental frame decoder. Feed it chunks cut anywhere; it validates `len` as soon as the
 * 4 length bytes are in, and it never holds more than one (partial) frame plus the
 * unconsumed rest of the last chunk. It frames every type, known or not: a frame of an
 * unknown type is skipped whole by its reader (and answered with UNSUPPORTED), which only
 * works if the framing layer never cares about the type. After an error it is dead: every
 * later call throws the same error.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private failure: ProtocolError | null = null;

  /** Bytes held waiting for the rest of a frame. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  get error(): ProtocolError | null {
    return this.failure;
  }

  /**
   * Consumes a chunk, calling onFrame for every complete frame in order. If the stream is
   * invalid, the frames before the bad one are delivered first, then ProtocolError is thrown.
   * Payloads delivered to onFrame may be views into the chunk: copy them to keep them.
   */
  feed(chunk: Uint8Array, onFrame: (frame: Frame) => void): void {
    if (this.failure) throw this.failure;
    if (chunk.length > 0) {
      this.chunks.push(
        Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length),
      );
      this.buffered += chunk.length;
    }
    try {
      for (;;) {
        if (this.buffered < LEN_SIZE) return;
        const len = this.peekU32();
        checkLen(len);
        if (this.buffered < LEN_SIZE + len) return;
        const bytes = this.take(LEN_SIZE + len);
        onFrame({
          type: bytes.readUInt8(4),
          stream: bytes.readUInt32BE(5),
          payload: bytes.subarray(HEADER_SIZE),
        });
        if (this.failure) return;
      }
    } catch (err) {
      if (err instanceof ProtocolError) {
        this.fail(err);
      }
      throw err;
    }
  }

  /** Convenience: feed and collect the frames (throws on a bad stream; frames before are lost). */
  push(chunk: Uint8Array): Frame[] {
    const out: Frame[] = [];
    this.feed(chunk, (f) => {
      out.push({ type: f.type, stream: f.stream, payload: Buffer.from(f.payload) });
    });
    return out;
  }

  private fail(err: ProtocolError): void {
    this.failure = err;
    this.chunks = [];
    this.buffered = 0;
  }

  private peekByte(index: number): number {
    let i = index;
    for (const c of this.chunks) {
      if (i < c.length) return c[i]!;
      i -= c.length;
    }
    throw new RangeError('peek past buffered bytes');
  }

  private peekU32(): number {
    const first = this.chunks[0]!;
    if (first.length >= 4) return first.readUInt32BE(0);
    return (
      ((this.peekByte(0) << 24) | (this.peekByte(1) << 16) | (this.peekByte(2) << 8) | this.peekByte(3)) >>> 0
    );
  }

  private take(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n) {
      const out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    let used = 0;
    while (off < n) {
      const c = this.chunks[used]!;
      const want = n - off;
      if (c.length <= want) {
        out.set(c, off);
        off += c.length;
        used++;
      } else {
        out.set(c.subarray(0, want), off);
        this.chunks[used] = c.subarray(want);
        off += want;
      }
    }
    this.chunks.splice(0, used);
    this.buffered -= n;
    return out;
  }
}

// ---------------------------------------------------------------------------------------
// TLV

export interface Tlv {
  tag: number;
  value: Buffer;
}

/** Splits a TLV payload. Throws ProtocolError('truncated') if a field runs past the end. */
export function parseTlv(payload: Buffer): Tlv[] {
  const out: Tlv[] = [];
  let off = 0;
  while (off < payload.length) {
    if (payload.length - off < 5) {
      throw new ProtocolError(
        'truncated',
        `TLV header at offset ${off} needs 5 bytes, ${payload.length - off} left`,
      );
    }
    const tag = payload.readUInt8(off);
    const len = payload.readUInt32BE(off + 1);
    off += 5;
    if (len > payload.length - off) {
      throw new ProtocolError(
        'truncated',
        `TLV field ${tag} of ${len} bytes, only ${payload.length - off} left`,
      );
    }
    out.push({ tag, value: payload.subarray(off, off + len) });
    off += len;
  }
  return out;
}

export function encodeTlv(fields: readonly Tlv[]): Buffer {
  let size = 0;
  for (const f of fields) size += 5 + f.value.length;
  const out = Buffer.allocUnsafe(size);
  let off = 0;
  for (const f of fields) {
    out.writeUInt8(f.tag, off);
    out.writeUInt32BE(f.value.length, off + 1);
    out.set(f.value, off + 5);
    off += 5 + f.value.length;
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Structured messages

/** One decoded field, in frame order. `tag` is null for fixed-layout payloads. */
export type Field =
  | { kind: 'bytes'; key: string; tag: number | null; value: Buffer }
  | { kind: 'uint'; key: string; tag: number | null; width: UintWidth; value: bigint }
  | { kind: 'pty'; key: 'pty'; tag: number; cols: number; rows: number }
  | { kind: 'unknown'; key: 'unknown'; tag: number; value: Buffer };

export type UintWidth = 1 | 2 | 4 | 8;

export interface Message {
  type: FrameTypeCode;
  name: FrameTypeName;
  stream: number;
  fields: Field[];
}

type TagSpec =
  | { kind: 'bytes'; key: string }
  | { kind: 'uint'; key: string; width: UintWidth }
  | { kind: 'pty' };

type PayloadSpec =
  | { layout: 'empty' }
  | { layout: 'bytes'; key: string; max: number }
  | { layout: 'fixed'; fields: ReadonlyArray<{ key: string; width: UintWidth }> }
  | { layout: 'tlv'; tags: ReadonlyMap<number, TagSpec> };

const bytesTag = (key: string): TagSpec => ({ kind: 'bytes', key });
const uintTag = (key: string, width: UintWidth): TagSpec => ({ kind: 'uint', key, width });

const SPECS: Record<FrameTypeName, PayloadSpec> = {
  PING: { layout: 'bytes', key: 'nonce', max: MAX_NONCE },
  PONG: { layout: 'bytes', key: 'nonce', max: MAX_NONCE },
  POWEROFF: { layout: 'empty' },
  RESET: { layout: 'empty' },
  EXEC: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [ExecTag.ARG, bytesTag('arg')],
      [ExecTag.ENV, bytesTag('env')],
      [ExecTag.CWD, bytesTag('cwd')],
      [ExecTag.PTY, { kind: 'pty' }],
      [ExecTag.TIMEOUT_MS, uintTag('timeout_ms', 4)],
      [ExecTag.STDIN, uintTag('stdin', 1)],
    ]),
  },
  STARTED: { layout: 'fixed', fields: [{ key: 'pid', width: 4 }] },
  STDIN: { layout: 'bytes', key: 'data', max: MAX_PAYLOAD },
  STDOUT: { layout: 'bytes', key: 'data', max: MAX_PAYLOAD },
  STDERR: { layout: 'bytes', key: 'data', max: MAX_PAYLOAD },
  SIGNAL: { layout: 'fixed', fields: [{ key: 'signal', width: 1 }] },
  RESIZE: {
    layout: 'fixed',
    fields: [
      { key: 'cols', width: 2 },
      { key: 'rows', width: 2 },
    ],
  },
  EXIT: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [ExitTag.CODE, uintTag('code', 4)],
      [ExitTag.SIGNAL, uintTag('signal', 4)],
      [ExitTag.TIMED_OUT, uintTag('timed_out', 1)],
    ]),
  },
  ERROR: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [ErrorTag.CODE, bytesTag('code')],
      [ErrorTag.MESSAGE, bytesTag('message')],
    ]),
  },
  CREDIT: { layout: 'fixed', fields: [{ key: 'bytes', width: 4 }] },
  FILE_WRITE: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [FileWriteTag.PATH, bytesTag('path')],
      [FileWriteTag.MODE, uintTag('mode', 4)],
      [FileWriteTag.MKDIRS, uintTag('mkdirs', 1)],
    ]),
  },
  FILE_READ: { layout: 'tlv', tags: new Map<number, TagSpec>([[FileReadTag.PATH, bytesTag('path')]]) },
  DATA: { layout: 'bytes', key: 'data', max: MAX_PAYLOAD },
  DONE: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [DoneTag.SIZE, uintTag('size', 8)],
      [DoneTag.MODE, uintTag('mode', 4)],
    ]),
  },
  CANCEL: { layout: 'empty' },
  // No fields yet: unknown tags are skipped as in every TLV payload.
  API_OPEN: { layout: 'tlv', tags: new Map<number, TagSpec>() },
  PORT_OPEN: { layout: 'tlv', tags: new Map<number, TagSpec>([[PortOpenTag.PORT, uintTag('port', 2)]]) },
  DISK_MOUNT: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [DiskMountTag.TARGET, uintTag('target', 2)],
      [DiskMountTag.PATH, bytesTag('path')],
      [DiskMountTag.READ_ONLY, uintTag('read_only', 1)],
    ]),
  },
  DISK_UNMOUNT: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [DiskUnmountTag.PATH, bytesTag('path')],
      [DiskUnmountTag.TARGET, uintTag('target', 2)],
    ]),
  },
  CONFIGURE: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [ConfigureTag.HOSTNAME, bytesTag('hostname')],
      [ConfigureTag.TIME_NS, uintTag('time_ns', 8)],
      [ConfigureTag.ENTROPY, bytesTag('entropy')],
      [ConfigureTag.MACHINE_ID, bytesTag('machine_id')],
      [ConfigureTag.VOLUME, bytesTag('volume')],
      [ConfigureTag.GROW_ROOT, uintTag('grow_root', 1)],
      // Fixed at 15 bytes, but carried as bytes: the agent judges it (EINVAL), like a hostname.
      [ConfigureTag.NET, bytesTag('net')],
    ]),
  },
  HELLO: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [HelloTag.VERSION, uintTag('version', 4)],
      [HelloTag.FEATURES, uintTag('features', 8)],
    ]),
  },
  UNSUPPORTED: {
    layout: 'tlv',
    tags: new Map<number, TagSpec>([
      [UnsupportedTag.TYPE, uintTag('type', 1)],
      [UnsupportedTag.STREAM, uintTag('stream', 4)],
    ]),
  },
};

function readUint(buf: Buffer, off: number, width: UintWidth): bigint {
  switch (width) {
    case 1:
      return BigInt(buf.readUInt8(off));
    case 2:
      return BigInt(buf.readUInt16BE(off));
    case 4:
      return BigInt(buf.readUInt32BE(off));
    case 8:
      return buf.readBigUInt64BE(off);
  }
}

export function writeUint(value: bigint, width: UintWidth): Buffer {
  const max = (1n << BigInt(width * 8)) - 1n;
  if (value < 0n || value > max) throw new RangeError(`${value} does not fit in ${width} bytes`);
  const out = Buffer.allocUnsafe(width);
  switch (width) {
    case 1:
      out.writeUInt8(Number(value), 0);
      break;
    case 2:
      out.writeUInt16BE(Number(value), 0);
      break;
    case 4:
      out.writeUInt32BE(Number(value), 0);
      break;
    case 8:
      out.writeBigUInt64BE(value, 0);
      break;
  }
  return out;
}

function checkFixedLength(what: string, got: number, want: number): void {
  if (got < want) throw new ProtocolError('truncated', `${what}: ${got} bytes, expected ${want}`);
  if (got > want) throw new ProtocolError('bad-length', `${what}: ${got} bytes, expected ${want}`);
}

/**
 * Decodes a frame's payload into fields (in frame order). Throws ProtocolError for a frame
 * type that is unknown (`bad-type`), a TLV field or fixed payload that is too short
 * (`truncated`), a fixed value that is too long (`bad-length`) or an oversized nonce /
 * non-empty POWEROFF or CANCEL (`too-large`).
 */
export function decodeMessage(frame: Frame): Message {
  const name = frameTypeName(frame.type);
  if (name === undefined) {
    checkType(frame.type);
    throw new Error('unreachable');
  }
  const type = FrameType[name];
  const spec = SPECS[name];
  const p = frame.payload;
  const fields: Field[] = [];
  switch (spec.layout) {
    case 'empty':
      if (p.length !== 0) throw new ProtocolError('bad-length', `${name} carries ${p.length} payload bytes`);
      break;
    case 'bytes':
      if (p.length > spec.max)
        throw new ProtocolError('too-large', `${name} payload ${p.length} > ${spec.max}`);
      fields.push({ kind: 'bytes', key: spec.key, tag: null, value: p });
      break;
    case 'fixed': {
      const total = spec.fields.reduce((n, f) => n + f.width, 0);
      checkFixedLength(name, p.length, total);
      let off = 0;
      for (const f of spec.fields) {
        fields.push({
          kind: 'uint',
          key: f.key,
          tag: null,
          width: f.width,
          value: readUint(p, off, f.width),
        });
        off += f.width;
      }
      break;
    }
    case 'tlv':
      for (const { tag, value } of parseTlv(p)) {
        const t = spec.tags.get(tag);
        if (t === undefined) {
          fields.push({ kind: 'unknown', key: 'unknown', tag, value });
        } else if (t.kind === 'bytes') {
          fields.push({ kind: 'bytes', key: t.key, tag, value });
        } else if (t.kind === 'uint') {
          checkFixedLength(`${name} field ${t.key}`, value.length, t.width);
          fields.push({ kind: 'uint', key: t.key, tag, width: t.width, value: readUint(value, 0, t.width) });
        } else {
          checkFixedLength(`${name} field pty`, value.length, 4);
          fields.push({
            kind: 'pty',
            key: 'pty',
            tag,
            cols: value.readUInt16BE(0),
            rows: value.readUInt16BE(2),
          });
        }
      }
      break;
  }
  return { type, name, stream: frame.stream, fields };
}

/** Encodes a message's fields back into a payload (the inverse of decodeMessage). */
export function encodePayload(msg: Pick<Message, 'fields'>): Buffer {
  const parts: Buffer[] = [];
  for (const f of msg.fields) {
    let value: Buffer;
    switch (f.kind) {
      case 'bytes':
      case 'unknown':
        value = f.value;
        break;
      case 'uint':
        value = writeUint(f.value, f.width);
        break;
      case 'pty':
        value = Buffer.allocUnsafe(4);
        value.writeUInt16BE(f.cols, 0);
        value.writeUInt16BE(f.rows, 2);
        break;
    }
    if (f.tag === null) {
      parts.push(value);
    } else {
      parts.push(encodeTlv([{ tag: f.tag, value }]));
    }
  }
  return Buffer.concat(parts);
}

export function encodeMessage(msg: Message): Buffer {
  return encodeFrame(msg.type, msg.stream, encodePayload(msg));
}

/** `key="…"` quoting of the canonical text. */
export function quoteBytes(bytes: Uint8Array): string {
  let s = '"';
  for (const b of bytes) {
    if (b >= 0x20 && b <= 0x7e && b !== 0x22 && b !== 0x5c) s += String.fromCharCode(b);
    else s += `\\x${b.toString(16).padStart(2, '0')}`;
  }
  return `${s}"`;
}

/** Canonical text of a frame or a decoded message (docs/agent-protocol.md, "Test vectors"). */
export function canonicalText(input: Frame | Message): string {
  const msg = 'fields' in input ? input : decodeMessage(input);
  const parts = [`${msg.name} stream=${msg.stream}`];
  for (const f of msg.fields) {
    switch (f.kind) {
      case 'bytes':
        parts.push(`${f.key}=${quoteBytes(f.value)}`);
        break;
      case 'uint':
        parts.push(`${f.key}=${f.value.toString(10)}`);
        break;
      case 'pty':
        parts.push(`pty=${f.cols}x${f.rows}`);
        break;
      case 'unknown':
        parts.push(`unknown=${f.tag}`);
        break;
    }
  }
  return parts.join(' ');
}

// ---------------------------------------------------------------------------------------
// Handshake resynchronisation

/**
 * Finds an exact byte sequence (the expected PONG frame) in a stream of arbitrary bytes.
 * Holds at most `pattern.length - 1` bytes between calls, however much garbage comes first.
 */
export class SequenceScanner {
  private readonly pattern: Buffer;
  private tail: Buffer = EMPTY;
  private discardedBytes = 0;

  constructor(pattern: Uint8Array) {
    if (pattern.length === 0) throw new RangeError('empty pattern');
    this.pattern = Buffer.from(pattern);
  }

  /** Bytes dropped so far (not counting those still held as a possible prefix). */
  get discarded(): number {
    return this.discardedBytes;
  }

  get bufferedBytes(): number {
    return this.tail.length;
  }

  /**
   * Scans a chunk. Returns the bytes that follow the pattern once it is found (possibly
   * empty), or null if it has not been found yet.
   */
  push(chunk: Uint8Array): Buffer | null {
    const hay = this.tail.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.tail, chunk]);
    const at = hay.indexOf(this.pattern);
    if (at >= 0) {
      this.discardedBytes += at;
      this.tail = EMPTY;
      return hay.subarray(at + this.pattern.length);
    }
    const keep = Math.min(hay.length, this.pattern.length - 1);
    this.discardedBytes += hay.length - keep;
    this.tail = Buffer.from(hay.subarray(hay.length - keep));
    return null;
  }
}
