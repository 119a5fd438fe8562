/**
 * A root disk larger than its image: the image at the start, zeros after it.
 *
 * Ironic gives a node a root disk of `root_gb` (or the whole device), and cloud-init's
 * growpart then extends the image's last partition over the rest. The host must see that
 * size from its first boot, so the streaming disk is as large as the root disk; this
 * source serves the bytes past the image as zeros without asking the origin (the regions
 * wholly past it start as `zero` in the region map and are never fetched at all; this
 * covers the one region that straddles the image's end).
 */
import type { RemoteReadOptions, RemoteSource, RemoteSourceStats } from './source.js';

export class PaddedSource implements RemoteSource {
  readonly size: number;
  /** Where the image ends: bytes from here on are zeros. */
  readonly imageSize: number;

  constructor(private readonly inner: RemoteSource, diskSize: number) {
    if (!Number.isSafeInteger(diskSize) || diskSize < inner.size) {
      throw new RangeError(`a ${diskSize}-byte disk cannot hold a ${inner.size}-byte image`);
    }
    this.size = diskSize;
    this.imageSize = inner.size;
  }

  /** The image's identity: the padding is the disk's geometry, recorded with the disk. */
  get identity(): string {
    return this.inner.identity;
  }

  get description(): string {
    return `${this.inner.description} on a ${this.size}-byte disk`;
  }

  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    const inImage = Math.max(0, Math.min(dest.length, this.imageSize - offset));
    if (inImage < dest.length) dest.fill(0, inImage);
    if (inImage === 0) {
      opts.onProgress?.(dest.length);
      return;
    }
    const onProgress = opts.onProgress;
    await this.inner.read(offset, inImage === dest.length ? dest : dest.subarray(0, inImage), {
      priority: opts.priority,
      // The zeros past the image are there from the start: report them with the last byte.
      ...(onProgress ? { onProgress: (filled: number) => onProgress(filled === inImage ? dest.length : filled) } : {}),
    });
  }

  reportCorrupt(offset: number, length: number): boolean {
    const inImage = Math.min(length, this.inner.size - offset);
    return inImage > 0 ? (this.inner.reportCorrupt?.(offset, inImage) ?? false) : false;
  }

  asBackground<T>(request: () => Promise<T>): Promise<T> {
    return this.inner.asBackground ? this.inner.asBackground(request) : request();
  }

  stats(): RemoteSourceStats {
    return this.inner.stats();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
