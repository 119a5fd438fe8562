/**
 * The test suite's own HTTP image origin: serves one file with Range support and injects
 * faults on request, so tests can see the disk answer correct bytes or a clean error
 * under every failure an origin can produce. It also counts what it served, can cap its
 * rate, and can hold back a byte range (`hold`): for tests that must see hydration still
 * running at some event, whatever the speed of the machine — a copy that cannot fetch a
 * range cannot finish, however much time passes.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export type Fault =
  | '500' // 500 before any byte
  | '503' // 503
  | 'reset' // socket destroyed before the headers
  | 'truncate' // 206 headers, half the body, then the connection is destroyed
  | 'full200' // ignore Range: 200 with the whole object
  | 'wrong-range' // 206 with a Content-Range that starts elsewhere
  | 'stall' // 206 headers and part of the body, then silence (connection kept open)
  | 'corrupt'; // 206 with the right range and length, one byte flipped

export const FAULT_KINDS: readonly Fault[] = ['500', '503', 'reset', 'truncate', 'full200', 'wrong-range', 'stall', 'corrupt'];

/** Decides the fault (if any) of one ranged GET for bytes start..end (inclusive). */
export type FaultPlan = (req: { start: number; end: number }) => Fault | undefined;

/**
 * How an outage looks from outside: `reset` accepts connections and resets them at once;
 * `refuse` stops listening (connect() fails with ECONNREFUSED) and listens again on the
 * same port when it is over.
 */
export type OutageMode = 'reset' | 'refuse';

export interface OriginOptions {
  file: string;
  /** Cap on the bytes/s of every response body together; 0 = none. */
  rate?: number;
  /** Faults applied to the next GET requests, one per request, in order. */
  faults?: Fault[];
  /** Asked for a fault for every ranged GET once `faults` is used up (see randomFaults). */
  plan?: FaultPlan;
  /** Answer 404 to everything (a missing image). */
  notFound?: boolean;
  /** Omit ETag. */
  noEtag?: boolean;
  /** Time to the head of every ranged answer, ms: an origin slow to answer (a Swift proxy). */
  answerDelayMs?: number;
}

export interface OriginStats {
  requests: number;
  rangeRequests: number;
  bytesSent: number;
  faultsInjected: number;
  /** Injected faults by kind. */
  byKind: Partial<Record<Fault, number>>;
  /** Requests reset or refused because the origin was down (outages are not in faultsInjected). */
  refused: number;
  /** Responses cut off mid-body when an outage began. */
  cutByOutage: number;
  /** Ranged GETs held back by `hold` (answered at `release`, if their client still waits). */
  held: number;
}

/** Emits `held` each time `hold` holds back a request (tests wait for it, not for time). */
export class TestOrigin extends EventEmitter<{ held: [] }> {
  readonly stats: OriginStats = { requests: 0, rangeRequests: 0, bytesSent: 0, faultsInjected: 0, byKind: {}, refused: 0, cutByOutage: 0, held: 0 };
  readonly faults: Fault[];
  private readonly server: http.Server;
  private readonly sockets = new Set<Socket>();
  private readonly size: number;
  private readonly fd: number;
  private readonly opts: OriginOptions;
  private nextSendAt = 0;
  private down = false;
  private listening: { host: string; port: number } | null = null;
  private holding: { from: number; to: number } | null = null;
  private readonly waiting: (() => void)[] = [];
  /** Responses whose body is still being sent (an outage cuts them). */
  private readonly sending = new Set<http.ServerResponse>();
  url = '';

  constructor(opts: OriginOptions) {
    super();
    this.opts = opts;
    this.faults = [...(opts.faults ?? [])];
    this.fd = fs.openSync(opts.file, 'r');
    this.size = fs.fstatSync(this.fd).size;
    this.server = http.createServer((req, res) => this.handle(req, res));
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  /** Listens on loopback by default; the lab binds it inside a network namespace of its own. */
  async start(host = '127.0.0.1', port = 0): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(port, host, resolve));
    const bound = (this.server.address() as AddressInfo).port;
    this.listening = { host, port: bound };
    this.url = `http://${host}:${bound}/images/disk.raw`;
    return this.url;
  }

  /**
   * While down, every connection is reset at once (an origin outage); existing ones too.
   * With `refuse`, the origin also stops listening until it comes back up.
   */
  async setDown(down: boolean, mode: OutageMode = 'reset'): Promise<void> {
    if (down === this.down) return;
    this.down = down;
    if (down) {
      this.stats.cutByOutage += this.sending.size;
      if (mode === 'refuse' && this.listening) {
        const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
        for (const s of this.sockets) s.destroy();
        await closed;
      } else {
        for (const s of this.sockets) s.destroy();
      }
    } else if (!this.server.listening && this.listening) {
      const { host, port } = this.listening;
      await new Promise<void>((resolve, reject) => {
        this.server.once('error', reject);
        this.server.listen(port, host, () => {
          this.server.off('error', reject);
          resolve();
        });
      });
    }
  }

  setRate(bytesPerSecond: number): void {
    this.opts.rate = bytesPerSecond;
  }

  /**
   * Holds back every ranged GET that overlaps bytes [from, to): no header is sent until
   * `release()`. Regions there cannot become local meanwhile, so the disk cannot be
   * complete; choose a range the host never reads (and, because the disk coalesces its
   * background reads, at least a batch away from anything the host reads), or its reads hang.
   */
  hold(from: number, to: number): void {
    this.holding = { from, to };
  }

  /** Answers the held requests whose clients still wait (retries of abandoned ones come anew) and holds nothing more. */
  release(): void {
    this.holding = null;
    for (const answer of this.waiting.splice(0)) answer();
  }

  async stop(): Promise<void> {
    this.waiting.length = 0;
    for (const s of this.sockets) s.destroy();
    if (this.server.listening) await new Promise<void>((resolve) => this.server.close(() => resolve()));
    fs.closeSync(this.fd);
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.stats.requests++;
    if (this.down) {
      this.stats.refused++;
      req.socket.destroy();
      return;
    }
    if (this.opts.notFound) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('no such image\n');
      return;
    }
    const etag: Record<string, string> = this.opts.noEtag ? {} : { etag: '"test-image-v1"' };
    if (req.method === 'HEAD') {
      res.writeHead(200, { 'content-length': this.size, 'accept-ranges': 'bytes', ...etag }).end();
      return;
    }
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    let start = 0;
    let end = this.size - 1;
    let ranged = false;
    if (m) {
      start = Number(m[1]);
      end = Math.min(Number(m[2]), this.size - 1);
      ranged = true;
      if (start >= this.size || start > end) {
        res.writeHead(416, { 'content-range': `bytes */${this.size}` }).end();
        return;
      }
      this.stats.rangeRequests++;
    }
    const h = this.holding;
    if (ranged && h && start < h.to && end >= h.from) {
      this.stats.held++;
      this.waiting.push(() => {
        if (!res.destroyed && !req.socket.destroyed) this.answer(req, res, start, end, ranged, etag);
      });
      this.emit('held');
      return;
    }
    const delay = ranged ? (this.opts.answerDelayMs ?? 0) : 0;
    if (delay > 0) setTimeout(() => !res.destroyed && this.answer(req, res, start, end, ranged, etag), delay);
    else this.answer(req, res, start, end, ranged, etag);
  }

  private answer(req: http.IncomingMessage, res: http.ServerResponse, start: number, end: number, ranged: boolean, etag: Record<string, string>): void {
    const fault = this.faults.length > 0 ? this.faults.shift() : ranged ? this.opts.plan?.({ start, end }) : undefined;
    if (fault) {
      this.stats.faultsInjected++;
      this.stats.byKind[fault] = (this.stats.byKind[fault] ?? 0) + 1;
    }
    switch (fault) {
      case '500':
      case '503':
        res.writeHead(Number(fault), { 'content-type': 'text/plain' }).end('injected failure\n');
        return;
      case 'reset':
        req.socket.destroy();
        return;
      case 'full200':
        ranged = false;
        start = 0;
        end = this.size - 1;
        break;
      default:
        break;
    }
    const length = end - start + 1;
    if (ranged) {
      const shown = fault === 'wrong-range' ? start + 512 : start;
      res.writeHead(206, { 'content-range': `bytes ${shown}-${shown + length - 1}/${this.size}`, 'content-length': length, ...etag });
    } else {
      res.writeHead(200, { 'content-length': this.size, ...etag });
    }
    const cut = fault === 'truncate' || fault === 'stall' ? Math.floor(length / 2) : length;
    this.sending.add(res);
    this.sendBody(res, start, cut, fault === 'corrupt').then(
      () => {
        this.sending.delete(res);
        if (fault === 'truncate') res.socket?.destroy();
        else if (fault === 'stall') return; // keep the socket open and silent
        else res.end();
      },
      () => {
        this.sending.delete(res);
        res.destroy();
      },
    );
  }

  private async sendBody(res: http.ServerResponse, start: number, length: number, corrupt: boolean): Promise<void> {
    const chunk = 64 << 10;
    let sent = 0;
    while (sent < length) {
      if (res.destroyed) throw new Error('client went away');
      const n = Math.min(chunk, length - sent);
      const buf = Buffer.allocUnsafe(n);
      fs.readSync(this.fd, buf, 0, n, start + sent);
      if (corrupt && sent === 0) buf[0] = buf[0]! ^ 0xff;
      await this.pace(n);
      this.stats.bytesSent += n;
      sent += n;
      if (!res.write(buf)) await new Promise((r) => res.once('drain', r));
    }
  }

  /** A shared token bucket: all responses together stay under the rate. */
  private async pace(n: number): Promise<void> {
    const rate = this.opts.rate ?? 0;
    if (rate <= 0) return;
    const now = Date.now();
    const at = Math.max(now, this.nextSendAt);
    this.nextSendAt = at + (n / rate) * 1000;
    if (at > now) await new Promise((r) => setTimeout(r, at - now));
  }
}

export interface RandomFaultOptions {
  /** Chance that a ranged GET gets a fault. */
  probability: number;
  /** The kinds drawn from, uniformly. @default FAULT_KINDS without corrupt */
  kinds?: readonly Fault[];
  /** A random number in [0, 1): a seeded one makes a run replayable. */
  random: () => number;
  /**
   * Faults in a row for one read (requests ending at the same byte: a read's retries keep
   * their end), so that no read meets more faults in a row than its retry deadline allows.
   * @default 3
   */
  maxInARow?: number;
  /** Region size, for `maxCorruptPerRegion`. */
  regionSize?: number;
  /**
   * Corrupt answers at most per region (the disk fails a host read after three bad
   * fetches of its region, so two keep every read correct). @default 2
   */
  maxCorruptPerRegion?: number;
}

/**
 * A FaultPlan drawing faults at random, bounded so that every read must still succeed:
 * what an origin that misbehaves often, but never for longer than the retry deadline,
 * looks like.
 */
export function randomFaults(o: RandomFaultOptions): FaultPlan {
  const kinds = o.kinds ?? FAULT_KINDS.filter((k) => k !== 'corrupt');
  const maxInARow = o.maxInARow ?? 3;
  const maxCorrupt = o.maxCorruptPerRegion ?? 2;
  const inARow = new Map<number, number>();
  const corrupted = new Map<number, number>();
  return ({ start, end }) => {
    const n = inARow.get(end) ?? 0;
    if (n >= maxInARow || o.random() >= o.probability) {
      inARow.delete(end);
      return undefined;
    }
    let kind = kinds[Math.floor(o.random() * kinds.length)]!;
    if (kind === 'corrupt') {
      const r = Math.floor(start / (o.regionSize ?? 1));
      const c = corrupted.get(r) ?? 0;
      if (c >= maxCorrupt) kind = '503';
      else corrupted.set(r, c + 1);
    }
    inARow.set(end, n + 1);
    return kind;
  };
}
