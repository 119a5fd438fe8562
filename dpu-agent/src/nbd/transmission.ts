/**
 * Phase 2 of an NBD connection: requests in, replies out. validate → dispatch → reply.
 *
 * Requests are dispatched as soon as they are parsed, without waiting for earlier ones;
 * replies carry the client's handle and go out in completion order. Each read reply is one
 * buffer: the 16-byte header, then the data the backend reads straight into it. Replies
 * made in one tick are written under one cork. The stream never desyncs: a write refused
 * before its payload arrived still has its payload drained, and a reply header is written
 * only once its data or its error is known. Backpressure: reading from the socket pauses
 * while too many requests, too many bytes of reads and writes (MAX_INFLIGHT_BYTES: each
 * READ holds a reply buffer of its length, each WRITE its payload, until it ends) or too
 * many reply bytes are outstanding, so a client's memory on the DPU is bounded whatever it
 * pipelines.
 *
 * Command flags are checked against the command and the transmission flags this export
 * advertised (doc/proto.md, "Command flags"): anything else is EINVAL before the backend
 * sees it. NBD_CMD_CACHE without flags is answered as soon as the backend has started the
 * prefetch, which runs on after the reply (see `detach`).
 */
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import type { BlockBackend, MaybePromise } from '../block/backend.js';
import { DpuError, NbdErrno, toNbdErrno } from '../../../image-access/src/errors.js';
import { BufferPool } from './buffer-pool.js';
import type { ByteQueue } from './byte-queue.js';
import {
  Cmd,
  CMD_NAMES,
  CmdFlag,
  decodeRequestHeader,
  MAX_PAYLOAD,
  REQUEST_HEADER_BYTES,
  type RequestHeader,
  SIMPLE_REPLY_BYTES,
  TFlag,
  writeSimpleReplyHeader,
} from './protocol.js';

const MAX_INFLIGHT = 256;
const MAX_PENDING_REPLY_BYTES = 16 << 20;
/**
 * Bytes of READs and WRITEs in flight per connection before the server stops reading
 * requests: one request of the largest size (32 MiB) always fits. QEMU keeps at most 16
 * requests in flight, mostly far smaller.
 */
export const MAX_INFLIGHT_BYTES = 32 << 20;
/** Shared by every connection of the process: replies are short-lived and alike. */
const replyPool = new BufferPool();

export interface TransmissionStats {
  requests: number;
  errors: number;
}

type Phase = { kind: 'header' } | { kind: 'payload'; req: RequestHeader } | { kind: 'drain'; req: RequestHeader; left: number; errno: number } | { kind: 'closing' };

export class Transmission {
  private phase: Phase = { kind: 'header' };
  private inflight = 0;
  /** Bytes of the READs and WRITEs in `inflight` (see MAX_INFLIGHT_BYTES). */
  private inflightBytes = 0;
  /** Backend calls still running after their reply was sent (CACHE prefetches). */
  private detached = 0;
  /** Command flags a WRITE_ZEROES may carry on this export; every other command, `otherFlags`. */
  private readonly zeroFlags: number;
  private readonly otherFlags: number;
  private paused = false;
  private corked = false;
  private finished = false;
  private eof = false;
  private readonly onDrain = (): void => this.maybeResume();

  constructor(
    private readonly socket: Socket,
    private readonly backend: BlockBackend,
    /** The transmission flags the client was given for this export. */
    exportFlags: number,
    private readonly queue: ByteQueue,
    private readonly log: Logger,
    private readonly stats: TransmissionStats,
    private readonly onDone: () => void,
  ) {
    // doc/proto.md: FUA is valid on every command once SEND_FUA is advertised (the server
    // MUST accept it, even where there is nothing to persist); NO_HOLE only on WRITE_ZEROES,
    // and FAST_ZERO there too if SEND_FAST_ZERO was advertised (else EINVAL). DF needs
    // structured replies and REQ_ONE needs BLOCK_STATUS, neither of which this server
    // speaks, so no request may carry them.
    this.otherFlags = exportFlags & TFlag.SEND_FUA ? CmdFlag.FUA : 0;
    this.zeroFlags = this.otherFlags | CmdFlag.NO_HOLE | (exportFlags & TFlag.SEND_FAST_ZERO ? CmdFlag.FAST_ZERO : 0);
    socket.on('data', (b: Buffer) => {
      // Once closing (after DISC), what a client still sends is read and dropped: were it
      // left unread, the client's writes would stall and the close never complete.
      if (this.phase.kind === 'closing') return;
      this.queue.push(b);
      this.process();
    });
    socket.on('drain', this.onDrain);
    socket.on('end', () => {
      // The client will send nothing more: answer what was asked, then end our side.
      this.eof = true;
      this.process();
    });
    this.process();
  }

  get outstanding(): number {
    return this.inflight;
  }

  /** Stop taking requests; the connection ends once outstanding replies are sent. */
  shutdown(): void {
    if (this.phase.kind !== 'closing') this.phase = { kind: 'closing' };
    this.socket.resume(); // see the 'data' handler
    this.finishIfIdle();
  }

  private process(): void {
    if (this.paused) return;
    const q = this.queue;
    this.cork();
    for (;;) {
      const ph = this.phase;
      if (ph.kind === 'header') {
        if (q.length < REQUEST_HEADER_BYTES) break;
        const req = decodeRequestHeader(q.take(REQUEST_HEADER_BYTES), 0);
        if (!req) {
          this.protocolError('request without the NBD request magic');
          return;
        }
        this.stats.requests++;
        this.onHeader(req);
      } else if (ph.kind === 'payload') {
        if (q.length < ph.req.length) break;
        const chunks = q.takeChunks(ph.req.length);
        this.phase = { kind: 'header' };
        this.run(ph.req, null, () => this.backend.write(ph.req.offset, chunks, ph.req.length, (ph.req.flags & CmdFlag.FUA) !== 0));
      } else if (ph.kind === 'drain') {
        ph.left -= q.skip(ph.left);
        if (ph.left > 0) break;
        this.phase = { kind: 'header' };
        this.replyError(ph.req, ph.errno);
      } else {
        break;
      }
      if (this.phase.kind !== 'closing' && this.mustWait()) {
        this.paused = true;
        this.socket.pause();
        break;
      }
    }
    // Everything the client sent before closing its side has been taken (a request cut
    // short by the close is dropped): answer what is outstanding, then end.
    if (this.eof && !this.paused && this.phase.kind !== 'closing') this.shutdown();
  }

  private maybeResume(): void {
    if (!this.paused || this.mustWait()) return;
    this.paused = false;
    this.socket.resume();
    this.process();
  }

  /** Too much is outstanding to take another request (see the top). */
  private mustWait(): boolean {
    return this.inflight + this.detached >= MAX_INFLIGHT || this.inflightBytes >= MAX_INFLIGHT_BYTES || this.socket.writableLength > MAX_PENDING_REPLY_BYTES;
  }

  private onHeader(req: RequestHeader): void {
    const b = this.backend;
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    const errno = this.validate(req);
    if (req.type === Cmd.WRITE) {
      if (errno !== 0) {
        // Refused before its payload arrived: drain the payload so the next header is found.
        if (req.length > 0) this.phase = { kind: 'drain', req, left: req.length, errno };
        else this.replyError(req, errno);
      } else {
        this.phase = { kind: 'payload', req };
      }
      return;
    }
    if (req.type === Cmd.DISC) {
      this.log.debug('client sent NBD_CMD_DISC');
      this.shutdown();
      return;
    }
    if (errno !== 0) {
      this.replyError(req, errno);
      return;
    }
    switch (req.type) {
      case Cmd.READ: {
        const reply = replyPool.acquire(SIMPLE_REPLY_BYTES + req.length);
        this.run(req, reply, () => b.read(req.offset, reply.subarray(SIMPLE_REPLY_BYTES)));
        break;
      }
      case Cmd.FLUSH:
        this.run(req, null, () => b.flush());
        break;
      case Cmd.TRIM:
        this.run(req, null, () => b.trim(req.offset, req.length, fua));
        break;
      case Cmd.WRITE_ZEROES: {
        const opts = { noHole: (req.flags & CmdFlag.NO_HOLE) !== 0, fastZero: (req.flags & CmdFlag.FAST_ZERO) !== 0 };
        this.run(req, null, () => b.writeZeroes(req.offset, req.length, fua, opts));
        break;
      }
      case Cmd.CACHE: {
        // proto.md: "When no command flags are in use, the server MAY send a reply prior to
        // the requested area being fully cached." With FUA the reply waits, as before.
        const { offset, length } = req;
        if (req.flags === 0) this.run(req, null, () => this.detach(offset, length, b.cache(offset, length)));
        else this.run(req, null, () => b.cache(offset, length));
        break;
      }
      default:
        this.replyError(req, NbdErrno.EINVAL);
    }
  }

  /** 0, or the errno that refuses the request before it reaches the backend. */
  private validate(req: RequestHeader): number {
    const caps = this.backend.capabilities;
    if ((req.flags & ~(req.type === Cmd.WRITE_ZEROES ? this.zeroFlags : this.otherFlags)) !== 0) return NbdErrno.EINVAL;
    switch (req.type) {
      case Cmd.DISC:
        return 0;
      case Cmd.FLUSH:
        return req.offset === 0 && req.length === 0 ? 0 : NbdErrno.EINVAL;
      case Cmd.READ:
      case Cmd.CACHE:
        if (req.length === 0 || req.length > MAX_PAYLOAD) return NbdErrno.EINVAL;
        return req.offset + req.length > this.backend.size ? NbdErrno.EINVAL : 0;
      case Cmd.WRITE:
        if (caps.readOnly) return NbdErrno.EPERM;
        if (req.length === 0 || req.length > MAX_PAYLOAD) return NbdErrno.EINVAL;
        return req.offset + req.length > this.backend.size ? NbdErrno.ENOSPC : 0;
      case Cmd.TRIM:
      case Cmd.WRITE_ZEROES:
        if (caps.readOnly) return NbdErrno.EPERM;
        if (req.length === 0) return NbdErrno.EINVAL;
        return req.offset + req.length > this.backend.size ? NbdErrno.ENOSPC : 0;
      default:
        return NbdErrno.EINVAL;
    }
  }

  /** Runs one backend call; replies when it completes, synchronously if it did. */
  private run(req: RequestHeader, readReply: Buffer | null, call: () => void | Promise<void>): void {
    const reply = readReply ?? replyPool.acquire(SIMPLE_REPLY_BYTES);
    writeSimpleReplyHeader(reply, 0, req.handle); // copies the handle: the header view may go
    let result: void | Promise<void>;
    try {
      result = call();
    } catch (err) {
      this.fail(req, reply, err);
      return;
    }
    if (result === undefined) {
      this.send(reply);
      return;
    }
    const bytes = req.type === Cmd.READ || req.type === Cmd.WRITE ? req.length : 0;
    this.inflight++;
    this.inflightBytes += bytes;
    result.then(
      () => {
        this.inflight--;
        this.inflightBytes -= bytes;
        this.send(reply);
        this.afterAsync();
      },
      (err: unknown) => {
        this.inflight--;
        this.inflightBytes -= bytes;
        this.fail(req, reply, err);
        this.afterAsync();
      },
    );
  }

  /**
   * Lets a backend call's promise run on after the reply has gone (NBD_CMD_CACHE without
   * flags), returning at once. The promise is always handled: a failure later is logged,
   * as the client has its answer and later reads fetch the range again. It keeps nothing of
   * the request but two numbers (not the header's buffer, not the reply), and it still
   * counts toward MAX_INFLIGHT, so the prefetches one client starts stay bounded.
   */
  private detach(offset: number, length: number, result: MaybePromise<void>): void {
    if (result === undefined) return;
    this.detached++;
    const done = (): void => {
      this.detached--;
      if (this.phase.kind !== 'closing') this.maybeResume();
    };
    result.then(done, (err: unknown) => {
      const code = err instanceof DpuError ? err.code : (err as NodeJS.ErrnoException)?.code;
      this.log.debug({ cmd: 'CACHE', offset, length, code, err: (err as Error)?.message }, 'prefetch after an early NBD_CMD_CACHE reply failed');
      done();
    });
  }

  private fail(req: RequestHeader, reply: Buffer, err: unknown): void {
    const errno = toNbdErrno(err);
    this.stats.errors++;
    const code = err instanceof DpuError ? err.code : (err as NodeJS.ErrnoException)?.code;
    // A FAST_ZERO the backend cannot do quickly is refused as the client asked it to be;
    // the client falls back. Not worth a warning.
    this.log[code === 'DPU_ERR_ZERO_NOT_FAST' ? 'debug' : 'warn']({ cmd: CMD_NAMES[req.type], offset: req.offset, length: req.length, errno, code, err: (err as Error)?.message }, 'request failed');
    reply.writeUInt32BE(errno, 4);
    this.send(reply.subarray(0, SIMPLE_REPLY_BYTES)); // an error reply carries no data
  }

  private replyError(req: RequestHeader, errno: number): void {
    this.stats.errors++;
    this.log.debug({ cmd: CMD_NAMES[req.type] ?? req.type, offset: req.offset, length: req.length, flags: req.flags, errno }, 'request refused');
    const reply = replyPool.acquire(SIMPLE_REPLY_BYTES);
    writeSimpleReplyHeader(reply, errno, req.handle);
    this.send(reply);
  }

  private send(buf: Buffer): void {
    if (this.socket.destroyed) {
      replyPool.release(buf);
      return;
    }
    this.cork();
    // The buffer returns to the pool once the socket has handed its bytes to the kernel
    // (or failed): never earlier, or a later reply could overwrite unsent bytes.
    this.socket.write(buf, () => replyPool.release(buf));
  }

  private afterAsync(): void {
    if (this.phase.kind === 'closing') this.finishIfIdle();
    else this.maybeResume();
  }

  private cork(): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    process.nextTick(() => {
      this.corked = false;
      this.socket.uncork();
    });
  }

  private finishIfIdle(): void {
    if (this.inflight > 0 || this.finished) return;
    this.finished = true;
    if (!this.socket.destroyed) this.socket.end();
    this.onDone();
  }

  private protocolError(what: string): void {
    this.log.warn({ code: 'DPU_ERR_NBD_PROTOCOL' }, `${what}; closing the connection`);
    this.phase = { kind: 'closing' };
    this.socket.destroy();
    this.finished = true;
    this.onDone();
  }
}
