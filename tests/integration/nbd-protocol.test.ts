// Drives the NBD server in-process over a real unix socket with a raw client written
// here (no libnbd): every handshake option and transmission command the server speaks,
// plus the malformed ones it must refuse without losing the stream. The backend is a
// streaming disk over a TestOrigin: first with the hydrator not started (reads take the
// streaming path), then fully hydrated (reads take the local hot path).

import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';

import type { BlockBackend } from '../../dpu-agent/src/block/backend.js';
import { NbdServer } from '../../dpu-agent/src/nbd/server.js';
import { Cmd, CmdFlag, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, Info, MAX_OPTION_BYTES, MAX_PAYLOAD, Opt, Rep, TFlag } from '../../dpu-agent/src/nbd/protocol.js';
import { RegionState } from '../../dpu-agent/src/region/region-map.js';
import { type OpenDiskOptions, openStreamingDisk, type OpenedDisk } from '../../dpu-agent/src/streaming/open.js';
import { makeImage, tempDir } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';

const MiB = 1 << 20;
const IMAGE_SIZE = 16 * MiB;
const REGION = MiB;
const EINVAL = 22;
const ENOSPC = 28;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
const CLIENT_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
const IO_TIMEOUT_MS = 10_000;

// ---- the raw client ------------------------------------------------------------------

interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

interface Reply {
  error: number;
  handle: bigint;
  data: Buffer | null;
}

interface RequestSpec {
  type: number;
  offset?: number | bigint;
  length?: number;
  flags?: number;
  /** Payload sent right after the header (WRITE). */
  data?: Buffer;
  /** Expected data bytes in a successful reply; defaults to `length` for READ, else 0. */
  replyBytes?: number;
}

interface Pending {
  replyBytes: number;
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
}

class RawClient {
  private buf: Buffer = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  private transmission = false;
  private readonly pending = new Map<bigint, Pending>();
  private nextHandle = 0x1000n;
  closed = false;
  /** A reply the client could not match (unknown handle, bad magic). */
  protocolError: Error | null = null;
  readonly closedPromise: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (b: Buffer) => {
      this.buf = this.buf.length === 0 ? b : Buffer.concat([this.buf, b]);
      if (this.transmission) this.parseReplies();
      else this.wake();
    });
    socket.on('error', () => {
      /* seen as close */
    });
    this.closedPromise = new Promise((resolve) => {
      socket.on('close', () => {
        this.closed = true;
        this.wake();
        if (this.transmission) this.parseReplies();
        for (const p of this.pending.values()) p.reject(new Error('connection closed with the request outstanding'));
        this.pending.clear();
        resolve();
      });
    });
  }

  static async connect(sock: string): Promise<RawClient> {
    const s = net.connect(sock);
    await once(s, 'connect');
    return new RawClient(s);
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  get buffered(): number {
    return this.buf.length;
  }

  /** Exactly n bytes (handshake phase). */
  async read(n: number, timeoutMs = IO_TIMEOUT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed while waiting for ${n} bytes (have ${this.buf.length})`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.buf.length})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  /** Resolves when the server has closed the connection; rejects after timeoutMs. */
  async expectClose(timeoutMs = IO_TIMEOUT_MS): Promise<void> {
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Error(`server did not close the connection within ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      await Promise.race([this.closedPromise, timeout]);
    } finally {
      clearTimeout(t);
    }
  }

  destroy(): void {
    this.socket.destroy();
  }

  // -- handshake --

  async greeting(): Promise<Buffer> {
    return this.read(18);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    h.write('IHAVEOPT', 0, 'ascii');
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.write(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<OptionReply> {
    const h = await this.read(20);
    assert.equal(h.readBigUInt64BE(0), OPTION_REPLY_MAGIC, 'option reply magic');
    const len = h.readUInt32BE(16);
    const data = len > 0 ? Buffer.from(await this.read(len)) : Buffer.alloc(0);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
  }

  /** Option replies up to and including the first ACK or error. */
  async optionReplies(): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === Rep.ACK || r.type >= 2 ** 31) return out;
    }
  }

  /** Greeting + client flags. */
  async start(flags = CLIENT_FLAGS): Promise<void> {
    await this.greeting();
    const f = Buffer.alloc(4);
    f.writeUInt32BE(flags, 0);
    this.write(f);
  }

  /** NBD_OPT_GO; on success the client switches to transmission. */
  async go(name = '', infos: number[] = []): Promise<{ size: number; flags: number; replies: OptionReply[] }> {
    this.sendOption(Opt.GO, goPayload(name, infos));
    const replies = await this.optionReplies();
    const last = replies.at(-1)!;
    assert.equal(last.type, Rep.ACK, `NBD_OPT_GO refused: ${last.type} ${last.data.toString()}`);
    const exp = replies.find((r) => r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.EXPORT);
    assert.ok(exp, 'NBD_INFO_EXPORT sent');
    this.enterTransmission();
    return { size: Number(exp.data.readBigUInt64BE(2)), flags: exp.data.readUInt16BE(10), replies };
  }

  enterTransmission(): void {
    this.transmission = true;
    this.parseReplies();
  }

  // -- transmission --

  private parseReplies(): void {
    while (this.buf.length >= 16) {
      const magic = this.buf.readUInt32BE(0);
      if (magic !== SIMPLE_REPLY_MAGIC) {
        this.protocolError ??= new Error(`reply with bad magic 0x${magic.toString(16)}`);
        this.socket.destroy();
        return;
      }
      const error = this.buf.readUInt32BE(4);
      const handle = this.buf.readBigUInt64BE(8);
      const p = this.pending.get(handle);
      if (!p) {
        this.protocolError ??= new Error(`reply for unknown handle 0x${handle.toString(16)}`);
        this.socket.destroy();
        return;
      }
      const dataBytes = error === 0 ? p.replyBytes : 0;
      if (this.buf.length < 16 + dataBytes) return;
      const data = dataBytes > 0 ? Buffer.from(this.buf.subarray(16, 16 + dataBytes)) : null;
      this.buf = this.buf.subarray(16 + dataBytes);
      this.pending.delete(handle);
      p.resolve({ error, handle, data });
    }
  }

  get outstanding(): number {
    return this.pending.size;
  }

  /** Encodes one request; the reply promise is registered before the bytes go out. */
  encode(spec: RequestSpec): { bytes: Buffer; reply: Promise<Reply> } {
    const handle = this.nextHandle++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(spec.flags ?? 0, 4);
    h.writeUInt16BE(spec.type, 6);
    h.writeBigUInt64BE(handle, 8);
    h.writeBigUInt64BE(BigInt(spec.offset ?? 0), 16);
    h.writeUInt32BE(spec.length ?? 0, 24);
    const replyBytes = spec.replyBytes ?? (spec.type === Cmd.READ ? (spec.length ?? 0) : 0);
    let reply: Promise<Reply>;
    if (spec.type === Cmd.DISC) {
      reply = Promise.resolve({ error: 0, handle, data: null });
    } else {
      reply = new Promise<Reply>((resolve, reject) => this.pending.set(handle, { replyBytes, resolve, reject }));
      reply.catch(() => {}); // observed by the caller; avoid unhandled rejections in between
    }
    return { bytes: spec.data ? Buffer.concat([h, spec.data]) : h, reply };
  }

  request(spec: RequestSpec): Promise<Reply> {
    const { bytes, reply } = this.encode(spec);
    this.write(bytes);
    return withTimeout(reply, IO_TIMEOUT_MS, `reply to command ${spec.type} at ${spec.offset}`);
  }

  async readAt(offset: number, length: number): Promise<Buffer> {
    const r = await this.request({ type: Cmd.READ, offset, length });
    assert.equal(r.error, 0, `read ${offset}+${length} failed with errno ${r.error}`);
    return r.data!;
  }

  async writeAt(offset: number, data: Buffer, flags = 0): Promise<void> {
    const r = await this.request({ type: Cmd.WRITE, offset, length: data.length, data, flags });
    assert.equal(r.error, 0, `write ${offset}+${data.length} failed with errno ${r.error}`);
  }
}

function goPayload(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, reject) => (t = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms)))]);
  } finally {
    clearTimeout(t);
  }
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = seed >>> 0 || 7;
  for (let i = 0; i < length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

/** The same pseudo-random sequence every run. */
function rng(seed: number): () => number {
  let x = seed >>> 0;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

// ---- fixture ---------------------------------------------------------------------------

interface Fixture {
  dir: string;
  cleanup: () => void;
  origin: TestOrigin;
  opened: OpenedDisk;
  server: NbdServer;
  sock: string;
  /** What the disk must read back as: the image, plus every write the tests made. */
  model: Buffer;
  streaming: boolean;
}

/** `source` is merged into the disk's HTTP source options (e.g. a shorter retry deadline). */
async function setUp(streaming: boolean, source: Partial<Omit<OpenDiskOptions['source'], 'url'>> = {}): Promise<Fixture> {
  const { dir, cleanup } = tempDir(streaming ? 'nbd-proto-stream' : 'nbd-proto-hydrated');
  const imageFile = path.join(dir, 'image.raw');
  makeImage(imageFile, IMAGE_SIZE, streaming ? 11 : 12);
  const model = fs.readFileSync(imageFile);
  const origin = new TestOrigin({ file: imageFile });
  const url = await origin.start();
  const log = pino({ level: 'silent' });
  const opened = await openStreamingDisk({
    source: { ...source, url },
    targetPath: path.join(dir, 'target.raw'),
    stateDir: path.join(dir, 'state'),
    regionSize: REGION,
    log,
  });
  if (!streaming) {
    const complete = once(opened.disk, 'complete');
    opened.hydrator.start();
    await withTimeout(complete, 30_000, 'hydration');
  }
  const server = new NbdServer({ exports: [{ name: 'disk', description: 'the test disk', backend: opened.disk }], log });
  const sock = path.join(dir, 'nbd.sock');
  const uri = await server.listen({ kind: 'unix', path: sock });
  assert.equal(uri, `nbd+unix:///?socket=${sock}`);
  return { dir, cleanup, origin, opened, server, sock, model, streaming };
}

async function tearDown(f: Fixture | undefined): Promise<void> {
  if (!f) return;
  await f.server.close(1000);
  await f.opened.close();
  await f.origin.stop();
  f.cleanup();
}

/** A connected client in transmission phase (NBD_OPT_GO on the default export). */
async function transmissionClient(f: Fixture): Promise<RawClient> {
  const c = await RawClient.connect(f.sock);
  await c.start();
  await c.go();
  return c;
}

/** The server survived: a brand-new client negotiates and reads correct bytes. */
async function assertServerHealthy(f: Fixture): Promise<void> {
  const c = await transmissionClient(f);
  try {
    const off = 3 * REGION - 5000; // spans regions 2 and 3, within the range the read tests own
    assert.ok((await c.readAt(off, 70_000)).equals(f.model.subarray(off, off + 70_000)), 'fresh client reads correct data');
    assert.ok((await c.readAt(0, 4096)).equals(f.model.subarray(0, 4096)));
  } finally {
    c.destroy();
  }
}

function regionState(f: Fixture, r: number): number {
  return f.opened.disk.map.state(r);
}

// ---- tests -------------------------------------------------------------------------------

/*
 * Region use of the 16 MiB image (1 MiB regions), so the streaming-path tests find the
 * regions they need still remote: 0-3 reads; 4 partial write; 5/6 a write across their
 * boundary; 7 and 15 the disk end; 8-9 WRITE_ZEROES; 10-11 TRIM; 12 DISC; 13 DISC + half-close; 14 the
 * in-flight limit, then refused writes. The image's zero stretch is 6.4-8 MiB.
 */
function transmissionTests(get: () => Fixture): void {
  it('answers 64 pipelined reads, each with its own handle and the right bytes', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      const rand = rng(f.streaming ? 1 : 2);
      const specs: { offset: number; length: number }[] = [];
      for (let i = 0; i < 64; i++) {
        const length = 1 + Math.floor(rand() * 128 * 1024);
        const offset = Math.floor(rand() * (4 * REGION - length));
        specs.push({ offset, length });
      }
      const encoded = specs.map((s) => c.encode({ type: Cmd.READ, offset: s.offset, length: s.length }));
      c.write(Buffer.concat(encoded.map((e) => e.bytes))); // all 64 in one write, none awaited
      const replies = await withTimeout(Promise.all(encoded.map((e) => e.reply)), IO_TIMEOUT_MS, '64 pipelined reads');
      const handles = new Set(replies.map((r) => r.handle));
      assert.equal(handles.size, 64, 'every reply carries a distinct handle');
      replies.forEach((r, i) => {
        const s = specs[i]!;
        assert.equal(r.error, 0, `read ${i} errno`);
        assert.ok(r.data!.equals(f.model.subarray(s.offset, s.offset + s.length)), `read ${i} (${s.offset}+${s.length}) has the image's bytes`);
      });
      assert.equal(c.outstanding, 0);
      assert.equal(c.protocolError, null);
    } finally {
      c.destroy();
    }
  });

  it('keeps answering under backpressure: 300 reads in flight, then 48 MiB of replies', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      // In streaming mode all 300 wait on one fetch of region 14: past the server's
      // in-flight limit, so it pauses reading and must resume as they complete.
      if (f.streaming) assert.equal(regionState(f, 14), RegionState.Remote);
      const small = Array.from({ length: 300 }, (_, i) => ({ offset: 14 * REGION + i * 3001, length: 512 }));
      // Then big replies from the read-owned regions: more than the pending-reply limit.
      const big = Array.from({ length: 48 }, (_, i) => ({ offset: (i % 3) * REGION + i * 4096, length: MiB }));
      const specs = [...small, ...big];
      const encoded = specs.map((s) => c.encode({ type: Cmd.READ, offset: s.offset, length: s.length }));
      c.write(Buffer.concat(encoded.map((e) => e.bytes)));
      const replies = await withTimeout(Promise.all(encoded.map((e) => e.reply)), 20_000, 'backpressured reads');
      replies.forEach((r, i) => {
        const s = specs[i]!;
        assert.equal(r.error, 0);
        assert.ok(r.data!.equals(f.model.subarray(s.offset, s.offset + s.length)), `read ${i}`);
      });
    } finally {
      c.destroy();
    }
  });

  it('reads across region boundaries, and a read of several whole regions', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      const cases = [
        [REGION - 1, 2],
        [REGION - 4096, 8192],
        [2 * REGION - 1, 1],
        [2 * REGION - 100_000, 200_000],
        [0, 4 * REGION], // whole regions 0-3 at once
        [7 * REGION + 100, 1000], // inside the image's zero stretch
        [IMAGE_SIZE - 4096, 4096], // the last bytes of the disk
        [IMAGE_SIZE - 1, 1],
      ] as const;
      const replies = await Promise.all(cases.map(([o, l]) => c.readAt(o, l)));
      replies.forEach((d, i) => {
        const [o, l] = cases[i]!;
        assert.ok(d.equals(f.model.subarray(o, o + l)), `read ${o}+${l}`);
      });
    } finally {
      c.destroy();
    }
  });

  it('refuses reads beyond the end with EINVAL and stays usable', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      const bad = await Promise.all([
        c.request({ type: Cmd.READ, offset: IMAGE_SIZE - 100, length: 200 }),
        c.request({ type: Cmd.READ, offset: IMAGE_SIZE, length: 1 }),
        c.request({ type: Cmd.READ, offset: 2n ** 63n, length: 512 }),
        c.request({ type: Cmd.READ, offset: 0, length: MAX_PAYLOAD + 1 }),
      ]);
      for (const r of bad) {
        assert.equal(r.error, EINVAL);
        assert.equal(r.data, null, 'an error reply carries no data');
      }
      assert.ok((await c.readAt(100, 1000)).equals(f.model.subarray(100, 1100)));
    } finally {
      c.destroy();
    }
  });

  it('refuses a write beyond the end with ENOSPC and drains its payload', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      const tail = f.model.subarray(IMAGE_SIZE - 8192);
      const payload = pattern(8192, 3);
      // The payload starts with something that looks like a request header: if the server
      // did not drain it, it would be parsed as one.
      const fake = Buffer.alloc(28);
      fake.writeUInt32BE(REQUEST_MAGIC, 0);
      fake.writeUInt16BE(Cmd.READ, 6);
      fake.writeBigUInt64BE(0xbadn, 8); // a handle the client never issued
      fake.writeUInt32BE(512, 24);
      fake.copy(payload, 0);
      const [r1, r2, r3] = await Promise.all([
        c.request({ type: Cmd.WRITE, offset: IMAGE_SIZE - 4096, length: 8192, data: payload }),
        c.request({ type: Cmd.WRITE, offset: IMAGE_SIZE + REGION, length: 100, data: pattern(100, 4) }),
        c.request({ type: Cmd.READ, offset: IMAGE_SIZE - 8192, length: 8192 }),
      ]);
      assert.equal(r1.error, ENOSPC);
      assert.equal(r2.error, ENOSPC);
      assert.equal(r3.error, 0);
      assert.ok(r3.data!.equals(tail), 'the refused write changed nothing');
      assert.equal(c.protocolError, null, 'no reply to the header hidden in the payload');
    } finally {
      c.destroy();
    }
  });

  it('refuses a write longer than 32 MiB with EINVAL and drains its payload', async function () {
    this.timeout(20_000);
    const f = get();
    const c = await transmissionClient(f);
    try {
      const length = MAX_PAYLOAD + 4096;
      const payload = Buffer.alloc(length, 0xa5);
      const big = c.request({ type: Cmd.WRITE, offset: 14 * REGION, length, data: payload });
      const after = c.request({ type: Cmd.READ, offset: 14 * REGION, length: 4096 });
      assert.equal((await big).error, EINVAL);
      const r = await after;
      assert.equal(r.error, 0);
      assert.ok(r.data!.equals(f.model.subarray(14 * REGION, 14 * REGION + 4096)));
      // A write with unknown flags is refused and drained the same way.
      const w = await c.request({ type: Cmd.WRITE, offset: 14 * REGION, length: 4096, data: Buffer.alloc(4096, 1), flags: 1 << 9 });
      assert.equal(w.error, EINVAL);
      assert.ok((await c.readAt(14 * REGION, 4096)).equals(f.model.subarray(14 * REGION, 14 * REGION + 4096)));
    } finally {
      c.destroy();
    }
  });

  it('refuses an unknown command, unknown flags and FLUSH with an offset with EINVAL', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      const replies = await Promise.all([
        c.request({ type: 42 }),
        c.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: 4096 }), // not negotiated
        c.request({ type: Cmd.READ, offset: 0, length: 4096, flags: 1 << 7 }),
        c.request({ type: Cmd.READ, offset: 0, length: 4096, flags: 0x8000 }),
        c.request({ type: Cmd.FLUSH, offset: 4096 }),
        c.request({ type: Cmd.FLUSH, length: 1 }),
      ]);
      replies.forEach((r, i) => assert.equal(r.error, EINVAL, `case ${i}`));
      assert.equal((await c.request({ type: Cmd.FLUSH })).error, 0, 'a proper FLUSH succeeds');
      assert.ok((await c.readAt(0, 4096)).equals(f.model.subarray(0, 4096)));
    } finally {
      c.destroy();
    }
  });

  it('closes the connection on a request with a bad magic', async function () {
    const f = get();
    const c = await transmissionClient(f);
    const { bytes, reply } = c.encode({ type: Cmd.READ, offset: 0, length: 512 });
    bytes.writeUInt32BE(0xdeadbeef, 0);
    c.write(bytes);
    await c.expectClose(5000);
    await assert.rejects(reply, /connection closed/);
  });

  it('writes read back, including partial writes into regions still remote', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      if (f.streaming) for (const r of [4, 5, 6]) assert.equal(regionState(f, r), RegionState.Remote, `region ${r} is remote before the write`);
      // Partial write inside region 4.
      const a = 4 * REGION + 1000;
      const da = pattern(5000, 10);
      await c.writeAt(a, da);
      da.copy(f.model, a);
      // Partial write across the 5/6 boundary, with FUA.
      const b = 6 * REGION - 3000;
      const db = pattern(8000, 11);
      await c.writeAt(b, db, CmdFlag.FUA);
      db.copy(f.model, b);
      // The bytes around the writes are the image's.
      for (const [o, l] of [
        [4 * REGION, REGION],
        [5 * REGION, 2 * REGION],
        [a - 1, 5002],
        [b - 10, 8020],
      ] as const) {
        assert.ok((await c.readAt(o, l)).equals(f.model.subarray(o, o + l)), `read back ${o}+${l}`);
      }
      // Overwrite part of what was written, pipelined with reads of it.
      // NBD does not order requests in flight: the read may see the old or the new bytes.
      const dc = pattern(300, 12);
      const before = Buffer.from(f.model.subarray(a, a + 5000));
      const w = c.request({ type: Cmd.WRITE, offset: a + 100, length: 300, data: dc });
      const r = c.request({ type: Cmd.READ, offset: a, length: 5000 });
      dc.copy(f.model, a + 100);
      assert.equal((await w).error, 0);
      const rr = await r;
      assert.equal(rr.error, 0);
      assert.ok(rr.data!.equals(before) || rr.data!.equals(f.model.subarray(a, a + 5000)), 'old or new contents');
      assert.ok((await c.readAt(a, 5000)).equals(f.model.subarray(a, a + 5000)));
      assert.equal((await c.request({ type: Cmd.FLUSH })).error, 0);
    } finally {
      c.destroy();
    }
  });

  it('WRITE_ZEROES zeroes its range (partial and whole regions) and nothing else', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      if (f.streaming) for (const r of [8, 9]) assert.equal(regionState(f, r), RegionState.Remote);
      const cases = [
        [8 * REGION + 12_345, 50_000], // partial, remote region
        [9 * REGION, REGION], // whole region
      ] as const;
      for (const [o, l] of cases) {
        const r = await c.request({ type: Cmd.WRITE_ZEROES, offset: o, length: l });
        assert.equal(r.error, 0);
        f.model.fill(0, o, o + l);
      }
      const fz = await c.request({ type: Cmd.WRITE_ZEROES, offset: 8 * REGION + 500_000, length: 1000, flags: CmdFlag.FUA | CmdFlag.NO_HOLE });
      assert.equal(fz.error, 0);
      f.model.fill(0, 8 * REGION + 500_000, 8 * REGION + 501_000);
      assert.ok((await c.readAt(8 * REGION - 100, 2 * REGION + 100)).equals(f.model.subarray(8 * REGION - 100, 10 * REGION)));
      assert.ok(f.model.subarray(8 * REGION, 8 * REGION + 12_345).some((x) => x !== 0), 'the test image is not zero around the range');
      const beyond = await c.request({ type: Cmd.WRITE_ZEROES, offset: IMAGE_SIZE - 10, length: 20 });
      assert.equal(beyond.error, ENOSPC);
    } finally {
      c.destroy();
    }
  });

  it('TRIM leaves its range as zeros or old contents, and the rest untouched', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      if (f.streaming) for (const r of [10, 11]) assert.equal(regionState(f, r), RegionState.Remote);
      const cases = [
        [10 * REGION, REGION], // whole region
        [11 * REGION + 4096, 64 * 1024], // partial
      ] as const;
      for (const [o, l] of cases) {
        assert.equal((await c.request({ type: Cmd.TRIM, offset: o, length: l })).error, 0);
      }
      for (const [o, l] of cases) {
        const got = await c.readAt(o, l);
        for (let i = 0; i < l; i++) {
          if (got[i] !== 0 && got[i] !== f.model[o + i]) assert.fail(`trimmed byte at ${o + i} is neither zero nor the old value`);
        }
        got.copy(f.model, o);
      }
      assert.ok((await c.readAt(10 * REGION - 5000, 2 * REGION + 5000)).equals(f.model.subarray(10 * REGION - 5000, 12 * REGION)));
      assert.equal((await c.request({ type: Cmd.TRIM, offset: IMAGE_SIZE - 10, length: 20 })).error, ENOSPC);
    } finally {
      c.destroy();
    }
  });

  it('NBD_CMD_DISC: every outstanding request is answered, then the server closes', async function () {
    const f = get();
    const c = await transmissionClient(f);
    if (f.streaming) assert.equal(regionState(f, 12), RegionState.Remote);
    const specs: RequestSpec[] = [];
    for (let i = 0; i < 16; i++) specs.push({ type: Cmd.READ, offset: 12 * REGION + i * 60_000 - 1000, length: 70_000 });
    const wdata = pattern(4096, 20);
    specs.push({ type: Cmd.WRITE, offset: 12 * REGION + 777, length: 4096, data: wdata });
    specs.push({ type: Cmd.FLUSH });
    const encoded = specs.map((s) => c.encode(s));
    const disc = c.encode({ type: Cmd.DISC });
    c.write(Buffer.concat([...encoded.map((e) => e.bytes), disc.bytes]));
    const replies = await withTimeout(Promise.all(encoded.map((e) => e.reply)), IO_TIMEOUT_MS, 'replies before DISC');
    for (const r of replies) assert.equal(r.error, 0);
    // Reads were sent before the write; each returns either the old or the new bytes.
    const after = Buffer.from(f.model);
    wdata.copy(after, 12 * REGION + 777);
    replies.slice(0, 16).forEach((r, i) => {
      const o = specs[i]!.offset as number;
      const old = f.model.subarray(o, o + 70_000);
      const neu = after.subarray(o, o + 70_000);
      assert.ok(r.data!.equals(old) || r.data!.equals(neu), `read ${i} before DISC`);
    });
    wdata.copy(f.model, 12 * REGION + 777);
    await c.expectClose(5000);
    assert.equal(c.protocolError, null, 'no reply for NBD_CMD_DISC');
    assert.equal(c.buffered, 0, 'nothing after the last reply');
    // The write landed.
    const c2 = await transmissionClient(f);
    try {
      assert.ok((await c2.readAt(12 * REGION, 8192)).equals(f.model.subarray(12 * REGION, 12 * REGION + 8192)));
    } finally {
      c2.destroy();
    }
  });

  it('NBD_CMD_DISC followed by a half-close (shutdown SHUT_WR, as libnbd does): replies still arrive', async function () {
    const f = get();
    const c = await transmissionClient(f);
    if (f.streaming) assert.equal(regionState(f, 13), RegionState.Remote);
    const specs: RequestSpec[] = [];
    for (let i = 0; i < 8; i++) specs.push({ type: Cmd.READ, offset: 13 * REGION + 500_000 + i * 50_000, length: 40_000 });
    const encoded = specs.map((s) => c.encode(s));
    const disc = c.encode({ type: Cmd.DISC });
    c.socket.end(Buffer.concat([...encoded.map((e) => e.bytes), disc.bytes]));
    const replies = await withTimeout(Promise.all(encoded.map((e) => e.reply)), IO_TIMEOUT_MS, 'replies before DISC + FIN');
    replies.forEach((r, i) => {
      const o = specs[i]!.offset as number;
      assert.equal(r.error, 0);
      assert.ok(r.data!.equals(f.model.subarray(o, o + 40_000)), `read ${i}`);
    });
    await c.expectClose(5000);
  });

  it('serves requests sent right behind NBD_OPT_GO, before its reply', async function () {
    const f = get();
    const c = await RawClient.connect(f.sock);
    try {
      await c.start();
      const rd = c.encode({ type: Cmd.READ, offset: 3 * REGION + 17, length: 3000 });
      const h = Buffer.alloc(16);
      h.write('IHAVEOPT', 0, 'ascii');
      h.writeUInt32BE(Opt.GO, 8);
      const p = goPayload('');
      h.writeUInt32BE(p.length, 12);
      c.write(Buffer.concat([h, p, rd.bytes]));
      const replies = await c.optionReplies();
      assert.equal(replies.at(-1)!.type, Rep.ACK);
      c.enterTransmission();
      const r = await withTimeout(rd.reply, IO_TIMEOUT_MS, 'pipelined read');
      assert.equal(r.error, 0);
      assert.ok(r.data!.equals(f.model.subarray(3 * REGION + 17, 3 * REGION + 3017)));
    } finally {
      c.destroy();
    }
  });

  it('reads back the whole disk as the model after all of the above', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      const chunk = 2 * MiB;
      const reads: Promise<Buffer>[] = [];
      for (let o = 0; o < IMAGE_SIZE; o += chunk) reads.push(c.readAt(o, chunk));
      const all = Buffer.concat(await Promise.all(reads));
      for (let o = 0; o < IMAGE_SIZE; o += REGION) {
        assert.ok(all.subarray(o, o + REGION).equals(f.model.subarray(o, o + REGION)), `region ${o / REGION}`);
      }
    } finally {
      c.destroy();
    }
  });
}

/** Resolves once region `r` settles in `state` (the disk emits 'region-settled' on every change). */
function settledAs(f: Fixture, r: number, state: RegionState): Promise<void> {
  const disk = f.opened.disk;
  return withTimeout(
    new Promise<void>((resolve) => {
      const on = (x: number): void => {
        if (x !== r || disk.map.state(r) !== state) return;
        disk.off('region-settled', on);
        resolve();
      };
      disk.on('region-settled', on);
    }),
    IO_TIMEOUT_MS,
    `region ${r} to settle as ${state}`,
  );
}

/**
 * Resolves once no region is filling. A read that missed part of a region, with no hydrator
 * running, has the disk fetch the rest of that region in the background after the read is
 * answered; a test that counts origin requests waits for those fetches to end first.
 */
function noFetchInFlight(f: Fixture): Promise<void> {
  const disk = f.opened.disk;
  const filling = (): boolean => disk.map.states.includes(RegionState.Filling);
  return withTimeout(
    new Promise<void>((resolve) => {
      const check = (): void => {
        if (filling()) return;
        disk.off('region-settled', check);
        resolve();
      };
      disk.on('region-settled', check);
      check();
    }),
    IO_TIMEOUT_MS,
    'background fetches to end',
  );
}

/** Bytes the target file has allocated (st_blocks are 512-byte units whatever the file system). */
function targetAllocated(f: Fixture): number {
  return fs.statSync(path.join(f.dir, 'target.raw')).blocks * 512;
}

/*
 * Its own streaming disk, hydrator not started, so every region a test names is still
 * remote when it starts: 0-1 refused flags; 2-3 the health check after each test; 4
 * FAST_ZERO on a whole remote region; 5-8 and 12 FAST_ZERO refused; 9-10 NO_HOLE; 11, 13,
 * 14 CACHE; 15 an export without FAST_ZERO. The source
 * gives up at the first failure (retryDeadlineMs 0), so an injected 500 fails a fetch at once.
 */
function conformanceTests(): void {
  const ENOTSUP = 95;
  const EIO = 5;
  let f: Fixture | undefined;
  const get = (): Fixture => f!;
  before(async function () {
    f = await setUp(true, { retryDeadlineMs: 0, probeDeadlineMs: IO_TIMEOUT_MS });
  });
  after(async function () {
    await tearDown(f);
  });
  afterEach(async function () {
    await assertServerHealthy(get());
    // The health check's misses complete their regions in the background; the next test
    // counts origin requests from a quiet disk.
    await noFetchInFlight(get());
  });

  it('refuses with EINVAL a flag its command does not take; FUA, advertised, is taken by every command', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      const before = f.opened.disk.map.states.slice();
      const refused: [string, RequestSpec][] = [
        ['READ + NO_HOLE', { type: Cmd.READ, offset: 0, length: 4096, flags: CmdFlag.NO_HOLE }],
        ['READ + DF (no structured replies, so no SEND_DF)', { type: Cmd.READ, offset: 0, length: 4096, flags: CmdFlag.DF }],
        ['READ + REQ_ONE', { type: Cmd.READ, offset: 0, length: 4096, flags: CmdFlag.REQ_ONE }],
        ['READ + FAST_ZERO', { type: Cmd.READ, offset: 0, length: 4096, flags: CmdFlag.FAST_ZERO }],
        ['TRIM + NO_HOLE', { type: Cmd.TRIM, offset: REGION, length: REGION, flags: CmdFlag.NO_HOLE }],
        ['TRIM + FAST_ZERO', { type: Cmd.TRIM, offset: REGION, length: REGION, flags: CmdFlag.FAST_ZERO }],
        ['FLUSH + NO_HOLE', { type: Cmd.FLUSH, flags: CmdFlag.NO_HOLE }],
        ['CACHE + NO_HOLE', { type: Cmd.CACHE, offset: REGION, length: 4096, flags: CmdFlag.NO_HOLE }],
        ['CACHE + DF', { type: Cmd.CACHE, offset: REGION, length: 4096, flags: CmdFlag.DF }],
        ['WRITE_ZEROES + DF', { type: Cmd.WRITE_ZEROES, offset: REGION, length: REGION, flags: CmdFlag.DF }],
        ['WRITE_ZEROES + REQ_ONE', { type: Cmd.WRITE_ZEROES, offset: REGION, length: REGION, flags: CmdFlag.REQ_ONE }],
      ];
      // A refused write still has its payload drained: it begins with what looks like a header.
      const payload = pattern(8192, 30);
      const fake = c.encode({ type: Cmd.READ, offset: 0, length: 512 }).bytes;
      fake.writeBigUInt64BE(0xbadn, 8);
      fake.copy(payload, 0);
      refused.push(['WRITE + NO_HOLE', { type: Cmd.WRITE, offset: 4096, length: payload.length, data: payload, flags: CmdFlag.NO_HOLE }]);
      refused.push(['WRITE + FAST_ZERO', { type: Cmd.WRITE, offset: 4096, length: payload.length, data: payload, flags: CmdFlag.FAST_ZERO }]);
      const replies = await Promise.all(refused.map(([, spec]) => c.request(spec)));
      replies.forEach((r, i) => assert.equal(r.error, EINVAL, refused[i]![0]));
      assert.equal(c.protocolError, null, 'no reply to the header hidden in the payload');
      assert.deepEqual(f.opened.disk.map.states, before, 'no refused request changed a region');
      // proto.md: with SEND_FUA the server MUST accept FUA on all commands (it may ignore it).
      const fua = await Promise.all([
        c.request({ type: Cmd.READ, offset: 0, length: 4096, flags: CmdFlag.FUA }),
        c.request({ type: Cmd.FLUSH, flags: CmdFlag.FUA }),
        c.request({ type: Cmd.CACHE, offset: 0, length: 4096, flags: CmdFlag.FUA }),
      ]);
      fua.forEach((r, i) => assert.equal(r.error, 0, `FUA on command ${i}`));
      assert.ok(fua[0]!.data!.equals(f.model.subarray(0, 4096)));
      assert.ok((await c.readAt(0, REGION + 4096)).equals(f.model.subarray(0, REGION + 4096)), 'the refused writes and zeroes changed nothing');
    } finally {
      c.destroy();
    }
  });

  it('advertises SEND_FAST_ZERO; FAST_ZERO over whole remote regions marks them zero without a fetch', async function () {
    const f = get();
    const c = await RawClient.connect(f.sock);
    try {
      await c.start();
      const { flags } = await c.go();
      assert.equal(flags & (TFlag.SEND_WRITE_ZEROES | TFlag.SEND_FAST_ZERO), TFlag.SEND_WRITE_ZEROES | TFlag.SEND_FAST_ZERO, `flags 0x${flags.toString(16)}`);
      assert.equal(regionState(f, 4), RegionState.Remote);
      const fetched = f.origin.stats.rangeRequests;
      const r = await c.request({ type: Cmd.WRITE_ZEROES, offset: 4 * REGION, length: REGION, flags: CmdFlag.FAST_ZERO | CmdFlag.FUA });
      assert.equal(r.error, 0);
      assert.equal(regionState(f, 4), RegionState.Zero);
      assert.equal(f.origin.stats.rangeRequests, fetched, 'nothing fetched');
      f.model.fill(0, 4 * REGION, 5 * REGION);
      assert.ok((await c.readAt(4 * REGION, REGION)).equals(f.model.subarray(4 * REGION, 5 * REGION)));
    } finally {
      c.destroy();
    }
  });

  it('FAST_ZERO that would need a fetch or a data write fails at once with ENOTSUP and changes nothing', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      // Region 8 local with the host's bytes (a whole-region write claims it without a fetch).
      const d8 = pattern(REGION, 31);
      await c.writeAt(8 * REGION, d8);
      d8.copy(f.model, 8 * REGION);
      assert.equal(regionState(f, 8), RegionState.Local);
      for (const r of [5, 6, 7, 12]) assert.equal(regionState(f, r), RegionState.Remote);
      const before = f.opened.disk.map.states.slice();
      const fetched = f.origin.stats.rangeRequests;
      const cases: [string, RequestSpec][] = [
        ['part of a remote region (needs a fetch)', { type: Cmd.WRITE_ZEROES, offset: 5 * REGION + 4096, length: 8192, flags: CmdFlag.FAST_ZERO }],
        ['a whole remote region and part of the next', { type: Cmd.WRITE_ZEROES, offset: 6 * REGION, length: REGION + 4096, flags: CmdFlag.FAST_ZERO }],
        ['a local region (zeros would be written)', { type: Cmd.WRITE_ZEROES, offset: 8 * REGION, length: REGION, flags: CmdFlag.FAST_ZERO | CmdFlag.FUA }],
        ['a whole remote region with NO_HOLE (zeros would be written)', { type: Cmd.WRITE_ZEROES, offset: 12 * REGION, length: REGION, flags: CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE }],
      ];
      for (const [what, spec] of cases) assert.equal((await c.request(spec)).error, ENOTSUP, what);
      assert.deepEqual(f.opened.disk.map.states, before, 'no region changed state');
      assert.equal(f.origin.stats.rangeRequests, fetched, 'nothing fetched');
      for (const r of [5, 6, 7, 8, 12]) assert.ok((await c.readAt(r * REGION, REGION)).equals(f.model.subarray(r * REGION, (r + 1) * REGION)), `region ${r} unchanged`);
      // Without FAST_ZERO the same request is done (and never ENOTSUP).
      assert.equal((await c.request({ type: Cmd.WRITE_ZEROES, offset: 5 * REGION + 4096, length: 8192 })).error, 0);
      f.model.fill(0, 5 * REGION + 4096, 5 * REGION + 12_288);
      assert.ok((await c.readAt(5 * REGION, REGION)).equals(f.model.subarray(5 * REGION, 6 * REGION)));
    } finally {
      c.destroy();
    }
  });

  it('NO_HOLE leaves the range allocated: zeros written, the region local, never just marked zero', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      for (const r of [9, 10]) assert.equal(regionState(f, r), RegionState.Remote);
      // A whole remote region with NO_HOLE: zeros written to the target, no fetch.
      const fetched = f.origin.stats.rangeRequests;
      const allocated = targetAllocated(f);
      assert.equal((await c.request({ type: Cmd.WRITE_ZEROES, offset: 9 * REGION, length: REGION, flags: CmdFlag.NO_HOLE })).error, 0);
      assert.equal(regionState(f, 9), RegionState.Local, 'region 9 is local, not zero');
      assert.equal(f.origin.stats.rangeRequests, fetched, 'nothing fetched');
      assert.ok(targetAllocated(f) - allocated >= REGION, `the target allocated ${targetAllocated(f) - allocated} bytes for the zeroed region`);
      // A region already `zero` (WRITE_ZEROES without NO_HOLE), then NO_HOLE on part of it.
      assert.equal((await c.request({ type: Cmd.WRITE_ZEROES, offset: 10 * REGION, length: REGION })).error, 0);
      assert.equal(regionState(f, 10), RegionState.Zero);
      const allocatedZero = targetAllocated(f);
      assert.equal((await c.request({ type: Cmd.WRITE_ZEROES, offset: 10 * REGION + 4096, length: 65_536, flags: CmdFlag.NO_HOLE | CmdFlag.FUA })).error, 0);
      assert.equal(regionState(f, 10), RegionState.Local, 'region 10 is local, not zero');
      assert.ok(targetAllocated(f) - allocatedZero >= 65_536, 'the target allocated the zeroed range');
      f.model.fill(0, 9 * REGION, 11 * REGION);
      assert.ok((await c.readAt(9 * REGION, 2 * REGION)).equals(f.model.subarray(9 * REGION, 11 * REGION)));
    } finally {
      c.destroy();
    }
  });

  it('CACHE without flags is answered once the fetch has started, before the region is local', async function () {
    const f = get();
    const c = await transmissionClient(f);
    try {
      assert.equal(regionState(f, 11), RegionState.Remote);
      const local = settledAs(f, 11, RegionState.Local);
      const order: string[] = [];
      // In one write: the CACHE, then a READ refused at once. The refusal needs no I/O; the
      // CACHE reply comes first only if it did not wait for the fetch.
      const cache = c.encode({ type: Cmd.CACHE, offset: 11 * REGION, length: REGION });
      const bad = c.encode({ type: Cmd.READ, offset: IMAGE_SIZE, length: 512 });
      const seen = [cache.reply.then((r) => order.push(`cache ${r.error}`)), bad.reply.then((r) => order.push(`bad read ${r.error}`))];
      c.write(Buffer.concat([cache.bytes, bad.bytes]));
      await withTimeout(Promise.all(seen), IO_TIMEOUT_MS, 'CACHE and READ replies');
      assert.deepEqual(order, ['cache 0', `bad read ${EINVAL}`]);
      await local; // the prefetch goes on after the reply
      const fetched = f.origin.stats.rangeRequests;
      assert.ok((await c.readAt(11 * REGION, REGION)).equals(f.model.subarray(11 * REGION, 12 * REGION)));
      assert.equal(f.origin.stats.rangeRequests, fetched, 'the read was served locally');
    } finally {
      c.destroy();
    }
  });

  it('a CACHE answered early whose fetch then fails leaves no unhandled rejection; CACHE with FUA waits and reports it', async function () {
    const f = get();
    const c = await transmissionClient(f);
    const unhandled: unknown[] = [];
    const onUnhandled = (err: unknown): void => {
      unhandled.push(err);
    };
    process.on('unhandledRejection', onUnhandled);
    try {
      for (const r of [13, 14]) assert.equal(regionState(f, r), RegionState.Remote);
      f.origin.faults.push('500'); // the source gives up at once (retryDeadlineMs 0)
      const failed = settledAs(f, 13, RegionState.Remote);
      assert.equal((await c.request({ type: Cmd.CACHE, offset: 13 * REGION, length: REGION })).error, 0, 'answered before the fetch failed');
      await failed;
      await new Promise((resolve) => setImmediate(resolve)); // unhandled rejections are reported by now
      assert.deepEqual(unhandled, []);
      // With a flag proto.md does not allow the early reply: the failure is the answer.
      f.origin.faults.push('500');
      assert.equal((await c.request({ type: Cmd.CACHE, offset: 14 * REGION, length: REGION, flags: CmdFlag.FUA })).error, EIO);
      assert.equal(regionState(f, 14), RegionState.Remote);
      // Nothing is lost: the regions are fetched again on demand.
      assert.ok((await c.readAt(13 * REGION, 2 * REGION)).equals(f.model.subarray(13 * REGION, 15 * REGION)));
      assert.deepEqual(unhandled, []);
    } finally {
      process.off('unhandledRejection', onUnhandled);
      c.destroy();
    }
  });

  it('FAST_ZERO on an export that does not advertise SEND_FAST_ZERO is EINVAL', async function () {
    const f = get();
    const disk = f.opened.disk;
    // The same disk behind a filter that does not offer fast zeroing (nbdkit-style: what it
    // does not change it forwards).
    const slow: BlockBackend = {
      size: disk.size,
      capabilities: { ...disk.capabilities, fastZero: false },
      read: (o, d) => disk.read(o, d),
      write: (o, ch, l, fua) => disk.write(o, ch, l, fua),
      flush: () => disk.flush(),
      trim: (o, l, fua) => disk.trim(o, l, fua),
      writeZeroes: (o, l, fua, opts) => disk.writeZeroes(o, l, fua, opts),
      cache: (o, l) => disk.cache(o, l),
      close: async () => {},
    };
    const sock = path.join(f.dir, 'nbd-slow-zero.sock');
    const server = new NbdServer({ exports: [{ name: 'slow', backend: slow }], log: pino({ level: 'silent' }) });
    await server.listen({ kind: 'unix', path: sock });
    const c = await RawClient.connect(sock);
    try {
      await c.start();
      const { flags } = await c.go();
      assert.equal(flags & TFlag.SEND_WRITE_ZEROES, TFlag.SEND_WRITE_ZEROES);
      assert.equal(flags & TFlag.SEND_FAST_ZERO, 0, 'SEND_FAST_ZERO not advertised');
      assert.equal(regionState(f, 15), RegionState.Remote);
      assert.equal((await c.request({ type: Cmd.WRITE_ZEROES, offset: 15 * REGION, length: REGION, flags: CmdFlag.FAST_ZERO })).error, EINVAL);
      assert.equal(regionState(f, 15), RegionState.Remote, 'nothing zeroed');
      assert.equal((await c.request({ type: Cmd.WRITE_ZEROES, offset: 15 * REGION, length: REGION })).error, 0);
      f.model.fill(0, 15 * REGION, 16 * REGION);
    } finally {
      c.destroy();
      await server.close(500);
    }
  });
}

describe('NBD protocol: in-process server over a unix socket, raw client', function () {
  this.timeout(30_000);

  describe('streaming disk, hydrator not started', function () {
    let f: Fixture | undefined;
    const get = (): Fixture => f!;
    before(async function () {
      f = await setUp(true);
    });
    after(async function () {
      await tearDown(f);
    });
    afterEach(async function () {
      await assertServerHealthy(get());
    });

    describe('handshake', function () {
      it('greets with NBDMAGIC, IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', async function () {
        const c = await RawClient.connect(get().sock);
        try {
          const g = await c.greeting();
          assert.equal(g.toString('ascii', 0, 8), 'NBDMAGIC');
          assert.equal(g.toString('ascii', 8, 16), 'IHAVEOPT');
          assert.equal(g.readUInt16BE(16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        } finally {
          c.destroy();
        }
      });

      it('closes the connection on unknown client flags', async function () {
        const c = await RawClient.connect(get().sock);
        await c.start(CLIENT_FLAGS | 0x4);
        await c.expectClose(5000);
        assert.equal(c.buffered, 0, 'no reply after the greeting');
      });

      it('closes the connection on an option without IHAVEOPT', async function () {
        const c = await RawClient.connect(get().sock);
        await c.start();
        const h = Buffer.alloc(16);
        h.write('IHAVEOPX', 0, 'ascii');
        h.writeUInt32BE(Opt.LIST, 8);
        c.write(h);
        await c.expectClose(5000);
      });

      it('NBD_OPT_LIST lists "disk"; with data it is ERR_INVALID', async function () {
        const c = await RawClient.connect(get().sock);
        try {
          await c.start();
          c.sendOption(Opt.LIST);
          const replies = await c.optionReplies();
          assert.equal(replies.length, 2);
          const [srv, ack] = replies as [OptionReply, OptionReply];
          assert.equal(srv.option, Opt.LIST);
          assert.equal(srv.type, Rep.SERVER);
          const nameLen = srv.data.readUInt32BE(0);
          assert.equal(srv.data.toString('utf8', 4, 4 + nameLen), 'disk');
          assert.equal(srv.data.toString('utf8', 4 + nameLen), 'the test disk');
          assert.equal(ack.type, Rep.ACK);
          assert.equal(ack.data.length, 0);
          c.sendOption(Opt.LIST, Buffer.from('xx'));
          const bad = await c.optionReply();
          assert.equal(bad.type, Rep.ERR_INVALID);
          assert.ok(bad.data.length > 0, 'with a message');
        } finally {
          c.destroy();
        }
      });

      it('NBD_OPT_INFO on an unknown name is ERR_UNKNOWN with a message; NAME and DESCRIPTION on request', async function () {
        const c = await RawClient.connect(get().sock);
        try {
          await c.start();
          c.sendOption(Opt.INFO, goPayload('nosuch'));
          const r = await c.optionReply();
          assert.equal(r.option, Opt.INFO);
          assert.equal(r.type, Rep.ERR_UNKNOWN);
          assert.match(r.data.toString('utf8'), /nosuch/);
          // Still negotiating: INFO on the real name, asking for name and description.
          c.sendOption(Opt.INFO, goPayload('disk', [Info.NAME, Info.DESCRIPTION]));
          const replies = await c.optionReplies();
          assert.equal(replies.at(-1)!.type, Rep.ACK);
          const infos = new Map(replies.filter((x) => x.type === Rep.INFO).map((x) => [x.data.readUInt16BE(0), x.data]));
          assert.equal(infos.get(Info.NAME)?.toString('utf8', 2), 'disk');
          assert.equal(infos.get(Info.DESCRIPTION)?.toString('utf8', 2), 'the test disk');
          assert.equal(Number(infos.get(Info.EXPORT)!.readBigUInt64BE(2)), IMAGE_SIZE);
          // INFO does not end negotiation: GO still works.
          const { size } = await c.go('disk');
          assert.equal(size, IMAGE_SIZE);
          assert.ok((await c.readAt(0, 512)).equals(get().model.subarray(0, 512)));
        } finally {
          c.destroy();
        }
      });

      it('NBD_OPT_INFO/GO with inconsistent lengths is ERR_INVALID and negotiation continues', async function () {
        const c = await RawClient.connect(get().sock);
        try {
          await c.start();
          const nameTooLong = goPayload('disk');
          nameTooLong.writeUInt32BE(100, 0);
          const countTooBig = goPayload('disk', [Info.NAME]);
          countTooBig.writeUInt16BE(3, 8);
          const trailing = Buffer.concat([goPayload('disk'), Buffer.from([0])]);
          const tooShort = Buffer.from([0, 0, 0]);
          for (const opt of [Opt.INFO, Opt.GO]) {
            for (const data of [nameTooLong, countTooBig, trailing, tooShort, Buffer.alloc(0)]) {
              c.sendOption(opt, data);
              const r = await c.optionReply();
              assert.equal(r.option, opt);
              assert.equal(r.type, Rep.ERR_INVALID, `option ${opt} with ${data.toString('hex')}`);
              assert.ok(r.data.length > 0, 'with a message');
            }
          }
          await c.go();
          assert.ok((await c.readAt(0, 512)).equals(get().model.subarray(0, 512)));
        } finally {
          c.destroy();
        }
      });

      it('an unknown option is ERR_UNSUP and negotiation continues; STRUCTURED_REPLY is ERR_UNSUP', async function () {
        const c = await RawClient.connect(get().sock);
        try {
          await c.start();
          c.sendOption(99, Buffer.from('some option data'));
          const r = await c.optionReply();
          assert.equal(r.option, 99);
          assert.equal(r.type, Rep.ERR_UNSUP);
          assert.ok(r.data.length > 0);
          c.sendOption(Opt.STRUCTURED_REPLY);
          const s = await c.optionReply();
          assert.equal(s.option, Opt.STRUCTURED_REPLY);
          assert.equal(s.type, Rep.ERR_UNSUP);
          for (const opt of [Opt.STARTTLS, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.EXTENDED_HEADERS]) {
            c.sendOption(opt);
            assert.equal((await c.optionReply()).type, Rep.ERR_UNSUP, `option ${opt}`);
          }
          await c.go();
          assert.ok((await c.readAt(5000, 512)).equals(get().model.subarray(5000, 5512)));
        } finally {
          c.destroy();
        }
      });

      it('NBD_OPT_GO with the empty name selects the default export: INFO_EXPORT, INFO_BLOCK_SIZE, ACK', async function () {
        const c = await RawClient.connect(get().sock);
        try {
          await c.start();
          const { size, flags, replies } = await c.go('');
          assert.equal(size, IMAGE_SIZE);
          const want = TFlag.HAS_FLAGS | TFlag.SEND_FLUSH | TFlag.SEND_FUA | TFlag.SEND_TRIM | TFlag.SEND_WRITE_ZEROES | TFlag.CAN_MULTI_CONN;
          assert.equal(flags & want, want, `flags 0x${flags.toString(16)}`);
          assert.equal(flags & TFlag.READ_ONLY, 0);
          for (const r of replies) assert.equal(r.option, Opt.GO);
          const bs = replies.find((r) => r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.BLOCK_SIZE);
          assert.ok(bs, 'NBD_INFO_BLOCK_SIZE sent');
          assert.equal(bs.data.length, 14);
          const [min, pref, max] = [bs.data.readUInt32BE(2), bs.data.readUInt32BE(6), bs.data.readUInt32BE(10)];
          assert.equal(min, 1);
          // Streaming: I/O smaller than a region that is not local costs a whole-region fetch.
          assert.equal(pref, REGION, 'preferred block size is the region size while streaming');
          assert.equal(max, MAX_PAYLOAD);
          const exp = replies.find((r) => r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.EXPORT)!;
          assert.equal(exp.data.length, 12);
          assert.ok((await c.readAt(0, 4096)).equals(get().model.subarray(0, 4096)));
        } finally {
          c.destroy();
        }
      });

      for (const noZeroes of [true, false]) {
        it(`NBD_OPT_EXPORT_NAME ${noZeroes ? 'with' : 'without'} NO_ZEROES answers ${noZeroes ? 10 : 134} bytes`, async function () {
          const c = await RawClient.connect(get().sock);
          try {
            await c.start(noZeroes ? CLIENT_FLAGS : FLAG_FIXED_NEWSTYLE);
            c.sendOption(Opt.EXPORT_NAME, Buffer.from('disk'));
            const r = await c.read(noZeroes ? 10 : 134);
            assert.equal(Number(r.readBigUInt64BE(0)), IMAGE_SIZE);
            assert.equal(r.readUInt16BE(8) & TFlag.HAS_FLAGS, TFlag.HAS_FLAGS);
            if (!noZeroes) assert.ok(r.subarray(10).equals(Buffer.alloc(124)));
            await sleep(20);
            assert.equal(c.buffered, 0, 'nothing more than the reply');
            c.enterTransmission();
            assert.ok((await c.readAt(REGION - 10, 20)).equals(get().model.subarray(REGION - 10, REGION + 10)));
          } finally {
            c.destroy();
          }
        });
      }

      it('NBD_OPT_EXPORT_NAME with an unknown name closes the connection', async function () {
        const c = await RawClient.connect(get().sock);
        await c.start();
        c.sendOption(Opt.EXPORT_NAME, Buffer.from('nosuch'));
        await c.expectClose(5000);
        assert.equal(c.buffered, 0);
      });

      it('NBD_OPT_ABORT is acknowledged and the connection closes', async function () {
        const c = await RawClient.connect(get().sock);
        await c.start();
        c.sendOption(Opt.ABORT);
        const r = await c.optionReply();
        assert.equal(r.option, Opt.ABORT);
        assert.equal(r.type, Rep.ACK);
        await c.expectClose(5000);
      });

      it('an option longer than 64 KiB is ERR_TOO_BIG and the connection still works', async function () {
        const c = await RawClient.connect(get().sock);
        try {
          await c.start();
          c.sendOption(99, Buffer.alloc(MAX_OPTION_BYTES + 1, 0x49)); // 'IIII…': no stray IHAVEOPT parse
          const r = await c.optionReply();
          assert.equal(r.option, 99);
          assert.equal(r.type, Rep.ERR_TOO_BIG);
          assert.ok(r.data.length > 0);
          // A GO whose payload is oversized is skipped the same way.
          c.sendOption(Opt.GO, Buffer.concat([goPayload('disk'), Buffer.alloc(200_000)]));
          const g = await c.optionReply();
          assert.equal(g.option, Opt.GO);
          assert.equal(g.type, Rep.ERR_TOO_BIG);
          c.sendOption(Opt.LIST);
          assert.equal((await c.optionReplies()).at(-1)!.type, Rep.ACK);
          await c.go();
          assert.ok((await c.readAt(2 * REGION, 4096)).equals(get().model.subarray(2 * REGION, 2 * REGION + 4096)));
        } finally {
          c.destroy();
        }
      });

      it('closes a client that sends nothing within the handshake timeout, not one that finished', async function () {
        const f = get();
        const sock = path.join(f.dir, 'nbd-timeout.sock');
        const server = new NbdServer({ exports: [{ name: 'disk', backend: f.opened.disk }], log: pino({ level: 'silent' }), handshakeTimeoutMs: 300 });
        await server.listen({ kind: 'unix', path: sock });
        try {
          const t0 = Date.now();
          const silent = await RawClient.connect(sock);
          const half = await RawClient.connect(sock);
          await half.start(); // greeting and flags, then silence
          const done = await RawClient.connect(sock);
          await done.start();
          await done.go();
          await silent.expectClose(3000);
          await half.expectClose(3000);
          const elapsed = Date.now() - t0;
          assert.ok(elapsed >= 250, `closed after ${elapsed} ms, expected about 300`);
          assert.equal(silent.buffered, 18, 'only the greeting was sent');
          await sleep(400);
          assert.equal(done.closed, false, 'a negotiated connection outlives the handshake timeout');
          assert.ok((await done.readAt(0, 4096)).equals(f.model.subarray(0, 4096)));
          done.destroy();
        } finally {
          await server.close(500);
        }
      });
    });

    describe('transmission', function () {
      transmissionTests(get);
    });
  });

  describe('hydrated disk (hydrator run to completion first)', function () {
    let f: Fixture | undefined;
    const get = (): Fixture => f!;
    before(async function () {
      f = await setUp(false);
      assert.ok(f.opened.disk.complete, 'hydrated');
    });
    after(async function () {
      await tearDown(f);
    });
    afterEach(async function () {
      await assertServerHealthy(get());
    });

    it('NBD_INFO_BLOCK_SIZE: the preferred block size is back to 4096 once every region is local', async function () {
      const c = await RawClient.connect(get().sock);
      try {
        await c.start();
        for (const opt of [Opt.INFO, Opt.GO]) {
          const replies = opt === Opt.GO ? (await c.go('disk', [Info.BLOCK_SIZE])).replies : (c.sendOption(opt, goPayload('disk', [Info.BLOCK_SIZE])), await c.optionReplies());
          const bs = replies.find((r) => r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.BLOCK_SIZE)!;
          assert.deepEqual([bs.data.readUInt32BE(2), bs.data.readUInt32BE(6), bs.data.readUInt32BE(10)], [1, 4096, MAX_PAYLOAD], `option ${opt}`);
        }
      } finally {
        c.destroy();
      }
    });

    transmissionTests(get);
  });

  describe('conformance to doc/proto.md: command flags, FAST_ZERO, NO_HOLE, CACHE (streaming disk)', function () {
    conformanceTests();
  });
});

/**
 * A backend that holds every read and write until the test releases it: the transmission
 * (the component under test) decides how many requests reach it at once.
 */
class HeldBackend implements BlockBackend {
  readonly size = 256 * MiB;
  readonly capabilities = { readOnly: false, flush: true, fua: true, trim: true, writeZeroes: true, fastZero: false, cache: false, multiConn: true };
  readonly held: { bytes: number; release: () => void }[] = [];
  inflightBytes = 0;
  maxInflightBytes = 0;
  private waiters: (() => void)[] = [];

  private hold(bytes: number, fill?: Buffer): Promise<void> {
    this.inflightBytes += bytes;
    this.maxInflightBytes = Math.max(this.maxInflightBytes, this.inflightBytes);
    return new Promise((resolve) => {
      this.held.push({
        bytes,
        release: () => {
          fill?.fill(0x42);
          this.inflightBytes -= bytes;
          resolve();
        },
      });
      for (const w of this.waiters.splice(0)) w();
    });
  }

  /** Resolves once `n` requests are held. */
  async heldCount(n: number): Promise<void> {
    while (this.held.length < n) await new Promise<void>((r) => this.waiters.push(r));
  }

  read(_offset: number, dest: Buffer): Promise<void> {
    return this.hold(dest.length, dest);
  }
  write(_offset: number, _chunks: readonly Buffer[], length: number): Promise<void> {
    return this.hold(length);
  }
  flush(): void {}
  trim(): void {}
  writeZeroes(): void {}
  cache(): void {}
  async close(): Promise<void> {}
}

describe('NBD transmission: a byte budget per connection', function () {
  it('stops reading requests while 32 MiB of reads and writes are in flight, and serves them all', async function () {
    this.timeout(60_000);
    const { dir, cleanup } = tempDir('nbd-budget');
    const backend = new HeldBackend();
    const server = new NbdServer({ exports: [{ name: 'disk', description: 'held', backend }], log: pino({ level: 'silent' }) });
    const sock = path.join(dir, 'nbd.sock');
    await server.listen({ kind: 'unix', path: sock });
    const c = await RawClient.connect(sock);
    try {
      await c.start();
      await c.go();
      // 12 reads and 4 writes of 8 MiB, all sent at once: 128 MiB the server would hold.
      const replies: Promise<Reply>[] = [];
      for (let i = 0; i < 16; i++) {
        replies.push(i % 4 === 3 ? c.request({ type: Cmd.WRITE, offset: i * 8 * MiB, length: 8 * MiB, data: Buffer.alloc(8 * MiB, i) }) : c.request({ type: Cmd.READ, offset: i * 8 * MiB, length: 8 * MiB }));
      }
      await backend.heldCount(4);
      // The server reads no further request until one ends: the client's bytes stay in the sockets.
      await assertStays(() => backend.held.length === 4, c);
      assert.equal(backend.inflightBytes, 32 * MiB);
      let released = 0;
      while (released < 16) {
        backend.held[released]!.release();
        released++;
        if (released < 16) await backend.heldCount(Math.min(16, released + 4));
        assert.ok(backend.inflightBytes <= 32 * MiB, `${backend.inflightBytes / MiB} MiB in flight`);
      }
      const got = await Promise.all(replies);
      assert.ok(got.every((r) => r.error === 0));
      assert.ok(got.filter((r) => r.data).every((r) => r.data!.length === 8 * MiB && r.data!.every((b) => b === 0x42)));
      assert.equal(backend.maxInflightBytes, 32 * MiB);
    } finally {
      c.destroy();
      await server.close(1000);
      cleanup();
    }
  });
});

/**
 * The condition holds while the server has every chance to break it: the client has more
 * requests written than the server has taken (it cannot flush them all: the server stopped
 * reading), and the server's event loop (this process's) turns over many times.
 */
async function assertStays(cond: () => boolean, c: RawClient): Promise<void> {
  assert.ok(c.socket.writableLength > 0 || c.socket.bytesWritten > 32 * MiB, 'more was sent than is held');
  for (let i = 0; i < 50; i++) {
    await new Promise((r) => setImmediate(r));
    assert.ok(cond(), 'held steady');
  }
}
