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
 *
 * Who has what: while the disk has a manifest and peers, peers' servable regions are read
 * (GET …/image/regions, a few bytes of run lengths), MAP_READS_PER_TICK peers every
 * MAP_INTERVAL_MS round robin; a complete peer's only once (until it refuses a read). A region is
 * asked of a peer that has it (round robin among those), then of the others that have it,
 * then the origin. With `originWaitMs` (the driver sets it for disks that are not their
 * image's seeders) the hydrator's sweep copies only regions some peer has (the union of
 * their maps, `admissible`), each run from one peer that has all of it (`admit`), and
 * leaves the rest for later — as long as the peers make progress: once the union has not
 * grown for originWaitMs (the seeder died or stalls, or no peer is listed), everything is
 * admitted and what peers lack comes from the origin; when they grow again the gate closes
 * again. So a fleet pulls about one copy from the origin, the seeders', and the rest from
 * each other, whatever the image's size. The host's reads never wait for this.
 */
import type { Logger } from 'pino';
import { TLS_CONFIG_ERRORS } from '../../../common/src/tls.js';
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
  /** Which (kept while they stay in the list). */
  excludedPeers: PeerAddress[];
  bytesFromPeers: number;
  /** Background reads a peer could not answer (refused, failed, stalled), read from the origin instead. */
  fallbacks: number;
  /** Of the fallbacks, by the last peer's answer: every peer asked was busy; one refused (not servable there, or a stale list); one failed (an error, a stall, too slow). */
  fallbackBusy: number;
  fallbackRefused: number;
  fallbackFailed: number;
  /** Times a peer request waited for the host's reads to end before it started. */
  hostYields: number;
  /** Batches left for later: their peers did not answer while the disk waited for peers, not the origin. */
  deferrals: number;
  corrupt: number;
}

/** How long a peer may take to start answering and between reads of its answer. */
const PEER_STALL_MS = 5_000;
/**
 * A peer answer must also arrive whole at this rate at least (a trickling peer holds its
 * regions `filling`, and host writes to them wait): else the origin is read instead.
 */
const PEER_MIN_BYTES_PER_S = 2 << 20;
/** The most one peer read asks for, and what the serving side answers at most (GET /v1/disks/{id}/image). */
export const PEER_MAX_BYTES = 16 << 20;
/** How often peers' region maps are read while there is something to copy. */
const MAP_INTERVAL_MS = 500;
/**
 * Maps read per MAP_INTERVAL_MS, round robin (peers never read yet are read at once, on
 * top): a fleet's polls cost every agent CPU on both ends, and each peer's map is still
 * read every few seconds — often enough for a gate that waits origin_wait_ms (30 s).
 */
const MAP_READS_PER_TICK = 2;
const MAP_TIMEOUT_MS = 2_000;
/** The most a disk waiting for peers asks of one peer at once (admit). */
const GATED_RUN_BYTES = 2 << 20;
/** Peers that have a region asked for it before the origin is. */
const MAX_PEER_TRIES = 3;
/**
 * With origin_wait_ms, peers that did not answer (busy, failed) or maps still to be read
 * are waited for this often, this many times; then the regions are left for later
 * (DEFER_MS) while the gate holds, else read from the origin.
 */
const BUSY_RETRY_MS = 200;
const BUSY_ROUNDS = 10;
/** How long regions whose peers did not answer are passed over by the sweep (admit). */
const DEFER_MS = 1_000;

interface PeerState extends PeerAddress {
  excluded: boolean;
  /** 1 for each region it serves, from its last map; null before the first (or after a failed read of it). */
  map: Uint8Array | null;
  /**
   * Its last map said the disk is complete and verified: what it serves can only shrink
   * (host writes), so it is not read again until the peer refuses or fails a read.
   */
  complete: boolean;
  /** Kept for its map answers (they are read into it). */
  body: Buffer | null;
  /** The most regions its maps have shown (kept while its map is dropped and read again). */
  most: number;
  /** A TLS failure that repeats (warnTls) leaves it alone until then (ms since the epoch): no handshake per map tick. */
  tlsRetryAt: number;
}

/** How long a peer whose TLS fails for a reason that repeats is left alone. */
const TLS_RETRY_MS = 30_000;

/**
 * The TLS failure last logged for each peer URL, across every disk of this process: an
 * agent with many disks, or many disks reading one untrusted agent, says it once, and
 * again only after that agent has answered (or fails another way).
 */
const tlsWarned = new Map<string, string>();

function peerKey(p: PeerAddress): string {
  return `${p.url.replace(/\/+$/, '')} ${p.disk}`;
}

export class PeerFirstSource implements RemoteSource {
  private peers: PeerState[] = [];
  private token: string | null = null;
  private next = 0;
  private canVerify: () => boolean = () => false;
  private copying: () => boolean = () => true;
  /** Which peer sent each region last (by region index), for reportCorrupt; the origin's regions are not in it. */
  private readonly sentBy = new Map<number, PeerState>();
  private readonly pool: Http1Pool;
  private readonly counters = { bytesFromPeers: 0, fallbacks: 0, fallbackBusy: 0, fallbackRefused: 0, fallbackFailed: 0, corrupt: 0, hostYields: 0, deferrals: 0 };
  /** Regions passed over until then (ms since the epoch): their peers did not answer. */
  private readonly deferred = new Map<number, number>();
  private originWaitMs = 0;
  /** 1 where some listed peer serves the region (the union of their maps), or null before any map. */
  private union: Uint8Array | null = null;
  /** When a peer last served more regions than it ever had (or the gate was first set): the origin opens originWaitMs after. */
  private lastGrowth = 0;
  private mapTimer: NodeJS.Timeout | null = null;
  private mapping = false;
  /** Where the round robin of map reads goes on. */
  private mapNext = 0;
  private done = false;

  /** `ca`: what https:// peers' certificates must chain to (config peers.ca); the system's store without it. */
  constructor(
    private readonly origin: RemoteSource,
    private readonly regionSize: number,
    private readonly log?: Logger,
    ca?: Buffer,
  ) {
    this.pool = new Http1Pool({ maxIdle: 4, ...(ca ? { ca } : {}) });
  }

  get size(): number {
    return this.origin.size;
  }
  get identity(): string {
    return this.origin.identity;
  }
  get description(): string {
    return this.origin.description;
  }

  /** Regions of the image (what maps and the union cover). */
  private get regions(): number {
    return Math.ceil(this.size / this.regionSize);
  }

  /** Peers' maps are read only while `check` says the background copy runs (not paused, failed or disabled). */
  whileCopying(check: () => boolean): void {
    this.copying = check;
  }

  /** Peers are asked only while `check` says what they send is verified (the disk has a manifest). */
  verifiedBy(check: () => boolean): void {
    this.canVerify = check;
  }

  /** Replaces the peer list (the tracker's latest), keeping what is known of peers that stay. */
  setPeers(peers: readonly PeerAddress[], token: string, originWaitMs = 0): void {
    const old = new Map(this.peers.map((p) => [peerKey(p), p]));
    this.peers = peers.map((p) => old.get(peerKey(p)) ?? { url: p.url.replace(/\/+$/, ''), disk: p.disk, excluded: false, map: null, complete: false, body: null, most: 0, tlsRetryAt: 0 });
    this.token = token;
    if (originWaitMs > 0 && this.originWaitMs <= 0) this.lastGrowth = Date.now();
    this.originWaitMs = originWaitMs;
    if (this.peers.length > 0 && !this.done && !this.mapTimer) {
      this.mapTimer = setInterval(() => void this.refreshMaps(), MAP_INTERVAL_MS);
      this.mapTimer.unref();
    }
    // New peers' maps are read now, not at the next tick.
    if (this.mapTimer && this.peers.some((p) => p.map === null)) void this.refreshMaps();
  }

  /** Nothing more to copy (the disk is complete): peers' maps are no longer read. */
  finished(): void {
    this.done = true;
    if (this.mapTimer) clearInterval(this.mapTimer);
    this.mapTimer = null;
  }

  peerStats(): PeerStats {
    const excluded = this.peers.filter((p) => p.excluded);
    return { peers: this.peers.length, excluded: excluded.length, excludedPeers: excluded.map((p) => ({ url: p.url, disk: p.disk })), ...this.counters };
  }

  /**
   * The regions the hydrator's sweep may copy now: null for all of them (no gate: a seeder,
   * no manifest, or the peers have not grown for originWaitMs), else 1 where some peer has
   * the region (all zeros before any map). A disk told it is not a seeder waits even with
   * no peer listed yet: a seeder's regions are on their way, and the stall clock bounds it
   * — except while a complete peer answers (it has every region: nothing is stalled).
   */
  admissible(now = Date.now()): Uint8Array | null {
    if (this.originWaitMs <= 0 || this.token === null || !this.canVerify()) return null;
    // Not growing is a stall only while the peers lack regions: a complete peer that
    // answers has them all, however long the union has stood still (its map is dropped
    // when it refuses or fails a read, or its map cannot be read).
    if (now - this.lastGrowth >= this.originWaitMs && !this.peers.some((p) => !p.excluded && p.complete && p.map !== null)) return null;
    return this.union ?? (this.union = new Uint8Array(this.regions));
  }

  /**
   * How many regions from `first` (of the `count` the hydrator would copy) to copy now:
   * while gated, the run one peer has from `first` (read() asks it of that peer), 0 when
   * none has `first`; all of them when not gated.
   */
  admit(first: number, count: number, now = Date.now()): number {
    if (this.admissible(now) === null) return count;
    // Short runs while waiting for peers: a peer's upload is what is scarce, and a long
    // answer holds one of its serving slots (and the regions, filling) for its whole time.
    count = Math.min(count, Math.max(1, Math.floor(GATED_RUN_BYTES / this.regionSize)));
    if (this.isDeferred(first, now)) return 0;
    let best = 0;
    for (const p of this.peers) {
      if (p.excluded || p.map === null || p.map[first] !== 1) continue;
      let n = 1;
      while (n < count && p.map[first + n] === 1 && !this.isDeferred(first + n, now)) n++;
      best = Math.max(best, n);
    }
    return best;
  }

  private isDeferred(r: number, now: number): boolean {
    const until = this.deferred.get(r);
    if (until === undefined) return false;
    if (until > now) return true;
    this.deferred.delete(r);
    return false;
  }

  /**
   * Reads peers' maps of servable regions: those never read (or whose last read failed)
   * and MAP_READS_PER_TICK others, round robin, skipping complete peers. A failed read
   * forgets that peer's map.
   */
  private async refreshMaps(): Promise<void> {
    if (this.mapping || this.done || this.token === null || !this.canVerify() || !this.copying()) return;
    this.mapping = true;
    try {
      const now = Date.now();
      const live = this.peers.filter((p) => usable(p, now) && !(p.complete && p.map !== null));
      const due = live.filter((p) => p.map === null);
      const known = live.filter((p) => p.map !== null);
      for (let i = 0; i < Math.min(MAP_READS_PER_TICK, known.length); i++) due.push(known[(this.mapNext + i) % known.length]!);
      this.mapNext = known.length ? (this.mapNext + MAP_READS_PER_TICK) % known.length : 0;
      await Promise.all(due.map((p) => this.readMap(p)));
      this.rebuildUnion();
    } finally {
      this.mapping = false;
    }
  }

  /**
   * One peer's map (GET …/image/regions) on the pooled keep-alive connections the region
   * reads use, into the peer's kept buffer: redirects and answers larger than a map can be
   * (a number per region) are refused.
   */
  private async readMap(p: PeerState): Promise<void> {
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(new DpuError('DPU_ERR_SOURCE_TRANSIENT', `peer ${p.url} did not send its map within ${MAP_TIMEOUT_MS} ms`)), MAP_TIMEOUT_MS);
    const limit = 16 * this.regions + 1024;
    let body: Buffer | null = null;
    try {
      const res = await this.pool.request(new URL(`${p.url}/v1/disks/${encodeURIComponent(p.disk)}/image/regions`), {
        method: 'GET',
        headers: { authorization: `Bearer ${this.token!}` },
        signal: ac.signal,
        onHead: (head) => {
          if (head.status !== 200) return { kind: 'discard' };
          const given = head.headers['content-length'];
          // Unknown length (chunked): up to one byte more than a map may be, to tell.
          const length = given === undefined ? limit + 1 : Number(given);
          if (!Number.isInteger(length) || length <= 0 || length > limit + 1 || (given !== undefined && length > limit)) throw new DpuError('DPU_ERR_SOURCE_TRANSIENT', `a map of ${given} bytes (at most ${limit})`);
          if (p.body === null || p.body.length < length) p.body = Buffer.allocUnsafe(Math.max(length, 4096));
          body = p.body.subarray(0, length);
          return given === undefined ? { kind: 'into', dest: body, skip: 0, exact: false, upTo: true } : { kind: 'into', dest: body, skip: 0, exact: true };
        },
      });
      const got = body as Buffer | null;
      if (res.head.status !== 200 || got === null || res.filled > limit) {
        p.map = null;
        return;
      }
      tlsWarned.delete(p.url);
      const m = JSON.parse(got.toString('latin1', 0, res.filled)) as { region_size?: unknown; runs?: unknown; complete?: unknown };
      p.map = m.region_size === this.regionSize && Array.isArray(m.runs) ? decodeRuns(m.runs, this.regions, p.map) : null;
      p.complete = p.map !== null && m.complete === true;
      if (p.map !== null) {
        // A peer that serves more than it ever did is progress: the stall clock starts over.
        let n = 0;
        for (let r = 0; r < p.map.length; r++) n += p.map[r]!;
        if (n > p.most) {
          p.most = n;
          this.lastGrowth = Date.now();
        }
      }
    } catch (err) {
      p.map = null;
      if (!this.warnTls(p, err)) this.log?.debug({ peer: p.url, disk: p.disk, err: (err as Error).message }, "reading a peer's region map failed");
    } finally {
      clearTimeout(timer);
    }
  }

  /** The union of the peers' maps; growing restarts the stall clock. */
  private rebuildUnion(): void {
    const regions = this.regions;
    const u = this.union ?? new Uint8Array(regions);
    u.fill(0);
    for (const p of this.peers) {
      if (p.excluded || p.map === null) continue;
      const m = p.map;
      for (let r = 0; r < regions; r++) u[r]! |= m[r]!;
    }
    this.union = u;
  }

  async read(offset: number, dest: Buffer, opts: RemoteReadOptions): Promise<void> {
    const first = Math.floor(offset / this.regionSize);
    const last = Math.floor((offset + dest.length - 1) / this.regionSize);
    if (opts.priority === 'background' && this.token !== null && this.wholeRegions(offset, dest.length) && dest.length <= PEER_MAX_BYTES && this.canVerify()) {
      let asked = false;
      let lastNo: 'busy' | 'refused' | 'failed' = 'refused';
      // A disk that spares the origin asks only peers whose maps say they have the regions.
      const sparing = this.originWaitMs > 0;
      for (let round = 0; ; round++) {
        const tried = new Set<PeerState>();
        for (let i = 0; i < MAX_PEER_TRIES; i++) {
          const peer = this.pick(first, last, tried, !sparing);
          if (!peer) break;
          tried.add(peer);
          asked = true;
          // Over the same link as the origin's answers: after the host's reads, as those are.
          let waited = true;
          const ask = (): Promise<'ok' | 'busy' | 'refused' | 'failed'> => {
            waited = false;
            return this.fromPeer(peer, offset, dest);
          };
          const answer = this.origin.asBackground ? this.origin.asBackground(ask) : ask();
          if (waited) this.counters.hostYields++;
          const got = await answer;
          if (got === 'ok') {
            for (let r = first; r <= last; r++) this.sentBy.set(r, peer);
            opts.onProgress?.(dest.length);
            return;
          }
          lastNo = got;
          // Only peers whose maps say they have the regions are worth a second ask.
          if (!this.peers.some((p) => !p.excluded && !tried.has(p) && holds(p, first, last))) break;
        }
        // A disk told to spare the origin asks again, rather than the origin, while its
        // gate holds: peers that did not answer (busy: serving slots full; failed: stalled,
        // its map read again) and maps still to be read are waited for, BUSY_ROUNDS times.
        // The gate open (a seeder, or the peers stalled): the origin.
        if (!sparing || this.admissible() === null) break;
        const now = Date.now();
        const pending = this.peers.some((p) => usable(p, now) && p.map === null);
        if (round >= BUSY_ROUNDS || (tried.size === 0 && !pending)) {
          // No answer, or no listed peer has them now (the tracker's list changed since the
          // sweep admitted them), while the gate holds: the regions are left for later
          // rather than read from the origin — the batch fails with DPU_ERR_BUSY, its
          // regions go back to remote (a host read waiting on them fetches them itself), and
          // the sweep takes other regions first. Regions are held `filling` at most
          // BUSY_ROUNDS retries long.
          const until = Date.now() + DEFER_MS;
          for (let r = first; r <= last; r++) {
            this.deferred.set(r, until);
            this.sentBy.delete(r);
          }
          this.counters.deferrals++;
          throw new DpuError('DPU_ERR_BUSY', `no peer that has bytes ${offset}-${offset + dest.length - 1} answered (${asked ? `the last: ${lastNo}` : 'none listed has them now'}): left for later`);
        }
        await new Promise((r) => setTimeout(r, BUSY_RETRY_MS));
      }
      if (asked) {
        this.log?.debug({ offset, length: dest.length, last: lastNo, waitingForPeers: sparing, gate: this.admissible() === null ? 'open' : 'held', sinceGrowthMs: Date.now() - this.lastGrowth, completePeers: this.peers.filter((p) => p.complete && p.map !== null).length }, 'peers did not answer: reading the origin');
        this.counters.fallbacks++;
        this.counters[lastNo === 'busy' ? 'fallbackBusy' : lastNo === 'refused' ? 'fallbackRefused' : 'fallbackFailed']++;
      }
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
    this.finished();
    this.pool.destroy();
    await this.origin.close();
  }

  /**
   * A TLS failure that will repeat (TLS_CONFIG_ERRORS): logged at warn once per peer URL and
   * kind (true), and the peer left alone for TLS_RETRY_MS; else false.
   */
  private warnTls(p: PeerState, err: unknown): boolean {
    const code = (err as NodeJS.ErrnoException | null)?.code;
    if (typeof code !== 'string' || !TLS_CONFIG_ERRORS.has(code)) return false;
    p.tlsRetryAt = Date.now() + TLS_RETRY_MS;
    if (tlsWarned.get(p.url) !== code) {
      tlsWarned.set(p.url, code);
      this.log?.warn(
        { peer: p.url, disk: p.disk, code, err: (err as Error).message },
        code === 'ERR_SSL_WRONG_VERSION_NUMBER'
          ? 'TLS with a peer failed: its URL says https:// but it does not speak TLS there (its listen.tls is not set?); its regions come from other peers or the origin'
          : "a peer's certificate is not trusted: set peers.ca to the CA that signs the agents' API certificates (listen.tls.cert), which must name the host in the peer's URL; its regions come from other peers or the origin",
      );
    } else {
      this.log?.debug({ peer: p.url, disk: p.disk, code }, 'TLS with a peer failed again (reported already): left alone for a while');
    }
    return true;
  }

  private wholeRegions(offset: number, length: number): boolean {
    const end = offset + length;
    return offset % this.regionSize === 0 && (end % this.regionSize === 0 || end === this.size);
  }

  /** The next peer, round robin: one whose map says it has regions first..last if any, else (`blind`) one with no map yet. */
  private pick(first: number, last: number, tried: ReadonlySet<PeerState>, blind: boolean): PeerState | null {
    const n = this.peers.length;
    const now = Date.now();
    const wants = [(p: PeerState) => holds(p, first, last)];
    if (blind) wants.push((p: PeerState) => p.map === null);
    for (const want of wants) {
      for (let i = 0; i < n; i++) {
        const p = this.peers[(this.next + i) % n]!;
        if (usable(p, now) && !tried.has(p) && want(p)) {
          this.next = (this.next + i + 1) % n;
          return p;
        }
      }
    }
    return null;
  }

  /**
   * 'ok' when the peer answered the whole range; else (dest not to be used) 'busy' (503: its
   * serving slots are full), 'refused' (another status) or 'failed' (an error, a stall).
   */
  private async fromPeer(peer: PeerState, offset: number, dest: Buffer): Promise<'ok' | 'busy' | 'refused' | 'failed'> {
    const ac = new AbortController();
    const stalled = (): void => ac.abort(new DpuError('DPU_ERR_SOURCE_TRANSIENT', `peer ${peer.url} stalled`));
    let timer = setTimeout(stalled, PEER_STALL_MS);
    const deadline = setTimeout(() => ac.abort(new DpuError('DPU_ERR_SOURCE_TRANSIENT', `peer ${peer.url} too slow`)), PEER_STALL_MS + (dest.length / PEER_MIN_BYTES_PER_S) * 1000);
    const renew = (): void => {
      clearTimeout(timer);
      timer = setTimeout(stalled, PEER_STALL_MS);
    };
    const end = offset + dest.length;
    const errorBody = Buffer.alloc(512);
    try {
      const res = await this.pool.request(new URL(`${peer.url}/v1/disks/${encodeURIComponent(peer.disk)}/image`), {
        method: 'GET',
        headers: { authorization: `Bearer ${this.token!}`, range: `bytes=${offset}-${end - 1}` },
        signal: ac.signal,
        onActivity: renew,
        onHead: (head) => {
          if (head.status === 206 && head.headers['content-range'] === `bytes ${offset}-${end - 1}/${this.size}`) return { kind: 'into', dest, skip: 0, exact: true };
          // A 503's code tells busy (ask again) from a peer that cannot serve at all (its
          // target failed, it shuts down): the Error body's first bytes.
          if (head.status === 503) return { kind: 'into', dest: errorBody, skip: 0, exact: false, upTo: true };
          return { kind: 'discard' };
        },
      });
      if (res.head.status !== 206 || res.filled !== dest.length) {
        // 409 (not verified there yet) and 503 (busy) are the usual refusals; a 401 or 404
        // means the tracker's list is stale: the next list fixes it.
        this.log?.debug({ peer: peer.url, disk: peer.disk, status: res.head.status, offset }, 'peer did not serve the range');
        if (res.head.status === 503 && errorBody.toString('latin1', 0, res.filled).includes('"DPU_ERR_BUSY"')) return 'busy';
        peer.complete = false; // its map is stale (or it cannot serve now): read it again
        peer.map = null;
        return res.head.status === 503 ? 'failed' : 'refused';
      }
      this.counters.bytesFromPeers += dest.length;
      return 'ok';
    } catch (err) {
      if (!this.warnTls(peer, err)) this.log?.debug({ peer: peer.url, disk: peer.disk, err: (err as Error).message, offset }, 'peer read failed');
      // Gone, or overloaded for now: what it has is read again (a map it cannot send drops it).
      peer.complete = false;
      peer.map = null;
      return 'failed';
    } finally {
      clearTimeout(timer);
      clearTimeout(deadline);
    }
  }
}

/** Not dropped for a wrong byte, nor left alone for a TLS failure that repeats. */
function usable(p: PeerState, now: number): boolean {
  return !p.excluded && p.tlsRetryAt <= now;
}

function holds(p: PeerState, first: number, last: number): boolean {
  if (p.map === null) return false;
  for (let r = first; r <= last; r++) if (p.map[r] !== 1) return false;
  return true;
}

/** One 0/1 byte per region into run lengths, alternating, a run of 0s first (which may be empty). */
export function encodeRuns(bits: ArrayLike<number>): number[] {
  const runs: number[] = [];
  let want = 0;
  let i = 0;
  while (i < bits.length) {
    let n = 0;
    while (i + n < bits.length && bits[i + n] === want) n++;
    runs.push(n);
    i += n;
    want ^= 1;
  }
  return runs;
}

/**
 * Whether `err` is a background batch the peer source left for later (its peers did not
 * answer while the disk waits for peers): not a failure; the regions are remote again.
 */
export function leftForLater(err: unknown): boolean {
  return err instanceof DpuError && err.code === 'DPU_ERR_BUSY';
}

/** Run lengths (not served first, alternating) into one byte per region of the image: into `reuse` when it has that length. */
export function decodeRuns(runs: readonly unknown[], regions: number, reuse?: Uint8Array | null): Uint8Array | null {
  const map = reuse?.length === regions ? reuse.fill(0) : new Uint8Array(regions);
  let at = 0;
  let bit = 0;
  for (const n of runs) {
    if (typeof n !== 'number' || !Number.isInteger(n) || n < 0) return null;
    if (bit === 1) map.fill(1, Math.min(at, regions), Math.min(at + n, regions));
    at += n;
    bit ^= 1;
  }
  return map;
}
