/**
 * Structure-aware fuzzing of the NBD server (issue #8): the real NbdServer in-process on a
 * unix socket, exporting a real StreamingDisk (hydrated from a TestOrigin, so every region
 * is local and the origin is never asked again) on a target in a temp directory.
 *
 * Inputs come from fast-check arbitraries (generation and shrinking):
 *
 *   - handshake sessions: client flags, a list of options (INFO/GO with wrong name lengths
 *     and info-request counts, EXPORT_NAME, ABORT, LIST, STARTTLS, unsupported and random
 *     option codes, declared lengths that disagree with the payload or exceed the limit),
 *     a few transmission requests after the export is chosen, optional byte-level
 *     mutations (bit flips, overwrites, insertions, deletions, truncation); one connection
 *     each, half-closed by the client after the last byte. One input per session.
 *   - transmission sessions: one negotiated connection carrying up to 16 batches of
 *     pipelined requests (bad magic, unknown commands and flags, offsets and lengths beyond
 *     the end, huge lengths, writes whose payload is shorter or longer than declared,
 *     DISC in the middle), each batch optionally byte-mutated. One input per batch.
 *
 * The oracle does not ask the server what it meant: the client frames its own byte stream
 * as the protocol says the server must (a WRITE header is followed by `length` payload
 * bytes whether or not the write is refused; bad magic or DISC ends the stream; a request
 * cut short by the half-close is dropped), then checks per input:
 *
 *   - nothing throws in the server (uncaught exceptions, "negotiation failed" in its log);
 *   - no hang: an open batch is answered within 2 s; a connection the client half-closed
 *     (or that met DISC or bad magic) ends within 2 s;
 *   - every option reply has the reply magic, echoes the option, and has the type the
 *     spec requires (ERR_UNSUP for unknown options, ERR_INVALID for a malformed INFO/GO,
 *     INFO_EXPORT then ACK for a good one…), and refusals carry a message;
 *   - every transmission reply has the simple-reply magic, the handle of a request the
 *     client sent and not yet answered, an errno from NBD's set; requests the spec says
 *     must fail fail, in-range well-formed ones succeed, READ data is the disk's;
 *   - every framed request is answered exactly once (after bad magic the server may close
 *     at once: replies may then be missing, the last one cut short);
 *   - the disk changes only through writes, zeroes and trims that were answered with
 *     success (or cut off by the close): each client owns a lane of the disk and its lane
 *     is compared with a model after every input; the rest of the disk (never written)
 *     is compared with the image periodically;
 *   - after every chunk of sessions a well-behaved client negotiates, writes, reads back,
 *     flushes and disconnects.
 *
 * Overlapping requests in flight together may complete in any order (NBD makes no
 * promise), so a byte touched by several of them may end as any one's value.
 *
 * Run outside CI:  node dist/tests/fuzz/nbd-fuzz.js --inputs 1000000 [--seed S] [--workers 8]
 */
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import fc from 'fast-check';
import { pino } from 'pino';
import { NbdServer } from '../../dpu-agent/src/nbd/server.js';
import { openStreamingDisk, type OpenedDisk } from '../../dpu-agent/src/streaming/open.js';
import { makeImage } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';

// ---- wire constants, written out from the spec (not imported from the server) ---------------

const IHAVEOPT = Buffer.from('IHAVEOPT', 'ascii');
const NBDMAGIC = Buffer.from('NBDMAGIC', 'ascii');
const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const MAX_OPTION_BYTES = 64 << 10; // what the server documents as its option limit
const MAX_PAYLOAD = 32 << 20; // the block-size maximum it advertises
const MAX_OPTIONS = 128;
const EXPORT_NAME = 'fuzz';

const OPT = { EXPORT_NAME: 1, ABORT: 2, LIST: 3, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8, LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11 };
const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const ERR = (n: number): number => 2 ** 31 + n;
const REP_ERR_UNSUP = ERR(1);
const REP_ERR_POLICY = ERR(2);
const REP_ERR_INVALID = ERR(3);
const REP_ERR_UNKNOWN = ERR(6);
const REP_ERR_TOO_BIG = ERR(9);
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7, RESIZE: 8 };
const FLAG_FUA = 1;
const FLAG_NO_HOLE = 2;
const FLAG_FAST_ZERO = 16;
const DEFINED_CMD_FLAGS = 0x1f; // FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO
/** NBD's errno values (proto.md "Error values"). */
const NBD_ERRNOS = new Set([1, 5, 12, 22, 28, 75, 95, 108]);

// ---- geometry ------------------------------------------------------------------------

const KiB = 1024;
const MiB = 1 << 20;
const DISK_SIZE = 4 * MiB;
const REGION = 64 * KiB;
/** Each concurrent client owns one lane; nothing else is ever written. */
const LANE = 192 * KiB;
const MAX_WORKERS = 8;
const RESERVED_START = MAX_WORKERS * LANE; // 1.5 MiB … 4 MiB: the image, forever
const HANG_MS = 2000;
const ZEROS = Buffer.alloc(LANE);

// ---- inputs ------------------------------------------------------------------------------

type Mutation = { kind: 'flip' | 'set' | 'insert' | 'delete'; at: number; v: number };
interface Mutations {
  edits: Mutation[];
  /** Cut the stream to `truncate % (length + 1)` bytes. */
  truncate: number | null;
}

type OffsetSpec = ['lane', number] | ['end', number] | ['beyond', number] | ['abs', bigint];
type PayloadSpec = 'exact' | 'none' | number;
interface RequestSpec {
  magic: number | null; // null: the right magic
  type: number;
  flags: number;
  offset: OffsetSpec;
  length: number;
  payload: PayloadSpec;
  seed: number;
}

interface OptionSpec {
  code: number;
  /** The payload, as a recipe (see encodeOption). */
  body:
    | { kind: 'go'; name: string; infos: number[]; nameLenDelta: number; countDelta: number; trailing: number }
    | { kind: 'name'; name: string }
    | { kind: 'bytes'; n: number; seed: number };
  /** Declared length minus the real one (0: truthful); 'huge' declares over the limit. */
  lengthDelta: number | 'huge';
}

interface HandshakeSession {
  kind: 'handshake';
  flags: number;
  options: OptionSpec[];
  tail: RequestSpec[];
  mutate: Mutations;
}

interface Batch {
  reqs: RequestSpec[];
  mutate: Mutations;
  /** Half-close after this batch (ends the session). */
  halfClose: boolean;
}

interface TransmissionSession {
  kind: 'transmission';
  batches: Batch[];
  finish: 'disc' | 'half-close' | 'destroy';
}

type Session = HandshakeSession | TransmissionSession;

const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });

const noMutations: Mutations = { edits: [], truncate: null };
const mutationsArb: fc.Arbitrary<Mutations> = fc.oneof(
  { weight: 6, arbitrary: fc.constant(noMutations) },
  {
    weight: 1,
    arbitrary: fc.record({
      edits: fc.array(fc.record({ kind: fc.constantFrom('flip', 'set', 'insert', 'delete') as fc.Arbitrary<Mutation['kind']>, at: fc.nat(), v: fc.nat(255) }), { minLength: 1, maxLength: 4 }),
      truncate: fc.option(fc.nat(), { freq: 3 }),
    }),
  },
);

const nameArb = fc.oneof(
  { weight: 4, arbitrary: fc.constant('') },
  { weight: 4, arbitrary: fc.constant(EXPORT_NAME) },
  { weight: 1, arbitrary: fc.constantFrom('Fuzz', 'fuzz\0', 'fuzz ', 'disk', '\u00e9', 'f') },
  { weight: 2, arbitrary: fc.string({ maxLength: 24 }) },
  { weight: 1, arbitrary: fc.string({ unit: 'grapheme', maxLength: 12 }) },
  { weight: 1, arbitrary: fc.integer({ min: 4090, max: 4200 }).map((n) => 'x'.repeat(n)) },
);

const goBody = fc.record({
  kind: fc.constant('go' as const),
  name: nameArb,
  infos: fc.array(fc.oneof({ weight: 4, arbitrary: fc.integer({ min: 0, max: 4 }) }, { weight: 1, arbitrary: u16 }), { maxLength: 6 }),
  nameLenDelta: fc.oneof({ weight: 8, arbitrary: fc.constant(0) }, { weight: 2, arbitrary: fc.integer({ min: -8, max: 8 }) }, { weight: 1, arbitrary: fc.constantFrom(0x7fffffff, 4097, -1e6) }),
  countDelta: fc.oneof({ weight: 8, arbitrary: fc.constant(0) }, { weight: 2, arbitrary: fc.integer({ min: -3, max: 3 }) }, { weight: 1, arbitrary: fc.constantFrom(0xffff, 0x8000) }),
  trailing: fc.oneof({ weight: 8, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 9 }) }),
});
const bytesBody = (max: number): fc.Arbitrary<OptionSpec['body']> => fc.record({ kind: fc.constant('bytes' as const), n: fc.nat(max), seed: fc.nat() });
const emptyOrBytes = fc.oneof({ weight: 5, arbitrary: fc.constant({ kind: 'bytes' as const, n: 0, seed: 0 }) }, { weight: 1, arbitrary: bytesBody(16) });
const lengthDelta = fc.oneof(
  { weight: 12, arbitrary: fc.constant(0) },
  { weight: 1, arbitrary: fc.integer({ min: -6, max: 6 }) },
  { weight: 1, arbitrary: fc.constant('huge' as const) },
);

const optionArb: fc.Arbitrary<OptionSpec> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ code: fc.constantFrom(OPT.GO, OPT.INFO), body: goBody, lengthDelta }) },
  { weight: 2, arbitrary: fc.record({ code: fc.constant(OPT.EXPORT_NAME), body: fc.record({ kind: fc.constant('name' as const), name: nameArb }), lengthDelta }) },
  { weight: 1, arbitrary: fc.record({ code: fc.constant(OPT.ABORT), body: emptyOrBytes, lengthDelta }) },
  { weight: 2, arbitrary: fc.record({ code: fc.constant(OPT.LIST), body: emptyOrBytes, lengthDelta }) },
  { weight: 2, arbitrary: fc.record({ code: fc.constant(OPT.STARTTLS), body: emptyOrBytes, lengthDelta }) },
  { weight: 2, arbitrary: fc.record({ code: fc.constantFrom(OPT.STRUCTURED_REPLY, OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT, OPT.EXTENDED_HEADERS), body: bytesBody(32), lengthDelta }) },
  { weight: 3, arbitrary: fc.record({ code: fc.oneof(fc.integer({ min: 0, max: 16 }), u32), body: bytesBody(40), lengthDelta }) },
  // Over the option limit, payload sent in full: the server must skip it and refuse.
  { weight: 1, arbitrary: fc.record({ code: fc.constantFrom(OPT.GO, OPT.LIST, 0xdead), body: fc.record({ kind: fc.constant('bytes' as const), n: fc.integer({ min: MAX_OPTION_BYTES + 1, max: MAX_OPTION_BYTES + 64 }), seed: fc.nat() }), lengthDelta: fc.constant(0) }) },
);

const offsetArb: fc.Arbitrary<OffsetSpec> = fc.oneof(
  { weight: 10, arbitrary: fc.tuple(fc.constant('lane' as const), fc.nat(LANE - 1)) },
  { weight: 2, arbitrary: fc.tuple(fc.constant('end' as const), fc.nat(64 * KiB)) },
  { weight: 2, arbitrary: fc.tuple(fc.constant('beyond' as const), fc.nat(64 * KiB)) },
  { weight: 1, arbitrary: fc.tuple(fc.constant('abs' as const), fc.oneof(fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), fc.constantFrom(2n ** 53n, 2n ** 53n - 1n, 2n ** 63n, 2n ** 64n - 1n, 2n ** 64n - 512n))) },
);
const lengthArb = fc.oneof(
  { weight: 3, arbitrary: fc.integer({ min: 1, max: 4096 }) },
  { weight: 3, arbitrary: fc.constantFrom(512, 4096, 8192) },
  { weight: 2, arbitrary: fc.integer({ min: 1, max: LANE }) },
  { weight: 1, arbitrary: fc.constant(0) },
  { weight: 1, arbitrary: fc.constantFrom(MAX_PAYLOAD, MAX_PAYLOAD + 1, DISK_SIZE, DISK_SIZE + 1, 0xffffffff, 0x80000000) },
  { weight: 1, arbitrary: u32 },
);
const typeArb = fc.oneof(
  { weight: 6, arbitrary: fc.constant(CMD.READ) },
  { weight: 6, arbitrary: fc.constant(CMD.WRITE) },
  { weight: 2, arbitrary: fc.constant(CMD.FLUSH) },
  { weight: 2, arbitrary: fc.constantFrom(CMD.TRIM, CMD.WRITE_ZEROES) },
  { weight: 1, arbitrary: fc.constant(CMD.CACHE) },
  { weight: 1, arbitrary: fc.constantFrom(CMD.BLOCK_STATUS, CMD.RESIZE, 9, 0x8000) },
  { weight: 1, arbitrary: u16 },
);
const flagsArb = fc.oneof({ weight: 10, arbitrary: fc.constant(0) }, { weight: 3, arbitrary: fc.constant(FLAG_FUA) }, { weight: 2, arbitrary: fc.nat(DEFINED_CMD_FLAGS) }, { weight: 1, arbitrary: u16 });
const requestArb: fc.Arbitrary<RequestSpec> = fc.record({
  magic: fc.oneof({ weight: 30, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: u32 }),
  type: typeArb,
  flags: flagsArb,
  offset: offsetArb,
  length: lengthArb,
  payload: fc.oneof({ weight: 12, arbitrary: fc.constant('exact' as const) }, { weight: 1, arbitrary: fc.constant('none' as const) }, { weight: 1, arbitrary: fc.integer({ min: -40, max: 40 }) }),
  seed: fc.nat(),
});
/** DISC is rare so that batches are not mostly cut short. */
const discArb: fc.Arbitrary<RequestSpec> = requestArb.map((r) => ({ ...r, magic: null, type: CMD.DISC, flags: 0, offset: ['abs', 0n] as OffsetSpec, length: 0 }));
const batchReqArb = fc.oneof({ weight: 40, arbitrary: requestArb }, { weight: 1, arbitrary: discArb });

const handshakeArb: fc.Arbitrary<Session> = fc.record({
  kind: fc.constant('handshake' as const),
  flags: fc.oneof({ weight: 10, arbitrary: fc.constant(3) }, { weight: 3, arbitrary: fc.constant(1) }, { weight: 1, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: u32 }),
  options: fc.array(optionArb, { maxLength: 6 }),
  tail: fc.array(requestArb, { maxLength: 4 }),
  mutate: mutationsArb,
});
// ---- encoding ------------------------------------------------------------------------------

/** Payload bytes: a window of one random pool (generating them byte by byte was the fuzzer's hot spot). */
const POOL = (() => {
  const b = Buffer.allocUnsafe(2 * MiB);
  let x = 0x2545f491;
  for (let i = 0; i < b.length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeInt32LE(x | 0, i);
  }
  return b;
})();
function pattern(n: number, seed: number): Buffer {
  if (n > POOL.length) return Buffer.alloc(n, seed & 0xff);
  const at = seed % (POOL.length - n + 1);
  return POOL.subarray(at, at + n);
}

function encodeOption(o: OptionSpec): Buffer {
  let data: Buffer;
  const b = o.body;
  if (b.kind === 'go') {
    const name = Buffer.from(b.name, 'utf8');
    data = Buffer.alloc(4 + name.length + 2 + 2 * b.infos.length + b.trailing);
    data.writeUInt32BE(Math.max(0, Math.min(0xffffffff, name.length + b.nameLenDelta)), 0);
    name.copy(data, 4);
    data.writeUInt16BE((b.infos.length + b.countDelta) & 0xffff, 4 + name.length);
    b.infos.forEach((t, i) => data.writeUInt16BE(t, 6 + name.length + 2 * i));
  } else if (b.kind === 'name') {
    data = Buffer.from(b.name, 'utf8');
  } else {
    data = pattern(b.n, b.seed);
  }
  const h = Buffer.alloc(16);
  IHAVEOPT.copy(h, 0);
  h.writeUInt32BE(o.code, 8);
  const declared = o.lengthDelta === 'huge' ? MAX_OPTION_BYTES + 1 + (data.length % 1000) : Math.max(0, data.length + o.lengthDelta);
  h.writeUInt32BE(declared, 12);
  return Buffer.concat([h, data]);
}

function resolveOffset(o: OffsetSpec, lane: number): bigint {
  switch (o[0]) {
    case 'lane':
      return BigInt(lane + o[1]);
    case 'end':
      return BigInt(Math.max(0, DISK_SIZE - o[1]));
    case 'beyond':
      return BigInt(DISK_SIZE + o[1]);
    default:
      return o[1];
  }
}

function encodeRequest(r: RequestSpec, lane: number): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(r.magic ?? REQUEST_MAGIC, 0);
  h.writeUInt16BE(r.flags, 4);
  h.writeUInt16BE(r.type, 6);
  // handle: fixed up when framing
  h.writeBigUInt64BE(resolveOffset(r.offset, lane), 16);
  h.writeUInt32BE(r.length >>> 0, 24);
  if (r.type !== CMD.WRITE) return h;
  let n: number;
  if (r.payload === 'none') n = 0;
  else if (r.payload === 'exact') n = r.length <= LANE ? r.length : 0;
  else n = Math.max(0, Math.min(LANE, r.length) + r.payload);
  return n ? Buffer.concat([h, pattern(n, r.seed)]) : h;
}

function mutate(b: Buffer, m: Mutations): Buffer {
  if (m.edits.length === 0 && m.truncate === null) return b;
  let body = Buffer.from(b);
  for (const e of m.edits) {
    const at = body.length ? e.at % body.length : 0;
    if (e.kind === 'flip' && body.length) body[at]! ^= 1 << (e.v & 7);
    else if (e.kind === 'set' && body.length) body[at] = e.v;
    else if (e.kind === 'insert') body = Buffer.concat([body.subarray(0, at), Buffer.of(e.v), body.subarray(at)]);
    else if (e.kind === 'delete' && body.length) body = Buffer.concat([body.subarray(0, at), body.subarray(at + 1)]);
  }
  return m.truncate !== null ? body.subarray(0, m.truncate % (body.length + 1)) : body;
}

// ---- the oracle: framing the client's own stream as the spec says the server must ---------------

interface Framed {
  handle: bigint;
  type: number;
  flags: number;
  offset: bigint;
  length: number;
  /** For WRITE: where its payload starts in the sent stream. */
  payloadAt: number;
  expect: 'ok' | 'fail' | 'any';
}

type StreamEnd = 'open' | 'disc' | 'bad-magic' | 'cut';

interface Framing {
  reqs: Framed[];
  end: StreamEnd;
}

const modifying = (t: number): boolean => t === CMD.WRITE || t === CMD.TRIM || t === CMD.WRITE_ZEROES;

/** What the spec lets the server answer to one request on this export. */
function expectation(type: number, flags: number, offset: bigint, length: number): Framed['expect'] {
  const known = type === CMD.READ || type === CMD.WRITE || type === CMD.FLUSH || type === CMD.TRIM || type === CMD.CACHE || type === CMD.WRITE_ZEROES;
  if (!known) return 'fail'; // BLOCK_STATUS/RESIZE were not negotiated; others do not exist
  // The export advertises SEND_FUA and SEND_FAST_ZERO: FUA is valid on every command (the
  // server MUST accept it), NO_HOLE and FAST_ZERO on WRITE_ZEROES; DF (no structured
  // replies) and REQ_ONE (no BLOCK_STATUS) on none. Other flags SHOULD be EINVAL: this
  // server does that, so the oracle holds it to it.
  const allowed = type === CMD.WRITE_ZEROES ? FLAG_FUA | FLAG_NO_HOLE | FLAG_FAST_ZERO : FLAG_FUA;
  if ((flags & ~allowed) !== 0) return 'fail';
  if (type === CMD.FLUSH) return offset === 0n && length === 0 ? 'ok' : 'any';
  if ((type === CMD.READ || type === CMD.WRITE || type === CMD.CACHE) && length > MAX_PAYLOAD) return 'fail';
  if (length > 0 && offset + BigInt(length) > BigInt(DISK_SIZE)) return 'fail';
  if (length === 0) return 'any';
  // A FAST_ZERO the disk cannot do without writing data is refused with ENOTSUP.
  return (flags & FLAG_FAST_ZERO) === 0 ? 'ok' : 'any';
}

/**
 * Frames requests in `buf` from `at`, rewriting in place: handles become unique (so replies
 * can be matched), and a modifying request that would land inside the disk but outside
 * this client's lane is moved into the lane (or past the end, if it is longer than the
 * lane) — with the same length, so the framing does not change.
 */
function frame(buf: Buffer, at: number, lane: number, nextHandle: () => bigint): Framing {
  const reqs: Framed[] = [];
  let p = at;
  for (;;) {
    if (p === buf.length) return { reqs, end: 'open' };
    if (buf.length - p < 28) return { reqs, end: 'cut' };
    if (buf.readUInt32BE(p) !== REQUEST_MAGIC) return { reqs, end: 'bad-magic' };
    const flags = buf.readUInt16BE(p + 4);
    const type = buf.readUInt16BE(p + 6);
    let offset = buf.readBigUInt64BE(p + 16);
    const length = buf.readUInt32BE(p + 24);
    if (type === CMD.DISC) return { reqs, end: 'disc' };
    const handle = nextHandle();
    buf.writeBigUInt64BE(handle, p + 8);
    if (modifying(type) && length > 0 && offset + BigInt(length) <= BigInt(DISK_SIZE)) {
      const inLane = offset >= BigInt(lane) && offset + BigInt(length) <= BigInt(lane + LANE);
      if (!inLane) {
        offset = length <= LANE ? BigInt(lane + Number(offset % BigInt(LANE - length + 1))) : BigInt(DISK_SIZE);
        buf.writeBigUInt64BE(offset, p + 16);
      }
    }
    p += 28;
    const f: Framed = { handle, type, flags, offset, length, payloadAt: p, expect: expectation(type, flags, offset, length) };
    if (type === CMD.WRITE) {
      if (buf.length - p < length) return { reqs, end: 'cut' }; // the payload never arrives
      p += length;
    }
    reqs.push(f);
  }
}

interface OptionExpect {
  option: number;
  /** Acceptable final reply types. */
  finals: number[];
  /** Non-final reply types allowed before the final one. */
  partials: number[];
  /** For INFO/GO that must succeed: NBD_INFO_EXPORT must come before the ACK. */
  needsExport: boolean;
  /** STARTTLS: an ACK would switch to TLS; checking stops there. */
  tlsSwitch?: boolean;
  /** EXPORT_NAME: the raw export reply, no option reply. */
  exportName?: boolean;
}

interface HandshakePlan {
  options: OptionExpect[];
  /** How negotiation ends: the server closes (orderly or not), or transmission starts at `at`. */
  end: { kind: 'close' } | { kind: 'abort' } | { kind: 'transmission'; at: number; noZeroes: boolean };
}

function decodeName(b: Buffer): 'default' | 'unknown' {
  return b.length === 0 || b.equals(Buffer.from(EXPORT_NAME)) ? 'default' : 'unknown';
}

function planHandshake(buf: Buffer): HandshakePlan {
  const options: OptionExpect[] = [];
  const close = (): HandshakePlan => ({ options, end: { kind: 'close' } });
  if (buf.length < 4) return close();
  const flags = buf.readUInt32BE(0);
  if ((flags & ~3) !== 0) return close(); // unknown client flags: the spec says disconnect
  const noZeroes = (flags & 2) !== 0;
  let p = 4;
  for (let n = 0; n < MAX_OPTIONS; n++) {
    if (buf.length - p < 16) return close();
    if (!buf.subarray(p, p + 8).equals(IHAVEOPT)) return close();
    const option = buf.readUInt32BE(p + 8);
    const length = buf.readUInt32BE(p + 12);
    p += 16;
    if (buf.length - p < length) return close(); // cut short by the half-close
    const data = buf.subarray(p, p + length);
    p += length;
    const refuse = (...finals: number[]): void => void options.push({ option, finals, partials: [], needsExport: false });
    if (length > MAX_OPTION_BYTES) {
      if (option === OPT.EXPORT_NAME) return close();
      refuse(REP_ERR_TOO_BIG);
      continue;
    }
    switch (option) {
      case OPT.EXPORT_NAME:
        if (decodeName(data) === 'unknown') return close();
        options.push({ option, finals: [], partials: [], needsExport: false, exportName: true });
        return { options, end: { kind: 'transmission', at: p, noZeroes } };
      case OPT.ABORT:
        options.push({ option, finals: [REP_ACK], partials: [], needsExport: false });
        return { options, end: { kind: 'abort' } };
      case OPT.LIST:
        if (length !== 0) refuse(REP_ERR_INVALID);
        else options.push({ option, finals: [REP_ACK], partials: [REP_SERVER], needsExport: false });
        break;
      case OPT.INFO:
      case OPT.GO: {
        const ok = data.length >= 6 && data.readUInt32BE(0) + 6 <= data.length && data.length === data.readUInt32BE(0) + 6 + 2 * data.readUInt16BE(4 + data.readUInt32BE(0));
        if (!ok) {
          refuse(REP_ERR_INVALID);
          break;
        }
        const nameLen = data.readUInt32BE(0);
        if (nameLen > 4096) {
          refuse(REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_POLICY);
          break;
        }
        if (decodeName(data.subarray(4, 4 + nameLen)) === 'unknown') {
          refuse(REP_ERR_UNKNOWN);
          break;
        }
        options.push({ option, finals: [REP_ACK], partials: [REP_INFO], needsExport: true });
        if (option === OPT.GO) return { options, end: { kind: 'transmission', at: p, noZeroes } };
        break;
      }
      case OPT.STARTTLS:
        // TLS may or may not be offered on a unix socket; an ACK switches to TLS.
        options.push({ option, finals: [REP_ACK, REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID], partials: [], needsExport: false, tlsSwitch: true });
        break;
      default:
        refuse(REP_ERR_UNSUP); // every option this server does not implement, known or not
    }
  }
  return close();
}

// ---- the client --------------------------------------------------------------------------

class Conn {
  private chunks: Buffer[] = [];
  private size = 0;
  private waiter: (() => void) | null = null;
  closed = false;
  readonly closedAt: Promise<void>;

  constructor(readonly socket: net.Socket) {
    socket.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.size += b.length;
      this.wake();
    });
    socket.on('error', () => undefined); // EPIPE/ECONNRESET: seen as the close
    this.closedAt = new Promise((resolve) =>
      socket.on('close', () => {
        this.closed = true;
        this.wake();
        resolve();
      }),
    );
  }

  static async open(sock: string): Promise<Conn> {
    const s = net.connect(sock);
    await once(s, 'connect');
    return new Conn(s);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  get length(): number {
    return this.size;
  }

  /** Everything received so far, consumed. */
  takeAll(): Buffer {
    const b = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.chunks = [];
    this.size = 0;
    return b;
  }

  peek(): Buffer {
    if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0] ?? Buffer.alloc(0);
  }

  consume(n: number): void {
    const b = this.peek();
    this.chunks = n < b.length ? [b.subarray(n)] : [];
    this.size -= n;
  }

  /** Waits for more data or the close, up to the deadline; false on timeout. */
  async more(deadline: number): Promise<boolean> {
    if (this.closed) return true;
    const left = deadline - Date.now();
    if (left <= 0) return false;
    return new Promise<boolean>((resolve) => {
      const t = setTimeout(() => {
        this.waiter = null;
        resolve(false);
      }, left);
      this.waiter = () => {
        clearTimeout(t);
        resolve(true);
      };
    });
  }

  async waitClosed(ms: number): Promise<boolean> {
    if (this.closed) return true;
    let t: NodeJS.Timeout | undefined;
    const r = await Promise.race([this.closedAt.then(() => true), new Promise<boolean>((resolve) => (t = setTimeout(() => resolve(false), ms)))]);
    clearTimeout(t);
    return r;
  }
}

class Violation extends Error {}
function check(cond: unknown, what: string): asserts cond {
  if (!cond) throw new Violation(what);
}

// ---- the fixture and the runner ---------------------------------------------------------

export interface FuzzFailure {
  message: string;
  seed: number;
  counterexample?: string;
}

export interface FuzzReport {
  name: string;
  inputs: number;
  /** Transmission requests and handshake options sent. */
  units: number;
  seconds: number;
  rate: number;
  failures: FuzzFailure[];
  seed: number;
  notes: string[];
}

export interface NbdFuzzOptions {
  inputs: number;
  seed: number;
  /** Concurrent clients (each its own lane of the disk). @default 6 */
  workers?: number;
  /** Progress lines. */
  log?: (line: string) => void;
  /** Where the image, target and socket live. @default /dev/shm when present, else the OS temp dir */
  dir?: string;
}

interface Fixture {
  dir: string;
  origin: TestOrigin;
  opened: OpenedDisk;
  server: NbdServer;
  sock: string;
  image: Buffer;
  serverProblems: string[];
}

async function setUp(base: string | undefined): Promise<Fixture> {
  const root = base ?? (fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir());
  const dir = fs.mkdtempSync(path.join(root, 'nbd-fuzz-'));
  const imageFile = path.join(dir, 'image.raw');
  makeImage(imageFile, DISK_SIZE, 77);
  const image = fs.readFileSync(imageFile);
  const origin = new TestOrigin({ file: imageFile });
  const url = await origin.start();
  const serverProblems: string[] = [];
  // The server's own log: an exception caught inside negotiation or a failed backend
  // call is a finding; the routine refusals at warn level are not.
  const sink = {
    write(line: string): void {
      if (line.includes('"negotiation failed"') || line.includes('"request failed"')) serverProblems.push(line.slice(0, 600));
    },
  };
  const log = pino({ level: 'warn' }, sink);
  const opened = await openStreamingDisk({ source: { url }, targetPath: path.join(dir, 'target.raw'), stateDir: path.join(dir, 'state'), regionSize: REGION, log });
  const complete = once(opened.disk, 'complete');
  opened.hydrator.start();
  await complete;
  const server = new NbdServer({ exports: [{ name: EXPORT_NAME, description: 'fuzz target', backend: opened.disk }], log });
  const sock = path.join(dir, 'nbd.sock');
  await server.listen({ kind: 'unix', path: sock });
  return { dir, origin, opened, server, sock, image, serverProblems };
}

async function tearDown(f: Fixture): Promise<void> {
  await f.server.close(1000);
  await f.opened.close();
  await f.origin.stop();
  fs.rmSync(f.dir, { recursive: true, force: true });
}

async function readDisk(f: Fixture, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.allocUnsafe(length);
  await f.opened.disk.read(offset, b);
  return b;
}

/** One concurrent client: its lane, the model of the lane, a handle counter. */
class Worker {
  readonly lane: number;
  model: Buffer;
  private handle = 1n;
  inputs = 0;
  units = 0;

  constructor(
    readonly f: Fixture,
    index: number,
  ) {
    this.lane = index * LANE;
    this.model = Buffer.from(f.image.subarray(this.lane, this.lane + LANE));
  }

  readonly nextHandle = (): bigint => this.handle++;

  async resync(): Promise<void> {
    this.model = await readDisk(this.f, this.lane, LANE);
  }

  async run(s: Session): Promise<void> {
    // Shrinking replays inputs on a disk earlier runs changed: start from what is there.
    await this.resync();
    if (s.kind === 'handshake') await this.handshake(s);
    else await this.transmission(s);
  }

  // -- handshake sessions --

  private async handshake(s: HandshakeSession): Promise<void> {
    this.inputs++;
    this.units += s.options.length + s.tail.length;
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(s.flags, 0);
    const raw = Buffer.concat([flags, ...s.options.map(encodeOption), ...s.tail.map((r) => encodeRequest(r, this.lane))]);
    const bytes = mutate(raw, s.mutate);
    const plan = planHandshake(bytes);
    const framing = plan.end.kind === 'transmission' ? frame(bytes, plan.end.at, this.lane, this.nextHandle) : null;
    const c = await Conn.open(this.f.sock);
    c.socket.end(bytes);
    const closed = await c.waitClosed(HANG_MS);
    check(closed, `hang: the server did not close the connection within ${HANG_MS} ms of the client's half-close (plan ${plan.end.kind}, ${bytes.length} bytes sent, ${c.length} received)`);
    const out = c.takeAll();
    check(out.length >= 18 && out.subarray(0, 8).equals(NBDMAGIC) && out.subarray(8, 16).equals(IHAVEOPT), 'the greeting is not NBDMAGIC IHAVEOPT');
    check(out.readUInt16BE(16) === 3, `greeting flags ${out.readUInt16BE(16)}, expected FIXED_NEWSTYLE|NO_ZEROES`);
    let p = 18;
    for (const o of plan.options) {
      if (o.exportName) {
        const n = plan.end.kind === 'transmission' && plan.end.noZeroes ? 10 : 134;
        check(out.length - p >= n, `NBD_OPT_EXPORT_NAME: ${out.length - p} reply bytes, expected ${n}`);
        check(out.readBigUInt64BE(p) === BigInt(DISK_SIZE), 'NBD_OPT_EXPORT_NAME reply: wrong size');
        check((out.readUInt16BE(p + 8) & 1) === 1, 'NBD_OPT_EXPORT_NAME reply: HAS_FLAGS not set');
        if (n === 134) check(out.subarray(p + 10, p + 134).every((b) => b === 0), 'NBD_OPT_EXPORT_NAME reply: the 124 zero bytes are not zero');
        p += n;
        continue;
      }
      let sawExport = false;
      for (;;) {
        check(out.length - p >= 20, `option ${o.option}: the reply is missing or cut short (${out.length - p} bytes left)`);
        check(out.readBigUInt64BE(p) === OPTION_REPLY_MAGIC, `option ${o.option}: reply without the option reply magic`);
        const opt = out.readUInt32BE(p + 8);
        const type = out.readUInt32BE(p + 12);
        const len = out.readUInt32BE(p + 16);
        check(opt === o.option, `option ${o.option}: the reply echoes option ${opt}`);
        check(out.length - p - 20 >= len, `option ${o.option}: reply data cut short`);
        const data = out.subarray(p + 20, p + 20 + len);
        p += 20 + len;
        if (o.partials.includes(type)) {
          if (type === REP_INFO) {
            check(len >= 2, 'NBD_REP_INFO without an info type');
            const info = data.readUInt16BE(0);
            if (info === 0) {
              check(len === 12 && data.readBigUInt64BE(2) === BigInt(DISK_SIZE) && (data.readUInt16BE(10) & 1) === 1, 'NBD_INFO_EXPORT malformed or wrong size');
              sawExport = true;
            } else if (info === 3) check(len === 14, 'NBD_INFO_BLOCK_SIZE of the wrong length');
            else check(info === 1 || info === 2, `NBD_REP_INFO of unknown info type ${info}`);
          }
          if (type === REP_SERVER) check(len >= 4 && data.readUInt32BE(0) <= len - 4, 'NBD_REP_SERVER with a bad name length');
          continue;
        }
        check(o.finals.includes(type), `option ${o.option}: reply type 0x${type.toString(16)}, expected one of ${o.finals.map((t) => '0x' + t.toString(16)).join(', ')}`);
        if (type >= 2 ** 31) check(len > 0 && data.toString('utf8').trim().length > 0, `option ${o.option}: refusal 0x${type.toString(16)} without a message`);
        if (type === REP_ACK && o.needsExport) check(sawExport, `option ${o.option}: ACK without NBD_INFO_EXPORT`);
        if (type === REP_ACK && o.tlsSwitch) return; // TLS from here: nothing more to check in clear text
        break;
      }
    }
    if (!framing) {
      check(p === out.length, `${out.length - p} unexpected bytes after the last option reply (plan ${plan.end.kind})`);
      return;
    }
    // Transmission started; every complete request is answered, the stream having ended.
    this.units += framing.reqs.length;
    const pending = new Map(framing.reqs.map((r) => [r.handle, r]));
    const before = this.model;
    // After bad magic the server may drop the connection at once, even mid-reply.
    const dropped = framing.end === 'bad-magic';
    const answered = parseReplies(out.subarray(p), pending, !dropped);
    check(dropped || answered.rest.length === 0, `${answered.rest.length} bytes after the last reply`);
    if (framing.end !== 'bad-magic') check(pending.size === 0, `${pending.size} request(s) never answered (stream end: ${framing.end})`);
    await this.settle(bytes, framing.reqs, answered.replies, pending, before);
  }

  // -- transmission sessions --

  private async negotiate(): Promise<Conn> {
    const c = await Conn.open(this.f.sock);
    const go = Buffer.alloc(4 + 16 + 4 + EXPORT_NAME.length + 2);
    go.writeUInt32BE(3, 0);
    IHAVEOPT.copy(go, 4);
    go.writeUInt32BE(OPT.GO, 12);
    go.writeUInt32BE(4 + EXPORT_NAME.length + 2, 16);
    go.writeUInt32BE(EXPORT_NAME.length, 20);
    go.write(EXPORT_NAME, 24);
    c.socket.write(go);
    const deadline = Date.now() + HANG_MS;
    let p = 18;
    for (;;) {
      const b = c.peek();
      if (b.length >= p + 20) {
        const len = b.readUInt32BE(p + 16);
        if (b.length >= p + 20 + len) {
          const type = b.readUInt32BE(p + 12);
          p += 20 + len;
          if (type === REP_ACK) break;
          check(type === REP_INFO, `NBD_OPT_GO refused (0x${type.toString(16)})`);
          continue;
        }
      }
      check(!c.closed, 'the server closed the connection during a well-formed NBD_OPT_GO');
      check(await c.more(deadline), 'hang: no answer to a well-formed NBD_OPT_GO');
    }
    c.consume(p);
    return c;
  }

  private async transmission(s: TransmissionSession): Promise<void> {
    const c = await this.negotiate();
    try {
      for (let i = 0; i < s.batches.length; i++) {
        const batch = s.batches[i]!;
        this.inputs++;
        this.units += batch.reqs.length;
        const bytes = mutate(Buffer.concat(batch.reqs.map((r) => encodeRequest(r, this.lane))), batch.mutate);
        const framing = frame(bytes, 0, this.lane, this.nextHandle);
        const last = framing.end !== 'open' || batch.halfClose || i === s.batches.length - 1;
        const before = this.model;
        const pending = new Map(framing.reqs.map((r) => [r.handle, r]));
        const replies: Reply[] = [];
        let finish: 'open' | 'half-close' | 'disc' | 'destroy' = 'open';
        if (framing.end === 'disc') finish = 'disc';
        else if (framing.end !== 'open' || batch.halfClose) finish = 'half-close';
        else if (last) finish = s.finish;
        if (finish === 'half-close') c.socket.end(bytes);
        else if (finish === 'disc' && framing.end !== 'disc') {
          const disc = Buffer.alloc(28);
          disc.writeUInt32BE(REQUEST_MAGIC, 0);
          disc.writeUInt16BE(CMD.DISC, 6);
          c.socket.write(Buffer.concat([bytes, disc]));
        } else c.socket.write(bytes);
        if (finish === 'destroy') {
          // The client vanishes with requests in flight: only the server's health is checked.
          c.socket.destroy();
          await new Promise((r) => setImmediate(r));
          await this.settle(bytes, framing.reqs, replies, pending, before, true);
          return;
        }
        const deadline = Date.now() + HANG_MS;
        for (;;) {
          const got = parseReplies(c.peek(), pending, false);
          c.consume(c.peek().length - got.rest.length);
          replies.push(...got.replies);
          if (finish === 'open' ? pending.size === 0 : c.closed) break;
          if (c.closed) break;
          check(await c.more(deadline), finish === 'open' ? `hang: ${pending.size} of ${framing.reqs.length} request(s) unanswered after ${HANG_MS} ms` : `hang: the server did not close the connection within ${HANG_MS} ms (${finish}, stream end ${framing.end})`);
        }
        if (c.closed) {
          // After bad magic the server may drop the connection at once, even mid-reply.
          const dropped = framing.end === 'bad-magic';
          const tail = parseReplies(c.peek(), pending, !dropped);
          replies.push(...tail.replies);
          check(dropped || tail.rest.length === 0, `${tail.rest.length} bytes after the last reply`);
          check(finish !== 'open', 'the server closed the connection after a well-framed batch');
          if (framing.end !== 'bad-magic') check(pending.size === 0, `${pending.size} request(s) never answered before the close (stream end: ${framing.end})`);
        }
        await this.settle(bytes, framing.reqs, replies, pending, before);
        if (c.closed) return;
      }
    } finally {
      c.socket.destroy();
    }
  }

  /**
   * After an input: READ data matched the model where no request of the same input could
   * change it, and the lane changed only where a request that succeeded (or was cut off
   * unanswered by the close) may have changed it.
   */
  private async settle(sent: Buffer, reqs: Framed[], replies: Reply[], unanswered: Map<bigint, Framed>, before: Buffer, unknownOutcome = false): Promise<void> {
    const ok = new Set(replies.filter((r) => r.error === 0).map((r) => r.handle));
    const writers = reqs.filter((r) => modifying(r.type) && r.length > 0 && (ok.has(r.handle) || unanswered.has(r.handle) || unknownOutcome));
    const lane = BigInt(this.lane);
    for (const r of replies) {
      if (r.error !== 0 || !r.data) continue;
      const q = r.req;
      const off = Number(q.offset);
      const end = off + q.length;
      const touched = writers.some((w) => Number(w.offset) < end && off < Number(w.offset) + w.length);
      if (touched) continue;
      if (q.offset >= lane && end <= this.lane + LANE) check(r.data.equals(before.subarray(off - this.lane, end - this.lane)), `READ ${off}+${q.length} returned bytes that are not the disk's`);
      else if (off >= RESERVED_START) check(r.data.equals(this.f.image.subarray(off, end)), `READ ${off}+${q.length} returned bytes that are not the image's`);
    }
    // The zeroing of a WRITE_ZEROES may run after the reply's microtask; give it a tick.
    if (writers.length) await new Promise((r) => setImmediate(r));
    const now = await readDisk(this.f, this.lane, LANE);
    if (!now.equals(before)) {
      // A request's whole range holding exactly its bytes explains that range at once;
      // only what is left is checked byte by byte (overlaps, torn mixes, strays).
      const explained: [number, number][] = [];
      for (const w of writers) {
        const o = Number(w.offset) - this.lane;
        const got = now.subarray(o, o + w.length);
        if (w.type === CMD.WRITE ? got.equals(sent.subarray(w.payloadAt, w.payloadAt + w.length)) : got.equals(ZEROS.subarray(0, got.length))) explained.push([o, o + w.length]);
      }
      const BLOCK = 4096;
      const wo = writers.map((w) => Number(w.offset) - this.lane);
      for (let blk = 0; blk < LANE; blk += BLOCK) {
        if (now.compare(before, blk, blk + BLOCK, blk, blk + BLOCK) === 0) continue;
        for (let i = blk; i < blk + BLOCK; i++) {
          const v = now[i]!;
          if (v === before[i]) continue;
          let ok = false;
          for (let k = 0; k < explained.length && !ok; k++) ok = i >= explained[k]![0] && i < explained[k]![1];
          for (let k = 0; k < writers.length && !ok; k++) {
            const w = writers[k]!;
            const o = wo[k]!;
            if (i < o || i >= o + w.length) continue;
            ok = w.type === CMD.WRITE ? sent[w.payloadAt + (i - o)] === v : v === 0;
          }
          check(ok, `disk byte ${this.lane + i} changed from ${before[i]} to ${v} though no successful request wrote it`);
        }
      }
    }
    this.model = now;
  }

  /** A well-behaved client: GO, write, read back, flush, DISC, close. */
  async healthy(): Promise<void> {
    await this.resync();
    const c = await this.negotiate();
    const data = pattern(8192, this.lane + this.inputs);
    const reqs = Buffer.alloc(28 * 4 + data.length);
    const put = (at: number, type: number, handle: number, offset: number, length: number): void => {
      reqs.writeUInt32BE(REQUEST_MAGIC, at);
      reqs.writeUInt16BE(type, at + 6);
      reqs.writeBigUInt64BE(BigInt(handle), at + 8);
      reqs.writeBigUInt64BE(BigInt(offset), at + 16);
      reqs.writeUInt32BE(length, at + 24);
    };
    put(0, CMD.WRITE, 1, this.lane + 4096, data.length);
    data.copy(reqs, 28);
    put(28 + data.length, CMD.FLUSH, 2, 0, 0);
    put(56 + data.length, CMD.READ, 3, this.lane + 4096, data.length);
    put(84 + data.length, CMD.DISC, 4, 0, 0);
    // One request at a time, as a careful client would, so the read sees the write.
    const deadline = Date.now() + HANG_MS;
    const answers: Buffer[] = [];
    const pieces = [reqs.subarray(0, 28 + data.length), reqs.subarray(28 + data.length, 56 + data.length), reqs.subarray(56 + data.length, 84 + data.length)];
    const sizes = [16, 16, 16 + data.length];
    for (let i = 0; i < 3; i++) {
      c.socket.write(pieces[i]!);
      while (c.length < sizes[i]!) {
        check(!c.closed, 'a well-behaved client was disconnected');
        check(await c.more(deadline), 'hang: a well-behaved client got no reply');
      }
      const b = c.peek().subarray(0, sizes[i]!);
      answers.push(Buffer.from(b));
      c.consume(sizes[i]!);
    }
    answers.forEach((a, i) => check(a.readUInt32BE(0) === SIMPLE_REPLY_MAGIC && a.readUInt32BE(4) === 0 && a.readBigUInt64BE(8) === BigInt(i + 1), `well-behaved client: reply ${i + 1} is wrong`));
    check(answers[2]!.subarray(16).equals(data), 'well-behaved client: read back other bytes than it wrote');
    c.socket.write(reqs.subarray(84 + data.length));
    check(await c.waitClosed(HANG_MS), 'hang: NBD_CMD_DISC did not close the connection');
    check(c.length === 0, 'bytes after NBD_CMD_DISC');
    data.copy(this.model, 4096);
    check((await readDisk(this.f, this.lane, LANE)).equals(this.model), 'well-behaved client: the lane does not hold what was written');
  }
}

interface Reply {
  handle: bigint;
  error: number;
  req: Framed;
  data: Buffer | null;
}

/** Parses simple replies, checking each; `final`: the stream has ended (a cut reply is a violation). */
function parseReplies(b: Buffer, pending: Map<bigint, Framed>, final: boolean): { replies: Reply[]; rest: Buffer } {
  const replies: Reply[] = [];
  let p = 0;
  while (b.length - p >= 16) {
    const magic = b.readUInt32BE(p);
    check(magic === SIMPLE_REPLY_MAGIC, `reply with magic 0x${magic.toString(16)}`);
    const error = b.readUInt32BE(p + 4);
    const handle = b.readBigUInt64BE(p + 8);
    const req = pending.get(handle);
    check(req, `reply for handle ${handle}, which no outstanding request has`);
    check(error === 0 || NBD_ERRNOS.has(error), `reply errno ${error} is not one of NBD's`);
    const n = error === 0 && req.type === CMD.READ ? req.length : 0;
    if (b.length - p - 16 < n) break;
    const name = `${Object.entries(CMD).find(([, v]) => v === req.type)?.[0] ?? req.type} flags=${req.flags} offset=${req.offset} length=${req.length}`;
    if (req.expect === 'ok') check(error === 0, `${name} failed with errno ${error}; it is well-formed and in range`);
    if (req.expect === 'fail') check(error !== 0, `${name} succeeded; the spec says it must fail`);
    replies.push({ handle, error, req, data: n ? b.subarray(p + 16, p + 16 + n) : null });
    pending.delete(handle);
    p += 16 + n;
  }
  const rest = b.subarray(p);
  if (final) check(rest.length === 0, `a reply cut short at the close (${rest.length} bytes)`);
  return { replies, rest };
}

const transmissionArb: fc.Arbitrary<Session> = fc.record({
  kind: fc.constant('transmission' as const),
  batches: fc.array(
    fc.record({
      reqs: fc.array(batchReqArb, { minLength: 1, maxLength: 6 }),
      mutate: mutationsArb,
      halfClose: fc.oneof({ weight: 25, arbitrary: fc.constant(false) }, { weight: 1, arbitrary: fc.constant(true) }),
    }),
    { minLength: 1, maxLength: 16 },
  ),
  finish: fc.constantFrom('disc', 'half-close', 'destroy') as fc.Arbitrary<'disc' | 'half-close' | 'destroy'>,
});
export const sessionArb: fc.Arbitrary<Session> = fc.oneof({ weight: 2, arbitrary: handshakeArb }, { weight: 1, arbitrary: transmissionArb });

function describeSession(s: Session, lane: number): string {
  const hex = (b: Buffer): string => (b.length > 256 ? `${b.subarray(0, 256).toString('hex')}… (${b.length} bytes)` : b.toString('hex'));
  if (s.kind === 'handshake') {
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(s.flags, 0);
    return `handshake session, bytes sent after the greeting: ${hex(mutate(Buffer.concat([flags, ...s.options.map(encodeOption), ...s.tail.map((r) => encodeRequest(r, lane))]), s.mutate))}\n${JSON.stringify(s, big)}`;
  }
  return `transmission session, ${s.batches.length} batch(es):\n${s.batches.map((b, i) => `  batch ${i}: ${hex(mutate(Buffer.concat(b.reqs.map((r) => encodeRequest(r, lane))), b.mutate))}`).join('\n')}\n${JSON.stringify(s, big)}`;
}
const big = (_k: string, v: unknown): unknown => (typeof v === 'bigint' ? `${v}n` : v);

/** Runs at least `inputs` inputs; resolves with the figures and any failure (it never throws for a finding). */
export async function runNbdFuzz(opts: NbdFuzzOptions): Promise<FuzzReport> {
  const workers = Math.max(1, Math.min(MAX_WORKERS, opts.workers ?? 6));
  const say = opts.log ?? (() => undefined);
  const failures: FuzzFailure[] = [];
  const processErrors: string[] = [];
  const onUncaught = (err: unknown): void => void processErrors.push(`uncaught: ${(err as Error)?.stack ?? String(err)}`);
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  const f = await setUp(opts.dir);
  const started = Date.now();
  const ws = Array.from({ length: workers }, (_, i) => new Worker(f, i));
  const total = (): number => ws.reduce((n, w) => n + w.inputs, 0);
  let stop = false;
  let lastSay = Date.now();
  const CHUNK = 200; // sessions per fast-check run, then a well-behaved client
  let shrinkDeadline = Infinity;
  let owner: number | null = null;
  const perWorker = Math.ceil(opts.inputs / workers);
  try {
    await Promise.all(
      ws.map(async (w, wi) => {
        for (let chunk = 0; !stop && w.inputs < perWorker; chunk++) {
          const seed = (opts.seed + wi * 1_000_003 + chunk * 7919) | 0;
          const result = await fc.check(
            fc.asyncProperty(sessionArb, async (s) => {
              // Once a worker has failed, it alone runs (and shrinks), so what the server
              // logs is that input's doing.
              if (owner !== null && owner !== wi) return;
              if (Date.now() > shrinkDeadline) return; // shrinking had its time: keep what it found
              const seen = f.serverProblems.length + processErrors.length;
              try {
                await w.run(s);
                // Let an exception the input caused surface before judging it.
                await new Promise((r) => setImmediate(r));
                if (f.serverProblems.length + processErrors.length > seen) {
                  // Several clients run at once: the culprit may be another's input. Stop
                  // them, let their inputs finish, and replay this one alone.
                  if (owner === null) {
                    owner = wi;
                    shrinkDeadline = Date.now() + 30_000;
                    await new Promise((r) => setTimeout(r, HANG_MS + 200));
                  }
                  const others = [...processErrors, ...f.serverProblems].slice(seen);
                  f.serverProblems.length = 0;
                  processErrors.length = 0;
                  await w.run(s);
                  await new Promise((r) => setImmediate(r));
                  const mine = [...processErrors, ...f.serverProblems];
                  throw new Violation(mine.length ? `the server reported: ${mine.join('\n')}` : `the server reported, while ${workers} clients ran (not reproduced by this input alone): ${others.join('\n')}`);
                }
              } catch (err) {
                if (owner === null) {
                  owner = wi;
                  shrinkDeadline = Date.now() + 30_000;
                }
                throw err;
              } finally {
                if (owner === wi) {
                  f.serverProblems.length = 0;
                  processErrors.length = 0;
                }
              }
            }),
            { numRuns: CHUNK, seed, endOnFailure: false, verbose: 0 },
          );
          if (owner !== null && owner !== wi) break;
          if (result.failed) {
            stop = true;
            const ce = result.counterexample?.[0] as Session | undefined;
            failures.push({
              message: `${(result.errorInstance as Error)?.message ?? 'failure'} (worker ${wi}, chunk ${chunk}, fast-check seed ${seed}, path ${result.counterexamplePath})`,
              seed: opts.seed,
              ...(ce ? { counterexample: describeSession(ce, w.lane) } : {}),
            });
            break;
          }
          try {
            await w.healthy();
          } catch (err) {
            stop = true;
            failures.push({ message: `after chunk ${chunk} of worker ${wi}: ${(err as Error).message}`, seed: opts.seed });
          }
          if (wi === 0 && Date.now() - lastSay > 10_000) {
            lastSay = Date.now();
            const n = total();
            say(`nbd: ${n} inputs, ${Math.round(n / ((Date.now() - started) / 1000))}/s`);
          }
        }
      }),
    );
    // The part of the disk nobody may write still holds the image.
    if (!stop) {
      const rest = await readDisk(f, RESERVED_START, DISK_SIZE - RESERVED_START);
      if (!rest.equals(f.image.subarray(RESERVED_START))) failures.push({ message: 'bytes outside every client lane changed', seed: opts.seed });
    }
  } finally {
    const seconds = (Date.now() - started) / 1000;
    await tearDown(f).catch((err: Error) => failures.push({ message: `teardown: ${err.message}`, seed: opts.seed }));
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUncaught);
    if (processErrors.length) failures.push({ message: processErrors.join('\n'), seed: opts.seed });
    const inputs = total();
    // eslint-disable-next-line no-unsafe-finally
    return {
      name: 'nbd',
      inputs,
      units: ws.reduce((n, w) => n + w.units, 0),
      seconds,
      rate: inputs / seconds,
      failures,
      seed: opts.seed,
      notes: [`${workers} concurrent clients; disk ${DISK_SIZE / MiB} MiB, lanes of ${LANE / KiB} KiB`],
    };
  }
}

export function printReport(r: FuzzReport, out: (s: string) => void = console.log): void {
  out(`${r.name}: ${r.inputs} inputs (${r.units} requests/options) in ${r.seconds.toFixed(1)} s = ${Math.round(r.rate)} inputs/s; ${r.failures.length} failure(s); seed ${r.seed}`);
  for (const n of r.notes) out(`  ${n}`);
  for (const fl of r.failures) {
    out(`  FAILURE: ${fl.message}`);
    if (fl.counterexample) out(`  counterexample: ${fl.counterexample}`);
    out(`  reproduce: node dist/tests/fuzz/fuzz.js --${r.name} ${r.inputs} --${r.name === 'nbd' ? 'api' : 'nbd'} 0 --seed ${fl.seed}`);
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const { values } = parseArgs({ options: { inputs: { type: 'string', default: '10000' }, seed: { type: 'string' }, workers: { type: 'string', default: '6' } } });
  const seed = values.seed !== undefined ? Number(values.seed) : Math.floor(Math.random() * 2 ** 31);
  const report = await runNbdFuzz({ inputs: Number(values.inputs), seed, workers: Number(values.workers), log: (l) => console.log(l) });
  printReport(report);
  process.exit(report.failures.length ? 1 : 0);
}
