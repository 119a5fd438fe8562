/**
 * Hosts on one machine, each in a network namespace of its own behind its own shaped link
 * (issue #15's fleet: docs/fleet.md). A bridge in this (the root) namespace is the switch;
 * each host is a veth pair, one end on the bridge, the other, `eth0`, in the host's
 * namespace. A host's upload is shaped on its `eth0` (tbf), its download on the bridge's
 * end (tbf). This namespace reaches every host through the bridge (it has the bridge's
 * address, `<subnet>.0.1`), so servers started here (Redis, the driver, an origin) are
 * reached by the hosts at that address; `shapeFromRoot` caps what one port of this
 * namespace sends (htb on the bridge: the origin's shared link), leaving the rest unshaped.
 *
 * Needs CAP_NET_ADMIN (root), iproute2's `ip` and `tc`, and the kernel's veth, bridge, tbf
 * and htb. Names carry a prefix of this process's so that runs do not collide; `stop`
 * removes everything (the namespaces' processes must be stopped first).
 */
import { execFileSync } from 'node:child_process';

export interface HostLink {
  /** Bytes per second the host may send (its upload); undefined: unshaped. */
  up?: number;
  /** Bytes per second the host may receive (its download); undefined: unshaped. */
  down?: number;
}

export interface NetHost {
  /** The namespace's name (`ip netns exec <ns> …`). */
  ns: string;
  ip: string;
  /** The command prefix that runs a program in the namespace. */
  exec: string[];
}

/** The MTU of every link: data-centre jumbo frames. */
const MTU = 9000;

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}
function tc(...args: string[]): void {
  execFileSync('tc', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** tbf parameters for `rate` bytes/s: a bucket of 10 ms of the rate, at least 64 KiB (a GSO packet). */
function tbf(rate: number): string[] {
  const burst = Math.max(64 << 10, Math.round(rate / 100));
  return ['tbf', 'rate', `${Math.round(rate * 8)}bit`, 'burst', String(burst), 'latency', '50ms'];
}

export class NetLab {
  readonly hosts: NetHost[] = [];
  readonly bridge: string;
  /** This namespace's address on the bridge: where hosts reach servers started here. */
  readonly rootIp: string;
  private started = false;
  private rootShaped = false;
  private nextClass = 10;

  /** `subnet`: the first two octets of the lab's /16 (e.g. "10.66"): must not be in use here. */
  constructor(
    readonly subnet = '10.66',
    readonly prefix = `nl${(process.pid % 46656).toString(36)}`,
  ) {
    this.bridge = `${prefix}br`;
    this.rootIp = `${subnet}.0.1`;
  }

  /** Whether this process may make namespaces (root with CAP_NET_ADMIN, iproute2 present). */
  static available(): boolean {
    const probe = `nlprobe${process.pid % 1000}`;
    try {
      ip('netns', 'add', probe);
      ip('netns', 'del', probe);
      return true;
    } catch {
      return false;
    }
  }

  start(): void {
    this.started = true;
    ip('link', 'add', this.bridge, 'type', 'bridge');
    ip('link', 'set', this.bridge, 'mtu', String(MTU), 'txqueuelen', '1000');
    ip('addr', 'add', `${this.rootIp}/16`, 'dev', this.bridge);
    ip('link', 'set', this.bridge, 'up');
  }

  /** A new host behind a link shaped as `link`. */
  addHost(link: HostLink = {}): NetHost {
    const i = this.hosts.length;
    const ns = `${this.prefix}h${i}`;
    const outer = `${this.prefix}v${i}`;
    const inner = `${this.prefix}p${i}`;
    const addr = `${this.subnet}.${1 + Math.floor(i / 250)}.${2 + (i % 250)}`;
    ip('netns', 'add', ns);
    const host: NetHost = { ns, ip: addr, exec: ['ip', 'netns', 'exec', ns] };
    this.hosts.push(host);
    ip('link', 'add', outer, 'mtu', String(MTU), 'type', 'veth', 'peer', 'name', inner, 'mtu', String(MTU));
    ip('link', 'set', inner, 'netns', ns);
    ip('-n', ns, 'link', 'set', inner, 'name', 'eth0');
    ip('-n', ns, 'addr', 'add', `${addr}/16`, 'dev', 'eth0');
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    ip('-n', ns, 'link', 'set', 'eth0', 'up');
    ip('link', 'set', outer, 'master', this.bridge);
    ip('link', 'set', outer, 'up');
    if (link.up !== undefined) tc('-n', ns, 'qdisc', 'add', 'dev', 'eth0', 'root', ...tbf(link.up));
    if (link.down !== undefined) tc('qdisc', 'add', 'dev', outer, 'root', ...tbf(link.down));
    return host;
  }

  /**
   * Caps what this namespace sends from TCP port `port` to the hosts at `rate` bytes/s
   * (a server's shared link: an origin's), on the bridge; everything else it sends stays
   * unshaped.
   */
  shapeFromRoot(port: number, rate: number): void {
    if (!this.rootShaped) {
      tc('qdisc', 'add', 'dev', this.bridge, 'root', 'handle', '1:', 'htb', 'default', '1');
      tc('class', 'add', 'dev', this.bridge, 'parent', '1:', 'classid', '1:1', 'htb', 'rate', '40gbit');
      this.rootShaped = true;
    }
    const cls = `1:${this.nextClass++}`;
    const bits = `${Math.round(rate * 8)}bit`;
    tc('class', 'add', 'dev', this.bridge, 'parent', '1:', 'classid', cls, 'htb', 'rate', bits, 'ceil', bits, 'burst', String(Math.max(64 << 10, Math.round(rate / 100))));
    tc('filter', 'add', 'dev', this.bridge, 'parent', '1:', 'protocol', 'ip', 'prio', '1', 'u32', 'match', 'ip', 'sport', String(port), '0xffff', 'flowid', cls);
  }

  /** Removes the hosts (their namespaces and links) and the bridge; what fails to go is reported, not thrown. */
  stop(): string[] {
    const failed: string[] = [];
    for (const h of this.hosts.splice(0)) {
      try {
        ip('netns', 'del', h.ns); // its veth end goes with it, and so the pair
      } catch (err) {
        failed.push(`${h.ns}: ${(err as Error).message}`);
      }
    }
    if (this.started) {
      try {
        ip('link', 'del', this.bridge);
      } catch (err) {
        failed.push(`${this.bridge}: ${(err as Error).message}`);
      }
      this.started = false;
    }
    return failed;
  }
}
