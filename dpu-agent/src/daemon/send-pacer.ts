/**
 * What this agent sends to peers (answers of GET /v1/disks/{id}/image, docs/fleet.md), sent
 * in SEND_CHUNK pieces so that serving peers gives way to what matters more:
 *
 *  - The host (`host`, `holdMs`: peers.host_yield_ms). Each piece waits for a pause in the
 *    host's NBD requests on this agent, at most holdMs. Serving peers costs the agent's
 *    CPU (the kernel's copies, TLS) and the thread pool; without this, an agent serving
 *    peers as fast as they ask left its host a fifth of its read rate (bench/peer-serve.ts).
 *  - The uplink (`rate`: peers.serve_bandwidth). One budget for every answer at once, so
 *    serving never fills the node's uplink — the host's traffic and the ACKs of the node's
 *    own downloads share that link, and a full uplink queue delays them (measured in the
 *    network-namespace fleet: a seeder whose uplink was full copied from the origin at half
 *    its link's rate). A piece goes when the budget has room: a reservation on a shared
 *    clock (the next free instant), no bursts beyond one piece.
 */
import { Readable } from 'node:stream';
import type { HostActivity } from '../block/host-activity.js';

/** A piece of an answer while the host is busy, or paced: the most a waiting host request can find ahead of it. */
const SEND_CHUNK = 64 << 10;
/**
 * A piece while the host is quiet (and no rate is set): larger, as each piece costs a turn of
 * the event loop; a host request that arrives meanwhile finds at most this much ahead of it.
 */
const QUIET_CHUNK = 512 << 10;

export interface SendPacerOptions {
  /** Bytes per second over every answer; 0: no cap. */
  rate: number;
  /** Whose pauses pieces wait for, and for how long at most (ms; 0: they do not wait). */
  host?: HostActivity;
  holdMs?: number;
}

export class SendPacer {
  private nextAt = 0;
  private readonly rate: number;
  private readonly host: HostActivity | undefined;
  private readonly holdMs: number;

  constructor(opts: SendPacerOptions) {
    this.rate = opts.rate;
    this.host = opts.host;
    this.holdMs = opts.holdMs ?? 0;
  }

  /** Reserves `n` bytes of the rate's budget: how many ms from now they may go (0 without a rate). */
  reserve(n: number, now = Date.now()): number {
    if (this.rate <= 0) return 0;
    const start = Math.max(now, this.nextAt);
    this.nextAt = start + (n / this.rate) * 1000;
    return start - now;
  }

  /** `data` as a stream of pieces, each after a pause of the host's and within the rate; destroying it stops its waits. */
  stream(data: Buffer): Readable {
    let at = 0;
    let timer: NodeJS.Timeout | null = null;
    let waiting = false;
    let gone = false;
    const abort = new AbortController();
    const { host, holdMs } = this;
    const pacer = this;
    return new Readable({
      highWaterMark: SEND_CHUNK,
      read() {
        if (waiting || gone) return;
        if (at >= data.length) {
          this.push(null);
          return;
        }
        const push = (piece: Buffer): void => {
          waiting = false;
          if (!gone) this.push(piece);
        };
        const send = (size: number): void => {
          if (gone) return;
          const piece = data.subarray(at, Math.min(at + size, data.length));
          at += piece.length;
          const wait = pacer.reserve(piece.length);
          if (wait <= 0) return push(piece);
          timer = setTimeout(() => {
            timer = null;
            push(piece);
          }, wait);
        };
        // After a wait the piece goes whether or not the host paused (the floor), and is a
        // small one.
        const afterHold = (): void => {
          const held = host!.whenQuiet(holdMs, abort.signal);
          if (held) void held.then(() => send(SEND_CHUNK));
          else setImmediate(quiet);
        };
        // The host looked quiet: the piece goes on the next turn of the event loop, not in
        // this one, so a host request that arrived meanwhile is read first — and then this
        // piece waits for it too.
        const quiet = (): void => {
          if (gone) return;
          if (host!.busy) return afterHold();
          send(pacer.rate > 0 ? SEND_CHUNK : QUIET_CHUNK);
        };
        waiting = true;
        if (!host || holdMs <= 0) return send(SEND_CHUNK);
        afterHold();
      },
      destroy(err, cb) {
        gone = true;
        abort.abort();
        if (timer) clearTimeout(timer);
        timer = null;
        cb(err);
      },
    });
  }
}
