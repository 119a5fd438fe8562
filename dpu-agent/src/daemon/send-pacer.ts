/**
 * What this agent sends to peers, paced to peers.serve_bandwidth (docs/fleet.md): one
 * budget for every answer of GET /v1/disks/{id}/image at once, so that serving peers never
 * fills the node's uplink — the host's traffic and the ACKs of the node's own downloads
 * (its copy from peers or the origin) share that link, and a full uplink queue delays
 * them (measured in the network-namespace fleet: a seeder whose uplink was full copied
 * from the origin at half its link's rate).
 *
 * An answer is sent in SEND_CHUNK pieces, each when the budget has room: a reservation
 * on a shared clock (the next free instant), no bursts beyond one piece.
 */
import { Readable } from 'node:stream';

const SEND_CHUNK = 64 << 10;

export class SendPacer {
  private nextAt = 0;

  /** `rate` bytes per second, over every answer. */
  constructor(private readonly rate: number) {}

  /** Reserves `n` bytes of the budget: how many ms from now they may go. */
  reserve(n: number, now = Date.now()): number {
    const start = Math.max(now, this.nextAt);
    this.nextAt = start + (n / this.rate) * 1000;
    return start - now;
  }

  /** `data` as a stream whose pieces go out at the shared rate; destroying it stops its timer. */
  stream(data: Buffer): Readable {
    let at = 0;
    let timer: NodeJS.Timeout | null = null;
    const pacer = this;
    return new Readable({
      highWaterMark: SEND_CHUNK,
      read() {
        if (timer) return;
        if (at >= data.length) {
          this.push(null);
          return;
        }
        const piece = data.subarray(at, Math.min(at + SEND_CHUNK, data.length));
        at += piece.length;
        const wait = pacer.reserve(piece.length);
        if (wait <= 0) {
          this.push(piece);
          return;
        }
        timer = setTimeout(() => {
          timer = null;
          this.push(piece);
        }, wait);
      },
      destroy(err, cb) {
        if (timer) clearTimeout(timer);
        timer = null;
        cb(err);
      },
    });
  }
}
