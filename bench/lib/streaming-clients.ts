/**
 * The two small clients the streaming bench drives its peers with:
 *
 * - `NbdClient`: a fixed-newstyle NBD client over a unix socket (NBD_OPT_GO, simple
 *   replies, one request at a time). The bench times single reads with it — the time to
 *   first byte and QD1 cold-read latencies — so it does nothing but frame requests and
 *   wait for their replies: no structured replies, no pipelining, one copy per reply.
 * - `QmpClient`: line-delimited JSON over qemu-storage-daemon's monitor socket:
 *   capabilities negotiation, commands answered in order, and events to whoever waits.
 *
 * Both fail with a timeout instead of waiting forever: qemu-storage-daemon 7.2 sometimes
 * hangs (PEERS.md), and a hung peer must be a failed run, not a hung bench.
 */
import net from 'node:net';
import { Cmd, IHAVEOPT, NBDMAGIC, Opt, OPTION_REPLY_MAGIC, Rep, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES } from '../../dpu-agent/src/nbd/protocol.js';

export class TimeoutError extends Error {}

/** Bytes from a socket, handed out in exact-length pieces. */
class SocketReader {
  private chunks: Buffer[] = [];
  private have = 0;
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;

  constructor(sock: net.Socket) {
    sock.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.have += d.length;
      this.serve();
    });
    const fail = (e: Error): void => {
      this.failure ??= e;
      const w = this.want;
      this.want = null;
      w?.reject(this.failure);
    };
    sock.on('error', fail);
    sock.on('close', () => fail(new Error('connection closed')));
  }

  read(n: number): Promise<Buffer> {
    if (this.want) return Promise.reject(new Error('one read at a time'));
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
      this.serve();
      if (this.want && this.failure) {
        this.want = null;
        reject(this.failure);
      }
    });
  }

  private serve(): void {
    const w = this.want;
    if (!w || this.have < w.n) return;
    this.want = null;
    let out: Buffer;
    if (this.chunks[0]!.length >= w.n) {
      const c = this.chunks[0]!;
      out = c.subarray(0, w.n);
      if (c.length === w.n) this.chunks.shift();
      else this.chunks[0] = c.subarray(w.n);
    } else {
      out = Buffer.allocUnsafe(w.n);
      let off = 0;
      while (off < w.n) {
        const c = this.chunks[0]!;
        const take = Math.min(c.length, w.n - off);
        c.copy(out, off, 0, take);
        off += take;
        if (take === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(take);
      }
    }
    this.have -= w.n;
    w.resolve(out);
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string, onTimeout?: () => void): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => {
        onTimeout?.();
        reject(new TimeoutError(`${what}: no answer within ${ms} ms`));
      }, ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

export class NbdClient {
  private handle = 0n;

  private constructor(
    private readonly sock: net.Socket,
    private readonly rd: SocketReader,
    readonly size: number,
  ) {}

  /** Connects and negotiates the export (NBD_OPT_GO); rejects if the server is not there yet. */
  static async connect(socketPath: string, exportName: string, timeoutMs = 10_000): Promise<NbdClient> {
    const sock = net.createConnection(socketPath);
    const rd = new SocketReader(sock);
    try {
      return await withTimeout(NbdClient.handshake(sock, rd, exportName), timeoutMs, `NBD handshake on ${socketPath}`);
    } catch (err) {
      sock.destroy();
      throw err;
    }
  }

  private static async handshake(sock: net.Socket, rd: SocketReader, exportName: string): Promise<NbdClient> {
    const greet = await rd.read(18);
    if (!greet.subarray(0, 8).equals(NBDMAGIC) || !greet.subarray(8, 16).equals(IHAVEOPT)) throw new Error('not a newstyle NBD server');
    const serverFlags = greet.readUInt16BE(16);
    const cflags = Buffer.alloc(4);
    cflags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
    const name = Buffer.from(exportName, 'utf8');
    const opt = Buffer.alloc(16 + 4 + name.length + 2);
    IHAVEOPT.copy(opt, 0);
    opt.writeUInt32BE(Opt.GO, 8);
    opt.writeUInt32BE(4 + name.length + 2, 12);
    opt.writeUInt32BE(name.length, 16);
    name.copy(opt, 20);
    opt.writeUInt16BE(0, 20 + name.length); // no information requests beyond the default
    sock.write(Buffer.concat([cflags, opt]));
    let size = -1;
    for (;;) {
      const h = await rd.read(20);
      if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error('bad option reply magic');
      const type = h.readUInt32BE(12);
      const len = h.readUInt32BE(16);
      const data = len ? await rd.read(len) : Buffer.alloc(0);
      if (type === Rep.ACK) break;
      if (type === Rep.INFO && data.readUInt16BE(0) === 0) size = Number(data.readBigUInt64BE(2));
      else if (type >= 2 ** 31) throw new Error(`NBD_OPT_GO refused (${type - 2 ** 31}): ${data.toString('utf8')}`);
    }
    if (size < 0) throw new Error('server sent no export size');
    return new NbdClient(sock, rd, size);
  }

  /** One NBD_CMD_READ; the reply's data (a view of the socket's bytes or one copy of them). */
  async read(offset: number, length: number, timeoutMs = 30_000): Promise<Buffer> {
    const handle = ++this.handle;
    const req = Buffer.alloc(28);
    req.writeUInt32BE(REQUEST_MAGIC, 0);
    req.writeUInt16BE(0, 4);
    req.writeUInt16BE(Cmd.READ, 6);
    req.writeBigUInt64BE(handle, 8);
    req.writeBigUInt64BE(BigInt(offset), 16);
    req.writeUInt32BE(length, 24);
    this.sock.write(req);
    const reply = async (): Promise<Buffer> => {
      const h = await this.rd.read(16);
      if (h.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new Error('bad reply magic');
      if (h.readBigUInt64BE(8) !== handle) throw new Error('reply for another request');
      const err = h.readUInt32BE(4);
      if (err) throw new Error(`read ${offset}+${length}: NBD error ${err}`);
      return this.rd.read(length);
    };
    // A timed-out connection is useless (the reply may still come): close it.
    return withTimeout(reply(), timeoutMs, `NBD read ${offset}+${length}`, () => this.sock.destroy());
  }

  close(): void {
    const disc = Buffer.alloc(28);
    disc.writeUInt32BE(REQUEST_MAGIC, 0);
    disc.writeUInt16BE(Cmd.DISC, 6);
    if (!this.sock.destroyed) this.sock.end(disc);
  }
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  [k: string]: unknown;
}

export class QmpClient {
  private buf = '';
  private pending: { resolve: (v: unknown) => void; reject: (e: Error) => void }[] = [];
  private readonly events: QmpEvent[] = [];
  private waiters: { pred: (e: QmpEvent) => boolean; resolve: (e: QmpEvent) => void }[] = [];
  private greeted!: Promise<void>;
  private closed: Error | null = null;

  private constructor(private readonly sock: net.Socket) {}

  static async connect(socketPath: string, timeoutMs = 10_000): Promise<QmpClient> {
    const sock = net.createConnection(socketPath);
    const c = new QmpClient(sock);
    c.greeted = new Promise((resolve, reject) => {
      sock.setEncoding('utf8').on('data', (d: string) => c.onData(d, resolve));
      const fail = (e: Error): void => {
        c.closed ??= e;
        reject(e);
        for (const p of c.pending.splice(0)) p.reject(e);
      };
      sock.on('error', fail);
      sock.on('close', () => fail(new Error('QMP connection closed')));
    });
    try {
      await withTimeout(c.greeted, timeoutMs, `QMP greeting on ${socketPath}`);
      await c.execute('qmp_capabilities', undefined, timeoutMs);
    } catch (err) {
      sock.destroy();
      throw err;
    }
    return c;
  }

  private onData(d: string, greeted: () => void): void {
    this.buf += d;
    let i;
    while ((i = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, i).trim();
      this.buf = this.buf.slice(i + 1);
      if (!line) continue;
      const msg = JSON.parse(line) as Record<string, unknown>;
      if ('QMP' in msg) greeted();
      else if ('event' in msg) {
        const ev = msg as QmpEvent;
        this.events.push(ev);
        this.waiters = this.waiters.filter((w) => (w.pred(ev) ? (w.resolve(ev), false) : true));
      } else if ('return' in msg) this.pending.shift()?.resolve(msg['return']);
      else if ('error' in msg) this.pending.shift()?.reject(new Error(`QMP error: ${JSON.stringify(msg['error'])}`));
    }
  }

  execute(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<unknown> {
    if (this.closed) return Promise.reject(this.closed);
    const p = new Promise<unknown>((resolve, reject) => this.pending.push({ resolve, reject }));
    this.sock.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
    return withTimeout(p, timeoutMs, `QMP ${command}`);
  }

  /** The first event (past or future) that matches, or a TimeoutError. */
  waitEvent(pred: (e: QmpEvent) => boolean, timeoutMs: number): Promise<QmpEvent> {
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    return withTimeout(new Promise<QmpEvent>((resolve) => this.waiters.push({ pred, resolve })), timeoutMs, 'QMP event');
  }

  close(): void {
    this.sock.destroy();
  }
}
