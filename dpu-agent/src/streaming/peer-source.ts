/**
 * Peers first, the origin on a miss (issue #15, docs/fleet.md). Wraps a disk's source (the
 * raw disk's bytes: after any qcow2 decoding and padding) and sends its background reads to
 * peer agents that stream the same image — `GET {agent}/v1/disks/{disk}/image` with one
 * Range and the image's peer token — falling back to the origin when no peer is set, a
 * peer refuses (409: not verified there yet; 503: busy), fails or stalls.
 *
 * What stays as it was:
 *  - The host's reads (foreground) go to the origin: a peer that has not got the region
 *    would cost the miss a round trip first.
 *  - Verification: the disk checks every region it gets against the manifest, from a peer
 *    as from the origin, and peers are asked only while it has one (verifiedBy): bytes no
 *    one can check come from the origin alone. When a region fails, the disk reports it
 *    (reportCorrupt) and the peer that last sent that region is dropped for good, so its
 *    next fetch goes elsewhere; a lying or broken peer costs a fetch, never a wrong byte.
 *  - Only whole regions go to peers (the hydrator's batches): a block-sized read (a miss,
 *    the gaps around miss blocks) goes to the origin, so a failing region has one sender.
 *  - Buffer safety: a peer request that fails has its socket destroyed before the origin is
 *    asked (http1.ts), so no peer byte lands in `dest` afterwards; progress is reported only
 *    once the whole range is in, from whichever side sent it.
 */
import type { Logger } from 'pino';
import { DpuError } from '../../../image-access/src/errors.js';
import { Http1Pool } from '../../../image-access/src/http1.js';
import type { RemoteReadOptions, RemoteSource, RemoteSourceStats } from '../../../image-access/src/source.js';

export interface PeerAddress {
  /** The peer agent's API base URL, e.g. http://10.0.0.12:9611. */
  url: string;
  /** Its disk of the same image. */
  disk: string;
}

export interface PeerStats {
  peers: number;
  /** Peers dropped: they sent a region that failed verification. */
  excluded: number;
  bytesFromPeers: number;
  /** Background reads a peer could not answer (refused, failed, stalled), read from the origin instead. */
  fallbacks: number;
  corrupt: number;
}

/** How long a peer may take to start answering and between reads of its answer. */
const PEER_STALL_MS = 5_000;
/**
 * A peer answer must also arrive whole at this rate at least (a trickling peer holds its
 * regions `filling`, and host writes to them wait): else the origin is read instead.
 */
const PEER_MIN_BYTES_PER_S = 8 << 20;
/** The most one peer read asks for, and what the serving side answers at most (GET /v1/disks/{id}/image). */
export const PEER_MAX_BYTES = 16 << 20;

interface PeerState extends PeerAddress {
  excluded: boolean;
}

function peerKey(p: PeerAddress): string {
  return `${p.url.replace(/\/+$/, '')} ${p.disk}`;
}

export class PeerFirstSource implements RemoteSource {
  private peers: PeerState[] = [];
  private token: string | null = null;
  private next = 0;
  private canVerify: () => boolean = () => false;
  /** Which peer sent each region last (by region index), for reportCorrupt; the origin's regions are not in it. */
  private readonly sentBy = new Map<number, PeerState>();
  private readonly pool = new Http1Pool({ maxIdle: 4 });
  private readonly counters = { bytesFromPeers: 0, fallbacks: 0, corrupt: 0 };

  constructor(
    private readonly origin: RemoteSource,
    private readonly regionSize: number,
    private readonly log?: Logger,
  ) {}

  get size(): number {
    return this.origin.size;
  }
  get identity(): string {
    return this.origin.identity;
  }
  get description(): string {
    return this.origin.description;
  }

  /** Peers are asked only while `check` says what they send is verified (the disk has a manifest). */
  verifiedBy(check: () => boolean): void {
    this.canVerify = check;
  }

  /** Replaces the peer list (the tracker's latest), keeping what is known of peers that stay. */
  setPeers(peers: readonly PeerAddress[], token: string): void {
    const old = new Map(this.peers.map((p) => [peerKey(p), p]));
    this.peers = peers.map((p) => old.get(peerKey(p)) ?? { url: p.url.replace(/\/+$/, ''), disk: p.disk, excluded: false });
    this.token = token;
  }

  peerStats(): PeerStats {
    return { peers: this.peers.length, excluded: this.peers.filter((p) => p.excluded).length, ...this.counters };
  }

  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    const first = Math.floor(offset / this.regionSize);
    const last = Math.floor((offset + dest.length - 1) / this.regionSize);
    if (opts.priority === 'background' && this.token !== null && this.wholeRegions(offset, dest.length) && dest.length <= PEER_MAX_BYTES && this.canVerify()) {
      const peer = this.pick();
      if (peer && (await this.fromPeer(peer, offset, dest))) {
        for (let r = first; r <= last; r++) this.sentBy.set(r, peer);
        opts.onProgress?.(dest.length);
        return;
      }
      if (peer) this.counters.fallbacks++;
    }
    for (let r = first; r <= last; r++) this.sentBy.delete(r);
    return this.origin.read(offset, dest, opts);
  }

  /** Region [offset, offset+length) failed verification: drop the peer that sent it, if one did (true). */
  reportCorrupt(offset: number, length: number): boolean {
    const r = Math.floor(offset / this.regionSize);
    const peer = this.sentBy.get(r);
    this.sentBy.delete(r);
    if (!peer) return this.origin.reportCorrupt?.(offset, length) ?? false;
    if (!peer.excluded) {
      peer.excluded = true;
      this.counters.corrupt++;
      this.log?.warn({ peer: peer.url, disk: peer.disk, offset, length, code: 'DPU_ERR_INTEGRITY' }, 'a peer sent bytes that failed verification: not asked again');
    }
    return true;
  }

  stats(): RemoteSourceStats {
    return this.origin.stats();
  }

  async close(): Promise<void> {
    this.pool.destroy();
    await this.origin.close();
  }

  private wholeRegions(offset: number, length: number): boolean {
    const end = offset + length;
    return offset % this.regionSize === 0 && (end % this.regionSize === 0 || end === this.size);
  }

  private pick(): PeerState | null {
    for (let i = 0; i < this.peers.length; i++) {
      const p = this.peers[(this.next + i) % this.peers.length]!;
      if (!p.excluded) {
        this.next = (this.next + i + 1) % this.peers.length;
        return p;
      }
    }
    return null;
  }

  /** True when the peer answered the whole range; false (dest not to be used) otherwise. */
  private async fromPeer(peer: PeerState, offset: number, dest: Buffer): Promise<boolean> {
    const ac = new AbortController();
    const stalled = (): void => ac.abort(new DpuError('DPU_ERR_SOURCE_TRANSIENT', `peer ${peer.url} stalled`));
    let timer = setTimeout(stalled, PEER_STALL_MS);
    const deadline = setTimeout(() => ac.abort(new DpuError('DPU_ERR_SOURCE_TRANSIENT', `peer ${peer.url} too slow`)), PEER_STALL_MS + (dest.length / PEER_MIN_BYTES_PER_S) * 1000);
    const renew = (): void => {
      clearTimeout(timer);
      timer = setTimeout(stalled, PEER_STALL_MS);
    };
    const end = offset + dest.length;
    try {
      const res = await this.pool.request(new URL(`${peer.url}/v1/disks/${encodeURIComponent(peer.disk)}/image`), {
        method: 'GET',
        headers: { authorization: `Bearer ${this.token!}`, range: `bytes=${offset}-${end - 1}` },
        signal: ac.signal,
        onActivity: renew,
        onHead: (head) => (head.status === 206 && head.headers['content-range'] === `bytes ${offset}-${end - 1}/${this.size}` ? { kind: 'into', dest, skip: 0, exact: true } : { kind: 'discard' }),
      });
      if (res.head.status !== 206 || res.filled !== dest.length) {
        // 409 (not verified there yet) and 503 (busy) are the usual refusals; a 401 or 404
        // means the tracker's list is stale: the next list fixes it.
        this.log?.debug({ peer: peer.url, disk: peer.disk, status: res.head.status, offset }, 'peer did not serve the range; reading the origin');
        return false;
      }
      this.counters.bytesFromPeers += dest.length;
      return true;
    } catch (err) {
      this.log?.debug({ peer: peer.url, disk: peer.disk, err: (err as Error).message, offset }, 'peer read failed; reading the origin');
      return false;
    } finally {
      clearTimeout(timer);
      clearTimeout(deadline);
    }
  }
}
