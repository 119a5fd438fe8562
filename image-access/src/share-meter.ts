/**
 * The rate background bytes arrive at while background requests have the link to
 * themselves: the link's rate, as far as hydration can use it. HttpSource sizes its
 * background requests from it.
 *
 * Measured over windows of at least `windowMs` of busy time: time during which at least
 * one background answer was flowing (from its head to its end) and nothing else was
 * (`suspend` while the host's reads are). Busy time adds up across requests, so one stream
 * of short requests is measured too; time with no answer flowing is left out (a pause in
 * hydration is not a slow link), and so is a link the host is using. Each window's rate is
 * bytes ÷ busy time; the estimate is the median of the last windows.
 *
 * Why from the head, not from the request's send: the wait for the head is the round trip
 * and the origin's time, not the link's. Counted, it made the estimate fall with the
 * request size (shorter requests spend more of their time waiting, read as a slower link,
 * which shortened the requests again): across an emulated 10 Gbit/s link, 200–550 MB/s
 * estimated on 1,250, and hydration at a fifth of the link.
 *
 * Why not the rate of each request's body: bytes that waited in the socket buffer while
 * the event loop was busy are read in one go, so a single body can look many times faster
 * than the link (measured: 2,988 MB/s "seen" on a 125 MB/s link, which made 8 MiB
 * requests out of what should have been 128 KiB ones). Over a window, bytes that arrived
 * during a stall are counted against the stall's time too, and a median drops the window
 * that caught a backlog anyway (one that began as the host's read ended, say).
 */
export interface ShareMeterOptions {
  /** Shortest window, ms of busy time. @default 20 */
  windowMs?: number;
  /** Windows the median is taken over. @default 7 */
  windows?: number;
}

export class ShareMeter {
  private readonly windowMs: number;
  private readonly samples: number[];
  private at = 0;
  private filled = 0;
  private active = 0;
  private suspended = 0;
  /** Busy time of the window before the current busy stretch, ms, and when that stretch began. */
  private busyMs = 0;
  private busySince = 0;
  private windowBytes = 0;
  private estimate = 0;

  constructor(opts: ShareMeterOptions = {}) {
    this.windowMs = opts.windowMs ?? 20;
    this.samples = new Array<number>(Math.max(1, opts.windows ?? 7)).fill(0);
  }

  /** Bytes per second; 0 until a first window closed. */
  get rate(): number {
    return this.estimate;
  }

  /** A background answer began to flow at `now` (ms): its head arrived. */
  begin(now: number): void {
    if (this.active++ === 0 && this.suspended === 0) this.busySince = now;
  }

  /**
   * Something else shares the link from now on (the host's reads): the window in progress
   * is dropped and nothing is measured until `resume`. Calls nest.
   */
  suspend(): void {
    this.suspended++;
    this.drop();
  }

  /** The link is the background's alone again from `now`. */
  resume(now: number): void {
    if (this.suspended > 0 && --this.suspended === 0) {
      this.drop();
      this.busySince = now;
    }
  }

  /** `n` bytes of a background answer arrived at `now`. */
  bytes(n: number, now: number): void {
    if (this.active === 0 || this.suspended > 0) return;
    this.windowBytes += n;
    const busy = this.busyMs + (now - this.busySince);
    if (busy >= this.windowMs) {
      this.close(busy);
      this.busySince = now;
    }
  }

  /** A background answer that began to flow ended at `now` (finished, failed or aborted). */
  end(now: number): void {
    if (this.active === 0) return;
    if (--this.active > 0 || this.suspended > 0) return;
    // No answer flowing from here on: the stretch's time counts, the gap to the next does not.
    this.busyMs += now - this.busySince;
    if (this.busyMs >= this.windowMs) this.close(this.busyMs);
  }

  private drop(): void {
    this.busyMs = 0;
    this.windowBytes = 0;
  }

  private close(busy: number): void {
    this.samples[this.at++ % this.samples.length] = (this.windowBytes / busy) * 1000;
    this.filled = Math.min(this.filled + 1, this.samples.length);
    const sorted = this.samples.slice(0, this.filled).sort((a, b) => a - b);
    this.estimate = sorted[(sorted.length - 1) >> 1]!; // the lower middle: a backlog window is high
    this.drop();
  }
}
