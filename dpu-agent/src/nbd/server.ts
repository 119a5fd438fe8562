/**
 * The NBD server: listens on a unix socket (the default: only local processes with
 * access to the path can connect) or TCP, negotiates, then runs a Transmission per
 * connection against the export's BlockBackend. It knows nothing of streaming.
 *
 * With `tls` it offers NBD_OPT_STARTTLS (nbd/tls.ts has the modes); the transmission then
 * runs over the TLS socket. Without it nothing changes: the plain socket is used as is.
 */
import fs from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import type { BlockBackend } from '../block/backend.js';
import { DpuError } from '../../../image-access/src/errors.js';
import { type Conn, type ExportCatalog, HandshakeClosed, negotiate, type NegotiableExport, SocketReader } from './handshake.js';
import { MAX_PAYLOAD, PREFERRED_BLOCK, TFlag } from './protocol.js';
import type { NbdTls } from './tls.js';
import { Transmission, type TransmissionStats } from './transmission.js';

export type Endpoint = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

export interface NbdExport {
  name: string;
  description?: string;
  backend: BlockBackend;
}

export interface NbdServerOptions {
  exports: NbdExport[];
  /** The export the empty name selects. @default the first export */
  defaultExport?: string;
  log: Logger;
  /** A connection that has not chosen an export by then is closed, ms. @default 10000 */
  handshakeTimeoutMs?: number;
  /** Offer TLS (NBD_OPT_STARTTLS), and require it in mode `require`. @default no TLS */
  tls?: NbdTls;
}

/** `unix:/path/to.sock`, `tcp:HOST:PORT` or `tcp:[v6]:PORT`. */
export function parseEndpoint(spec: string): Endpoint {
  if (spec.startsWith('unix:')) {
    const path = spec.slice(5);
    if (!path) throw new DpuError('DPU_ERR_CONFIG', `listen endpoint "${spec}" has no socket path; write unix:/run/dpu-agent/disk.sock`);
    return { kind: 'unix', path };
  }
  if (spec.startsWith('tcp:')) {
    const m = /^tcp:(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(spec);
    const port = m ? Number(m[3]) : NaN;
    if (!m || port > 65535) throw new DpuError('DPU_ERR_CONFIG', `listen endpoint "${spec}" is not tcp:HOST:PORT (e.g. tcp:127.0.0.1:10809)`);
    return { kind: 'tcp', host: (m[1] ?? m[2])!, port };
  }
  throw new DpuError('DPU_ERR_CONFIG', `listen endpoint "${spec}" must start with unix: or tcp: (e.g. unix:/run/dpu-agent/disk.sock)`);
}

export function exportFlags(backend: BlockBackend): number {
  const c = backend.capabilities;
  let f = TFlag.HAS_FLAGS;
  if (c.readOnly) f |= TFlag.READ_ONLY;
  if (c.flush) f |= TFlag.SEND_FLUSH;
  if (c.fua) f |= TFlag.SEND_FUA;
  if (c.trim && !c.readOnly) f |= TFlag.SEND_TRIM;
  if (c.writeZeroes && !c.readOnly) f |= TFlag.SEND_WRITE_ZEROES;
  if (c.writeZeroes && c.fastZero && !c.readOnly) f |= TFlag.SEND_FAST_ZERO;
  if (c.cache) f |= TFlag.SEND_CACHE;
  if (c.multiConn) f |= TFlag.CAN_MULTI_CONN;
  return f;
}

/**
 * The preferred block size to advertise: the backend's, kept to what proto.md allows (a
 * power of two, at least 512 and the minimum block, at most the maximum payload) and never
 * below the 4 KiB default; the default when the backend states none.
 */
export function preferredBlock(backend: BlockBackend): number {
  const p = backend.preferredBlockSize;
  if (p === undefined || !Number.isInteger(Math.log2(p))) return PREFERRED_BLOCK;
  return Math.min(MAX_PAYLOAD, Math.max(PREFERRED_BLOCK, p));
}

export class NbdServer {
  private readonly server: net.Server;
  private readonly catalog: ExportCatalog;
  private readonly backends = new Map<string, BlockBackend>();
  private readonly sockets = new Set<net.Socket>();
  private readonly transmissions = new Set<Transmission>();
  private readonly log: Logger;
  private readonly handshakeTimeoutMs: number;
  private readonly tls: NbdTls | undefined;
  private unixPath: string | null = null;
  readonly stats: TransmissionStats & { connections: number } = { requests: 0, errors: 0, connections: 0 };

  constructor(opts: NbdServerOptions) {
    if (opts.exports.length === 0) throw new DpuError('DPU_ERR_CONFIG', 'an NBD server needs at least one export');
    this.log = opts.log;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 10_000;
    this.tls = opts.tls;
    const entries: NegotiableExport[] = opts.exports.map((e) => {
      this.backends.set(e.name, e.backend);
      return { name: e.name, description: e.description ?? '', size: e.backend.size, flags: exportFlags(e.backend), preferredBlock: () => preferredBlock(e.backend) };
    });
    const defaultName = opts.defaultExport ?? entries[0]!.name;
    const byName = new Map(entries.map((e) => [e.name, e]));
    this.catalog = {
      resolve: (name) => byName.get(name === '' ? defaultName : name) ?? null,
      list: () => entries,
    };
    // allowHalfOpen: a client may send NBD_CMD_DISC (or its last requests) and then shut
    // down its sending side, as libnbd does; the replies still owed must go out after that.
    this.server = net.createServer({ noDelay: true, allowHalfOpen: true }, (socket) => this.accept(socket));
  }

  /** Starts listening; resolves with the NBD URI clients use. */
  async listen(ep: Endpoint): Promise<string> {
    if (ep.kind === 'unix') {
      await removeStaleSocket(ep.path);
      await new Promise<void>((resolve, reject) => {
        this.server.once('error', reject);
        this.server.listen(ep.path, () => {
          this.server.off('error', reject);
          resolve();
        });
      });
      fs.chmodSync(ep.path, 0o660);
      this.unixPath = ep.path;
      return `${this.tls ? 'nbds' : 'nbd'}+unix:///?socket=${ep.path}`;
    }
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(ep.port, ep.host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    const addr = this.server.address() as net.AddressInfo;
    const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
    return `${this.tls ? 'nbds' : 'nbd'}://${host}:${addr.port}/`;
  }

  private accept(socket: net.Socket): void {
    this.stats.connections++;
    this.sockets.add(socket);
    const log = this.log.child({ conn: this.stats.connections });
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', (err) => log.debug({ err: err.message }, 'socket error'));
    const conn: Conn = { socket, reader: new SocketReader(socket), tls: false, upgraded: (secure) => this.track(secure, socket) };
    const timer = setTimeout(() => {
      log.warn(`no export chosen within ${this.handshakeTimeoutMs} ms; closing`);
      conn.socket.destroy();
    }, this.handshakeTimeoutMs);
    negotiate(conn, this.catalog, log, this.tls)
      .then((result) => {
        clearTimeout(timer);
        const s = conn.socket; // the TLS socket after STARTTLS
        if (!result || s.destroyed) return;
        const queue = conn.reader.detach();
        log.debug({ export: result.export.name, tls: conn.tls }, 'transmission');
        // The transmission may finish inside its constructor (the client pipelined requests
        // and DISC, or bad magic, behind NBD_OPT_GO): `t` is not assigned yet then.
        let finished = false;
        let t: Transmission | undefined;
        t = new Transmission(s, this.backends.get(result.export.name)!, result.export.flags, queue, log, this.stats, () => {
          finished = true;
          if (t) this.transmissions.delete(t);
        });
        if (finished) return;
        const tracked = t;
        this.transmissions.add(tracked);
        s.on('close', () => this.transmissions.delete(tracked));
      })
      .catch((err: Error) => {
        clearTimeout(timer);
        if (!(err instanceof HandshakeClosed)) log.warn({ err: err.message }, 'negotiation failed');
        conn.socket.destroy();
      });
  }

  /** A TLS socket wrapping `plain`: closed by close() as well, and it takes `plain` with it. */
  private track(secure: net.Socket, plain: net.Socket): void {
    this.sockets.add(secure);
    secure.once('close', () => {
      this.sockets.delete(secure);
      plain.destroy();
    });
  }

  /** Stops accepting, lets outstanding requests answer (up to `graceMs`), closes every connection. */
  async close(graceMs = 5_000): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const t of this.transmissions) t.shutdown();
    const deadline = Date.now() + graceMs;
    while ([...this.transmissions].some((t) => t.outstanding > 0) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
    }
    for (const s of this.sockets) s.destroy();
    await closed;
    if (this.unixPath) fs.rmSync(this.unixPath, { force: true });
  }
}

/** A socket file nobody answers on is left over from a crash; one that answers is in use. */
async function removeStaleSocket(path: string): Promise<void> {
  if (!fs.existsSync(path)) return;
  const alive = await new Promise<boolean>((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (alive) throw new DpuError('DPU_ERR_CONFIG', `${path} is in use by another NBD server; stop it or choose another --listen path`);
  fs.rmSync(path, { force: true });
}
