/**
 * NBD wire constants and codecs (NetworkBlockDevice/nbd doc/proto.md). Everything on the
 * wire is big-endian. Only what this server speaks is here: fixed newstyle negotiation
 * and simple replies.
 */
export const NBDMAGIC = Buffer.from('NBDMAGIC', 'ascii');
export const IHAVEOPT = Buffer.from('IHAVEOPT', 'ascii');
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// Options.
export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

// Option reply types.
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  ERR_UNSUP: 2 ** 31 + 1,
  ERR_POLICY: 2 ** 31 + 2,
  ERR_INVALID: 2 ** 31 + 3,
  ERR_PLATFORM: 2 ** 31 + 4,
  ERR_TLS_REQD: 2 ** 31 + 5,
  ERR_UNKNOWN: 2 ** 31 + 6,
  ERR_SHUTDOWN: 2 ** 31 + 7,
  ERR_BLOCK_SIZE_REQD: 2 ** 31 + 8,
  ERR_TOO_BIG: 2 ** 31 + 9,
} as const;

// NBD_INFO_* in NBD_REP_INFO.
export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

// Transmission flags.
export const TFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

// Commands.
export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

// Command flags.
export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const OPTION_HEADER_BYTES = 16;

/**
 * Block size constraints we advertise: any byte granularity, 32 MiB max payload, and 4 KiB
 * preferred unless the backend states its own (server.ts `preferredBlock`).
 */
export const MIN_BLOCK = 1;
export const PREFERRED_BLOCK = 4096;
export const MAX_PAYLOAD = 32 << 20;
/** Longest option payload we read into memory; longer ones are skipped and refused. */
export const MAX_OPTION_BYTES = 64 << 10;
/** The spec's bound on strings (export names, messages). */
export const MAX_STRING = 4096;

export const CMD_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Cmd).map(([k, v]) => [v, k]));

/** S: server's first message of the fixed newstyle handshake. */
export function encodeGreeting(): Buffer {
  const b = Buffer.alloc(18);
  NBDMAGIC.copy(b, 0);
  IHAVEOPT.copy(b, 8);
  b.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return b;
}

export function encodeOptionReply(option: number, type: number, data?: Buffer): Buffer {
  const len = data?.length ?? 0;
  const b = Buffer.alloc(20 + len);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(len, 16);
  if (data) data.copy(b, 20);
  return b;
}

export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

export function encodeInfoString(type: number, s: string): Buffer {
  const str = Buffer.from(s, 'utf8');
  const b = Buffer.alloc(2 + str.length);
  b.writeUInt16BE(type, 0);
  str.copy(b, 2);
  return b;
}

/** NBD_REP_SERVER payload: name length, name, description. */
export function encodeServerEntry(name: string, description: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.alloc(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zero bytes. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export interface GoRequest {
  name: string;
  infos: number[];
}

/** Parses the payload of NBD_OPT_INFO / NBD_OPT_GO; null when its lengths disagree. */
export function decodeGoRequest(data: Buffer): GoRequest | null {
  if (data.length < 6) return null;
  const nameLen = data.readUInt32BE(0);
  if (nameLen > MAX_STRING || 4 + nameLen + 2 > data.length) return null;
  const name = data.toString('utf8', 4, 4 + nameLen);
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 4 + nameLen + 2 + 2 * count) return null;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(4 + nameLen + 2 + 2 * i));
  return { name, infos };
}

export interface RequestHeader {
  flags: number;
  type: number;
  /** The client's opaque 8-byte cookie, echoed in the reply. */
  handle: Buffer;
  offset: number;
  length: number;
}

/**
 * Parses a 28-byte request header at `at`. Offsets above 2^53 cannot be represented
 * exactly: they are reported as Infinity, which fails every range check.
 */
export function decodeRequestHeader(b: Buffer, at: number): RequestHeader | null {
  if (b.readUInt32BE(at) !== REQUEST_MAGIC) return null;
  const hi = b.readUInt32BE(at + 16);
  const lo = b.readUInt32BE(at + 20);
  const offset = hi >= 0x200000 ? Infinity : hi * 2 ** 32 + lo;
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    handle: b.subarray(at + 8, at + 16),
    offset,
    length: b.readUInt32BE(at + 24),
  };
}

export function writeSimpleReplyHeader(dest: Buffer, error: number, handle: Buffer): void {
  dest.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  dest.writeUInt32BE(error, 4);
  handle.copy(dest, 8);
}
