/**
 * An image origin reached with HTTP(S) Range GETs: a Swift temp URL, Glance's download
 * URL on its file store, or any web server. Responses are checked, not trusted:
 *
 *   206  Content-Range must start where we asked and end at or before where we asked
 *        (a shorter answer is continued with another request), and the body must carry
 *        exactly that many bytes;
 *   200  the origin ignored Range and sends the whole object: skip to the offset, take
 *        what we need, drop the connection;
 *   5xx, 408, 429, resets, stalls and truncated bodies are transient: retried with
 *        exponential backoff from where the data stopped, until no byte has arrived for
 *        `retryDeadlineMs`; anything else (403, 404, 416…) is permanent.
 *
 * Every answer must describe an object of the size learnt at open (Content-Range's total,
 * or a 200's length): anything else is another image, refused as DPU_ERR_SOURCE_MISMATCH.
 * `setUrl` swaps the URL (a renewed Swift temp URL) under running reads: each new request
 * uses the new one; when the identity came from the ETag, the first answer through the
 * new URL must carry the same ETag.
 *
 * Connections come from two keep-alive pools, one per priority, so a host's miss goes out
 * on a warm connection of its own (the size probe opens the first one) and never queues
 * behind a background batch, in the pool or on a socket. `maxConnections` bounds them;
 * background (hydration) reads may use at most `backgroundConnections`.
 *
 * Background requests yield to the host's. A background read is sent as requests of about
 * `backgroundRequestMs` of link time each, one after another, sized from the rate
 * background bytes arrive at (the link's share, share-meter.ts): the origin puts at most
 * that much per background connection ahead of a miss in the link's queue, whatever the
 * batch size (1 Gbit/s: 128 KiB requests; 10 Gbit/s: 1.2 MiB). And no background request
 * starts while a host's read is in flight or within `foregroundHoldMs` after one (see
 * backgroundTurn), so a host reading block after block has the link to itself: measured
 * across an emulated 1 Gbit/s link against nginx, a 64 KiB miss took 0.55 ms at the
 * median with hydration running, as with nothing else on the link, where a background
 * stream kept going during misses made it 1.6–2.8 ms. An origin slow to answer each
 * request (Swift's proxy) gets requests of at least twice its time to headers, so its
 * per-request cost does not eat the link.
 *
 * Requests go through http1.ts, whose body bytes land in `dest` straight from the socket
 * (neither axios, which cost the agent 22 MiB of resident memory on a DPU whose whole budget
 * is 64 MiB, nor node:http, which hands every 64 KiB of body to JavaScript as a new Buffer
 * to be copied again: most of the agent's CPU per hydrated byte).
 */
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';
import { DpuError } from './errors.js';
import { checkHeaders, Http1Pool, type BodyPlan, type Http1Response, type ResponseHead } from './http1.js';
import { redactUrl } from './redact.js';
import { ShareMeter } from './share-meter.js';
import type { FetchPriority, RemoteReadOptions, RemoteSource, RemoteSourceStats } from './source.js';

export interface HttpSourceOptions {
  url: string;
  /** Extra request headers (e.g. X-Auth-Token). Never logged. @default {} */
  headers?: Record<string, string>;
  /** Connections to the origin at most. @default 8 */
  maxConnections?: number;
  /** Of those, how many background reads may hold. @default 2 */
  backgroundConnections?: number;
  /** Give up on a read when no byte arrived for this long across retries. @default 30000 */
  retryDeadlineMs?: number;
  /** Abort an attempt when the body stops flowing for this long. @default 10000 */
  stallTimeoutMs?: number;
  /** Abort an attempt when response headers take longer than this. @default 10000 */
  headersTimeoutMs?: number;
  /**
   * Give up learning the image size (opening) after this long across retries. A daemon
   * answering an API call, or resuming its disks at start-up, cannot wait a whole
   * `retryDeadlineMs` for an origin that is down. @default retryDeadlineMs
   */
  probeDeadlineMs?: number;
  /**
   * Link time a background request carries at most, ms; 0 sends each background read as
   * one request. @default 1
   */
  backgroundRequestMs?: number;
  /**
   * Background requests start only once the host's reads have paused this long, ms (see
   * backgroundTurn). @default 1
   */
  foregroundHoldMs?: number;
  /** Replaces the identity derived from size and ETag (e.g. an image id and checksum). */
  identity?: string;
  /**
   * PEM CA certificate(s) an https origin must chain to, instead of the system's store
   * (which NODE_EXTRA_CA_CERTS extends for a whole program).
   */
  ca?: string | Buffer;
  log?: Logger;
}

const DEFAULTS = {
  headers: {} as Record<string, string>,
  maxConnections: 8,
  backgroundConnections: 2,
  backgroundRequestMs: 1,
  foregroundHoldMs: 1,
  retryDeadlineMs: 30_000,
  stallTimeoutMs: 10_000,
  headersTimeoutMs: 10_000,
};

/** Background request sizes: a multiple of this, between the bounds; the first before any rate is known. */
const BG_REQUEST_QUANTUM = 64 << 10;
/**
 * The smallest background request (100 Mbit/s and below). An origin slow to answer gets
 * larger ones from its measured latency (see measureLatency), whatever the link.
 */
const BG_REQUEST_MIN = 64 << 10;
const BG_REQUEST_MAX = 8 << 20;
const BG_REQUEST_FIRST = 1 << 20;

/**
 * The background request size for a link share of `bytesPerSecond`: `ms` of it, in
 * 64 KiB steps, from 64 KiB to 8 MiB.
 */
export function backgroundRequestBytes(bytesPerSecond: number, ms: number): number {
  const raw = (bytesPerSecond * ms) / 1000;
  return Math.min(BG_REQUEST_MAX, Math.max(BG_REQUEST_MIN, Math.round(raw / BG_REQUEST_QUANTUM) * BG_REQUEST_QUANTUM));
}

/** While the host reads, a background request may still start every this many request times (see backgroundTurn). */
const YIELD_GUARD = 10;
/**
 * A host's read of fewer bytes is small: its latency matters more than the link's use, and
 * background requests yield to it (see backgroundTurn). A boot's reads average ~32 KiB
 * (bench/deploy-modes.ts); a sequential reader's 1 MiB reads are large at any link rate (at
 * 10 Gbit/s, holding hydration back for them left 85% of the link idle).
 */
const SMALL_READ_BYTES = 256 << 10;

const BACKOFF_FIRST_MS = 50;
const BACKOFF_MAX_MS = 2_000;

/** Counts connections in use; foreground waiters are served before background ones. */
class ConnectionSlots {
  private inUse = { foreground: 0, background: 0 };
  private readonly waiting: Record<FetchPriority, (() => void)[]> = { foreground: [], background: [] };

  constructor(
    private readonly max: number,
    private readonly backgroundMax: number,
  ) {}

  get foreground(): number {
    return this.inUse.foreground;
  }

  get background(): number {
    return this.inUse.background;
  }

  private canTake(p: FetchPriority): boolean {
    const total = this.inUse.foreground + this.inUse.background;
    if (total >= this.max) return false;
    return p === 'foreground' || this.inUse.background < this.backgroundMax;
  }

  acquire(p: FetchPriority): Promise<void> | undefined {
    if (this.canTake(p) && (p === 'foreground' || this.waiting.foreground.length === 0)) {
      this.inUse[p]++;
      return undefined;
    }
    return new Promise((resolve) => this.waiting[p].push(resolve));
  }

  release(p: FetchPriority): void {
    this.inUse[p]--;
    for (const q of ['foreground', 'background'] as const) {
      while (this.waiting[q].length > 0 && this.canTake(q)) {
        this.inUse[q]++;
        this.waiting[q].shift()!();
      }
    }
  }
}

export class HttpSource implements RemoteSource {
  readonly size: number;
  readonly identity: string;
  description: string;
  private url: string;
  private headers: Record<string, string>;
  /** The ETag the identity was derived from (none when the caller named the identity). */
  private readonly etag: string | undefined;
  private checkEtagNext = false;
  private readonly opts: typeof DEFAULTS & HttpSourceOptions;
  /** One keep-alive pool per priority (see the top of the file). */
  private readonly pools: Record<FetchPriority, Http1Pool>;
  /** The rate background bytes arrive at (the link's share), and the request size it gives. */
  private readonly bgMeter = new ShareMeter();
  private bgRequest = BG_REQUEST_FIRST;
  /** Background answers whose head has come and whose body is still arriving (see measureLatency). */
  private bgFlowing = 0;
  /** The origin's least recent time to headers, ms (see measureLatency), and its ring. */
  private bgLatency = 0;
  private readonly latencySamples = new Array<number>(16).fill(Infinity);
  private latencyAt = 0;
  /** Background requests on the wire now (see backgroundTurn). */
  private bgActive = 0;
  /** Background requests waiting for their turn while the host reads, and the timer that asks again. */
  private turnWaiters: (() => void)[] = [];
  private turnTimer: NodeJS.Timeout | null = null;
  private turnAt = 0;
  /** The host's small reads in flight (see backgroundTurn), and when (performance.now()) the last one ended. */
  private smallReads = 0;
  private lastSmallReadAt = -Infinity;
  /** When the host's small reads last began after a pause, and when the last background request ended. */
  private busySince = -Infinity;
  private lastBackgroundAt = -Infinity;
  private readonly slots: ConnectionSlots;
  private readonly controllers = new Set<AbortController>();
  private readonly counters = { bytesFetched: 0, requests: 0, retries: 0, failures: 0 };
  private warnedNoRange = false;
  private closed = false;

  private constructor(opts: typeof DEFAULTS & HttpSourceOptions, pools: Record<FetchPriority, Http1Pool>, size: number, etag: string | undefined) {
    this.opts = opts;
    this.url = opts.url;
    this.headers = opts.headers;
    this.etag = opts.identity === undefined ? etag : undefined;
    this.pools = pools;
    this.size = size;
    this.identity = opts.identity ?? `http;size=${size}${etag ? `;etag=${etag}` : ''}`;
    this.description = redactUrl(opts.url);
    // At least one connection is the host's alone: background reads waiting for their turn
    // hold theirs (see backgroundTurn), and a host read must never queue behind them for one.
    this.slots = new ConnectionSlots(opts.maxConnections, Math.max(1, Math.min(opts.backgroundConnections, opts.maxConnections - 1)));
  }

  /** Learns the image size (HEAD, or a one-byte GET where HEAD is refused) and opens the pool. */
  static async open(options: HttpSourceOptions): Promise<HttpSource> {
    const opts = { ...DEFAULTS, ...options };
    let parsed: URL;
    try {
      parsed = new URL(opts.url);
    } catch {
      throw new DpuError('DPU_ERR_CONFIG', `source URL "${redactUrl(opts.url)}" is not a URL; give an http:// or https:// URL of the raw image`);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
      throw new DpuError('DPU_ERR_CONFIG', `source URL scheme "${parsed.protocol}" is not supported; give an http:// or https:// URL`);
    }
    checkHeaders(opts.headers);
    const poolOpts = { maxIdle: opts.maxConnections, ...(opts.ca ? { ca: opts.ca } : {}) };
    const pools = { foreground: new Http1Pool(poolOpts), background: new Http1Pool(poolOpts) };
    try {
      // Through the foreground pool: its connection stays open for the host's first miss.
      const { size, etag } = await probeSize(pools.foreground, opts);
      return new HttpSource(opts, pools, size, etag);
    } catch (err) {
      destroyPools(pools);
      throw err;
    }
  }

  /**
   * Reads from now on go to `url` (with `headers`, when given; else the current ones).
   * Requests already sent finish on the old URL; their retries use the new one.
   */
  setUrl(url: string, headers?: Record<string, string>): void {
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new DpuError('DPU_ERR_CONFIG', `source URL "${redactUrl(url)}" is not a URL`);
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') throw new DpuError('DPU_ERR_CONFIG', `source URL scheme "${parsed.protocol}" is not supported; give an http:// or https:// URL`);
    if (headers) checkHeaders(headers);
    this.url = url;
    if (headers) this.headers = { ...headers };
    this.description = redactUrl(url);
    this.checkEtagNext = this.etag !== undefined;
    this.opts.log?.debug({ source: this.description }, 'source URL replaced');
  }

  stats(): RemoteSourceStats {
    // A request resent on a new connection, after the reused one was closed or reset before
    // any byte of the answer, is a retry too (not slept for: see http1.ts).
    const resent = this.pools.foreground.resent + this.pools.background.resent;
    return { ...this.counters, retries: this.counters.retries + resent, foregroundInflight: this.slots.foreground, backgroundInflight: this.slots.background };
  }

  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    if (offset < 0 || offset + dest.length > this.size) {
      throw new DpuError('DPU_ERR_OUT_OF_RANGE', `range ${offset}+${dest.length} is outside the ${this.size}-byte image`);
    }
    this.assertOpen();
    const small = opts.priority === 'foreground' && dest.length < SMALL_READ_BYTES;
    if (small) {
      // A busy period begins: the guard counts from here (see backgroundTurn).
      const now = performance.now();
      if (this.smallReads++ === 0 && now >= this.lastSmallReadAt + this.opts.foregroundHoldMs) this.busySince = now;
    }
    if (opts.priority === 'foreground') this.bgMeter.suspend();
    const wait = this.slots.acquire(opts.priority);
    if (wait) await wait;
    try {
      const progress = { filled: 0 };
      let lastProgressAt = Date.now();
      let backoff = BACKOFF_FIRST_MS;
      while (progress.filled < dest.length) {
        this.assertOpen();
        if (opts.priority === 'background') {
          for (let turn = this.backgroundTurn(); turn; turn = this.backgroundTurn()) await turn;
          this.assertOpen();
        }
        const before = progress.filled;
        try {
          await this.attempt(offset, dest, progress, opts);
        } catch (err) {
          if (progress.filled > before) {
            // Some bytes arrived: the origin is alive; restart the clock and the backoff.
            lastProgressAt = Date.now();
            backoff = BACKOFF_FIRST_MS;
          }
          if (this.closed) throw new DpuError('DPU_ERR_SOURCE_CLOSED', undefined, { cause: err });
          const retryable = err instanceof DpuError ? err.retryable : true;
          if (!retryable) {
            this.counters.failures++;
            throw err;
          }
          // Give up only once no byte has arrived for the whole deadline: the last backoff
          // is cut short so that one more attempt lands at the deadline. (Giving up when
          // the next backoff would overshoot failed reads after half the deadline.)
          const waited = Date.now() - lastProgressAt;
          if (waited >= this.opts.retryDeadlineMs) {
            this.counters.failures++;
            throw new DpuError('DPU_ERR_SOURCE_DEADLINE', `${this.description} bytes ${offset + progress.filled}-${offset + dest.length - 1}, no byte for ${waited} ms: ${(err as Error).message}`, { cause: err });
          }
          this.counters.retries++;
          this.opts.log?.debug({ err: (err as Error).message, offset, filled: progress.filled, backoff }, 'retrying range read');
          await sleep(Math.min(backoff, this.opts.retryDeadlineMs - waited));
          backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
          continue;
        }
        if (progress.filled > before) {
          lastProgressAt = Date.now();
          backoff = BACKOFF_FIRST_MS;
        }
      }
    } finally {
      this.slots.release(opts.priority);
      if (opts.priority === 'foreground') this.bgMeter.resume(performance.now());
      if (small) {
        this.smallReads--;
        this.lastSmallReadAt = performance.now();
        this.wakeBackground();
      }
    }
  }

  /**
   * Background requests yield to the host's small reads (see the top): none starts while
   * one is in flight, nor within `foregroundHoldMs` after the last one ended (a host
   * reading block after block asks for the next well within that), so a miss waits at most
   * behind the background requests already on the wire. A large read (a sequential
   * reader's; SMALL_READ_BYTES or more) shares the link: its time is its bytes either way,
   * and the link stays full around it. Under small reads that never stop, one background
   * request at a time still goes, YIELD_GUARD request times after the last one ended:
   * hydration keeps about a tenth of the link. Resolves at once when the request may go;
   * else the promise ends when it is worth asking again.
   */
  private backgroundTurn(): Promise<void> | undefined {
    if (this.closed) return undefined;
    const now = performance.now();
    const quietAt = this.smallReads === 0 ? this.lastSmallReadAt + this.opts.foregroundHoldMs : Infinity;
    const guardAt = this.bgActive === 0 ? Math.max(this.lastBackgroundAt, this.busySince) + YIELD_GUARD * Math.max(1, this.requestMs) : Infinity;
    const at = Math.min(quietAt, guardAt);
    if (now >= at) return undefined;
    return new Promise((resolve) => {
      this.turnWaiters.push(resolve);
      if (at !== Infinity && (this.turnTimer === null || at < this.turnAt)) {
        if (this.turnTimer) clearTimeout(this.turnTimer);
        this.turnAt = at;
        this.turnTimer = setTimeout(() => this.wakeBackground(), at - now);
      }
    });
  }

  /**
   * A background request of someone else's over the same link (a peer's answer): it waits
   * for its turn and is counted as this source's own while it runs, so the host's reads
   * hold it back, and it holds back the next, as the origin's background requests do.
   */
  async asBackground<T>(request: () => Promise<T>): Promise<T> {
    for (let turn = this.backgroundTurn(); turn; turn = this.backgroundTurn()) await turn;
    this.bgActive++;
    try {
      return await request();
    } finally {
      this.lastBackgroundAt = performance.now();
      if (--this.bgActive === 0 && this.turnWaiters.length > 0) this.wakeBackground();
    }
  }

  /** Every background request waiting for its turn asks again (a read ended, or a timer). */
  private wakeBackground(): void {
    if (this.turnTimer) clearTimeout(this.turnTimer);
    this.turnTimer = null;
    const waiters = this.turnWaiters;
    this.turnWaiters = [];
    for (const w of waiters) w();
  }

  /** One GET for the unfilled tail of `dest`; advances `progress.filled` as bytes land. */
  private async attempt(offset: number, dest: Buffer, progress: { filled: number }, opts: RemoteReadOptions): Promise<void> {
    const start = offset + progress.filled;
    // A background read goes out in requests of ~backgroundRequestMs of link time (see the
    // top); not to an origin that ignores Range, which would resend the object each time.
    const sized = opts.priority === 'background' && this.opts.backgroundRequestMs > 0 && !this.warnedNoRange;
    const end = sized ? Math.min(offset + dest.length, start + this.bgRequest) - 1 : offset + dest.length - 1;
    if (opts.priority === 'background') this.bgActive++;
    // Background answers already flowing queue ahead of this one on the link (an answer
    // counts from its head: before, the origin has not sent its bytes).
    const alone = this.bgFlowing === 0;
    let flowing = false;
    const controller = new AbortController();
    this.controllers.add(controller);
    const { headersTimeoutMs, stallTimeoutMs } = this.opts;
    // Until the head: the headers timeout; then the body's stall timeout, renewed by each read.
    let timer = setTimeout(() => controller.abort(new DpuError('DPU_ERR_SOURCE_TRANSIENT', `no response headers within ${headersTimeoutMs} ms`)), headersTimeoutMs);
    this.counters.requests++;
    const base = progress.filled;
    let ranged = 0; // bytes a 206 announced
    const sentAt = performance.now();
    const onHead = (head: ResponseHead): BodyPlan => {
      clearTimeout(timer);
      timer = setTimeout(() => controller.abort(new DpuError('DPU_ERR_SOURCE_TRANSIENT', `body stalled for ${stallTimeoutMs} ms`)), stallTimeoutMs);
      if (sized) {
        const now = performance.now();
        if (alone) this.measureLatency(now - sentAt);
        flowing = true;
        this.bgFlowing++;
        // The link's time starts here: the wait for the head was the round trip's and the
        // origin's (see ShareMeter).
        this.bgMeter.begin(now);
      }
      const h = head.headers;
      const range = head.status === 206 ? parseContentRange(h['content-range']) : null;
      if (head.status === 206 || head.status === 200) {
        this.checkSameObject(head.status === 206 ? (range?.total ?? null) : Number(h['content-length'] ?? NaN), h['etag']);
      }
      if (head.status === 206) {
        if (!range || range.first !== start || range.last > end || range.last < range.first) {
          throw new DpuError('DPU_ERR_SOURCE_BAD_RANGE', `asked for bytes ${start}-${end}, got Content-Range "${String(h['content-range'])}"`);
        }
        ranged = range.last - range.first + 1;
        const length = h['content-length'];
        if (length !== undefined && Number(length) !== ranged) {
          throw new DpuError('DPU_ERR_SOURCE_BAD_RANGE', `Content-Range says ${ranged} bytes, Content-Length says ${String(length)}`);
        }
        return { kind: 'into', dest: dest.subarray(base, base + ranged), skip: 0, exact: true };
      }
      if (head.status === 200) {
        if (!this.warnedNoRange) {
          this.warnedNoRange = true;
          this.opts.log?.warn({ source: this.description }, 'origin ignored a Range request and sent the whole object; reads will be slow');
        }
        return { kind: 'into', dest: dest.subarray(base, base + (end - start + 1)), skip: start, exact: false };
      }
      const transient = head.status >= 500 || head.status === 408 || head.status === 429;
      throw new DpuError(
        transient ? 'DPU_ERR_SOURCE_TRANSIENT' : 'DPU_ERR_SOURCE_HTTP_STATUS',
        `HTTP ${head.status} for bytes ${start}-${end} of ${this.description}${transient ? '' : statusAdvice(head.status)}`,
      );
    };
    // Every read of the answer renews the stall timer, skipped bytes of a 200 included.
    const onActivity = (): void => void timer.refresh();
    const onBody = (filled: number): void => {
      const now = base + filled;
      const delta = now - progress.filled;
      if (sized) this.bgMeter.bytes(delta, performance.now());
      this.counters.bytesFetched += delta;
      progress.filled = now;
      opts.onProgress?.(now);
    };
    try {
      await send(this.pools[opts.priority], 'GET', this.url, { ...this.headers, Range: `bytes=${start}-${end}` }, controller.signal, onHead, onBody, onActivity);
    } catch (err) {
      throw transportError(err, controller);
    } finally {
      clearTimeout(timer);
      this.controllers.delete(controller);
      if (flowing) this.bgFlowing--;
      if (sized) {
        if (flowing) this.bgMeter.end(performance.now());
        this.resizeBackground();
      }
      if (opts.priority === 'background') {
        this.lastBackgroundAt = performance.now(); // the guard counts from the end (see backgroundTurn)
        if (--this.bgActive === 0 && this.turnWaiters.length > 0) this.wakeBackground();
      }
    }
  }

  /**
   * A background request took `ms` to its headers with no other background answer flowing
   * (sampled only then: an answer flowing ahead of this one in the link's queue would pass
   * for a slow origin, and grow the very requests that make the queue). The least of the
   * last 16 is the origin's cost per request; requests are made at least twice that long
   * in link time, so per-request costs stay under a third of the time (an origin that
   * answers in 0.2 ms gets 1 ms requests; Swift's proxy, at several ms, larger ones: its
   * throughput matters more than the queue it adds).
   */
  private measureLatency(ms: number): void {
    const samples = this.latencySamples;
    samples[this.latencyAt++ % samples.length] = ms;
    this.bgLatency = Math.min(...samples);
  }

  /** Link time a background request carries now, ms (see the top). */
  private get requestMs(): number {
    return Math.max(this.opts.backgroundRequestMs, 2 * this.bgLatency);
  }

  /** The background request size from the link's share and the origin's latency (see the top). */
  private resizeBackground(): void {
    const rate = this.bgMeter.rate;
    if (rate > 0) this.bgRequest = backgroundRequestBytes(rate, this.requestMs);
  }

  /** Background requests on the wire now (each holds a connection of the background pool). */
  get backgroundRequests(): number {
    return this.bgActive;
  }

  /** The size background requests have now (see the top of the file). */
  get backgroundRequestSize(): number {
    return this.opts.backgroundRequestMs > 0 ? this.bgRequest : 0;
  }

  /** Refuses an answer about another object: another size, or (once after setUrl) another ETag. */
  private checkSameObject(total: number | null, etag: unknown): void {
    if (total !== null && Number.isSafeInteger(total) && total !== this.size) {
      throw new DpuError('DPU_ERR_SOURCE_MISMATCH', `${this.description} is ${total} bytes now, not ${this.size}: the image changed or the URL names another one`);
    }
    if (this.checkEtagNext && typeof etag === 'string' && etag) {
      this.checkEtagNext = false;
      if (normaliseEtag(etag) !== normaliseEtag(this.etag!)) throw new DpuError('DPU_ERR_SOURCE_MISMATCH', `${this.description} has ETag ${etag}, not ${this.etag}: the new URL names another object`);
    }
  }

  private assertOpen(): void {
    if (this.closed) throw new DpuError('DPU_ERR_SOURCE_CLOSED');
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.wakeBackground(); // waiting background reads see the source closed
    for (const c of this.controllers) c.abort(new DpuError('DPU_ERR_SOURCE_CLOSED'));
    destroyPools(this.pools);
  }
}

function destroyPools(pools: Record<FetchPriority, Http1Pool>): void {
  for (const p of Object.values(pools)) p.destroy();
}

async function probeSize(pool: Http1Pool, opts: typeof DEFAULTS & HttpSourceOptions): Promise<{ size: number; etag: string | undefined }> {
  const deadline = Date.now() + (opts.probeDeadlineMs ?? opts.retryDeadlineMs);
  let backoff = BACKOFF_FIRST_MS;
  for (;;) {
    try {
      return await probeOnce(pool, opts, Math.max(1, Math.min(opts.headersTimeoutMs, deadline - Date.now())));
    } catch (err) {
      const retryable = err instanceof DpuError ? err.retryable : false;
      if (!retryable || Date.now() + backoff > deadline) throw err;
      await sleep(backoff);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }
}

async function probeOnce(pool: Http1Pool, opts: typeof DEFAULTS & HttpSourceOptions, timeoutMs: number): Promise<{ size: number; etag: string | undefined }> {
  const where = redactUrl(opts.url);
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const { head } = await send(pool, 'HEAD', opts.url, opts.headers, controller.signal, () => ({ kind: 'discard' })).catch((err) => {
      throw transportError(err, controller);
    });
    const etag = stringHeader(head.headers['etag']);
    const length = Number(head.headers['content-length']);
    if (head.status >= 200 && head.status < 300 && Number.isSafeInteger(length) && length > 0) return { size: length, etag };
    if (head.status >= 500 || head.status === 408 || head.status === 429) {
      throw new DpuError('DPU_ERR_SOURCE_TRANSIENT', `HEAD ${where}: HTTP ${head.status}`);
    }
    if (head.status === 404 || head.status === 401) {
      throw new DpuError('DPU_ERR_SOURCE_HTTP_STATUS', `HEAD ${where}: HTTP ${head.status}${statusAdvice(head.status)}`);
    }
    // HEAD refused (Glance answers 405 on /file; a temp URL may allow GET only) or no
    // length: ask for one byte instead, whose answer is definitive.
    const { head: res } = await send(pool, 'GET', opts.url, { ...opts.headers, Range: 'bytes=0-0' }, controller.signal, (h) =>
      h.status === 206 ? { kind: 'into', dest: Buffer.allocUnsafe(1), skip: 0, exact: false } : { kind: 'close' },
    ).catch((err) => {
      throw transportError(err, controller);
    });
    if (res.status === 206) {
      const range = parseContentRange(res.headers['content-range']);
      if (range?.total) return { size: range.total, etag: stringHeader(res.headers['etag']) ?? etag };
      throw new DpuError('DPU_ERR_SOURCE_BAD_RANGE', `GET ${where}: 206 without a total size in Content-Range "${String(res.headers['content-range'])}"`);
    }
    const total = Number(res.headers['content-length']);
    if (res.status === 200 && Number.isSafeInteger(total) && total > 0) return { size: total, etag: stringHeader(res.headers['etag']) ?? etag };
    const transient = res.status >= 500 || res.status === 408 || res.status === 429;
    throw new DpuError(transient ? 'DPU_ERR_SOURCE_TRANSIENT' : 'DPU_ERR_SOURCE_HTTP_STATUS', `GET ${where}: HTTP ${res.status}, cannot learn the image size${transient ? '' : statusAdvice(res.status)}`);
  } finally {
    clearTimeout(timer);
  }
}

function normaliseEtag(e: string): string {
  return e.replace(/^W\//, '').replace(/"/g, '');
}

function stringHeader(v: unknown): string | undefined {
  return typeof v === 'string' && v.length > 0 ? v : undefined;
}

function statusAdvice(status: number): string {
  switch (status) {
    case 401:
    case 403:
      return ' (the URL or token is not accepted: a Swift temp URL may have expired or its key changed)';
    case 404:
      return ' (no such object: check the image URL)';
    case 416:
      return ' (the origin says the range is outside the object: the image changed size)';
    default:
      return '';
  }
}

export function parseContentRange(v: unknown): { first: number; last: number; total: number | null } | null {
  if (typeof v !== 'string') return null;
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(v.trim());
  if (!m) return null;
  return { first: Number(m[1]), last: Number(m[2]), total: m[3] === '*' ? null : Number(m[3]) };
}

const REDIRECTS = new Set([301, 302, 303, 307, 308]);
const MAX_REDIRECTS = 5;

/**
 * One request through a keep-alive pool; resolves once the answer's body went where
 * `onHead` said. Redirects are followed (at most 5, headers kept: an origin's redirect
 * stays within the deployment it was configured for); their bodies are dropped and
 * `onHead` sees the final answer only.
 */
async function send(
  pool: Http1Pool,
  method: 'GET' | 'HEAD',
  url: string,
  headers: Record<string, string>,
  signal: AbortSignal,
  onHead: (head: ResponseHead) => BodyPlan,
  onBody?: (filled: number) => void,
  onActivity?: () => void,
): Promise<Http1Response> {
  let u = new URL(url);
  for (let redirects = 0; ; redirects++) {
    let location: string | undefined;
    const res = await pool.request(u, {
      method,
      headers,
      signal,
      onHead: (head) => {
        if (REDIRECTS.has(head.status) && head.headers['location']) {
          location = head.headers['location'];
          return { kind: 'discard' };
        }
        return onHead(head);
      },
      ...(onBody ? { onBody } : {}),
      ...(onActivity ? { onActivity } : {}),
    });
    if (location === undefined) return res;
    if (redirects >= MAX_REDIRECTS) throw new DpuError('DPU_ERR_SOURCE_HTTP_STATUS', `more than ${MAX_REDIRECTS} redirects from ${redactUrl(url)}`);
    u = new URL(location, u);
    if (u.protocol !== 'http:' && u.protocol !== 'https:') {
      throw new DpuError('DPU_ERR_SOURCE_HTTP_STATUS', `${redactUrl(url)} redirects to a ${u.protocol} URL; only http and https are followed`);
    }
  }
}

function transportError(err: unknown, controller: AbortController): DpuError {
  if (controller.signal.aborted && controller.signal.reason instanceof DpuError) return controller.signal.reason;
  if (err instanceof DpuError) return err;
  const e = err as { code?: string; message?: string };
  return new DpuError('DPU_ERR_SOURCE_TRANSIENT', `${e.code ?? 'error'}: ${e.message ?? String(err)}`, { cause: err });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
