/**
 * Phase 1 of an NBD connection: fixed newstyle negotiation. Ends with the export the
 * client chose (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or with the connection closed. Every
 * refusal carries a message saying what was wrong.
 */
import type { Socket } from 'node:net';
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
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  MAX_OPTION_BYTES,
  MAX_PAYLOAD,
  MIN_BLOCK,
  Opt,
  OPTION_HEADER_BYTES,
  PREFERRED_BLOCK,
  Rep,
} from './protocol.js';

export interface NegotiableExport {
  name: string;
  description: string;
  size: number;
  flags: number;
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

export async function negotiate(socket: Socket, reader: SocketReader, catalog: ExportCatalog, log: Logger): Promise<Negotiated | null> {
  socket.write(encodeGreeting());
  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~CLIENT_FLAGS_KNOWN) !== 0) {
    log.warn({ clientFlags }, 'client sent unknown handshake flags; closing');
    socket.destroy();
    return null;
  }
  const noZeroes = (clientFlags & FLAG_NO_ZEROES) !== 0;
  const reply = (option: number, type: number, data?: Buffer): void => {
    socket.write(encodeOptionReply(option, type, data));
  };
  const refuse = (option: number, type: number, message: string): void => {
    log.debug({ option, type, message }, 'option refused');
    reply(option, type, Buffer.from(message, 'utf8'));
  };

  for (let n = 0; n < MAX_OPTIONS; n++) {
    const head = await reader.read(OPTION_HEADER_BYTES);
    if (!head.subarray(0, 8).equals(IHAVEOPT)) {
      log.warn('option without IHAVEOPT magic; closing');
      socket.destroy();
      return null;
    }
    const option = head.readUInt32BE(8);
    const length = head.readUInt32BE(12);
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
        reply(option, Rep.INFO, encodeInfoBlockSize(MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD));
        reply(option, Rep.ACK);
        if (option === Opt.GO) return { export: exp };
        break;
      }
      case Opt.STARTTLS:
        refuse(option, Rep.ERR_UNSUP, 'TLS is not offered on this export; use a unix socket or a trusted network');
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
  socket.destroy();
  return null;
}
