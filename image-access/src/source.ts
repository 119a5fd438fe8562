/**
 * The remote source contract: where region bytes come from before they are local. An HTTP
 * origin (Swift temp URL, Glance, any web server) implements it today; an NBD client
 * source can implement the same interface later.
 */
export type FetchPriority = 'foreground' | 'background';

export interface RemoteReadOptions {
  /** Foreground reads answer a host's miss and never queue behind background batches. */
  priority: FetchPriority;
  /** Called as bytes arrive with the number of leading bytes of `dest` now filled. */
  onProgress?: (filled: number) => void;
}

export interface RemoteSourceStats {
  bytesFetched: number;
  requests: number;
  /** Attempts sent again (after a failure, or on a new connection when a reused one was closed before answering). */
  retries: number;
  failures: number;
  foregroundInflight: number;
  backgroundInflight: number;
}

export interface RemoteSource {
  /** Size of the image in bytes. */
  readonly size: number;
  /** A stable description of what the image is (size, ETag…), for the region map's identity. */
  readonly identity: string;
  /** A loggable description of the source (credentials and signatures redacted). */
  readonly description: string;
  /** Fill `dest` with the image's bytes at `offset`, retrying transient failures. */
  read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void>;
  stats(): RemoteSourceStats;
  /**
   * The bytes this source delivered for [offset, offset+length) failed verification. A
   * source with several places to read from stops using the one that sent them, and
   * answers true when that was not the origin (a peer): the origin is not to blame.
   */
  reportCorrupt?(offset: number, length: number): boolean;
  /**
   * Runs `request` as one of this source's background requests, for background reads from
   * elsewhere (peers) over the same link: it starts when the host's reads let a background
   * request start (http-source.ts: none while one is in flight), and counts as one while
   * it runs. Absent: run at once.
   */
  asBackground?<T>(request: () => Promise<T>): Promise<T>;
  close(): Promise<void>;
}
