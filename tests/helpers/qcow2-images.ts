/**
 * qcow2 test images made by the real qemu-img, from raw images whose clusters mix
 * incompressible random data, compressible data and zeros (so that `qemu-img convert -c`
 * produces compressed, uncompressed and unallocated clusters alike).
 */
import fs from 'node:fs';
import type { RemoteReadOptions, RemoteSource, RemoteSourceStats } from '../../image-access/src/source.js';
import { run } from './run.js';

/**
 * A raw image of `size` bytes (a multiple of 512): 64 KiB chunks cycling through random,
 * compressible (bytes 0..15), zero and half-zero content, with a long zero stretch at
 * 40-50 % and a random tail.
 */
export function makeMixedImage(file: string, size: number, seed = 7): void {
  const buf = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  const rnd = (): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const chunk = 64 << 10;
  for (let at = 0, i = 0; at < size; at += chunk, i++) {
    const end = Math.min(size, at + chunk);
    switch (i % 5) {
      case 0:
      case 3:
        for (let p = at; p + 4 <= end; p += 4) buf.writeUInt32LE(rnd(), p);
        break;
      case 1:
        for (let p = at; p < end; p++) buf[p] = rnd() & 15;
        break;
      case 2:
        break; // zeros
      case 4:
        for (let p = at; p + 4 <= at + (end - at) / 2; p += 4) buf.writeUInt32LE(rnd(), p);
        break;
    }
  }
  buf.fill(0, Math.floor((size * 0.4) / 512) * 512, Math.floor((size * 0.5) / 512) * 512);
  fs.writeFileSync(file, buf);
}

export interface ConvertOptions {
  /** `-c`: compressed clusters. */
  compressed?: boolean;
  /** '0.10' makes a version 2 image, '1.1' version 3. @default '1.1' */
  compat?: '0.10' | '1.1';
  clusterSize?: number;
}

/** `qemu-img convert -f raw -O qcow2` with the given options. */
export async function toQcow2(raw: string, out: string, opts: ConvertOptions = {}): Promise<void> {
  const o = [`compat=${opts.compat ?? '1.1'}`];
  if (opts.clusterSize) o.push(`cluster_size=${opts.clusterSize}`);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ...(opts.compressed ? ['-c'] : []), '-o', o.join(','), raw, out]);
}

/**
 * A RemoteSource over a local file, as the inner source of a Qcow2Source in unit tests:
 * asynchronous, reporting progress in `step`-byte pieces like a network body, counting
 * what it read.
 */
export class FileSource implements RemoteSource {
  readonly size: number;
  readonly identity: string;
  readonly description: string;
  bytesFetched = 0;
  requests = 0;
  private readonly fd: number;
  private closed = false;

  constructor(
    file: string,
    private readonly step = 16 << 10,
  ) {
    this.fd = fs.openSync(file, 'r');
    this.size = fs.fstatSync(this.fd).size;
    this.identity = `file;size=${this.size}`;
    this.description = file;
  }

  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    if (this.closed) throw new Error('closed');
    if (offset < 0 || offset + dest.length > this.size) throw new Error(`read ${offset}+${dest.length} past the ${this.size}-byte file`);
    this.requests++;
    for (let filled = 0; filled < dest.length; ) {
      await new Promise<void>((resolve) => setImmediate(resolve));
      const n = Math.min(this.step, dest.length - filled);
      fs.readSync(this.fd, dest, filled, n, offset + filled);
      filled += n;
      this.bytesFetched += n;
      opts.onProgress?.(filled);
    }
  }

  stats(): RemoteSourceStats {
    return { bytesFetched: this.bytesFetched, requests: this.requests, retries: 0, failures: 0, foregroundInflight: 0, backgroundInflight: 0 };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}
