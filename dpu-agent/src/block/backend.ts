/**
 * The one block contract. The NBD export speaks only to a BlockBackend; HTTP, region maps
 * and local disks live behind it (nbdkit's plugin struct, go-nbd's Backend).
 *
 * Methods may complete synchronously (return undefined) or asynchronously (return a
 * Promise). The hot path — a read of a region already on the local target — completes
 * synchronously from the page cache, and the server then skips a promise hop per request;
 * anything that waits for the network or for fdatasync returns a Promise.
 */
export interface BlockCapabilities {
  readOnly: boolean;
  flush: boolean;
  fua: boolean;
  trim: boolean;
  writeZeroes: boolean;
  /**
   * WRITE_ZEROES takes `fastZero` (NBD_FLAG_SEND_FAST_ZERO): such a request is done only
   * when no data needs writing or fetching, and is otherwise refused at once, unchanged.
   */
  fastZero: boolean;
  /** NBD_CMD_CACHE: the backend can prefetch a range (a streaming disk hydrates it). */
  cache: boolean;
  /** Flushing any connection makes every connection's completed writes durable. */
  multiConn: boolean;
}

export type MaybePromise<T> = T | Promise<T>;

/** How a WRITE_ZEROES may be carried out (NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLAG_FAST_ZERO). */
export interface WriteZeroesOptions {
  /**
   * The range must end up allocated, zeros actually stored: no hole punched, and not merely
   * recorded as "reads as zeros", so that later writes there cannot fail for lack of space.
   * @default false
   */
  noHole?: boolean;
  /**
   * Only if it is quick (no data written, nothing fetched): otherwise throw
   * `DPU_ERR_ZERO_NOT_FAST` (NBD_ENOTSUP) before changing anything. Only sent when
   * `capabilities.fastZero`. @default false
   */
  fastZero?: boolean;
}

export interface BlockBackend {
  /** Size in bytes; fixed for the life of the backend. */
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  /**
   * The smallest aligned request that is efficient now, in bytes (NBD_INFO_BLOCK_SIZE's
   * preferred size); read at each negotiation, so it may change over the backend's life.
   * Absent: 4 KiB. The server keeps it a power of two within what NBD allows.
   */
  readonly preferredBlockSize?: number;
  /** Fill `dest` (dest.length bytes) with the disk's bytes at `offset`. */
  read(offset: number, dest: Buffer): MaybePromise<void>;
  /**
   * Write `chunks` (in order, total `length` bytes) at `offset`. The chunks are the
   * socket's own buffers: the backend must not keep references after completing.
   * With `fua`, the data is durable when the call completes.
   */
  write(offset: number, chunks: readonly Buffer[], length: number, fua: boolean): MaybePromise<void>;
  /** Every write completed before this call is durable when it completes. */
  flush(): MaybePromise<void>;
  /** The range may read back as zeros or as its old contents afterwards. */
  trim(offset: number, length: number, fua: boolean): MaybePromise<void>;
  /** The range reads back as zeros afterwards; `opts` says how it may get there. */
  writeZeroes(offset: number, length: number, fua: boolean, opts?: WriteZeroesOptions): MaybePromise<void>;
  /**
   * Advisory prefetch of a range; settles when the range is cached. The server may answer
   * the client before that (NBD allows it), so the prefetch must be started by the time
   * this returns, and a rejection must leave nothing to clean up: reads still work.
   */
  cache(offset: number, length: number): MaybePromise<void>;
  close(): Promise<void>;
}
