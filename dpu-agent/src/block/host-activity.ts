/**
 * The host's requests in flight on this agent, across all its disks, and a way for work
 * that must not slow them to wait for a pause: what serving peers yields to (issue #15:
 * "peers never slow the host's own reads"; docs/fleet.md).
 *
 * Counted by a backend decorator (`countHostRequests`), the nbdkit-filter way: the NBD
 * server knows nothing of it. A request counts from its backend call until that call
 * settles; one answered at once (a read of local regions: one pread on the event loop)
 * counts as ending then. NBD_CMD_CACHE (a prefetch the host does not wait for) does not
 * count.
 *
 * The host is *busy* while a request is in flight and for `quietMs` after the last one
 * ended: a host reading at queue depth 1 sends its next request a few microseconds after
 * each reply, and a gap that short is not a pause. Waiters (`whenQuiet`) are let go once
 * the host has been quiet that long, or after their own limit — so a host that never
 * pauses still lets each of them through at that pace (the floor peers get).
 */
import type { BlockBackend, MaybePromise, WriteZeroesOptions } from './backend.js';

/** How long the host must have had no request in flight before it counts as quiet, ms. */
export const HOST_QUIET_MS = 1;

export class HostActivity {
  private inflight = 0;
  private lastEnd = -Infinity;
  private readonly waiters = new Set<() => void>();
  private timer: NodeJS.Timeout | null = null;
  /** Waits that found the host busy, and the ms they waited in all: for the metrics. */
  holds = 0;
  heldMs = 0;

  constructor(readonly quietMs = HOST_QUIET_MS) {}

  begin(): void {
    this.inflight++;
  }

  end(): void {
    if (this.inflight > 0) this.inflight--;
    if (this.inflight > 0) return;
    this.touch();
  }

  /**
   * A request that began and ended at once (or the last one in flight ended): the quiet
   * time starts over. On the host's fastest path: a timer already set looks again when it
   * fires (and waits out what is left), so none is set anew here.
   */
  touch(): void {
    this.lastEnd = performance.now();
    if (this.inflight === 0 && this.waiters.size > 0 && this.timer === null) this.arm(this.quietMs);
  }

  /** Waits not over yet. */
  get waiting(): number {
    return this.waiters.size;
  }

  /** A request in flight, or one ended less than quietMs ago. */
  get busy(): boolean {
    return this.inflight > 0 || performance.now() - this.lastEnd < this.quietMs;
  }

  /**
   * null when the host is quiet (go on at once); else a promise that settles once it has
   * been quiet for quietMs, or after `maxMs`, or when `signal` aborts, whichever comes
   * first. Never rejects.
   */
  whenQuiet(maxMs: number, signal?: AbortSignal): Promise<void> | null {
    if (maxMs <= 0 || !this.busy) return null;
    this.holds++;
    const since = performance.now();
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(limit);
        signal?.removeEventListener('abort', done);
        this.waiters.delete(done);
        this.heldMs += performance.now() - since;
        resolve();
      };
      const limit = setTimeout(done, maxMs);
      // Whoever waits went away (a peer's answer destroyed): no timer left behind.
      signal?.addEventListener('abort', done, { once: true });
      this.waiters.add(done);
      if (this.inflight === 0 && this.timer === null) this.arm(this.quietMs - (performance.now() - this.lastEnd));
    });
  }

  /** Lets every waiter go once the host has been quiet for quietMs (a request that starts meanwhile defers it: end() arms again). */
  private arm(ms: number): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.inflight > 0) return;
      const left = this.quietMs - (performance.now() - this.lastEnd);
      if (left > 0) return this.arm(left);
      for (const w of [...this.waiters]) w();
    }, Math.max(0, ms));
  }
}

/**
 * `backend` with its host requests counted in `activity` (every call but cache, which the
 * host does not wait for); otherwise the same backend.
 */
export function countHostRequests(backend: BlockBackend, activity: HostActivity): BlockBackend {
  const counted = <T>(r: MaybePromise<T>): MaybePromise<T> => {
    if (r === undefined) {
      activity.touch();
      return r;
    }
    activity.begin();
    const end = (): void => activity.end();
    (r as Promise<T>).then(end, end);
    return r;
  };
  return {
    get size() {
      return backend.size;
    },
    get capabilities() {
      return backend.capabilities;
    },
    get preferredBlockSize() {
      return backend.preferredBlockSize;
    },
    read: (offset: number, dest: Buffer) => counted(backend.read(offset, dest)),
    write: (offset: number, chunks: readonly Buffer[], length: number, fua: boolean) => counted(backend.write(offset, chunks, length, fua)),
    flush: () => counted(backend.flush()),
    trim: (offset: number, length: number, fua: boolean) => counted(backend.trim(offset, length, fua)),
    writeZeroes: (offset: number, length: number, fua: boolean, opts?: WriteZeroesOptions) => counted(backend.writeZeroes(offset, length, fua, opts)),
    cache: (offset: number, length: number) => backend.cache(offset, length),
    close: () => backend.close(),
  };
}
