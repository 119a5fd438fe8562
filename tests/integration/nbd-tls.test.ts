/**
 * NBD over TLS (NBD_OPT_STARTTLS). A throw-away PKI is made with openssl; then:
 *  - `dpu-agent stream` as a real process on loopback TCP, against the real clients that
 *    speak TLS (libnbd's nbdinfo and nbdcopy, qemu-img and qemu-io with tls-creds-x509):
 *    bytes read and written through TLS, plaintext clients refused with TLS_REQD, clients
 *    that do not trust the server or that the server does not trust refused, the agent
 *    unharmed by all of it; bad TLS flags stop it at start-up naming the flag;
 *  - the server in-process with a raw client written here, for the rules of the spec
 *    (proto.md "TLS support") no real client breaks on purpose: options before STARTTLS,
 *    STARTTLS twice or with data, bytes behind STARTTLS, garbage instead of a handshake,
 *    half-close and pipelining over TLS, mode `allow`;
 *  - the daemon: TCP exports under `nbd_tls` speak TLS, and bad `nbd_tls` keys stop
 *    `dpu-agent serve` naming the key.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import { pino } from 'pino';
import { ConfigError } from '../../common/src/config.js';
import { AgentClient } from '../../openapi/clients/agent-client.js';
import { buildAgentApi } from '../../dpu-agent/src/daemon/api.js';
import { parseAgentConfig } from '../../dpu-agent/src/daemon/config.js';
import { DiskManager } from '../../dpu-agent/src/daemon/disks.js';
import { NbdServer } from '../../dpu-agent/src/nbd/server.js';
import { Cmd, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, Info, MAX_OPTION_BYTES, Opt, Rep } from '../../dpu-agent/src/nbd/protocol.js';
import { loadNbdTls, type NbdTls, type TlsMode } from '../../dpu-agent/src/nbd/tls.js';
import { openStreamingDisk, type OpenedDisk } from '../../dpu-agent/src/streaming/open.js';
import { AGENT_BIN, AgentProcess, makeImage, tempDir } from '../helpers/agent.js';
import { DaemonProcess } from '../helpers/daemon.js';
import { TestOrigin } from '../helpers/origin.js';
import { run } from '../helpers/run.js';
import { clientDir, issue, makeCa, makePki, type TestPki } from '../helpers/tls-certs.js';

const MiB = 1 << 20;
const IMAGE_SIZE = 16 * MiB + 4096;
const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const REQUEST_MAGIC = 0x25609513;
const IO_TIMEOUT_MS = 10_000;

// ---- a raw NBD client whose stream can be switched to TLS ------------------------------

class Wire {
  private buf: Buffer = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  closed = false;
  private readonly onData = (b: Buffer): void => {
    this.buf = this.buf.length === 0 ? b : Buffer.concat([this.buf, b]);
    this.wake?.();
  };
  private readonly onClose = (): void => {
    this.closed = true;
    this.wake?.();
  };

  constructor(public sock: Duplex) {
    this.attach(sock);
  }

  private attach(sock: Duplex): void {
    this.sock = sock;
    sock.on('data', this.onData);
    sock.on('close', this.onClose);
    sock.on('error', () => {});
  }

  get buffered(): number {
    return this.buf.length;
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  async read(n: number, timeoutMs = IO_TIMEOUT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.buf.length} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          this.wake = null;
          resolve();
        };
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** True once the peer closed the connection (within `timeoutMs`), with nothing (more) received. */
  async closesSilently(timeoutMs = IO_TIMEOUT_MS): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    return this.closed && this.buf.length === 0;
  }

  /** Upgrades to TLS after the server's ACK to NBD_OPT_STARTTLS. */
  async startTls(opts: tls.ConnectionOptions): Promise<void> {
    assert.equal(this.buf.length, 0, 'nothing after the STARTTLS ACK');
    const plain = this.sock;
    plain.off('data', this.onData);
    plain.off('close', this.onClose);
    const secure = tls.connect({ socket: plain, servername: 'localhost', ...opts });
    this.attach(secure); // also catches a close during the handshake
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', reject);
    });
  }

  destroy(): void {
    this.sock.destroy();
  }
}

async function connect(port: number, flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES): Promise<Wire> {
  const sock = net.connect(port, '127.0.0.1');
  await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
  const w = new Wire(sock);
  const greeting = await w.read(18);
  assert.equal(greeting.subarray(0, 16).toString('latin1'), 'NBDMAGICIHAVEOPT');
  const f = Buffer.alloc(4);
  f.writeUInt32BE(flags);
  w.write(f);
  return w;
}

function option(opt: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.write('IHAVEOPT', 0, 'latin1');
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(declaredLength, 12);
  return Buffer.concat([h, data]);
}

async function optionReply(w: Wire): Promise<{ option: number; type: number; data: Buffer }> {
  const h = await w.read(20);
  assert.equal(h.readBigUInt64BE(0), OPTION_REPLY_MAGIC);
  const len = h.readUInt32BE(16);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len ? Buffer.from(await w.read(len)) : Buffer.alloc(0) };
}

async function ask(w: Wire, opt: number, data?: Buffer): Promise<{ option: number; type: number; data: Buffer }> {
  w.write(option(opt, data));
  return optionReply(w);
}

/** NBD_OPT_STARTTLS, ACK, handshake. */
async function upgrade(w: Wire, opts: tls.ConnectionOptions): Promise<void> {
  const r = await ask(w, Opt.STARTTLS);
  assert.equal(r.type, Rep.ACK);
  assert.equal(r.option, Opt.STARTTLS);
  await w.startTls(opts);
}

function goData(name = ''): Buffer {
  const b = Buffer.alloc(4 + Buffer.byteLength(name) + 2);
  b.writeUInt32BE(Buffer.byteLength(name), 0);
  b.write(name, 4);
  return b;
}

/** NBD_OPT_GO for the default export; returns the size it reports. */
async function go(w: Wire): Promise<number> {
  w.write(option(Opt.GO, goData()));
  let size = -1;
  for (;;) {
    const r = await optionReply(w);
    assert.equal(r.option, Opt.GO);
    if (r.type === Rep.ACK) return size;
    assert.equal(r.type, Rep.INFO, `GO answered ${r.type}: ${r.data.toString()}`);
    if (r.data.readUInt16BE(0) === Info.EXPORT) size = Number(r.data.readBigUInt64BE(2));
  }
}

function request(type: number, handle: bigint, offset: number, length: number, data?: Buffer): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(REQUEST_MAGIC, 0);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(handle, 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  return data ? Buffer.concat([h, data]) : h;
}

/** Reads `count` simple replies; `dataBytes(handle)` says how much data follows a success. */
async function replies(w: Wire, count: number, dataBytes: (handle: bigint) => number): Promise<Map<bigint, { error: number; data: Buffer }>> {
  const out = new Map<bigint, { error: number; data: Buffer }>();
  for (let i = 0; i < count; i++) {
    const h = await w.read(16);
    assert.equal(h.readUInt32BE(0), SIMPLE_REPLY_MAGIC);
    const error = h.readUInt32BE(4);
    const handle = h.readBigUInt64BE(8);
    const n = error === 0 ? dataBytes(handle) : 0;
    out.set(handle, { error, data: n ? Buffer.from(await w.read(n)) : Buffer.alloc(0) });
  }
  return out;
}

/** Waits (up to 5 s) for `pred`, e.g. for log lines a child process has written by now. */
async function eventually(pred: () => boolean, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms: ${pred.toString()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

// ---- fixtures ----------------------------------------------------------------------------

describe('NBD over TLS', function () {
  this.timeout(120_000);
  let dir: string;
  let cleanup: () => void;
  let pki: TestPki;
  /** ca-cert.pem + client cert/key: what a trusted host has. */
  let goodDir: string;
  /** Only ca-cert.pem: trusts the server, has no certificate of its own. */
  let noCertDir: string;
  /** Another CA's ca-cert.pem: does not trust the server. */
  let wrongCaDir: string;
  /** The right ca-cert.pem, but a client certificate from another CA. */
  let foreignCertDir: string;
  let imagePath: string;
  let image: Buffer;
  let origin: TestOrigin;

  before(async () => {
    ({ dir, cleanup } = tempDir('nbd-tls'));
    pki = await makePki(path.join(dir, 'pki'));
    goodDir = clientDir(path.join(dir, 'good'), pki, ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']);
    noCertDir = clientDir(path.join(dir, 'nocert'), pki, ['ca-cert.pem']);
    const other = await makeCa(path.join(dir, 'other'), 'some other CA');
    await issue(path.join(dir, 'other'), other, 'client', 'intruder');
    wrongCaDir = clientDir(path.join(dir, 'wrongca'), pki, ['client-cert.pem', 'client-key.pem']);
    fs.copyFileSync(other.cert, path.join(wrongCaDir, 'ca-cert.pem'));
    foreignCertDir = clientDir(path.join(dir, 'foreign'), pki, ['ca-cert.pem']);
    for (const f of ['client-cert.pem', 'client-key.pem']) fs.copyFileSync(path.join(dir, 'other', f), path.join(foreignCertDir, f));
    imagePath = path.join(dir, 'image.raw');
    makeImage(imagePath, IMAGE_SIZE, 23);
    image = fs.readFileSync(imagePath);
    origin = new TestOrigin({ file: imagePath });
    await origin.start();
  });
  after(async () => {
    await origin?.stop();
    cleanup?.();
  });

  const nbds = (port: number, certDir: string): string => `nbds://127.0.0.1:${port}/disk?tls-certificates=${certDir}`;
  const qemuObject = (certDir: string): string[] => ['--object', `tls-creds-x509,id=tls0,dir=${certDir},endpoint=client`];
  const qemuOpts = (port: number): string => `driver=nbd,host=127.0.0.1,port=${port},export=disk,tls-creds=tls0`;

  // ---- dpu-agent stream, real clients ---------------------------------------------------

  describe('dpu-agent stream on TCP with TLS, real clients', () => {
    let agent: AgentProcess | null = null;
    afterEach(async () => {
      await agent?.kill();
      agent = null;
    });

    async function startAgent(name: string, tlsFlags: string[], extra: string[] = []): Promise<{ agent: AgentProcess; port: number; target: string; uri: string }> {
      const a = new AgentProcess({
        source: origin.url,
        target: path.join(dir, `${name}.target`),
        state: path.join(dir, `${name}.state`),
        socket: path.join(dir, `${name}.sock`),
        // The last --listen wins: TCP on a free loopback port.
        extra: ['--listen', 'tcp:127.0.0.1:0', ...tlsFlags, ...extra],
      });
      agent = a;
      const ev = await a.listening();
      const uri = String(ev['uri']);
      return { agent: a, port: Number(new URL(uri.replace(/^nbds:/, 'http:')).port), target: path.join(dir, `${name}.target`), uri };
    }
    const serverTls = (): string[] => ['--tls-cert', pki.serverCert, '--tls-key', pki.serverKey];

    it('serves the image through TLS to nbdinfo, nbdcopy, qemu-img and qemu-io; refuses plaintext with TLS_REQD; survives an untrusting client', async () => {
      const a = await startAgent('tls', serverTls(), ['--no-hydrate']);
      assert.match(a.uri, /^nbds:\/\/127\.0\.0\.1:\d+\/$/, 'the listening URI says TLS');

      const info = await run('nbdinfo', ['--json', nbds(a.port, noCertDir)]);
      const exp = (JSON.parse(info.stdout) as { exports: { 'export-size': number }[] }).exports[0]!;
      assert.equal(exp['export-size'], IMAGE_SIZE);

      const copy = path.join(dir, 'tls-copy.raw');
      await run('nbdcopy', [nbds(a.port, goodDir), copy]);
      assert.ok(fs.readFileSync(copy).equals(image), 'nbdcopy over TLS (several connections) reads the image exactly');
      fs.rmSync(copy);

      const cmp = await run('qemu-img', ['compare', ...qemuObject(goodDir), '--image-opts', `driver=raw,file.driver=file,file.filename=${imagePath}`, qemuOpts(a.port)]);
      assert.match(cmp.stdout, /Images are identical/);

      const writes = ['write -P 0x5a 4096 200000', `write -P 0xc3 ${MiB - 512} 1024`, `write -z ${3 * MiB} ${MiB}`, 'flush'];
      await run('qemu-io', [...qemuObject(goodDir), '--image-opts', qemuOpts(a.port), ...writes.flatMap((c) => ['-c', c])]);
      const checks = ['read -P 0x5a 4096 200000', `read -P 0xc3 ${MiB - 512} 1024`, `read -P 0 ${3 * MiB} ${MiB}`];
      const rd = await run('qemu-io', [...qemuObject(noCertDir), '--image-opts', qemuOpts(a.port), ...checks.flatMap((c) => ['-c', c])]);
      assert.doesNotMatch(rd.stdout + rd.stderr, /Pattern verification failed|error/i);
      // The bytes around the writes are still the image's.
      const after = path.join(dir, 'tls-after.raw');
      await run('nbdcopy', [nbds(a.port, goodDir), after]);
      const got = fs.readFileSync(after);
      assert.ok(got.subarray(0, 4096).equals(image.subarray(0, 4096)));
      assert.ok(got.subarray(204096, MiB - 512).equals(image.subarray(204096, MiB - 512)));
      assert.ok(got.subarray(4 * MiB).equals(image.subarray(4 * MiB)));
      fs.rmSync(after);

      // Plaintext clients: refused with NBD_REP_ERR_TLS_REQD, and they say so.
      const plain = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${a.port}/disk`], { allowFail: true });
      assert.notEqual(plain.code, 0);
      assert.match(plain.stderr, /server requires TLS/i);
      const qplain = await run('qemu-img', ['info', '--image-opts', `driver=nbd,host=127.0.0.1,port=${a.port},export=disk`], { allowFail: true });
      assert.notEqual(qplain.code, 0);
      assert.match(qplain.stderr, /TLS/);

      // A client that does not trust the server certificate gives up in the handshake.
      const wrong = await run('nbdinfo', ['--size', nbds(a.port, wrongCaDir)], { allowFail: true });
      assert.notEqual(wrong.code, 0);
      assert.match(wrong.stderr, /certificate|verif|trust/i);
      const qwrong = await run('qemu-img', ['info', ...qemuObject(wrongCaDir), '--image-opts', qemuOpts(a.port)], { allowFail: true });
      assert.notEqual(qwrong.code, 0);

      // None of it harmed the agent.
      assert.equal((await run('nbdinfo', ['--size', nbds(a.port, goodDir)])).stdout.trim(), String(IMAGE_SIZE));
      await eventually(() => /DPU_ERR_NBD_TLS/.test(a.agent.stderr));
      assert.equal(a.agent.child.exitCode, null);
      assert.equal(await a.agent.stop(), 0);
    });

    it('mutual TLS (--tls-verify-peer): a client certificate from the CA is served, none or another CA\'s is refused', async () => {
      const a = await startAgent('mtls', [...serverTls(), '--tls-ca', pki.caCert, '--tls-verify-peer'], ['--no-hydrate']);
      assert.equal((await run('nbdinfo', ['--size', nbds(a.port, goodDir)])).stdout.trim(), String(IMAGE_SIZE));
      const cmp = await run('qemu-img', ['compare', ...qemuObject(goodDir), '--image-opts', `driver=raw,file.driver=file,file.filename=${imagePath}`, qemuOpts(a.port)]);
      assert.match(cmp.stdout, /Images are identical/);

      for (const [what, certDir] of [
        ['no client certificate', noCertDir],
        ['a client certificate from another CA', foreignCertDir],
      ] as const) {
        const r = await run('nbdinfo', ['--size', nbds(a.port, certDir)], { allowFail: true });
        assert.notEqual(r.code, 0, `nbdinfo with ${what} is refused`);
        const q = await run('qemu-img', ['info', ...qemuObject(certDir), '--image-opts', qemuOpts(a.port)], { allowFail: true });
        assert.notEqual(q.code, 0, `qemu-img with ${what} is refused`);
      }
      // gnutls offers no certificate the server's CA did not sign, so both cases are logged
      // as "no certificate" (qemu even refuses to load a client certificate its CA did not sign).
      await eventually(() => (a.agent.stderr.match(/TLS handshake failed: peer did not return a certificate/g) ?? []).length >= 3).catch(() => assert.fail(a.agent.stderr));
      assert.match(a.agent.stderr, /"code":"DPU_ERR_NBD_TLS","reason":"ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE"/);
      // Still serving.
      assert.equal((await run('nbdinfo', ['--size', nbds(a.port, goodDir)])).stdout.trim(), String(IMAGE_SIZE));
      assert.equal(await a.agent.stop(), 0);
    });

    it('warns when it listens on TCP without TLS', async () => {
      const a = await startAgent('plain-tcp', []);
      assert.match(a.uri, /^nbd:\/\//);
      await eventually(() => /without TLS/.test(a.agent.stderr));
      assert.match(a.agent.stderr, /listens on TCP without TLS/);
      assert.equal((await run('nbdinfo', ['--size', `nbd://127.0.0.1:${a.port}/disk`])).stdout.trim(), String(IMAGE_SIZE));
    });

    it('refuses bad TLS flags at start-up, naming the flag and what to do', async () => {
      const base = ['stream', '--source', origin.url, '--target', path.join(dir, 'never.target'), '--state', path.join(dir, 'never.state'), '--listen', 'tcp:127.0.0.1:0'];
      const cases: [string, string[], RegExp][] = [
        ['key without cert', ['--tls-key', pki.serverKey], /--tls-key needs --tls-cert and --tls-key/],
        ['cert without key', ['--tls-cert', pki.serverCert], /--tls-cert needs --tls-key/],
        ['unreadable cert', ['--tls-cert', path.join(dir, 'missing.pem'), '--tls-key', pki.serverKey], /--tls-cert .*missing\.pem: cannot read it \(ENOENT\)/],
        ['a key that is not the certificate\'s', ['--tls-cert', pki.serverCert, '--tls-key', pki.clientKey], /--tls-key .*client-key\.pem is not the private key of the certificate in --tls-cert/],
        ['a certificate that is not PEM', ['--tls-cert', pki.serverKey, '--tls-key', pki.serverKey], /--tls-cert .* is not a PEM certificate/],
        ['verify-peer without a CA', [...serverTls(), '--tls-verify-peer'], /--tls-ca is needed with --tls-verify-peer/],
        ['a CA without verify-peer', [...serverTls(), '--tls-ca', pki.caCert], /--tls-ca is only used to verify client certificates; add --tls-verify-peer/],
        ['an unknown mode', [...serverTls(), '--tls-mode', 'sometimes'], /--tls-mode "sometimes" is not one of require, allow/],
      ];
      for (const [what, flags, message] of cases) {
        const r = await run(process.execPath, [AGENT_BIN, ...base, ...flags], { allowFail: true });
        assert.equal(r.code, 2, `${what}: exit 2 (${r.stderr})`);
        assert.match(r.stderr, /DPU_ERR_CONFIG/, what);
        assert.match(r.stderr, message, what);
      }
      assert.ok(!fs.existsSync(path.join(dir, 'never.state')), 'nothing was opened');
    });
  });

  describe('TLS certificate checks', () => {
    const label = (f: string): string => `--tls-${f.replace('_', '-')}`;
    it('refuses an expired or not yet valid certificate', () => {
      const files = { cert: pki.serverCert, key: pki.serverKey, mode: 'require' as TlsMode, verifyPeer: false };
      assert.ok(loadNbdTls(files, label));
      assert.throws(() => loadNbdTls(files, label, new Date(Date.now() + 10 * 86400_000)), (e: Error) => e instanceof ConfigError && e.key === 'cert' && /expired on .*; renew it/.test(e.message));
      assert.throws(() => loadNbdTls(files, label, new Date(Date.now() - 10 * 86400_000)), /is not valid before/);
    });
  });

  // ---- the server in-process: the spec's rules ------------------------------------------

  describe('the NBD server with TLS, raw client', () => {
    let opened: OpenedDisk;
    let model: Buffer;
    const servers: NbdServer[] = [];
    const logLines: string[] = [];
    const log = pino({ level: 'debug' }, { write: (s: string) => void logLines.push(s) });
    const trust = (): tls.ConnectionOptions => ({ ca: fs.readFileSync(pki.caCert) });
    const withCert = (): tls.ConnectionOptions => ({ ...trust(), cert: fs.readFileSync(pki.clientCert), key: fs.readFileSync(pki.clientKey) });

    before(async () => {
      opened = await openStreamingDisk({
        source: { url: origin.url },
        targetPath: path.join(dir, 'raw-client.target'),
        stateDir: path.join(dir, 'raw-client.state'),
        regionSize: MiB,
        log: pino({ level: 'silent' }),
      });
      model = Buffer.from(image);
    });
    after(async () => {
      for (const s of servers) await s.close(100);
      await opened?.close();
    });

    async function serve(mode: TlsMode, verifyPeer = false, handshakeTimeoutMs?: number): Promise<{ server: NbdServer; port: number }> {
      const nbdTls: NbdTls = loadNbdTls({ cert: pki.serverCert, key: pki.serverKey, ...(verifyPeer ? { ca: pki.caCert } : {}), mode, verifyPeer }, (f) => f);
      const server = new NbdServer({ exports: [{ name: 'disk', backend: opened.disk }], log, tls: nbdTls, ...(handshakeTimeoutMs ? { handshakeTimeoutMs } : {}) });
      servers.push(server);
      const uri = await server.listen({ kind: 'tcp', host: '127.0.0.1', port: 0 });
      return { server, port: Number(new URL(uri.replace(/^nbds:/, 'http:')).port) };
    }

    it('require: every option but STARTTLS and ABORT gets TLS_REQD before TLS, none after; STARTTLS with data or twice is INVALID', async () => {
      const { port } = await serve('require');
      const w = await connect(port);
      try {
        for (const opt of [Opt.LIST, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY, 99]) {
          const r = await ask(w, opt, opt === Opt.INFO || opt === Opt.GO ? goData() : Buffer.from(opt === 99 ? 'x' : ''));
          assert.equal(r.option, opt);
          assert.equal(r.type, Rep.ERR_TLS_REQD, `option ${opt} before TLS`);
          assert.match(r.data.toString(), /requires TLS/);
        }
        // An oversized option is skipped and refused the same way, keeping the stream.
        w.write(option(Opt.LIST, Buffer.alloc(MAX_OPTION_BYTES + 10)));
        assert.equal((await optionReply(w)).type, Rep.ERR_TLS_REQD);
        assert.equal((await ask(w, Opt.STARTTLS, Buffer.from('data'))).type, Rep.ERR_INVALID, 'STARTTLS with data');
        await upgrade(w, trust());
        const again = await ask(w, Opt.STARTTLS);
        assert.equal(again.type, Rep.ERR_INVALID, 'STARTTLS over TLS');
        const list = await ask(w, Opt.LIST);
        assert.equal(list.type, Rep.SERVER, 'LIST over TLS is answered');
        assert.equal((await optionReply(w)).type, Rep.ACK);
        assert.equal((await ask(w, Opt.STRUCTURED_REPLY)).type, Rep.ERR_UNSUP, 'no TLS_REQD once TLS is on');
        assert.equal(await go(w), IMAGE_SIZE);
        // Transmission over TLS: a write, then pipelined reads, one across it.
        const data = Buffer.alloc(70_000, 0x77);
        w.write(request(Cmd.WRITE, 1n, 5 * MiB + 100, data.length, data));
        data.copy(model, 5 * MiB + 100);
        assert.equal((await replies(w, 1, () => 0)).get(1n)!.error, 0);
        const reads: [bigint, number, number][] = [];
        for (let i = 0; i < 40; i++) reads.push([BigInt(100 + i), (i * 397_211) % (IMAGE_SIZE - 300_000), 1 + ((i * 7919) % 262_144)]);
        reads.push([999n, 5 * MiB, 2 * MiB]);
        w.write(Buffer.concat(reads.map(([h, off, len]) => request(Cmd.READ, h, off, len))));
        const got = await replies(w, reads.length, (h) => reads.find((r) => r[0] === h)![2]);
        for (const [h, off, len] of reads) {
          assert.equal(got.get(h)!.error, 0);
          assert.ok(got.get(h)!.data.equals(model.subarray(off, off + len)), `read ${h}`);
        }
        // Half-close over TLS after a request: its reply still arrives, then the server ends.
        w.write(request(Cmd.READ, 7n, 4096, 65536));
        (w.sock as tls.TLSSocket).end();
        const last = await replies(w, 1, () => 65536);
        assert.ok(last.get(7n)!.data.equals(model.subarray(4096, 4096 + 65536)));
        assert.ok(await w.closesSilently(), 'the server ends the connection');
      } finally {
        w.destroy();
      }
    });

    it('require: NBD_OPT_EXPORT_NAME before TLS closes the connection; ABORT is acknowledged; a client without fixed newstyle is closed', async () => {
      const { port } = await serve('require');
      const a = await connect(port);
      a.write(option(Opt.EXPORT_NAME, Buffer.from('disk')));
      assert.ok(await a.closesSilently(), 'EXPORT_NAME cannot be refused: closed');
      const b = await connect(port);
      assert.equal((await ask(b, Opt.ABORT)).type, Rep.ACK);
      assert.ok(await b.closesSilently());
      const c = await connect(port, FLAG_NO_ZEROES);
      assert.ok(await c.closesSilently(), 'no fixed newstyle, no TLS: closed');
    });

    it('bytes behind STARTTLS, garbage instead of a handshake, garbage over TLS, a stalled handshake: closed, and the server serves on', async () => {
      const { port } = await serve('require', false, 1500);
      // STARTTLS and, in the same write, bytes the client had no business sending yet.
      const a = await connect(port);
      a.write(Buffer.concat([option(Opt.STARTTLS), Buffer.from([0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])]));
      assert.ok(await a.closesSilently(), 'closed without an ACK');
      // The ACK, then not a TLS ClientHello.
      const b = await connect(port);
      assert.equal((await ask(b, Opt.STARTTLS)).type, Rep.ACK);
      b.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
      assert.ok(await b.closesSilently(), 'a handshake that is not TLS is closed');
      // TLS, then an option without the magic.
      const c = await connect(port);
      await upgrade(c, trust());
      c.write(Buffer.alloc(40, 0xee));
      assert.ok(await c.closesSilently(), 'garbage over TLS is closed');
      // The ACK, then nothing: the handshake timeout closes it.
      const d = await connect(port);
      assert.equal((await ask(d, Opt.STARTTLS)).type, Rep.ACK);
      assert.ok(await d.closesSilently(5000), 'a stalled handshake is closed by the handshake timeout');
      // Random bytes after the ACK, many times.
      for (let i = 0; i < 5; i++) {
        const e = await connect(port);
        assert.equal((await ask(e, Opt.STARTTLS)).type, Rep.ACK);
        e.write(Buffer.from(Array.from({ length: 64 + i * 100 }, (_, k) => (k * 31 + i * 17) & 0xff)));
        assert.ok(await e.closesSilently(5000), `garbage ${i}`);
      }
      // Still serving.
      const ok = await connect(port);
      await upgrade(ok, trust());
      assert.equal(await go(ok), IMAGE_SIZE);
      ok.destroy();
      const text = logLines.join('');
      assert.match(text, /client sent data after NBD_OPT_STARTTLS/);
      assert.match(text, /TLS handshake failed/);
    });

    it('verify-peer: the raw client needs a certificate from the CA', async () => {
      const { port } = await serve('require', true);
      const bad = await connect(port);
      assert.equal((await ask(bad, Opt.STARTTLS)).type, Rep.ACK);
      // TLS 1.3: the client completes its side before the server refuses it.
      await bad.startTls(trust()).catch(() => undefined);
      assert.ok(await bad.closesSilently(), 'no client certificate: closed');
      // Node's client sends its certificate even when another CA signed it.
      const foreign = await connect(port);
      assert.equal((await ask(foreign, Opt.STARTTLS)).type, Rep.ACK);
      await foreign.startTls({ ...trust(), cert: fs.readFileSync(path.join(dir, 'other', 'client-cert.pem')), key: fs.readFileSync(path.join(dir, 'other', 'client-key.pem')) }).catch(() => undefined);
      assert.ok(await foreign.closesSilently(), 'a certificate from another CA: closed');
      await eventually(() => /client certificate not accepted \(UNABLE_TO_VERIFY_LEAF_SIGNATURE\)/.test(logLines.join('')));
      const good = await connect(port);
      await upgrade(good, withCert());
      assert.equal(await go(good), IMAGE_SIZE);
      good.destroy();
    });

    it('allow: a plaintext client is served; one that starts TLS is served over TLS', async () => {
      const { port } = await serve('allow');
      const p = await connect(port);
      assert.equal((await ask(p, Opt.LIST)).type, Rep.SERVER);
      assert.equal((await optionReply(p)).type, Rep.ACK);
      assert.equal(await go(p), IMAGE_SIZE);
      p.write(request(Cmd.READ, 1n, 0, 4096));
      assert.ok((await replies(p, 1, () => 4096)).get(1n)!.data.equals(model.subarray(0, 4096)));
      p.destroy();
      const t = await connect(port);
      await upgrade(t, trust());
      assert.equal(await go(t), IMAGE_SIZE);
      t.write(request(Cmd.READ, 2n, MiB, 4096));
      assert.ok((await replies(t, 1, () => 4096)).get(2n)!.data.equals(model.subarray(MiB, MiB + 4096)));
      t.destroy();
      assert.equal((await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/disk`])).stdout.trim(), String(IMAGE_SIZE), 'libnbd plaintext');
      assert.equal((await run('nbdinfo', ['--size', nbds(port, noCertDir)])).stdout.trim(), String(IMAGE_SIZE), 'libnbd TLS');
    });

    it('close() ends TLS connections in negotiation and in transmission', async () => {
      const { server, port } = await serve('require');
      const a = await connect(port);
      await upgrade(a, trust());
      const b = await connect(port);
      await upgrade(b, trust());
      assert.equal(await go(b), IMAGE_SIZE);
      const c = await connect(port);
      assert.equal((await ask(c, Opt.STARTTLS)).type, Rep.ACK); // mid-handshake
      const t0 = Date.now();
      await server.close(500);
      for (const w of [a, b, c]) assert.ok(await w.closesSilently(3000));
      assert.ok(Date.now() - t0 < 3000);
    });
  });

  // ---- the daemon -------------------------------------------------------------------------

  describe('dpu-agent serve: nbd_tls', () => {
    it('TCP exports speak TLS (nbds:// URI, mutual TLS); unix exports stay plain', async () => {
      const targets = path.join(dir, 'daemon-targets') + '/';
      const config = parseAgentConfig(
        {
          auth: { disabled: true },
          state_dir: path.join(dir, 'daemon-state'),
          export_dir: path.join(dir, 'daemon-run'),
          allowed_targets: [targets],
          tcp_exports_allowed: true,
          nbd_tls: { cert: pki.serverCert, key: pki.serverKey, ca: pki.caCert, verify_peer: true },
        },
        'tls config',
      );
      assert.equal(config.nbd_tls!.mode, 'require', 'mode defaults to require');
      const log = pino({ level: 'silent' });
      const manager = new DiskManager({ config, log });
      await manager.start();
      const app = buildAgentApi({ config, manager, log, responseValidation: 'strict' });
      try {
        const client = new AgentClient({ baseUrl: await app.listen({ port: 0, host: '127.0.0.1' }) });
        const src = { url: origin.url };
        const d = await client.createDisk({ id: 'tls', source: src, target: { path: path.join(targets, 'tls.raw') }, region_size: MiB, export: { kind: 'tcp', name: 'disk' }, hydration: { enabled: false } });
        assert.equal(d.export.uri, `nbds://127.0.0.1:${d.export.port!}/disk`);
        assert.equal((await run('nbdinfo', ['--size', nbds(d.export.port!, goodDir)])).stdout.trim(), String(IMAGE_SIZE));
        const cmp = await run('qemu-img', ['compare', ...qemuObject(goodDir), '--image-opts', `driver=raw,file.driver=file,file.filename=${imagePath}`, qemuOpts(d.export.port!)]);
        assert.match(cmp.stdout, /Images are identical/);
        assert.notEqual((await run('nbdinfo', ['--size', `nbd://127.0.0.1:${d.export.port!}/disk`], { allowFail: true })).code, 0, 'plaintext refused');
        assert.notEqual((await run('nbdinfo', ['--size', nbds(d.export.port!, noCertDir)], { allowFail: true })).code, 0, 'no client certificate refused');
        const u = await client.createDisk({ id: 'plain', source: src, target: { path: path.join(targets, 'plain.raw') }, region_size: MiB, hydration: { enabled: false } });
        assert.match(u.export.uri, /^nbd\+unix:\/\//);
        assert.equal((await run('nbdinfo', ['--size', u.export.uri])).stdout.trim(), String(IMAGE_SIZE), 'the unix export needs no TLS');
        await client.deleteDisk('tls', true);
        await client.deleteDisk('plain', true);
      } finally {
        await app.close();
        await manager.close();
      }
    });

    it('names the bad nbd_tls key at start-up, in the config check and as a process', async () => {
      const base = { auth: { disabled: true }, tcp_exports_allowed: true };
      const cases: [unknown, string, RegExp][] = [
        [{ cert: pki.serverCert }, 'nbd_tls.key', /config key "nbd_tls\.key" is required/],
        [{ cert: pki.serverCert, key: pki.clientKey }, 'nbd_tls.key', /config key "nbd_tls\.key" .* is not the private key of the certificate/],
        [{ cert: path.join(dir, 'nope.pem'), key: pki.serverKey }, 'nbd_tls.cert', /config key "nbd_tls\.cert" .*nope\.pem: cannot read it/],
        [{ cert: pki.serverCert, key: pki.serverKey, verify_peer: true }, 'nbd_tls.ca', /config key "nbd_tls\.ca" is needed with config key "nbd_tls\.verify_peer"/],
        [{ cert: pki.serverCert, key: pki.serverKey, mode: 'maybe' }, 'nbd_tls.mode', /config key "nbd_tls\.mode" must be one of "require", "allow"/],
      ];
      for (const [nbdTls, key, message] of cases) {
        assert.throws(() => parseAgentConfig({ ...base, nbd_tls: nbdTls }, 'cfg'), (e: Error) => e instanceof ConfigError && e.key === key && message.test(e.message), `${key}: ${JSON.stringify(nbdTls)}`);
      }
      const file = path.join(dir, 'bad-tls.json');
      fs.writeFileSync(file, JSON.stringify({ ...base, state_dir: path.join(dir, 'bad-state'), export_dir: path.join(dir, 'bad-run'), nbd_tls: { cert: pki.serverCert, key: pki.clientKey } }));
      const daemon = new DaemonProcess(file);
      assert.equal(await daemon.exitCode(), 2);
      assert.match(daemon.stderr, /DPU_ERR_CONFIG: .*config key "nbd_tls\.key"/);
    });
  });
});
