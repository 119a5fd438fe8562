/**
 * The test suite's own HTTP image origin: serves one file with Range support and injects
 * faults on request, so tests can see the disk answer correct bytes or a clean error
 * under every failure an origin can produce. It also counts what it served, and can cap
 * its rate (for tests that must see hydration still running).
 */
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export type Fault =
  | '500' // 500 before any byte
  | '503' // 503
  | 'reset' // socket destroyed before the headers
  | 'truncate' // 206 headers, half the body, then the connection is destroyed
  | 'full200' // ignore Range: 200 with the whole object
  | 'wrong-range' // 206 with a Content-Range that starts elsewhere
  | 'stall' // 206 headers and part of the body, then silence (connection kept open)
  | 'corrupt'; // 206 with the right range and length, one byte flipped

export interface OriginOptions {
  file: string;
  /** Cap on the bytes/s of every response body together; 0 = none. */
  rate?: number;
  /** Faults applied to the next GET requests, one per request, in order. */
  faults?: Fault[];
  /** Answer 404 to everything (a missing image). */
  notFound?: boolean;
  /** Omit ETag. */
  noEtag?: boolean;
}

export interface OriginStats {
  requests: number;
  rangeRequests: number;
  bytesSent: number;
  faultsInjected: number;
}

export class TestOrigin {
  readonly stats: OriginStats = { requests: 0, rangeRequests: 0, bytesSent: 0, faultsInjected: 0 };
  readonly faults: Fault[];
  private readonly server: http.Server;
  private readonly sockets = new Set<Socket>();
  private readonly size: number;
  private readonly fd: number;
  private readonly opts: OriginOptions;
  private nextSendAt = 0;
  private down = false;
  url = '';

  constructor(opts: OriginOptions) {
    this.opts = opts;
    this.faults = [...(opts.faults ?? [])];
    this.fd = fs.openSync(opts.file, 'r');
    this.size = fs.fstatSync(this.fd).size;
    this.server = http.createServer((req, res) => this.handle(req, res));
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
  }

  /** Listens on loopback by default; the lab binds it inside a network namespace of its own. */
  async start(host = '127.0.0.1', port = 0): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(port, host, resolve));
    const bound = (this.server.address() as AddressInfo).port;
    this.url = `http://${host}:${bound}/images/disk.raw`;
    return this.url;
  }

  /** While down, every connection is reset at once (an origin outage); existing ones too. */
  setDown(down: boolean): void {
    this.down = down;
    if (down) for (const s of this.sockets) s.destroy();
  }

  setRate(bytesPerSecond: number): void {
    this.opts.rate = bytesPerSecond;
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    fs.closeSync(this.fd);
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.stats.requests++;
    if (this.down) {
      req.socket.destroy();
      return;
    }
    if (this.opts.notFound) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('no such image\n');
      return;
    }
    const etag = this.opts.noEtag ? {} : { etag: '"test-image-v1"' };
    if (req.method === 'HEAD') {
      res.writeHead(200, { 'content-length': this.size, 'accept-ranges': 'bytes', ...etag }).end();
      return;
    }
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    let start = 0;
    let end = this.size - 1;
    let ranged = false;
    if (m) {
      start = Number(m[1]);
      end = Math.min(Number(m[2]), this.size - 1);
      ranged = true;
      if (start >= this.size || start > end) {
        res.writeHead(416, { 'content-range': `bytes */${this.size}` }).end();
        return;
      }
      this.stats.rangeRequests++;
    }
    const fault = this.faults.shift();
    if (fault) this.stats.faultsInjected++;
    switch (fault) {
      case '500':
      case '503':
        res.writeHead(Number(fault), { 'content-type': 'text/plain' }).end('injected failure\n');
        return;
      case 'reset':
        req.socket.destroy();
        return;
      case 'full200':
        ranged = false;
        start = 0;
        end = this.size - 1;
        break;
      default:
        break;
    }
    const length = end - start + 1;
    if (ranged) {
      const shown = fault === 'wrong-range' ? start + 512 : start;
      res.writeHead(206, { 'content-range': `bytes ${shown}-${shown + length - 1}/${this.size}`, 'content-length': length, ...etag });
    } else {
      res.writeHead(200, { 'content-length': this.size, ...etag });
    }
    const cut = fault === 'truncate' || fault === 'stall' ? Math.floor(length / 2) : length;
    this.sendBody(res, start, cut, fault === 'corrupt').then(
      () => {
        if (fault === 'truncate') res.socket?.destroy();
        else if (fault === 'stall') return; // keep the socket open and silent
        else res.end();
      },
      () => res.destroy(),
    );
  }

  private async sendBody(res: http.ServerResponse, start: number, length: number, corrupt: boolean): Promise<void> {
    const chunk = 64 << 10;
    let sent = 0;
    while (sent < length) {
      if (res.destroyed) throw new Error('client went away');
      const n = Math.min(chunk, length - sent);
      const buf = Buffer.allocUnsafe(n);
      fs.readSync(this.fd, buf, 0, n, start + sent);
      if (corrupt && sent === 0) buf[0] = buf[0]! ^ 0xff;
      await this.pace(n);
      this.stats.bytesSent += n;
      sent += n;
      if (!res.write(buf)) await new Promise((r) => res.once('drain', r));
    }
  }

  /** A shared token bucket: all responses together stay under the rate. */
  private async pace(n: number): Promise<void> {
    const rate = this.opts.rate ?? 0;
    if (rate <= 0) return;
    const now = Date.now();
    const at = Math.max(now, this.nextSendAt);
    this.nextSendAt = at + (n / rate) * 1000;
    if (at > now) await new Promise((r) => setTimeout(r, at - now));
  }
}
