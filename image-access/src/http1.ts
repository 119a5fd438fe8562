/**
 * The range reader's HTTP/1.1 client: body bytes land in the caller's buffer straight from
 * the socket, with no copy, no per-chunk Buffer and no stream machinery in between.
 *
 * Why not node:http: its parser hands every body chunk to JavaScript as a fresh Buffer
 * (llhttp's on_body copies the socket's read buffer), which the reader then copied again
 * into the region buffer. Hydrating 512 MiB from a local nginx cost 1.3 s of the event
 * loop in node:http's socketOnData and 0.25 s of garbage collection for those chunks, most
 * of the agent's CPU (docs/benchmarks.md, "CPU per byte"). Here a socket's `onread` buffer
 * generator points each read at the unfilled part of the caller's buffer: the kernel copies
 * the body into it and JavaScript sees one callback per read, not per 64 KiB.
 *
 * What it implements, and nothing more (the origin is a Swift proxy, Glance, nginx or
 * any web server; see http-source.ts for what the reader checks of the answers):
 * - one request at a time per connection (no pipelining), keep-alive, an idle pool per
 *   origin with an idle timeout (shorter when the server's Keep-Alive header says so);
 *   a request whose reused connection turns out closed by the server before any byte of
 *   the answer is sent once more on a new one (GET and HEAD are idempotent);
 * - response framing as RFC 9112 §6.3 says: no body for HEAD, 1xx, 204 and 304;
 *   Transfer-Encoding chunked (decoded, through a copy: origins send range answers with a
 *   Content-Length); Content-Length (the zero-copy path); otherwise until the connection
 *   closes; 1xx interim answers skipped;
 * - reads never go past the end of a Content-Length body, so the next answer's bytes are
 *   never read into a caller's buffer;
 * - TLS through tls.connect (the system's CAs, plus NODE_EXTRA_CA_CERTS, or the pool's `ca`;
 *   the server name is checked; sessions resumed per origin). Over TLS the body goes
 *   through the scratch buffer and is copied: TLS already copies each decrypted record into
 *   the read buffer, and it goes on copying the records of one socket read after the socket
 *   is destroyed (node's TLSWrap::ClearOut checks for that only between reads), which would
 *   land bytes in a caller's buffer after its request had failed.
 *
 * Buffer safety: a request that fails or is aborted destroys its socket before its promise
 * settles, and a destroyed plain TCP socket never reads again (libuv stops at uv_close), so
 * no byte lands in the caller's buffer after the call has returned (the caller may hand the
 * buffer to another request). Over TLS reads never target the caller's buffer (above).
 */
import net from 'node:net';
import tls from 'node:tls';
import { DpuError } from './errors.js';

export interface ResponseHead {
  status: number;
  /** The minor version of HTTP/1.x. */
  minor: number;
  /** Header names in lower case; a repeated header's values joined with ", ". */
  headers: Record<string, string>;
}

/**
 * Where a response body goes, decided by `onHead`:
 *   into     bytes [skip, skip + dest.length) of the body land in dest. `exact`: the body
 *            must be exactly that long (a longer or shorter one fails the request); else
 *            the request ends as soon as dest is full (the connection is then closed unless
 *            the body ended there too). `upTo`: a body that ends before dest is full is
 *            not an error (`filled` says how much came): for small answers of unknown
 *            length.
 *   discard  read and dropped (small bodies: redirects, errors); a body over 64 KiB, or
 *            of unknown length, closes the connection instead.
 *   close    not read: the connection is closed.
 */
export type BodyPlan = { kind: 'into'; dest: Buffer; skip: number; exact: boolean; upTo?: boolean } | { kind: 'discard' } | { kind: 'close' };

export interface Http1RequestOptions {
  method: 'GET' | 'HEAD';
  /** Request headers; Host, Connection and User-Agent are added unless given. */
  headers: Record<string, string>;
  /** Aborting fails the request with the signal's reason and closes its connection. */
  signal: AbortSignal;
  /**
   * Called once, with the final (not 1xx) head; returns where the body goes. A throw fails
   * the request with what was thrown (the connection is closed).
   */
  onHead(head: ResponseHead): BodyPlan;
  /** Called as body bytes land in the plan's dest, with how many of its bytes are filled. */
  onBody?(filled: number): void;
  /**
   * Called on every read of the answer, whatever its bytes were for (head, skipped body,
   * chunk framing, dest): the origin is alive. A stall timeout is renewed here, not in
   * onBody, or skipping to the offset in a 200 that ignored Range would count as a stall.
   */
  onActivity?(): void;
}

export interface Http1Response {
  head: ResponseHead;
  /** Bytes of the plan's dest filled (0 for discard and close). */
  filled: number;
}

export interface Http1PoolOptions {
  /** Idle connections kept per origin. @default 8 */
  maxIdle?: number;
  /** An idle connection is closed after this long (or the server's Keep-Alive timeout less 1 s, if shorter). @default 30000 */
  idleTimeoutMs?: number;
  /** PEM CA certificate(s) that https origins must chain to, instead of the system's. */
  ca?: string | Buffer;
}

const SCRATCH = 64 << 10; // response heads, chunked and skipped bodies; a head must fit
const DISCARD_MAX = 64 << 10;
const MAX_CHUNK_LINE = 4096;
const USER_AGENT = 'smartnic-dpu-agent';

/** A keep-alive pool of HTTP/1.1 connections, per origin (scheme, host and port). */
export class Http1Pool {
  private readonly idle = new Map<string, Connection[]>();
  private readonly all = new Set<Connection>();
  private readonly maxIdle: number;
  private readonly idleTimeoutMs: number;
  private readonly ca: string | Buffer | undefined;
  /** The last TLS session of each origin, resumed by its next connection (no full handshake). */
  private readonly sessions = new Map<string, Buffer>();
  private destroyed = false;

  constructor(opts: Http1PoolOptions = {}) {
    this.maxIdle = opts.maxIdle ?? 8;
    this.idleTimeoutMs = opts.idleTimeoutMs ?? 30_000;
    this.ca = opts.ca;
  }

  /**
   * Requests sent again on a new connection because the reused one they went out on was
   * closed or reset by the server before any byte of the answer.
   */
  resent = 0;

  /** Connections open now, idle or busy. */
  get connections(): number {
    return this.all.size;
  }

  /** Sends one request and settles once its body has gone where onHead said. */
  async request(url: URL, opts: Http1RequestOptions): Promise<Http1Response> {
    const key = originKey(url);
    const request = encodeRequest(url, opts.method, opts.headers);
    for (;;) {
      if (this.destroyed) throw new DpuError('DPU_ERR_SOURCE_CLOSED');
      if (opts.signal.aborted) throw opts.signal.reason;
      const idle = this.takeIdle(key);
      const conn = idle ?? this.open(url);
      try {
        const res = await conn.exchange(request, opts);
        if (conn.reusable && !this.destroyed) this.putIdle(key, conn);
        else conn.destroy();
        return res;
      } catch (err) {
        conn.destroy();
        // The server closed an idle connection as we reused it: nothing of an answer came,
        // so the request cannot have been acted on in any way that matters to a GET.
        if (idle && conn.staleOnReuse && !opts.signal.aborted) {
          this.resent++;
          continue;
        }
        throw err;
      }
    }
  }

  /** Closes every connection; requests in flight fail with DPU_ERR_SOURCE_CLOSED. */
  destroy(): void {
    this.destroyed = true;
    for (const c of this.all) c.destroy(new DpuError('DPU_ERR_SOURCE_CLOSED'));
    this.all.clear();
    this.idle.clear();
  }

  private open(url: URL): Connection {
    const conn = new Connection(url, { ca: this.ca, sessions: this.sessions }, () => this.forget(conn));
    this.all.add(conn);
    return conn;
  }

  private forget(conn: Connection): void {
    this.all.delete(conn);
    const list = this.idle.get(conn.key);
    const i = list ? list.indexOf(conn) : -1;
    if (i >= 0) list!.splice(i, 1);
  }

  private takeIdle(key: string): Connection | undefined {
    const list = this.idle.get(key);
    // The most recently used first: the likeliest to be still open at the server.
    const conn = list?.pop();
    conn?.wake();
    return conn;
  }

  private putIdle(key: string, conn: Connection): void {
    let list = this.idle.get(key);
    if (!list) this.idle.set(key, (list = []));
    // The server closes it within a second (Keep-Alive: timeout=1 or 0): not worth keeping.
    if (list.length >= this.maxIdle || conn.serverIdleMs <= 0) {
      conn.destroy();
      return;
    }
    conn.sleep(Math.min(this.idleTimeoutMs, conn.serverIdleMs));
    list.push(conn);
  }
}

function originKey(url: URL): string {
  return `${url.protocol}//${url.host}`;
}

/** Throws DPU_ERR_CONFIG, naming the header, for a name or value HTTP cannot carry. */
export function checkHeaders(headers: Record<string, string>): void {
  for (const [name, value] of Object.entries(headers)) {
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) {
      throw new DpuError('DPU_ERR_CONFIG', `request header name "${name}" is not a valid HTTP token; fix the source's headers`);
    }
    // RFC 9110 §5.5: visible characters, spaces and tabs, obs-text (one byte each).
    if (typeof value !== 'string' || !/^[\t\x20-\x7e\x80-\xff]*$/.test(value)) {
      throw new DpuError('DPU_ERR_CONFIG', `the value of request header "${name}" holds a line break, a control character or a character HTTP cannot carry; fix the source's headers`);
    }
  }
}

function encodeRequest(url: URL, method: string, headers: Record<string, string>): string {
  checkHeaders(headers);
  const given = new Set<string>();
  let text = `${method} ${url.pathname}${url.search} HTTP/1.1\r\n`;
  for (const [name, value] of Object.entries(headers)) {
    given.add(name.toLowerCase());
    text += `${name}: ${value}\r\n`;
  }
  if (!given.has('host')) text += `Host: ${url.host}\r\n`;
  if (!given.has('user-agent')) text += `User-Agent: ${USER_AGENT}\r\n`;
  if (!given.has('connection')) text += 'Connection: keep-alive\r\n';
  return `${text}\r\n`;
}

type Framing = 'none' | 'length' | 'chunked' | 'eof';
type ChunkState = 'size' | 'data' | 'data-crlf' | 'trailers';

/** What one exchange is doing; null on an idle connection. */
interface Exchange {
  opts: Http1RequestOptions;
  resolve(res: Http1Response): void;
  reject(err: unknown): void;
  onAbort(): void;
  /** Bytes of the head received so far (they are at the start of the scratch buffer). */
  headLength: number;
  head: ResponseHead | null;
  plan: BodyPlan | null;
  framing: Framing;
  /** length: body bytes not yet received; chunked: of the current chunk. */
  left: number;
  skipLeft: number;
  filled: number;
  /** The connection may carry another request after this one. */
  keepAlive: boolean;
  received: number;
  /** The whole body has been received. */
  done: boolean;
  chunk: ChunkState;
  line: string;
}

class Connection {
  readonly key: string;
  readonly socket: net.Socket;
  private readonly scratch = Buffer.allocUnsafe(SCRATCH);
  /** Where the next read lands: a part of the scratch buffer, or of a plan's dest. */
  private target: Buffer;
  /** The target is a plan's dest (the zero-copy path), not the scratch buffer. */
  private targetIsDest = false;
  /** Reads may target a plan's dest: plain TCP only (see the top about TLS). */
  private readonly zeroCopy: boolean;
  private ex: Exchange | null = null;
  private dead = false;
  private served = 0;
  /** Set by the server's Keep-Alive: timeout=N. */
  serverIdleMs = Infinity;
  /** The last exchange failed on a reused connection before any byte of its answer. */
  staleOnReuse = false;

  constructor(
    url: URL,
    tlsOpts: { ca: string | Buffer | undefined; sessions: Map<string, Buffer> },
    private readonly onGone: () => void,
  ) {
    this.key = originKey(url);
    this.target = this.scratch;
    const onread = { buffer: (): Buffer => this.target, callback: (n: number, buf: Buffer): boolean => this.onRead(n, buf) };
    const port = Number(url.port) || (url.protocol === 'https:' ? 443 : 80);
    const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
    this.zeroCopy = url.protocol !== 'https:';
    if (url.protocol === 'https:') {
      const { ca, sessions } = tlsOpts;
      const session = sessions.get(this.key);
      // onread is honoured by tls.connect (Node's documentation) but missing from its types.
      const opts = { host, port, ...(net.isIP(host) ? {} : { servername: host }), ALPNProtocols: ['http/1.1'], ...(ca ? { ca } : {}), ...(session ? { session } : {}), onread };
      const socket = tls.connect(opts as tls.ConnectionOptions);
      socket.on('session', (s: Buffer) => sessions.set(this.key, s));
      this.socket = socket;
    } else {
      this.socket = net.connect({ host, port, onread });
    }
    this.socket.setNoDelay(true);
    this.socket.on('error', (err) => this.fail(err));
    this.socket.on('end', () => this.onEnd());
    this.socket.on('close', () => this.fail(new Error('connection closed')));
    this.socket.on('timeout', () => this.destroy());
  }

  get reusable(): boolean {
    return !this.dead && this.ex === null;
  }

  exchange(request: string, opts: Http1RequestOptions): Promise<Http1Response> {
    if (this.dead || this.ex) return Promise.reject(new Error('connection not available'));
    this.staleOnReuse = false;
    return new Promise<Http1Response>((resolve, reject) => {
      const ex: Exchange = {
        opts,
        resolve,
        reject,
        onAbort: () => this.fail(opts.signal.reason),
        headLength: 0,
        head: null,
        plan: null,
        framing: 'none',
        left: 0,
        skipLeft: 0,
        filled: 0,
        keepAlive: false,
        received: 0,
        done: false,
        chunk: 'size',
        line: '',
      };
      this.ex = ex;
      opts.signal.addEventListener('abort', ex.onAbort, { once: true });
      this.aim(this.scratch);
      this.socket.write(request, 'latin1');
    });
  }

  /** Parked in the idle pool: closed after `ms`, and not keeping the process alive. */
  sleep(ms: number): void {
    this.socket.setTimeout(ms); // 'timeout' closes it (the constructor's listener)
    this.socket.unref();
  }

  wake(): void {
    this.socket.setTimeout(0);
    this.socket.ref();
  }

  destroy(err?: Error): void {
    if (err) this.fail(err);
    else this.kill();
  }

  // ---- reading

  /** onread's callback: `n` bytes landed at the start of `buf` (the target of that read). */
  private onRead(n: number, buf: Buffer): boolean {
    const ex = this.ex;
    if (!ex) {
      this.fail(new Error(`${n} bytes from the server on an idle connection`));
      return false;
    }
    ex.received += n;
    try {
      ex.opts.onActivity?.();
      if (this.targetIsDest) {
        // The zero-copy path: the bytes are already where they belong.
        ex.filled += n;
        ex.left -= n;
        ex.opts.onBody?.(ex.filled);
      } else if (ex.head === null) {
        ex.headLength += n;
        this.parseHead(ex, ex.headLength - n);
      } else {
        this.body(ex, buf.subarray(0, n));
      }
      if (this.ex === ex) this.settleOrAim(ex);
    } catch (err) {
      this.fail(err);
      return false;
    }
    return true;
  }

  private parseHead(ex: Exchange, searchFrom: number): void {
    for (;;) {
      const end = this.scratch.indexOf('\r\n\r\n', Math.max(0, searchFrom - 3), 'latin1');
      if (end < 0 || end + 4 > ex.headLength) {
        if (ex.headLength >= SCRATCH) throw protocolError(`the response head is longer than ${SCRATCH} bytes`);
        return;
      }
      const head = parseHead(this.scratch.toString('latin1', 0, end));
      const rest = this.scratch.subarray(end + 4, ex.headLength);
      if (head.status < 200) {
        // 100 Continue, 103 Early Hints: the real answer follows.
        this.scratch.copyWithin(0, end + 4, ex.headLength);
        ex.headLength = rest.length;
        searchFrom = 0;
        continue;
      }
      this.begin(ex, head);
      if (rest.length > 0 && this.ex === ex) this.body(ex, rest);
      return;
    }
  }

  /** The final head: framing, keep-alive and the caller's plan. */
  private begin(ex: Exchange, head: ResponseHead): void {
    ex.head = head;
    const h = head.headers;
    const tokens = (h['connection'] ?? '').toLowerCase().split(',').map((s) => s.trim());
    ex.keepAlive = head.minor >= 1 ? !tokens.includes('close') : tokens.includes('keep-alive');
    const ka = /(?:^|[,\s])timeout=(\d+)/i.exec(h['keep-alive'] ?? '');
    if (ka) this.serverIdleMs = Number(ka[1]) >= 2 ? (Number(ka[1]) - 1) * 1000 : 0;
    if (ex.opts.method === 'HEAD' || head.status === 204 || head.status === 304) {
      ex.framing = 'none';
    } else if (h['transfer-encoding'] !== undefined) {
      const codings = h['transfer-encoding'].toLowerCase().split(',').map((s) => s.trim());
      ex.framing = codings[codings.length - 1] === 'chunked' ? 'chunked' : 'eof';
      if (h['content-length'] !== undefined) ex.keepAlive = false; // RFC 9112 §6.3: TE wins, then close
    } else if (h['content-length'] !== undefined) {
      const values = new Set(h['content-length'].split(',').map((s) => s.trim()));
      const v = [...values][0]!;
      if (values.size !== 1 || !/^\d{1,15}$/.test(v)) throw protocolError(`Content-Length "${h['content-length']}" is not a length`);
      ex.framing = 'length';
      ex.left = Number(v);
    } else {
      ex.framing = 'eof';
    }
    if (ex.framing === 'eof') ex.keepAlive = false;
    const plan = ex.opts.onHead(head); // may throw: the request fails with it
    ex.plan = plan;
    if (plan.kind === 'into') {
      ex.skipLeft = plan.skip;
      if (plan.exact && ex.framing === 'length' && ex.left !== plan.skip + plan.dest.length) {
        throw new DpuError('DPU_ERR_SOURCE_BAD_RANGE', `the body is ${ex.left} bytes, not the ${plan.skip + plan.dest.length} expected`);
      }
      if (ex.framing === 'none' && plan.dest.length + plan.skip > 0) {
        throw new DpuError('DPU_ERR_SOURCE_TRANSIENT', `HTTP ${head.status} answer without a body`);
      }
    } else if (plan.kind === 'close' || (ex.framing !== 'none' && (ex.framing !== 'length' || ex.left > DISCARD_MAX))) {
      // Not worth reading: done now, and the connection goes.
      ex.keepAlive = false;
      this.finish(ex);
    }
  }

  /** Body bytes that landed in the scratch buffer (heads' leftovers, chunked, skipped). */
  private body(ex: Exchange, data: Buffer): void {
    if (ex.framing === 'chunked') {
      this.chunked(ex, data);
      return;
    }
    if (ex.framing === 'length') {
      if (data.length > ex.left) throw protocolError(`${data.length - ex.left} bytes past the end of the body`);
      ex.left -= data.length;
    }
    if (ex.framing === 'none' && data.length > 0) throw protocolError(`${data.length} bytes after a response without a body`);
    this.deliver(ex, data);
  }

  /** Body bytes in order: skipped, copied into the plan's dest, or dropped. */
  private deliver(ex: Exchange, data: Buffer): void {
    const plan = ex.plan!;
    if (plan.kind !== 'into' || data.length === 0) return;
    let d = data;
    if (ex.skipLeft > 0) {
      const n = Math.min(ex.skipLeft, d.length);
      ex.skipLeft -= n;
      d = d.subarray(n);
    }
    if (d.length === 0) return;
    const room = plan.dest.length - ex.filled;
    if (d.length > room && plan.exact) {
      throw new DpuError('DPU_ERR_SOURCE_BAD_RANGE', `the body is longer than the ${plan.skip + plan.dest.length} bytes expected`);
    }
    const n = Math.min(room, d.length);
    d.copy(plan.dest, ex.filled, 0, n);
    ex.filled += n;
    ex.opts.onBody?.(ex.filled);
  }

  private chunked(ex: Exchange, data: Buffer): void {
    let i = 0;
    while (i < data.length) {
      switch (ex.chunk) {
        case 'size':
        case 'trailers': {
          const nl = data.indexOf(10, i);
          const end = nl < 0 ? data.length : nl + 1;
          ex.line += data.toString('latin1', i, end);
          i = end;
          if (ex.line.length > MAX_CHUNK_LINE) throw protocolError('a chunk-size or trailer line is too long');
          if (nl < 0) break;
          const line = ex.line.replace(/\r?\n$/, '');
          ex.line = '';
          if (ex.chunk === 'trailers') {
            if (line === '') {
              ex.done = true;
              if (i < data.length) throw protocolError(`${data.length - i} bytes past the end of a chunked body`);
              return;
            }
            break;
          }
          const m = /^([0-9a-fA-F]{1,13})[ \t]*(?:;.*)?$/.exec(line);
          if (!m) throw protocolError(`"${line.slice(0, 40)}" is not a chunk size`);
          ex.left = parseInt(m[1]!, 16);
          ex.chunk = ex.left === 0 ? 'trailers' : 'data';
          break;
        }
        case 'data': {
          const n = Math.min(ex.left, data.length - i);
          this.deliver(ex, data.subarray(i, i + n));
          ex.left -= n;
          i += n;
          if (ex.left === 0) ex.chunk = 'data-crlf';
          break;
        }
        case 'data-crlf': {
          const c = data[i++]!;
          if (c === 10) ex.chunk = 'size';
          else if (c !== 13) throw protocolError('a chunk is not followed by CRLF');
          break;
        }
      }
    }
  }

  /** After each read: the request is done, or the next read's target is set. */
  private settleOrAim(ex: Exchange): void {
    const plan = ex.plan;
    if (ex.head !== null) {
      if ((ex.framing === 'length' && ex.left === 0) || ex.framing === 'none') ex.done = true;
      const full = plan?.kind === 'into' && ex.filled === plan.dest.length && ex.skipLeft === 0;
      if (full && !plan.exact && !ex.done) {
        ex.keepAlive = false; // the rest of the body is not wanted
        this.finish(ex);
        return;
      }
      if (ex.done) {
        if (plan?.kind === 'into' && !full && !plan.upTo) throw new DpuError('DPU_ERR_SOURCE_TRANSIENT', `the body ended after ${ex.filled} of ${plan.dest.length} bytes`);
        this.finish(ex);
        return;
      }
    }
    if (ex.head === null) {
      this.aim(this.scratch.subarray(ex.headLength));
    } else if (this.zeroCopy && plan?.kind === 'into' && ex.framing === 'length' && ex.skipLeft === 0) {
      this.aim(plan.dest.subarray(ex.filled, ex.filled + Math.min(plan.dest.length - ex.filled, ex.left)), true);
    } else if (ex.framing === 'length') {
      this.aim(this.scratch.subarray(0, Math.min(SCRATCH, ex.left, ex.skipLeft > 0 ? ex.skipLeft : SCRATCH)));
    } else {
      this.aim(this.scratch);
    }
  }

  private aim(target: Buffer, isDest = false): void {
    this.target = target;
    this.targetIsDest = isDest;
  }

  private onEnd(): void {
    const ex = this.ex;
    if (ex && ex.head !== null && ex.framing === 'eof') {
      const plan = ex.plan;
      if (plan?.kind === 'into' && (ex.filled < plan.dest.length || ex.skipLeft > 0)) {
        this.fail(new DpuError('DPU_ERR_SOURCE_TRANSIENT', `the body ended after ${ex.filled} of ${plan.dest.length} bytes`));
        return;
      }
      ex.keepAlive = false;
      this.finish(ex);
      return;
    }
    this.fail(new Error(ex ? `the server closed the connection after ${ex.received} bytes of its answer` : 'the server closed an idle connection'));
  }

  private finish(ex: Exchange): void {
    this.ex = null;
    this.served++;
    ex.opts.signal.removeEventListener('abort', ex.onAbort);
    this.aim(this.scratch);
    if (!ex.keepAlive) this.kill();
    const plan = ex.plan;
    ex.resolve({ head: ex.head!, filled: plan?.kind === 'into' ? ex.filled : 0 });
  }

  /** Fails the exchange in flight (if any) with err, after the socket can no longer read. */
  private fail(err: unknown): void {
    const ex = this.ex;
    this.ex = null;
    this.kill();
    if (!ex) return;
    ex.opts.signal.removeEventListener('abort', ex.onAbort);
    this.staleOnReuse = this.served > 0 && ex.received === 0 && !ex.opts.signal.aborted;
    ex.reject(err);
  }

  private kill(): void {
    if (this.dead) return;
    this.dead = true;
    this.aim(this.scratch);
    this.socket.destroy();
    this.onGone();
  }
}

function protocolError(what: string): DpuError {
  return new DpuError('DPU_ERR_SOURCE_TRANSIENT', `malformed HTTP response: ${what}`);
}

function parseHead(text: string): ResponseHead {
  const lines = text.split('\r\n');
  const m = /^HTTP\/1\.(\d) (\d{3})(?: .*)?$/.exec(lines[0]!);
  if (!m) throw protocolError(`status line "${lines[0]!.slice(0, 60)}"`);
  const headers: Record<string, string> = {};
  let last: string | null = null;
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i]!;
    if (line.startsWith(' ') || line.startsWith('\t')) {
      // Obsolete line folding: part of the previous header's value.
      if (last === null) throw protocolError('a folded line before any header');
      headers[last] += ` ${line.trim()}`;
      continue;
    }
    const colon = line.indexOf(':');
    if (colon <= 0) throw protocolError(`header line "${line.slice(0, 60)}"`);
    const name = line.slice(0, colon).toLowerCase();
    if (!/^[!#$%&'*+.^_`|~0-9a-z-]+$/.test(name)) throw protocolError(`header name "${name.slice(0, 60)}"`);
    const value = line.slice(colon + 1).trim();
    headers[name] = headers[name] === undefined ? value : `${headers[name]}, ${value}`;
    last = name;
  }
  return { status: Number(m[2]), minor: Number(m[1]), headers };
}
