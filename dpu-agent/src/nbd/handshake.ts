/**
 * Phase 1 of an NBD connection: fixed newstyle negotiation. Ends with the export the
 * client chose (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or with the connection closed. Every
 * refusal carries a message saying what was wrong.
 *
 * TLS (NBD_OPT_STARTTLS) swaps the stream under the negotiation, so the order matters:
 *   1. STARTTLS arrives with no data and nothing after it: a client must wait for our ACK
 *      before its TLS ClientHello, so a byte already queued behind STARTTLS was sent in
 *      plaintext by a client that broke the protocol, and the connection is closed (taking
 *      it as the start of the TLS handshake, or dropping it, would both be wrong).
 *   2. The ACK goes out on the plain socket and is handed to the kernel in full before the
 *      socket is wrapped, so no plaintext byte of ours can land behind TLS bytes.
 *   3. The plain reader lets go of the socket (its queue is empty: checked again) and the
 *      socket is handed to a tls.Server, which wraps it and runs the handshake.
 *   4. Negotiation goes on, with a fresh reader on the TLS socket, only once the handshake
 *      is complete and, with verify-peer, the client's certificate verified; a failed
 *      handshake closes the connection.
 * `Conn` carries the socket and reader in use, so whoever owns the connection (timeouts,
 * the transmission phase) always holds the current one.
 */
import type { Socket } from 'node:net';
import tls from 'node:tls';
import type { Logger } from 'pino';
import { ByteQueue } from './byte-queue.js';
import {
  CLIENT_FLAGS_KNOWN,
  decodeGoRequest,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOptionReply,
  encodeServerEntry,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  MAX_OPTION_BYTES,
  MAX_PAYLOAD,
  MIN_BLOCK,
  Opt,
  OPTION_HEADER_BYTES,
  Rep,
} from './protocol.js';
import type { NbdTls } from './tls.js';

export interface NegotiableExport {
  name: string;
  description: string;
  size: number;
  flags: number;
  /** NBD_INFO_BLOCK_SIZE's preferred block size now (it may change between connections). */
  preferredBlock(): number;
}

export interface ExportCatalog {
  /** The export for a name the client asked for ('' means the default); null if none. */
  resolve(name: string): NegotiableExport | null;
  list(): NegotiableExport[];
}

/** Options a client may send before choosing an export; more is a misbehaving client. */
const MAX_OPTIONS = 128;

export class HandshakeClosed extends Error {}

/** Reads exact byte counts from a socket during negotiation. */
export class SocketReader {
  readonly queue = new ByteQueue();
  private want = 0;
  private waiter: ((err?: Error) => void) | null = null;
  private ended: Error | null = null;
  private readonly onData = (b: Buffer): void => {
    this.queue.push(b);
    if (this.waiter && this.queue.length >= this.want) this.wakeUp();
  };
  private readonly onEnd = (): void => {
    this.ended = new HandshakeClosed('client closed the connection during negotiation');
    if (this.waiter) this.wakeUp(this.ended);
  };

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
  }

  private wakeUp(err?: Error): void {
    const w = this.waiter!;
    this.waiter = null;
    w(err);
  }

  private async need(n: number): Promise<void> {
    while (this.queue.length < n) {
      if (this.ended) throw this.ended;
      this.want = n;
      await new Promise<void>((resolve, reject) => {
        this.waiter = (err) => (err ? reject(err) : resolve());
      });
    }
  }

  async read(n: number): Promise<Buffer> {
    await this.need(n);
    return this.queue.take(n);
  }

  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      await this.need(1);
      left -= this.queue.skip(left);
    }
  }

  /** Stops listening; the bytes already received stay in `queue` for the next phase. */
  detach(): ByteQueue {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    return this.queue;
  }
}

export interface Negotiated {
  export: NegotiableExport;
}

/** One connection during negotiation: the socket and reader in use (the TLS ones after STARTTLS). */
export interface Conn {
  socket: Socket;
  reader: SocketReader;
  /** Set once the TLS handshake completed. */
  tls: boolean;
  /** Called with the TLS socket once the handshake completed. */
  upgraded?: (secure: Socket) => void;
}

const TLS_REQUIRED_MESSAGE = 'this export requires TLS: send NBD_OPT_STARTTLS first (libnbd: an nbds:// URI; qemu: tls-creds)';

export async function negotiate(conn: Conn, catalog: ExportCatalog, log: Logger, tlsOpts?: NbdTls): Promise<Negotiated | null> {
  conn.socket.write(encodeGreeting());
  const clientFlags = (await conn.reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~CLIENT_FLAGS_KNOWN) !== 0) {
    log.warn({ clientFlags }, 'client sent unknown handshake flags; closing');
    conn.socket.destroy();
    return null;
  }
  const noZeroes = (clientFlags & FLAG_NO_ZEROES) !== 0;
  const tlsRequired = tlsOpts?.mode === 'require';
  if (tlsRequired && (clientFlags & FLAG_FIXED_NEWSTYLE) === 0) {
    // TLS needs fixed newstyle (proto.md), and without it there is no way to refuse options.
    log.warn({ code: 'DPU_ERR_NBD_TLS' }, 'client does not speak fixed newstyle, so cannot start TLS, and this export requires TLS; closing');
    conn.socket.destroy();
    return null;
  }
  const reply = (option: number, type: number, data?: Buffer): void => {
    conn.socket.write(encodeOptionReply(option, type, data));
  };
  const refuse = (option: number, type: number, message: string): void => {
    log.debug({ option, type, message }, 'option refused');
    reply(option, type, Buffer.from(message, 'utf8'));
  };
  let warnedPlain = false;

  for (let n = 0; n < MAX_OPTIONS; n++) {
    const { socket, reader } = conn;
    const head = await reader.read(OPTION_HEADER_BYTES);
    if (!head.subarray(0, 8).equals(IHAVEOPT)) {
      log.warn('option without IHAVEOPT magic; closing');
      socket.destroy();
      return null;
    }
    const option = head.readUInt32BE(8);
    const length = head.readUInt32BE(12);
    if (tlsRequired && !conn.tls && option !== Opt.STARTTLS && option !== Opt.ABORT) {
      // FORCEDTLS: nothing but STARTTLS and ABORT before TLS; EXPORT_NAME cannot be refused.
      await reader.skip(length);
      if (!warnedPlain) {
        warnedPlain = true;
        log.warn({ code: 'DPU_ERR_NBD_TLS', option }, 'client negotiates without TLS on an export that requires it; refusing its options');
      }
      if (option === Opt.EXPORT_NAME) {
        socket.destroy();
        return null;
      }
      refuse(option, Rep.ERR_TLS_REQD, TLS_REQUIRED_MESSAGE);
      continue;
    }
    if (length > MAX_OPTION_BYTES) {
      await reader.skip(length);
      if (option === Opt.EXPORT_NAME) {
        socket.destroy(); // EXPORT_NAME has no error reply
        return null;
      }
      refuse(option, Rep.ERR_TOO_BIG, `option payload of ${length} bytes is over the ${MAX_OPTION_BYTES}-byte limit`);
      continue;
    }
    const data = length > 0 ? await reader.read(length) : Buffer.alloc(0);
    switch (option) {
      case Opt.EXPORT_NAME: {
        const exp = catalog.resolve(data.toString('utf8'));
        if (!exp) {
          log.warn({ name: data.toString('utf8') }, 'NBD_OPT_EXPORT_NAME for an unknown export; closing');
          socket.destroy();
          return null;
        }
        socket.write(encodeExportNameReply(exp.size, exp.flags, noZeroes));
        return { export: exp };
      }
      case Opt.ABORT:
        reply(option, Rep.ACK);
        socket.end();
        return null;
      case Opt.LIST:
        if (length !== 0) {
          refuse(option, Rep.ERR_INVALID, 'NBD_OPT_LIST takes no data');
          break;
        }
        for (const e of catalog.list()) reply(option, Rep.SERVER, encodeServerEntry(e.name, e.description));
        reply(option, Rep.ACK);
        break;
      case Opt.INFO:
      case Opt.GO: {
        const req = decodeGoRequest(data);
        if (!req) {
          refuse(option, Rep.ERR_INVALID, 'malformed NBD_OPT_INFO/GO: the name and info-request lengths do not match the option length');
          break;
        }
        const exp = catalog.resolve(req.name);
        if (!exp) {
          const names = catalog.list().map((e) => JSON.stringify(e.name)).join(', ');
          refuse(option, Rep.ERR_UNKNOWN, `no export named ${JSON.stringify(req.name)}; this server has ${names} (the empty name is the default)`);
          break;
        }
        reply(option, Rep.INFO, encodeInfoExport(exp.size, exp.flags));
        if (req.infos.includes(Info.NAME)) reply(option, Rep.INFO, encodeInfoString(Info.NAME, exp.name));
        if (req.infos.includes(Info.DESCRIPTION)) reply(option, Rep.INFO, encodeInfoString(Info.DESCRIPTION, exp.description));
        reply(option, Rep.INFO, encodeInfoBlockSize(MIN_BLOCK, exp.preferredBlock(), MAX_PAYLOAD));
        reply(option, Rep.ACK);
        if (option === Opt.GO) return { export: exp };
        break;
      }
      case Opt.STARTTLS:
        if (!tlsOpts) {
          refuse(option, Rep.ERR_UNSUP, 'TLS is not offered on this export; use a unix socket or a trusted network');
        } else if (conn.tls) {
          refuse(option, Rep.ERR_INVALID, 'TLS is already active on this connection');
        } else if (length !== 0) {
          refuse(option, Rep.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
        } else if (!(await startTls(conn, option, tlsOpts, log))) {
          return null;
        }
        break;
      case Opt.STRUCTURED_REPLY:
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
      case Opt.EXTENDED_HEADERS:
        refuse(option, Rep.ERR_UNSUP, 'this server sends simple replies only');
        break;
      default:
        refuse(option, Rep.ERR_UNSUP, `option ${option} is not supported`);
    }
  }
  log.warn(`client sent more than ${MAX_OPTIONS} options without choosing an export; closing`);
  conn.socket.destroy();
  return null;
}

/**
 * Acknowledges NBD_OPT_STARTTLS and upgrades `conn` in place (steps 1–4 at the top of the
 * file). False when the connection was closed: a protocol error or a failed handshake,
 * both logged here.
 */
async function startTls(conn: Conn, option: number, opts: NbdTls, log: Logger): Promise<boolean> {
  const plain = conn.socket;
  if (conn.reader.queue.length > 0) {
    log.warn({ code: 'DPU_ERR_NBD_PROTOCOL', bytes: conn.reader.queue.length }, 'client sent data after NBD_OPT_STARTTLS without waiting for the reply; closing');
    plain.destroy();
    return false;
  }
  plain.write(encodeOptionReply(option, Rep.ACK));
  // The client sends nothing before it has the whole ACK; if it does, the plain reader,
  // still attached, queues it and the check below catches it.
  if (plain.writableLength > 0) await new Promise<void>((resolve) => plain.once('drain', resolve).once('close', resolve));
  const queue = conn.reader.detach();
  if (queue.length > 0 || plain.destroyed) {
    if (!plain.destroyed) log.warn({ code: 'DPU_ERR_NBD_PROTOCOL' }, 'client sent data after NBD_OPT_STARTTLS before the TLS handshake; closing');
    plain.destroy();
    return false;
  }
  // Node's tls.Server does the server side of the handshake and the verification of client
  // certificates (requestCert/rejectUnauthorized): a connection is handed to it, as its
  // documented 'connection' event allows. One per connection, so that its events can only
  // be about this one.
  const upgrader = tls.createServer(opts.serverOptions);
  const outcome = await new Promise<tls.TLSSocket | { reason: string; message: string }>((resolve) => {
    upgrader.once('secureConnection', (s: tls.TLSSocket) => resolve(s));
    upgrader.once('tlsClientError', (err: NodeJS.ErrnoException, s: tls.TLSSocket) => {
      s.destroy();
      // A certificate that does not verify ends the handshake as a hang-up; the reason is this.
      const reason = s.authorizationError ? String(s.authorizationError) : (err.code ?? 'TLS_ERROR');
      // OpenSSL errors carry a short `reason` ("peer did not return a certificate").
      resolve({ reason, message: s.authorizationError ? `client certificate not accepted (${reason})` : ((err as { reason?: string }).reason ?? err.message.split('\n')[0]!) });
    });
    // tlsClientError follows every close before the handshake completed; this is a backstop.
    plain.once('close', () => setImmediate(() => resolve({ reason: 'CLOSED', message: 'the connection closed during the TLS handshake' })));
    upgrader.emit('connection', plain);
  });
  if (!(outcome instanceof tls.TLSSocket)) {
    log.warn({ code: 'DPU_ERR_NBD_TLS', reason: outcome.reason }, `TLS handshake failed: ${outcome.message}; closing`);
    plain.destroy();
    return false;
  }
  const secure = outcome;
  // As the plain socket: a client may half-close after its last requests, and the replies
  // still owed must go out after that.
  secure.allowHalfOpen = true;
  secure.on('error', (err: Error) => log.debug({ err: err.message }, 'TLS socket error'));
  conn.upgraded?.(secure);
  if (opts.verifyPeer && !secure.authorized) {
    // rejectUnauthorized refuses these already; checked again because serving an
    // unverified client here would be the one silent failure of mutual TLS.
    log.warn({ code: 'DPU_ERR_NBD_TLS', reason: String(secure.authorizationError) }, 'client certificate not verified; closing');
    secure.destroy();
    return false;
  }
  conn.socket = secure;
  conn.reader = new SocketReader(secure);
  conn.tls = true;
  const peer = opts.verifyPeer ? secure.getPeerCertificate() : null;
  log.debug({ protocol: secure.getProtocol(), cipher: secure.getCipher().name, ...(peer ? { peer: peer.subject?.CN } : {}) }, 'TLS established');
  return true;
}
