/**
 * The benchmarks' image origin: nginx inside an emulated link's namespace, bound to the
 * namespace address only — a C origin with sendfile, so the origin is never what caps the
 * link. It serves `root` at `/` with Range. Every path it writes (pid, error log, temp
 * dirs) is under `dir`; it runs as root inside the namespace so its worker can read images
 * in a private temp dir. `ip netns exec` execs nginx (daemon off), so the tracked PID is
 * nginx's master, stopped by PID with the bench's other children.
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { EmulatedLink } from '../../lab/netns.js';
import { sleep, spawnTracked } from './common.js';

export interface NginxOrigin {
  /** `http://ADDR:PORT`; an image file `root/NAME` is at `${base}/NAME`. */
  base: string;
  child: ChildProcess;
  /** The configuration written, for the bench's record. */
  config: string;
}

/**
 * With `tls`, the server listens with TLS only (nginx's default protocols and ciphers; no
 * sendfile then: nginx encrypts in user space, as a Swift proxy behind TLS does).
 */
export async function startNginxOrigin(link: EmulatedLink, dir: string, root: string, port = 8080, tls?: { cert: string; key: string }): Promise<NginxOrigin> {
  const odir = path.join(dir, `nginx-${link.ns}`);
  fs.mkdirSync(path.join(odir, 'tmp'), { recursive: true });
  const v = spawnSync('nginx', ['-V'], { encoding: 'utf8' });
  if (v.error) throw new Error('nginx is missing: apt-get install nginx-light');
  // Temp paths exist only for compiled-in modules (nginx-light leaves some out); naming
  // a missing module's directive would stop nginx, leaving one out would make it create
  // its compiled-in default under /var/lib/nginx.
  const temps = ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']
    .filter((m) => m === 'client_body' || !v.stderr.includes(`--without-http_${m}_module`))
    .map((m) => `  ${m}_temp_path ${odir}/tmp/${m};`);
  const errorLog = path.join(odir, 'error.log');
  const config = `# written by bench/lib/nginx-origin.ts
daemon off;
master_process on;
worker_processes 1;
user root;
pid ${odir}/nginx.pid;
error_log ${errorLog} warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  default_type application/octet-stream;
${temps.join('\n')}
  server {
    listen ${link.nsAddr}:${port}${tls ? ' ssl' : ''};
${tls ? `    ssl_certificate ${tls.cert};
    ssl_certificate_key ${tls.key};
` : ''}    root ${root};
  }
}
`;
  const conf = path.join(odir, 'nginx.conf');
  fs.writeFileSync(conf, config);
  const { child, stderr } = spawnTracked('ip', ['netns', 'exec', link.ns, 'nginx', '-p', `${odir}/`, '-e', errorLog, '-c', conf]);
  const base = `${tls ? 'https' : 'http'}://${link.nsAddr}:${port}`;
  const tail = (): string => {
    try {
      return fs.readFileSync(errorLog, 'utf8').slice(-2000);
    } catch {
      return '';
    }
  };
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`nginx exited (${child.exitCode}): ${stderr()} ${tail()}`);
    try {
      if (tls) await tcpAnswers(link.nsAddr, port);
      else await fetch(`${base}/`, { method: 'HEAD', signal: AbortSignal.timeout(1000) });
      return { base, child, config };
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`nginx did not answer on ${base}: ${stderr()} ${tail()}`);
    await sleep(50);
  }
}

/** Resolves once a TCP connection to host:port is accepted (the TLS listener is up). */
function tcpAnswers(host: string, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port, timeout: 1000 }, () => {
      s.destroy();
      resolve();
    });
    s.once('error', reject);
    s.once('timeout', () => {
      s.destroy();
      reject(new Error('timeout'));
    });
  });
}
