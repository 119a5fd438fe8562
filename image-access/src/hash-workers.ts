/**
 * SHA-256 off the event loop: worker threads that hash manifest leaves (RFC 6962 leaf
 * hashes, SHA-256 of 0x00 and the leaf) of buffers backed by a SharedArrayBuffer, which
 * they read in place: a job is a message with the buffer's memory and a range, its answer
 * the 32-byte hashes. Hashing 1 MiB costs ~0.9 ms of CPU here; done on the event loop that
 * also serves the host's NBD requests it delayed every one queued behind it, and at
 * 10 Gbit/s it alone would take most of a core.
 *
 * Buffers not backed by a SharedArrayBuffer cannot be read by a worker without a copy;
 * `leafHashes` then hashes them on the calling thread (see sharedBuffer()).
 *
 * Workers are started on demand: a job goes to an idle worker, and another is started (up
 * to `threads`) only when every started one is busy, so a link one thread keeps up with
 * (1 Gbit/s needs ~0.1 of one) costs one thread's memory (~12 MiB), not `threads`'. They
 * are referenced only while a job is pending (an idle pool never keeps the process alive),
 * and a worker that dies fails its jobs and is replaced.
 */
import { createHash } from 'node:crypto';
import { Worker } from 'node:worker_threads';

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const PREFIX = Buffer.of(0);
parentPort.on('message', ({ id, memory, offset, length, leaf }) => {
  const data = Buffer.from(memory, offset, length);
  const n = Math.ceil(length / leaf);
  const out = Buffer.allocUnsafeSlow(n * 32);
  for (let i = 0; i < n; i++) {
    createHash('sha256').update(PREFIX).update(data.subarray(i * leaf, Math.min(length, (i + 1) * leaf))).digest().copy(out, i * 32);
  }
  parentPort.postMessage({ id, hashes: out.buffer }, [out.buffer]);
});
`;

const LEAF_PREFIX = Buffer.of(0);

/** A buffer of `size` bytes whose memory workers can read in place. */
export function sharedBuffer(size: number): Buffer {
  return Buffer.from(new SharedArrayBuffer(size));
}

interface Job {
  resolve(hashes: Buffer): void;
  reject(err: Error): void;
}

interface Slot {
  worker: Worker;
  jobs: Map<number, Job>;
}

export class HashWorkers {
  private readonly slots: (Slot | null)[];
  private nextId = 1;
  private closed = false;
  /** Bytes hashed by workers, and on the calling thread (buffers not shared). */
  readonly stats = { workerBytes: 0, inlineBytes: 0 };

  constructor(readonly threads: number) {
    if (!Number.isInteger(threads) || threads < 1) throw new Error(`hash threads must be a positive integer, not ${threads}`);
    this.slots = new Array<Slot | null>(threads).fill(null);
  }

  /** The leaf hashes of `data` cut in `leaf`-byte leaves (the last may be shorter), 32 bytes each. */
  leafHashes(data: Buffer, leaf: number): Promise<Buffer> {
    if (this.closed) return Promise.reject(new Error('the hash workers are closed'));
    if (!(data.buffer instanceof SharedArrayBuffer) || data.length === 0) {
      this.stats.inlineBytes += data.length;
      return Promise.resolve(leafHashesInline(data, leaf));
    }
    const slot = this.slot();
    const id = this.nextId++;
    return new Promise<Buffer>((resolve, reject) => {
      slot.jobs.set(id, { resolve, reject });
      if (slot.jobs.size === 1) slot.worker.ref();
      slot.worker.postMessage({ id, memory: data.buffer, offset: data.byteOffset, length: data.length, leaf });
      this.stats.workerBytes += data.length;
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    const workers = this.slots.filter((s): s is Slot => s !== null);
    this.slots.fill(null);
    for (const s of workers) for (const j of s.jobs.values()) j.reject(new Error('the hash workers are closed'));
    await Promise.all(workers.map((s) => s.worker.terminate()));
  }

  /** Threads started now. */
  get started(): number {
    return this.slots.filter((s) => s !== null).length;
  }

  /** An idle worker; else a new one while fewer than `threads` run; else the least busy. */
  private slot(): Slot {
    let best = -1;
    let free = -1;
    for (let k = 0; k < this.slots.length; k++) {
      const s = this.slots[k];
      if (!s) {
        if (free < 0) free = k;
        continue;
      }
      if (s.jobs.size === 0) return s;
      if (best < 0 || s.jobs.size < this.slots[best]!.jobs.size) best = k;
    }
    const i = free >= 0 ? free : best;
    let slot = this.slots[i];
    if (!slot) {
      // A worker allocates 32 bytes per leaf and nothing else that lives: a small heap keeps
      // its resident memory small (peak RSS of a 512 MiB hydration: +0-1 MiB, default heap +5).
      const worker = new Worker(WORKER_SOURCE, { eval: true, resourceLimits: { maxYoungGenerationSizeMb: 1, maxOldGenerationSizeMb: 16, stackSizeMb: 1 } });
      const s: Slot = { worker, jobs: new Map() };
      worker.unref();
      worker.on('message', ({ id, hashes }: { id: number; hashes: ArrayBuffer }) => {
        const job = s.jobs.get(id);
        if (!job) return;
        s.jobs.delete(id);
        if (s.jobs.size === 0) worker.unref();
        job.resolve(Buffer.from(hashes));
      });
      const died = (err: Error): void => {
        if (this.slots[i] === s) this.slots[i] = null; // the next job starts a new one
        for (const j of s.jobs.values()) j.reject(err);
        s.jobs.clear();
      };
      worker.on('error', died);
      worker.on('exit', (code) => died(new Error(`a hash worker exited (code ${code})`)));
      this.slots[i] = slot = s;
    }
    return slot;
  }
}

export function leafHashesInline(data: Buffer, leaf: number): Buffer {
  const n = Math.ceil(data.length / leaf);
  const out = Buffer.allocUnsafe(n * 32);
  for (let i = 0; i < n; i++) {
    createHash('sha256').update(LEAF_PREFIX).update(data.subarray(i * leaf, Math.min(data.length, (i + 1) * leaf))).digest().copy(out, i * 32);
  }
  return out;
}
