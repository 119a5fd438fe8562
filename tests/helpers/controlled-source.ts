/**
 * A remote source the test drives by hand: every range read waits until the test delivers
 * the image's bytes for it, or fails it. Races between fetches, host I/O, commits and
 * close are staged deterministically with it — no sleeps. It implements the RemoteSource
 * contract; the disk under test is real.
 */
import { EventEmitter, once } from 'node:events';
import { DpuError } from '../../image-access/src/errors.js';
import type { RemoteReadOptions, RemoteSource, RemoteSourceStats } from '../../image-access/src/source.js';

export interface PendingRead {
  offset: number;
  length: number;
  priority: string;
  dest: Buffer;
  opts: RemoteReadOptions;
  settled: boolean;
  resolve: () => void;
  reject: (err: Error) => void;
}

export class ControlledSource extends EventEmitter<{ read: [PendingRead] }> implements RemoteSource {
  readonly identity = 'controlled';
  readonly description = 'controlled test origin';
  readonly reads: PendingRead[] = [];
  closed = false;
  private bytes = 0;

  constructor(private readonly image: Buffer) {
    super();
  }

  get size(): number {
    return this.image.length;
  }

  get pending(): PendingRead[] {
    return this.reads.filter((r) => !r.settled);
  }

  read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    if (this.closed) return Promise.reject(new DpuError('DPU_ERR_SOURCE_CLOSED'));
    return new Promise<void>((resolve, reject) => {
      const p: PendingRead = {
        offset,
        length: dest.length,
        priority: opts.priority,
        dest,
        opts,
        settled: false,
        resolve: () => {
          p.settled = true;
          resolve();
        },
        reject: (err) => {
          p.settled = true;
          reject(err);
        },
      };
      this.reads.push(p);
      this.emit('read', p);
    });
  }

  /** The next unsettled read that matches, as soon as one is made. */
  async next(match: (p: PendingRead) => boolean = () => true): Promise<PendingRead> {
    for (;;) {
      const found = this.pending.find(match);
      if (found) return found;
      await once(this, 'read');
    }
  }

  /** Hands `p` the image's bytes (optionally only its first `upTo` bytes, without finishing it). */
  deliver(p: PendingRead, upTo = p.length, opts: { corrupt?: boolean } = {}): void {
    this.image.copy(p.dest, 0, p.offset, p.offset + upTo);
    if (opts.corrupt) p.dest[0] = p.dest[0]! ^ 0xff; // a corrupting proxy
    p.opts.onProgress?.(upTo);
    if (upTo === p.length) {
      this.bytes += p.length;
      p.resolve();
    }
  }

  fail(p: PendingRead, err: Error = new DpuError('DPU_ERR_SOURCE_HTTP_STATUS', 'HTTP 403 from the origin (temp URL expired)')): void {
    p.reject(err);
  }

  stats(): RemoteSourceStats {
    return { bytesFetched: this.bytes, requests: this.reads.length, retries: 0, failures: 0, foregroundInflight: 0, backgroundInflight: 0 };
  }

  /** Like the HTTP source: closing aborts every read in flight. */
  async close(): Promise<void> {
    this.closed = true;
    for (const p of this.pending) p.reject(new DpuError('DPU_ERR_SOURCE_CLOSED'));
  }
}

/** Lets every queued promise callback and immediate run. */
export async function settleTicks(n = 5): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
}
