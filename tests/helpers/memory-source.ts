/**
 * An image held in memory as a RemoteSource that answers at once: for building manifests
 * and for tests whose origin's timing does not matter (ControlledSource stages the ones
 * where it does).
 */
import type { RemoteReadOptions, RemoteSource, RemoteSourceStats } from '../../image-access/src/source.js';

export class MemorySource implements RemoteSource {
  readonly identity = 'memory';
  readonly description = 'memory';
  constructor(private readonly image: Buffer) {}
  get size(): number {
    return this.image.length;
  }
  async read(offset: number, dest: Buffer, _opts: RemoteReadOptions): Promise<void> {
    this.image.copy(dest, 0, offset, offset + dest.length);
  }
  stats(): RemoteSourceStats {
    return { bytesFetched: 0, requests: 0, retries: 0, failures: 0, foregroundInflight: 0, backgroundInflight: 0 };
  }
  async close(): Promise<void> {}
}
