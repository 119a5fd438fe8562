/**
 * An emulated network link for the lab and the benchmarks: a network namespace of our own
 * holding the image origin, joined to the root namespace by a veth pair whose two ends are
 * shaped with `tc tbf` (rate + burst). Traffic to the origin crosses the link at the set
 * rate, like a 1 or 10 Gbit/s datacenter network. This kernel has no `netem`, so latency
 * cannot be added (PEERS.md); the rate is what shapes hydration.
 *
 * Addresses are a /30 of 10.213.N.0 that exists only on these two veth ends; the origin
 * binds inside the namespace, and nothing else is ever addressed.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';

export interface LinkOptions {
  /** 0–255: picks the namespace name and the /30 (several links may coexist). */
  index: number;
  /** Bytes per second on the link; 0 for no shaping. */
  rate: number;
}

function sh(args: string[]): void {
  execFileSync(args[0]!, args.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
}

export class EmulatedLink {
  readonly ns: string;
  readonly hostIf: string;
  readonly nsIf: string;
  readonly hostAddr: string;
  readonly nsAddr: string;
  private readonly children = new Set<ChildProcess>();

  private constructor(readonly opts: LinkOptions) {
    const i = opts.index;
    this.ns = `snlab${i}`;
    this.hostIf = `snh${i}`;
    this.nsIf = `snn${i}`;
    this.hostAddr = `10.213.${i}.1`;
    this.nsAddr = `10.213.${i}.2`;
  }

  /** Creates the namespace and link, removing leftovers of an earlier run with the same index. */
  static create(opts: LinkOptions): EmulatedLink {
    const l = new EmulatedLink(opts);
    l.destroyQuietly();
    try {
      sh(['ip', 'netns', 'add', l.ns]);
      sh(['ip', 'link', 'add', l.hostIf, 'type', 'veth', 'peer', 'name', l.nsIf]);
      sh(['ip', 'link', 'set', l.nsIf, 'netns', l.ns]);
      sh(['ip', 'addr', 'add', `${l.hostAddr}/30`, 'dev', l.hostIf]);
      sh(['ip', 'link', 'set', l.hostIf, 'up']);
      sh(['ip', 'netns', 'exec', l.ns, 'ip', 'addr', 'add', `${l.nsAddr}/30`, 'dev', l.nsIf]);
      sh(['ip', 'netns', 'exec', l.ns, 'ip', 'link', 'set', l.nsIf, 'up']);
      sh(['ip', 'netns', 'exec', l.ns, 'ip', 'link', 'set', 'lo', 'up']);
      l.setRate(opts.rate);
    } catch (err) {
      l.destroyQuietly();
      const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim();
      throw new Error(`cannot build the emulated link ${l.ns} (needs root and iproute2): ${stderr || (err as Error).message}`);
    }
    return l;
  }

  /** Shapes both directions; 0 removes the shaping. */
  setRate(bytesPerSecond: number): void {
    const bits = Math.round(bytesPerSecond * 8);
    for (const [pre, dev] of [[[], this.hostIf], [['ip', 'netns', 'exec', this.ns], this.nsIf]] as const) {
      try {
        sh([...pre, 'tc', 'qdisc', 'del', 'dev', dev, 'root']);
      } catch {
        // no qdisc yet
      }
      if (bits > 0) {
        // A burst of ~1 ms of traffic (at least 64 KiB) keeps tbf accurate at 1–10 Gbit/s.
        const burst = Math.max(65_536, Math.round(bytesPerSecond / 1000));
        sh([...pre, 'tc', 'qdisc', 'add', 'dev', dev, 'root', 'tbf', 'rate', `${bits}bit`, 'burst', String(burst), 'latency', '50ms']);
      }
    }
  }

  /** Starts a program inside the namespace; it is killed by PID in destroy(). */
  spawnInside(cmd: string, args: string[]): ChildProcess {
    const child = spawn('ip', ['netns', 'exec', this.ns, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    return child;
  }

  /** Bytes received on the host end of the link so far (what crossed it, headers included). */
  rxBytes(): number {
    return Number(readFileSync(`/sys/class/net/${this.hostIf}/statistics/rx_bytes`, 'utf8'));
  }

  /** Removes the namespace and link of `index` if they exist (what a crashed run left). */
  static remove(index: number): void {
    new EmulatedLink({ index, rate: 0 }).destroyQuietly();
  }

  /** Whether the namespace exists now. */
  exists(): boolean {
    try {
      return execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' })
        .split('\n')
        .some((l) => l.split(' ')[0] === this.ns);
    } catch {
      return false;
    }
  }

  async destroy(): Promise<void> {
    for (const c of this.children) {
      const exited = new Promise((r) => c.once('exit', r));
      c.kill('SIGTERM');
      await exited;
    }
    this.destroyQuietly();
  }

  private destroyQuietly(): void {
    for (const args of [['ip', 'netns', 'del', this.ns], ['ip', 'link', 'del', this.hostIf]]) {
      try {
        sh(args);
      } catch {
        // already gone
      }
    }
  }
}
