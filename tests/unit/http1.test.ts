/**
 * The range reader's HTTP/1.1 client (image-access/src/http1.ts) against scripted servers:
 * raw TCP (and TLS) servers on loopback that answer each request with exactly the bytes a
 * test gives, split as the test says, so framing, keep-alive and failure paths are driven
 * deterministically. Every test checks the bytes that landed and the connections used.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import { Http1Pool, type BodyPlan, type ResponseHead } from '../../image-access/src/http1.js';
import { DpuError } from '../../image-access/src/errors.js';
import { issue, makeCa } from '../helpers/tls-certs.js';
import { tempDir } from '../helpers/agent.js';

/** What a scripted server does with one request: the answer's parts, written one by one. */
type Script = (req: string, sock: net.Socket, index: number) => void | Promise<void>;

interface Scripted {
  url: URL;
  /** Requests seen, in order (the head's text). */
  requests: string[];
  /** Connections accepted. */
  connections: number;
  /** Resolves when the n-th accepted connection (from 1) has closed. */
  closed(n: number): Promise<void>;
  close(): Promise<void>;
}

async function scripted(script: Script, opts: { tls?: { cert: string; key: string } } = {}): Promise<Scripted> {
  const requests: string[] = [];
  const closes: Promise<void>[] = [];
  const sockets = new Set<net.Socket>();
  const onConnection = (sock: net.Socket): void => {
    sockets.add(sock);
    closes.push(new Promise((resolve) => sock.once('close', () => resolve())));
    sock.on('error', () => {});
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString('latin1');
      for (;;) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        const req = buf.slice(0, end);
        buf = buf.slice(end + 4);
        requests.push(req);
        void script(req, sock, requests.length - 1);
      }
    });
  };
  const server = opts.tls
    ? tls.createServer({ cert: fs.readFileSync(opts.tls.cert), key: fs.readFileSync(opts.tls.key) }, onConnection)
    : net.createServer(onConnection);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: new URL(`${opts.tls ? 'https://localhost' : 'http://127.0.0.1'}:${port}/image.raw?sig=x`),
    requests,
    get connections() {
      return closes.length;
    },
    closed: (n) => closes[n - 1]!,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

const BODY = Buffer.from(Array.from({ length: 3000 }, (_, i) => (i * 7 + 3) & 0xff));

function rangeOf(req: string): [number, number] {
  const m = /\r\nRange: bytes=(\d+)-(\d+)/i.exec(req)!;
  return [Number(m[1]), Number(m[2])];
}

/** A 206 for the request's range of BODY with Content-Length, written in one go. */
const answer206: Script = (req, sock) => {
  const [a, b] = rangeOf(req);
  sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Range: bytes ${a}-${b}/${BODY.length}\r\nContent-Length: ${b - a + 1}\r\n\r\n`);
  sock.write(BODY.subarray(a, b + 1));
};

function get(pool: Http1Pool, url: URL, range: [number, number] | null, plan: (head: ResponseHead) => BodyPlan, signal = new AbortController().signal) {
  return pool.request(url, { method: 'GET', headers: range ? { Range: `bytes=${range[0]}-${range[1]}` } : {}, signal, onHead: plan });
}

const into = (dest: Buffer, skip = 0, exact = true): (() => BodyPlan) => () => ({ kind: 'into', dest, skip, exact });

describe('HTTP/1.1 range client (http1.ts)', () => {
  let pool: Http1Pool;
  let server: Scripted | undefined;
  beforeEach(() => {
    pool = new Http1Pool();
  });
  afterEach(async () => {
    pool.destroy();
    await server?.close();
    server = undefined;
  });

  it('lands Content-Length bodies in the caller\'s buffer and reuses one connection', async () => {
    server = await scripted(answer206);
    for (const [a, b] of [[0, 999], [1000, 2999], [5, 5]] as const) {
      const dest = Buffer.alloc(b - a + 1);
      const res = await get(pool, server.url, [a, b], into(dest));
      assert.equal(res.head.status, 206);
      assert.equal(res.filled, dest.length);
      assert.ok(dest.equals(BODY.subarray(a, b + 1)));
    }
    assert.equal(server.connections, 1);
    assert.match(server.requests[0]!, /^GET \/image\.raw\?sig=x HTTP\/1\.1\r\n/);
    assert.match(server.requests[0]!, /\r\nHost: 127\.0\.0\.1:\d+/);
  });

  it('parses heads and bodies split at every byte, after 100 and 103 interim answers', async () => {
    server = await scripted(async (req, sock) => {
      const [a, b] = rangeOf(req);
      const bytes = Buffer.concat([
        Buffer.from('HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n'),
        Buffer.from(`HTTP/1.1 206 Partial Content\r\nContent-Range: bytes ${a}-${b}/${BODY.length}\r\nX-Folded: one\r\n two\r\nContent-Length: ${b - a + 1}\r\n\r\n`),
        BODY.subarray(a, b + 1),
      ]);
      for (const byte of bytes) {
        // One write per byte, each flushed before the next: the client sees them in many reads.
        await new Promise<void>((resolve) => sock.write(Buffer.of(byte), () => resolve()));
      }
    });
    const dest = Buffer.alloc(300);
    const res = await get(pool, server.url, [100, 399], into(dest));
    assert.equal(res.head.status, 206);
    assert.equal(res.head.headers['x-folded'], 'one two');
    assert.ok(dest.equals(BODY.subarray(100, 400)));
  });

  it('decodes chunked bodies (extensions, trailers) and keeps the connection', async () => {
    server = await scripted((req, sock) => {
      const [a, b] = rangeOf(req);
      const body = BODY.subarray(a, b + 1);
      sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Range: bytes ${a}-${b}/${BODY.length}\r\nTransfer-Encoding: chunked\r\n\r\n`);
      sock.write(`${(10).toString(16)};ext=1\r\n`);
      sock.write(body.subarray(0, 10));
      sock.write(`\r\n${(body.length - 10).toString(16).toUpperCase()}\r\n`);
      sock.write(body.subarray(10));
      sock.write('\r\n0\r\nX-Trailer: yes\r\n\r\n');
    });
    const dest = Buffer.alloc(1000);
    await get(pool, server.url, [7, 1006], into(dest));
    assert.ok(dest.equals(BODY.subarray(7, 1007)));
    const again = Buffer.alloc(20);
    await get(pool, server.url, [0, 19], into(again));
    assert.ok(again.equals(BODY.subarray(0, 20)));
    assert.equal(server.connections, 1);
  });

  it('a body delimited by the connection closing is read to its end; the connection is not reused', async () => {
    server = await scripted((req, sock) => {
      const [a, b] = rangeOf(req);
      sock.end(Buffer.concat([Buffer.from('HTTP/1.1 206 Partial Content\r\n\r\n'), BODY.subarray(a, b + 1)]));
    });
    for (let i = 0; i < 2; i++) {
      const dest = Buffer.alloc(500);
      await get(pool, server.url, [500, 999], into(dest));
      assert.ok(dest.equals(BODY.subarray(500, 1000)));
    }
    assert.equal(server.connections, 2);
  });

  it('a 200 with the whole object: skips to the offset, takes what is asked, drops the connection', async () => {
    server = await scripted((_req, sock) => {
      // The head and the object up to the end of the range: the rest never comes, so the
      // request must end once its bytes are in, without waiting for the body's end.
      sock.write(`HTTP/1.1 200 OK\r\nContent-Length: ${BODY.length}\r\n\r\n`);
      sock.write(BODY.subarray(0, 2100));
    });
    const dest = Buffer.alloc(100);
    const res = await get(pool, server.url, [2000, 2099], into(dest, 2000, false));
    assert.equal(res.filled, 100);
    assert.ok(dest.equals(BODY.subarray(2000, 2100)));
    await server.closed(1); // not kept: the rest of the body would be the next answer's
    assert.equal(pool.connections, 0);
  });

  it('refuses a body of another length than expected, and one cut short', async () => {
    server = await scripted((req, sock, i) => {
      const [a, b] = rangeOf(req);
      if (i === 0) {
        sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${b - a + 2}\r\n\r\n`);
      } else {
        sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${b - a + 1}\r\n\r\n`);
        sock.end(BODY.subarray(a, a + 10)); // then the connection closes
      }
    });
    const dest = Buffer.alloc(100, 0xee);
    await assert.rejects(get(pool, server.url, [0, 99], into(dest)), (err: DpuError) => err.code === 'DPU_ERR_SOURCE_BAD_RANGE' && /101 bytes, not the 100/.test(err.message));
    await assert.rejects(get(pool, server.url, [0, 99], into(dest)), /closed the connection after/);
    assert.ok(dest.subarray(0, 10).equals(BODY.subarray(0, 10)), 'what arrived is kept');
    assert.ok(dest.subarray(10).every((b) => b === 0xee));
  });

  it('an aborted request never writes into the buffer afterwards', async () => {
    let sock!: net.Socket;
    const halfSent = new Promise<void>((resolve) => {
      void scripted((req, s) => {
        sock = s;
        const [a, b] = rangeOf(req);
        s.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${b - a + 1}\r\n\r\n`);
        s.write(BODY.subarray(a, a + 500), () => resolve());
      }).then((s) => {
        server = s;
        startRequest();
      });
    });
    const controller = new AbortController();
    const dest = Buffer.alloc(1000, 0xee);
    let filled = 0;
    let request!: Promise<unknown>;
    const startRequest = (): void => {
      request = pool.request(server!.url, {
        method: 'GET',
        headers: { Range: 'bytes=0-999' },
        signal: controller.signal,
        onHead: into(dest),
        onBody: (n) => {
          filled = n;
          if (n === 500) controller.abort(new Error('aborted by the test'));
        },
      });
    };
    await halfSent;
    await assert.rejects(request, /aborted by the test/);
    assert.equal(filled, 500);
    // The server now sends the rest; the client's socket is gone, so nothing can land.
    sock.write(BODY.subarray(500, 1000));
    await server!.closed(1);
    assert.ok(dest.subarray(0, 500).equals(BODY.subarray(0, 500)));
    assert.ok(dest.subarray(500).every((b) => b === 0xee), 'no byte after the abort');
  });

  it('a reused connection the server has closed is replaced without failing the request', async () => {
    server = await scripted((req, sock, i) => {
      answer206(req, sock, i);
      if (i === 0) sock.end(); // keep-alive promised, then closed
    });
    const one = Buffer.alloc(10);
    await get(pool, server.url, [0, 9], into(one));
    const two = Buffer.alloc(10);
    await get(pool, server.url, [10, 19], into(two));
    assert.ok(two.equals(BODY.subarray(10, 20)));
    assert.equal(server.connections, 2);
  });

  it('honours Connection: close, HTTP/1.0 and a short Keep-Alive timeout by not reusing', async () => {
    const heads = ['HTTP/1.1 206 Partial Content\r\nConnection: close', 'HTTP/1.0 206 Partial Content', 'HTTP/1.1 206 Partial Content\r\nKeep-Alive: timeout=1', 'HTTP/1.1 206 Partial Content'];
    server = await scripted((req, sock, i) => {
      const [a, b] = rangeOf(req);
      sock.write(`${heads[i]}\r\nContent-Length: ${b - a + 1}\r\n\r\n`);
      sock.write(BODY.subarray(a, b + 1));
    });
    for (let i = 0; i < 4; i++) await get(pool, server.url, [0, 9], into(Buffer.alloc(10)));
    assert.equal(server.connections, 4, 'each of the first three answers ends its connection');
  });

  it('reports activity on every read, skipped bytes of a 200 included (a stall timer must not fire while they flow)', async () => {
    let sendRest!: () => void;
    const restAsked = new Promise<void>((resolve) => (sendRest = resolve));
    server = await scripted(async (_req, sock) => {
      sock.write(`HTTP/1.1 200 OK\r\nContent-Length: ${BODY.length}\r\n\r\n`);
      sock.write(BODY.subarray(0, 1500)); // all before the range: skipped
      await restAsked;
      sock.write(BODY.subarray(1500));
    });
    const dest = Buffer.alloc(100);
    let activity = 0;
    let filled = 0;
    let skippedSeen!: () => void;
    const skipping = new Promise<void>((resolve) => (skippedSeen = resolve));
    const request = pool.request(server.url, {
      method: 'GET',
      headers: { Range: 'bytes=2000-2099' },
      signal: new AbortController().signal,
      onHead: into(dest, 2000, false),
      onBody: (n) => (filled = n),
      onActivity: () => {
        activity++;
        if (activity >= 1) skippedSeen();
      },
    });
    await skipping;
    assert.equal(filled, 0, 'nothing of the range yet: the reads so far were the head and skipped bytes');
    sendRest();
    await request;
    assert.ok(dest.equals(BODY.subarray(2000, 2100)));
  });

  it('HEAD has no body whatever its Content-Length; the connection stays', async () => {
    server = await scripted((req, sock) => {
      if (req.startsWith('HEAD')) sock.write(`HTTP/1.1 200 OK\r\nContent-Length: ${BODY.length}\r\nETag: "e1"\r\n\r\n`);
      else answer206(req, sock, 1);
    });
    const res = await pool.request(server.url, { method: 'HEAD', headers: {}, signal: new AbortController().signal, onHead: () => ({ kind: 'discard' }) });
    assert.equal(res.head.headers['content-length'], String(BODY.length));
    assert.equal(res.head.headers['etag'], '"e1"');
    const dest = Buffer.alloc(4);
    await get(pool, server.url, [0, 3], into(dest));
    assert.ok(dest.equals(BODY.subarray(0, 4)));
    assert.equal(server.connections, 1);
  });

  it('malformed answers fail clearly: a bad status line, a head over 64 KiB, bytes after the body', async () => {
    const answers = [
      'HTP/1.1 200 OK\r\n\r\n',
      `HTTP/1.1 206 Partial Content\r\nX-Big: ${'a'.repeat(70_000)}\r\n\r\n`,
      'HTTP/1.1 206 Partial Content\r\nContent-Length: 2\r\n\r\nabcd',
      'HTTP/1.1 206 Partial Content\r\nContent-Length: 12x\r\n\r\n',
    ];
    server = await scripted((_req, sock, i) => {
      sock.write(answers[i]!);
    });
    await assert.rejects(get(pool, server.url, [0, 1], into(Buffer.alloc(2))), /malformed HTTP response: status line "HTP\/1\.1 200 OK"/);
    await assert.rejects(get(pool, server.url, [0, 1], into(Buffer.alloc(2))), /malformed HTTP response: the response head is longer than 65536 bytes/);
    // Two bytes past the body: with the head in one read, the answer fails; if they come in
    // a read of their own, onto the idle connection, that connection is dropped. Either way
    // they are never taken for the next answer.
    await get(pool, server.url, [0, 1], into(Buffer.alloc(2))).then(
      () => server!.closed(3),
      (err: Error) => assert.match(err.message, /2 bytes past the end of the body/),
    );
    assert.equal(pool.connections, 0);
    await assert.rejects(get(pool, server.url, [0, 1], into(Buffer.alloc(2))), /Content-Length "12x" is not a length/);
  });

  it('refuses request headers HTTP cannot carry, naming them', async () => {
    server = await scripted(answer206);
    const bad = { 'X-Auth-Token': 'abc\r\nInjected: yes' };
    await assert.rejects(pool.request(server.url, { method: 'GET', headers: bad, signal: new AbortController().signal, onHead: () => ({ kind: 'discard' }) }), /request header "X-Auth-Token"/);
    for (const value of ['a\x01b', 'caf\u00e9 ok', 'snow \u2603']) {
      const req = pool.request(server.url, { method: 'GET', headers: { 'X-Note': value, Range: 'bytes=0-0' }, signal: new AbortController().signal, onHead: () => ({ kind: 'discard' }) });
      if (value.includes('\u2603') || value.includes('\x01')) await assert.rejects(req, /request header "X-Note"/);
      else await req; // obs-text (one byte each) is allowed
    }
    assert.equal(server.requests.length, 1);
  });

  it('https: an abort from a microtask of onBody leaves no byte landing afterwards (TLS copies records after destroy)', async () => {
    const { dir, cleanup } = tempDir('http1-tls-late');
    try {
      const ca = await makeCa(dir);
      const cert = await issue(dir, ca, 'server', 'localhost');
      const big = Buffer.alloc(4 << 20, 0x33);
      server = await scripted((_req, sock) => {
        sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${big.length}\r\n\r\n`);
        sock.write(big); // many TLS records, decrypted in one socket read
      }, { tls: cert });
      const trusting = new Http1Pool({ ca: fs.readFileSync(ca.cert) });
      try {
        const dest = Buffer.alloc(big.length, 0xee);
        const controller = new AbortController();
        let filled = 0;
        const request = trusting.request(server.url, {
          method: 'GET',
          headers: { Range: `bytes=0-${big.length - 1}` },
          signal: controller.signal,
          onHead: into(dest),
          onBody: (n) => {
            filled = n;
            queueMicrotask(() => controller.abort(new Error('aborted from a microtask')));
          },
        });
        await assert.rejects(request, /aborted from a microtask/);
        const atReject = filled;
        await new Promise((r) => setImmediate(r));
        await new Promise((r) => setImmediate(r));
        assert.ok(dest.subarray(0, atReject).every((b) => b === 0x33));
        assert.ok(dest.subarray(atReject).every((b) => b === 0xee), `bytes landed after the request failed (${atReject} filled when it did)`);
      } finally {
        trusting.destroy();
      }
    } finally {
      cleanup();
    }
  });

  it('https: verifies the origin against the given CA, then lands bytes the same way', async () => {
    const { dir, cleanup } = tempDir('http1-tls');
    try {
      const ca = await makeCa(dir);
      const cert = await issue(dir, ca, 'server', 'localhost');
      server = await scripted(answer206, { tls: cert });
      await assert.rejects(get(pool, server.url, [0, 9], into(Buffer.alloc(10))), /self[- ]signed|unable to (get|verify)/i);
      const trusting = new Http1Pool({ ca: fs.readFileSync(ca.cert) });
      try {
        const dest = Buffer.alloc(2000);
        await get(trusting, server.url, [1000, 2999], into(dest));
        assert.ok(dest.equals(BODY.subarray(1000, 3000)));
      } finally {
        trusting.destroy();
      }
    } finally {
      cleanup();
    }
  });
});
