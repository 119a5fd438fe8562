/**
 * `npm run lab`: the whole product on one machine. Builds a real Debian 12 cloud image
 * (UEFI, cloud-init; or with --image small a busybox one), uploads it to Glance on Swift, starts Redis, Swift, Glance, Ironic (standalone),
 * the driver service, a DPU agent and an ipmi_sim virtual BMC whose power-on starts a
 * QEMU host with the agent's export as its NVMe boot disk; enrolls the node and runs
 * `baremetal node deploy` with a config drive (an SSH key, user data that reports back on
 * the serial console) onto a root disk larger than the image; shows Ironic's state, the
 * host's boot (login prompt, cloud-init) and hydration live; prints
 * a summary; undeploys; stops everything. Swift (the image origin) runs inside a network
 * namespace of its own behind a veth link shaped to --link (lab/netns.ts), so Glance, the
 * driver and the agent reach it across an emulated 1–10 Gbit/s network.
 *
 *   npm run lab                      # up, deploy, summary, undeploy, down
 *   npm run lab -- --keep            # leave the lab running (dashboard, bull-board)
 *   npm run lab -- status | down     # from another shell
 *   npm run lab -- --image-mib 512 --bandwidth 50M
 *   npm run lab -- --link 10gbit --bandwidth 0
 *
 * Every process is started by this program and stopped by PID; `down` also kills what a
 * crashed run left behind (PIDs recorded in <dir>/lab.json). Re-running is safe.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { formatBytes, parseRate } from '../dpu-agent/src/cli/units.js';
import { AgentClient } from '../openapi/clients/agent-client.js';
import { DriverClient } from '../openapi/clients/driver-client.js';
import { buildBootImage, buildDebianImage, BOOT_MARKER, LOGIN_PROMPT } from '../tests/helpers/boot-image.js';
import { CLOUD_INIT_DONE, configDriveDict, guestReport, sshKey } from '../tests/helpers/cloud-config.js';
import { freePort } from '../tests/helpers/redis.js';
import { run } from '../tests/helpers/run.js';
import { installPlugin, IronicServer, ironicGlanceConf } from '../tests/helpers/ironic.js';
import { OpenStack } from '../tests/helpers/openstack.js';
import { RedisServer } from '../tests/helpers/redis.js';
import { agentDaemon, driverService, type ServiceProcess, TOKEN, until } from '../tests/helpers/services.js';
import { VirtualBmc } from '../tests/helpers/vbmc.js';
import { EmulatedLink } from './netns.js';

const HELP = `Usage: npm run lab -- [up] [options] | status | down

  up (default)      start everything, deploy the node, boot it, print a summary
    --image KIND      debian (default): a Debian 12 cloud image booting UEFI (OVMF), with
                      cloud-init reading the config drive; debian-bios: the same booting
                      BIOS (SeaBIOS); small: a busybox initramfs image (quick)
    --root-gb N       the node's root disk in GiB (instance_info root_gb; debian: default 4,
                      growpart grows the root file system over it; small: default none)
    --image-mib N     size of the small image (default 256, at least 26)
    --bandwidth RATE  cap on background hydration, e.g. 50M or 400mbit; 0 for none
                      (default 2M for debian, 16M for small: the copy visibly outlasts the boot)
    --link RATE       the origin (Swift) sits in a network namespace behind a veth link
                      shaped to RATE with tc tbf, e.g. 1gbit, 10gbit, 200mbit; 0 for no
                      namespace (Swift on loopback). No latency: this kernel lacks netem.
                      (default 1gbit)
    --link-index N    which namespace (snlabN) and subnet (10.213.N.0/30) (default 1)
    --keep            leave the lab running after the summary (until Ctrl-C or "down")
    --no-verify       do not require the image's manifest (regions stream unverified
                      until it is built, as the driver does by default)
    --hold-hydration  hold the background copy (the agent creates the disk paused) until
                      the host has booted (debian: cloud-init has finished; small: its boot
                      marker), then resume it: the host provably boots, and cloud-init runs
                      the config drive's user data, from regions fetched on demand
    --json            print the summary as one JSON line (for tests)
    --dir DIR         work directory (default /var/tmp/smartnic-lab)
  status            what runs where
  down              stop a running lab (and anything a crashed run left)
`;

interface LabRecord {
  pid: number;
  dir: string;
  startedAt: string;
  pids: Record<string, number[]>;
  urls: Record<string, string>;
  /** The emulated link Swift sits behind, if any. */
  link?: { index: number; ns: string; address: string; rate: number };
}

const NODE = 'lab-node-1';
const TEMP_URL_KEY = 'lab-temp-url-key';

function say(s: string): void {
  process.stderr.write(`lab: ${s}\n`);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function readRecord(dir: string): LabRecord | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, 'lab.json'), 'utf8')) as LabRecord;
  } catch {
    return null;
  }
}

/** PIDs of processes in the named network namespace (none when it does not exist). */
function namespacePids(ns: string): number[] {
  try {
    return execFileSync('ip', ['netns', 'pids', ns], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })
      .split('\n')
      .filter(Boolean)
      .map(Number);
  } catch {
    return [];
  }
}

async function down(dir: string): Promise<number> {
  const rec = readRecord(dir);
  if (!rec) {
    say(`no lab in ${dir}`);
    return 0;
  }
  if (rec.pid !== process.pid && alive(rec.pid)) {
    say(`stopping the lab (pid ${rec.pid})`);
    process.kill(rec.pid, 'SIGTERM');
    await until('the lab to stop', async () => !alive(rec.pid), 60_000, 200).catch(() => process.kill(rec.pid, 'SIGKILL'));
  }
  let killed = 0;
  for (const pids of Object.values(rec.pids)) {
    for (const pid of pids) {
      if (alive(pid)) {
        process.kill(pid, 'SIGKILL');
        killed++;
      }
    }
  }
  if (killed) say(`killed ${killed} process(es) a crashed run left behind`);
  if (rec.link) EmulatedLink.remove(rec.link.index);
  fs.rmSync(path.join(dir, 'lab.json'), { force: true });
  say('down');
  return 0;
}

function status(dir: string): number {
  const rec = readRecord(dir);
  if (!rec || !alive(rec.pid)) {
    process.stdout.write(`no lab running${rec ? ` (a stale record in ${dir}; "npm run lab -- down" cleans it)` : ''}\n`);
    return rec ? 1 : 0;
  }
  process.stdout.write(`lab pid ${rec.pid}, started ${rec.startedAt}, work dir ${rec.dir}\n`);
  for (const [name, pids] of Object.entries(rec.pids)) {
    const states = pids.map((p) => `${p}${alive(p) ? '' : ' (gone)'}`).join(', ');
    process.stdout.write(`  ${name.padEnd(14)} pid ${states}${rec.urls[name] ? `  ${rec.urls[name]}` : ''}\n`);
  }
  if (rec.link) process.stdout.write(`  link           netns ${rec.link.ns}: Swift at ${rec.link.address}, ${linkText(rec.link.rate)}\n`);
  return 0;
}

/** "1 Gbit/s" and the like (rates are bytes per second; links are named in bits). */
function linkText(bytesPerSecond: number): string {
  if (!bytesPerSecond) return 'not shaped';
  const bits = bytesPerSecond * 8;
  const [v, u] = bits >= 1e9 ? [bits / 1e9, 'G'] : bits >= 1e6 ? [bits / 1e6, 'M'] : [bits / 1e3, 'k'];
  return `${Number(v.toFixed(2))} ${u}bit/s (tc tbf)`;
}

/** Whether the file reads all zeros (a missing file counts: nothing is left). */
function allZero(file: string): boolean {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch {
    return true;
  }
  try {
    const buf = Buffer.alloc(4 << 20);
    const zeros = Buffer.alloc(buf.length);
    for (let off = 0; ; off += buf.length) {
      const n = fs.readSync(fd, buf, 0, buf.length, off);
      if (n === 0) return true;
      if (!buf.subarray(0, n).equals(zeros.subarray(0, n))) return false;
    }
  } finally {
    fs.closeSync(fd);
  }
}

function bar(frac: number, width = 24): string {
  const n = Math.max(0, Math.min(width, Math.round(frac * width)));
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}]`;
}

type ImageKind = 'debian' | 'debian-bios' | 'small';

interface UpOptions {
  dir: string;
  image: ImageKind;
  imageMiB: number;
  rootGb: number | null;
  bandwidth: number;
  link: number | null;
  linkIndex: number;
  keep: boolean;
  json: boolean;
  verify: boolean;
  holdHydration: boolean;
}


async function up(opts: UpOptions): Promise<number> {
  const { dir } = opts;
  const existing = readRecord(dir);
  if (existing && alive(existing.pid)) {
    say(`a lab is already running (pid ${existing.pid}); "npm run lab -- down" first`);
    return 1;
  }
  if (existing) await down(dir);
  for (const sub of ['openstack', 'redis', 'agent', 'ironic', 'bmc', 'plugin']) fs.rmSync(path.join(dir, sub), { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  const rec: LabRecord = { pid: process.pid, dir, startedAt: new Date().toISOString(), pids: {}, urls: {} };
  const save = (): void => fs.writeFileSync(path.join(dir, 'lab.json'), JSON.stringify(rec, null, 2));
  save();

  const stops: (() => Promise<unknown>)[] = [];
  let stopping = false;
  const stopAll = async (): Promise<void> => {
    if (stopping) return;
    stopping = true;
    for (const stop of stops.reverse()) await stop().catch(() => undefined);
    fs.rmSync(path.join(dir, 'lab.json'), { force: true });
  };
  const onSignal = (): void => {
    say('stopping');
    void stopAll().then(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    const real = opts.image !== 'small';
    const firmware = opts.image === 'debian' ? 'ovmf' : 'seabios';
    const image = path.join(dir, `${opts.image}.raw`);
    if (real) {
      say(`building a Debian 12 cloud image booting ${firmware === 'ovmf' ? 'UEFI' : 'BIOS'} (the first build takes a few minutes; later ones come from the cache)`);
      await buildDebianImage(image, { boot: firmware === 'ovmf' ? 'uefi' : 'bios' });
    } else {
      say(`building a ${opts.imageMiB} MiB bootable image (Debian kernel + busybox)`);
      await buildBootImage(image, { sizeMiB: opts.imageMiB });
    }
    const imageBytes = fs.readFileSync(image);
    const key = real ? await sshKey(path.join(dir, 'ssh')) : null;

    let netns: { name: string; address: string } | undefined;
    if (opts.link !== null) {
      const busy = namespacePids(`snlab${opts.linkIndex}`);
      if (busy.length) throw new Error(`namespace snlab${opts.linkIndex} is in use (pids ${busy.join(', ')}): another lab? "npm run lab -- down --dir …" it, or pick --link-index`);
      const link = EmulatedLink.create({ index: opts.linkIndex, rate: opts.link });
      stops.push(() => link.destroy());
      rec.link = { index: opts.linkIndex, ns: link.ns, address: link.nsAddr, rate: opts.link };
      save();
      netns = { name: link.ns, address: link.nsAddr };
      say(`emulated link: netns ${link.ns} (${link.nsAddr}) ⇄ ${link.hostIf} (${link.hostAddr}), ${linkText(opts.link)}`);
    }

    say(`starting memcached, Swift${netns ? ` (inside ${netns.name}, at ${netns.address})` : ''} and Glance (Swift store)`);
    const os = await OpenStack.start(path.join(dir, 'openstack'), { glance: ['swift'], ...(netns ? { netns } : {}) });
    stops.push(() => os.stop());
    rec.pids['openstack'] = [...os.memcached.processes(), ...os.swift.processes()].map((p) => p.child.pid ?? 0).filter(Boolean);
    rec.pids['glance'] = os.glance.swift!.processes().map((p) => p.child.pid ?? 0).filter(Boolean);
    rec.urls['glance'] = os.glance.swift!.url;
    rec.urls['openstack'] = `swift ${os.swift.url}${netns ? ` (in netns ${netns.name})` : ''}, glance ${os.glance.swift!.url}`;
    save();
    await os.swift.setTempUrlKey(TEMP_URL_KEY);
    // Public: Ironic, which resolves the image (no Keystone here), sees public images only.
    const glanceImage = await os.glance.swift!.uploadImage(imageBytes, { name: 'smartnic-lab', disk_format: 'raw', visibility: 'public' });
    say(`image ${glanceImage.id} in Glance (${formatBytes(glanceImage.size ?? 0)}, stored in Swift)`);

    say('starting Redis, the DPU agent, the driver service and Ironic');
    const redis = new RedisServer(path.join(dir, 'redis'));
    await redis.start();
    stops.push(() => redis.stop());
    // --hold-hydration: every disk starts with its background copy paused; resumed below at the boot marker.
    const agent = await agentDaemon({ dir: path.join(dir, 'agent'), extra: { log_level: 'warn', ...(opts.holdHydration ? { defaults: { hydration_paused: true } } : {}) } });
    const driver = await driverService({
      dir,
      redisUrl: redis.url,
      extra: {
        // Every region the host or the copy fetches is checked against the image's manifest,
        // built once from the image and its Glance digest (the first deploy of an image waits
        // for that build; later deploys of it find it cached).
        manifests: { require: opts.verify },
      },
    });
    const pluginDir = path.join(dir, 'plugin');
    await Promise.all([agent.start(), driver.start(), installPlugin(pluginDir)]);
    stops.push(() => driver.stop(), () => agent.stop());
    // Ironic resolves the Glance image itself ([smartnic]resolve_images_in_ironic): its
    // [glance] section names Glance and the Swift account, and the driver service (which
    // has no glance config here) is given the temp URL Ironic signs.
    const ironic = await IronicServer.create({
      dir: path.join(dir, 'ironic'),
      pluginDir,
      conf: { ...ironicGlanceConf(os.glance.swift!.url, os.swift, TEMP_URL_KEY), smartnic: { driver_url: driver.url, token: TOKEN, poll_interval: 1, wipe_on_teardown: false }, conductor: { automated_clean: true } },
    });
    await ironic.start();
    stops.push(() => ironic.stop());
    const target = path.join(dir, 'agent', 'targets', `${NODE}.raw`);
    const sshPort = real ? await freePort() : 0;
    const bmc = new VirtualBmc({ dir: path.join(dir, 'bmc'), agentUrl: agent.url, agentToken: TOKEN, target, firmware, ...(real ? { memoryMiB: 1024, sshPort } : {}) });
    await bmc.start();
    stops.push(() => bmc.stop());
    const pidOf = (p: ServiceProcess | { child: { pid?: number } | null }): number[] => (p.child?.pid ? [p.child.pid] : []);
    Object.assign(rec.pids, { redis: pidOf(redis as never), agent: pidOf(agent), driver: pidOf(driver), ironic: pidOf(ironic as never), bmc: pidOf(bmc as never) });
    Object.assign(rec.urls, { agent: agent.url, driver: driver.url, ironic: `http://127.0.0.1:${ironic.port}`, bmc: `ipmi 127.0.0.1:${bmc.port} (udp)` });
    save();

    say(`enrolling ${NODE} (smartnic-ipmi, virtual BMC at 127.0.0.1:${bmc.port})`);
    const info = { ...bmc.driverInfo(), smartnic_agent_url: agent.url, smartnic_target: target, ...(opts.bandwidth ? { smartnic_bandwidth: opts.bandwidth } : {}) };
    await ironic.baremetal('node', 'create', '--name', NODE, '--driver', 'smartnic-ipmi', ...Object.entries(info).flatMap(([k, v]) => ['--driver-info', `${k}=${v}`]), ...(real ? ['--property', `capabilities=boot_mode:${firmware === 'ovmf' ? 'uefi' : 'bios'}`] : []));
    await ironic.baremetal('node', 'manage', NODE);
    await ironic.waitForProvisionState(NODE, 'manageable');
    await ironic.baremetal('node', 'provide', NODE);
    await ironic.waitForProvisionState(NODE, 'available');
    await ironic.baremetal('node', 'set', NODE, '--instance-info', `image_source=${glanceImage.id}`, ...(opts.rootGb ? ['--instance-info', `root_gb=${opts.rootGb}`] : []));

    const api = new DriverClient({ baseUrl: driver.url, token: TOKEN });
    const agentApi = new AgentClient({ baseUrl: agent.url, token: TOKEN });
    const dashboard = `${driver.url}/dashboard/#token=${TOKEN}`;
    say(`dashboard: ${dashboard}`);
    // As Nova passes it: an SSH key and user data; Ironic builds the dict into the ISO.
    const configDrive = key ? JSON.stringify(configDriveDict(key.publicKey)) : null;
    say(`openstack baremetal node deploy${configDrive ? ' --config-drive <SSH key, user data>' : ''}`);
    const t0 = Date.now();
    await ironic.baremetal('node', 'deploy', NODE, ...(configDrive ? ['--config-drive', configDrive] : []));
    const node = await ironic.node(NODE);
    const uuid = node.uuid;
    let activeAt = 0;
    let markerAt = 0;
    let completeAt = 0;
    let atMarker = -1;
    // The real image's milestones, and how much was local at each.
    let loginAt = 0;
    let atLogin = -1;
    let cloudInitAt = 0;
    let atCloudInit = -1;
    /** Read from the agent at the marker: what the host's boot alone had fetched, when the copy was held. */
    let diskAtMarker: { fraction: number; bytes_fetched: number; hydration: string } | null = null;
    let provision = node.provision_state;
    let fraction = 0;
    let fetched = 0;
    // The hydration rate: bytes fetched between the first sample that saw bytes and completion.
    let firstFetch: { t: number; bytes: number } | null = null;
    let lastFetch: { t: number; bytes: number } | null = null;
    const tty = process.stderr.isTTY && !opts.json;
    for (;;) {
      const n = await ironic.node(NODE).catch(() => null);
      if (n) provision = n.provision_state;
      if (provision === 'deploy failed') throw new Error(`deploy failed: ${n?.last_error ?? ''}`);
      if (!activeAt && provision === 'active') activeAt = Date.now() - t0;
      const d = await api.getDeployment(uuid).catch(() => null);
      if (d) {
        fraction = d.progress.fraction;
        fetched = d.progress.bytes_fetched;
        if (!completeAt) {
          const sample = { t: Date.now(), bytes: fetched };
          if (fetched > 0 && !firstFetch) firstFetch = sample;
          if (fetched > 0) lastFetch = sample;
        }
        if (!completeAt && d.state === 'complete') completeAt = Date.now() - t0;
      }
      const serial = bmc.serial();
      if (real && !loginAt && LOGIN_PROMPT.test(serial)) {
        loginAt = Date.now() - t0;
        atLogin = fraction;
      }
      if (real && !cloudInitAt && serial.includes(CLOUD_INIT_DONE)) {
        cloudInitAt = Date.now() - t0;
        atCloudInit = fraction;
      }
      // The boot is done: the small image's marker; the real one's login prompt and cloud-init.
      const booted = real ? loginAt > 0 && cloudInitAt > 0 : serial.includes(BOOT_MARKER);
      if (!markerAt && booted) {
        markerAt = Date.now() - t0;
        atMarker = fraction;
        if (opts.holdHydration) {
          // The copy was held: everything local now is what the boot read, on demand. Resume it.
          const disk = (await agentApi.listDisks()).find((x) => x.target.path === target);
          if (!disk) throw new Error(`the agent has no disk on ${target} at the boot marker`);
          diskAtMarker = { fraction: disk.regions.total ? disk.regions.local / disk.regions.total : 0, bytes_fetched: disk.bytes_fetched, hydration: disk.hydration.state };
          atMarker = diskAtMarker.fraction;
          await agentApi.updateHydration(disk.id, { paused: false });
          say(`${real ? 'login prompt and cloud-init done' : 'boot marker seen'}: resuming the held copy (${(atMarker * 100).toFixed(0)}% local, ${formatBytes(disk.bytes_fetched)} fetched by the boot)`);
        }
      }
      const secs = ((Date.now() - t0) / 1000).toFixed(1).padStart(5);
      const host = markerAt ? `booted ${(markerAt / 1000).toFixed(1)}s` : loginAt ? 'login prompt, cloud-init…' : bmc.qemuPid() ? 'booting…' : 'off';
      const line = `t=${secs}s  ironic: ${provision.padEnd(16)} host: ${host}`.padEnd(70) + `  disk ${bar(fraction)} ${(fraction * 100).toFixed(0).padStart(3)}%`;
      if (tty) process.stderr.write(`\r${line}\x1b[K`);
      else if (!opts.json && Math.round((Date.now() - t0) / 250) % 8 === 0) process.stderr.write(`${line}\n`);
      if (markerAt && completeAt && activeAt) break;
      if (Date.now() - t0 > 15 * 60_000) throw new Error('the deployment did not finish within 15 minutes');
      await new Promise((r) => setTimeout(r, 250));
    }
    if (tty) process.stderr.write('\n');
    // What the guest says: the config drive's user data ran, the root grew, the key is in place.
    const report = real ? guestReport(bmc.serial()) : null;
    let sshLogin: boolean | null = null;
    if (key) {
      const ssh = await run('ssh', ['-i', key.privateKey, '-p', String(sshPort), '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'ConnectTimeout=60', 'debian@127.0.0.1', 'echo', 'SMARTNIC-SSH-OK'], { allowFail: true, timeoutMs: 120_000 });
      sshLogin = ssh.stdout.includes('SMARTNIC-SSH-OK');
      if (!sshLogin) say(`ssh with the config drive's key failed: ${ssh.stderr.trim().split('\n').pop() ?? ''}`);
    }
    // The image's part of the target (the root disk is larger: its rest is zeros or the config drive).
    const readTarget = (offset: number, length: number): Buffer => {
      const fd = fs.openSync(target, 'r');
      try {
        const buf = Buffer.alloc(length);
        fs.readSync(fd, buf, 0, length, offset);
        return buf;
      } finally {
        fs.closeSync(fd);
      }
    };
    const local = readTarget(0, imageBytes.length);
    const agentDisk = (await agentApi.listDisks()).find((x) => x.target.path === target);
    const cd = agentDisk?.config_drive ?? null;
    // A real OS writes to its disk (growpart, resize2fs, logs): its disk is no longer the
    // image, and what vouches for every byte that came from the origin is the manifest
    // (`verified`). The small image's guest writes nothing: its disk must equal the image.
    const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
    const sameAsImage = real ? null : sha(local) === sha(imageBytes);
    const driveIntact = cd ? sha(readTarget(cd.offset, cd.bytes)) === cd.sha256 : null;
    const summary = {
      image: opts.image,
      image_bytes: imageBytes.length,
      disk_bytes: agentDisk?.size ?? fs.statSync(target).size,
      deploy_to_login_ms: loginAt || null,
      deploy_to_cloud_init_ms: cloudInitAt || null,
      hydrated_fraction_at_login: real ? atLogin : null,
      hydrated_fraction_at_cloud_init: real ? atCloudInit : null,
      config_drive_partition: cd ? `${cd.table} partition ${cd.partition} at ${cd.offset}` : null,
      /** The config drive's bytes on the DPU's target are the ones written (the guest mounts it read-only). */
      config_drive_intact: driveIntact,
      cloud_init_datasource: report?.datasource ?? null,
      root_fs_bytes: report?.rootBytes ?? null,
      ssh_key_installed: report ? report.keys > 0 : null,
      ssh_login_with_config_drive_key: sshLogin,
      deploy_to_active_ms: activeAt,
      deploy_to_boot_marker_ms: markerAt,
      deploy_to_hydrated_ms: completeAt,
      verified: false,
      integrity_failures: 0,
      hydrated_fraction_at_marker: atMarker,
      /** With --hold-hydration: the copy was paused until the marker, and what the boot had fetched by then. */
      hydration_held_until_marker: diskAtMarker !== null && diskAtMarker.hydration === 'paused',
      bytes_fetched_at_marker: diskAtMarker?.bytes_fetched ?? null,
      bytes_fetched: fetched,
      fetched_over_image: fetched / imageBytes.length,
      link_bytes_per_s: opts.link ?? 0,
      hydration_bytes_per_s: firstFetch && lastFetch && lastFetch.t > firstFetch.t ? Math.round(((lastFetch.bytes - firstFetch.bytes) * 1000) / (lastFetch.t - firstFetch.t)) : 0,
      local_disk_equals_image: sameAsImage,
      /** After undeploy and automated cleaning: the DPU's target reads all zeros (or is gone). */
      wiped_on_undeploy: null as boolean | null,
      undeploy_to_available_ms: null as number | null,
      cleaning_last_step: null as string | null,
    };
    summary.verified = agentDisk?.verified ?? false;
    summary.integrity_failures = agentDisk?.integrity_failures ?? 0;
    const pct = (f: number): string => `${(f * 100).toFixed(0)}%`;
    const print = (): void => {
      if (opts.json) {
        process.stdout.write(JSON.stringify(summary) + '\n');
        return;
      }
      process.stdout.write(
        [
          '',
          'summary',
          `  image                    ${formatBytes(imageBytes.length)} in Glance, stored in Swift, read through a temp URL`,
          `  link to Swift            ${opts.link === null ? 'none (loopback)' : linkText(opts.link)}; hydration cap ${opts.bandwidth ? `${formatBytes(opts.bandwidth)}/s` : 'none'}${opts.holdHydration ? ', held until the boot marker' : ''}`,
          `  root disk                ${formatBytes(summary.disk_bytes)}${opts.rootGb ? ` (root_gb ${opts.rootGb})` : ''}; image ${opts.image === 'small' ? 'busybox, BIOS' : `Debian 12 cloud, ${firmware === 'ovmf' ? 'UEFI (OVMF)' : 'BIOS (SeaBIOS)'}`}`,
          `  deploy → ACTIVE          ${(activeAt / 1000).toFixed(1)} s`,
          ...(real
            ? [
                `  deploy → login prompt    ${(loginAt / 1000).toFixed(1)} s (hydration ${pct(atLogin)} done at that moment)`,
                `  deploy → cloud-init done ${(cloudInitAt / 1000).toFixed(1)} s (hydration ${pct(atCloudInit)} done at that moment)`,
                `  config drive             ${cd ? `${cd.table} partition ${cd.partition}, ${formatBytes(cd.bytes)} at ${formatBytes(cd.offset)}` : 'NONE'}; cloud-init's datasource: ${report?.datasource ?? 'no report'}`,
                `  root file system         ${report ? `${formatBytes(report.rootBytes)} (grown by growpart over the ${formatBytes(summary.disk_bytes)} disk)` : 'no report'}`,
                `  SSH key from the drive   ${report && report.keys > 0 ? 'installed' : 'NOT installed'}; ssh login with it: ${sshLogin ? 'ok' : 'FAILED'}`,
              ]
            : [`  deploy → boot marker     ${(markerAt / 1000).toFixed(1)} s (hydration ${pct(atMarker)} done at that moment)`]),
          `  deploy → all local       ${(completeAt / 1000).toFixed(1)} s (hydration at ${formatBytes(summary.hydration_bytes_per_s)}/s = ${((summary.hydration_bytes_per_s * 8) / 1e6).toFixed(0)} Mbit/s)`,
          `  fetched / image          ${formatBytes(fetched)} / ${formatBytes(imageBytes.length)} = ${summary.fetched_over_image.toFixed(3)}`,
          `  verified region by region ${summary.verified ? `yes (manifest checked against Glance's digest; ${summary.integrity_failures} bad regions refetched)` : 'no'}`,
          ...(sameAsImage === null ? [] : [`  local disk = image       ${sameAsImage ? 'yes' : 'NO'}`]),
          ...(summary.wiped_on_undeploy === null
            ? []
            : [`  undeploy + cleaning      ${((summary.undeploy_to_available_ms ?? 0) / 1000).toFixed(1)} s to available (last step: ${summary.cleaning_last_step ?? 'none'}); the DPU's disk ${summary.wiped_on_undeploy ? 'reads all zeros' : 'is NOT zeroed'}`]),
          '',
        ].join('\n'),
      );
    };
    if (opts.keep) {
      print();
      say(`the lab keeps running: dashboard ${dashboard}, queues ${driver.url}/queues (token ${TOKEN}); "npm run lab -- status", "npm run lab -- down"`);
      await new Promise(() => undefined); // until a signal
    }
    // Undeploy keeps the DPU's copy (wipe_on_teardown off); Ironic's automated cleaning then
    // runs the interface's erase_devices_metadata and erase_devices on the DPU, as it would
    // run IPA's on a host's local disk.
    say('openstack baremetal node undeploy (then automated cleaning on the DPU)');
    const u0 = Date.now();
    await ironic.baremetal('node', 'undeploy', NODE);
    await ironic.waitForProvisionState(NODE, 'available', 300_000);
    summary.undeploy_to_available_ms = Date.now() - u0;
    const cleaning = await api.getCleaning(uuid).catch(() => null);
    summary.cleaning_last_step = cleaning ? `${cleaning.step} ${cleaning.state}` : null;
    summary.wiped_on_undeploy = allZero(target);
    print();
    // Success is correctness (the disk equals the image, undeploy wiped it). Whether the host
    // booted before the copy ended depends on the image size and rates; the test asserts it.
    const guestOk = !real || (report?.datasource === 'configdrive' && report.keys > 0 && sshLogin === true && driveIntact === true);
    const dataOk = real ? summary.verified : sameAsImage === true;
    return dataOk && summary.wiped_on_undeploy && guestOk ? 0 : 1;
  } finally {
    await stopAll();
  }
}

async function main(): Promise<number> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      image: { type: 'string', default: 'debian' },
      'root-gb': { type: 'string' },
      'image-mib': { type: 'string', default: '256' },
      'no-verify': { type: 'boolean' },
      'hold-hydration': { type: 'boolean' },
      bandwidth: { type: 'string' },
      keep: { type: 'boolean' },
      json: { type: 'boolean' },
      dir: { type: 'string', default: '/var/tmp/smartnic-lab' },
      link: { type: 'string', default: '1gbit' },
      'link-index': { type: 'string', default: '1' },
      help: { type: 'boolean' },
    },
  });
  if (values.help) {
    process.stdout.write(HELP);
    return 0;
  }
  const dir = path.resolve(values.dir!);
  const command = positionals[0] ?? 'up';
  if (command === 'down') return down(dir);
  if (command === 'status') return status(dir);
  if (command !== 'up') {
    process.stderr.write(`lab: unknown command "${command}"\n${HELP}`);
    return 2;
  }
  const image = values.image as ImageKind;
  if (!['debian', 'debian-bios', 'small'].includes(image)) throw new Error(`--image ${values.image} must be debian, debian-bios or small`);
  const rootGb = values['root-gb'] !== undefined ? Number(values['root-gb']) : image === 'small' ? null : 4;
  if (rootGb !== null && (!Number.isInteger(rootGb) || rootGb < 1)) throw new Error(`--root-gb ${values['root-gb']} must be a whole number of GiB, at least 1`);
  // The real image's data (~480 MiB) at 2 MiB/s outlasts its boot under TCG; the small one's at 16.
  const bandwidth = parseRate(values.bandwidth ?? (image === 'small' ? '16M' : '2M'), '--bandwidth');
  const imageMiB = Number(values['image-mib']);
  if (!Number.isInteger(imageMiB) || imageMiB < 26) throw new Error(`--image-mib ${values['image-mib']} must be an integer of at least 26`);
  const linkIndex = Number(values['link-index']);
  if (!Number.isInteger(linkIndex) || linkIndex < 0 || linkIndex > 255) throw new Error(`--link-index ${values['link-index']} must be an integer from 0 to 255`);
  const link = values.link!.trim() === '0' ? null : parseRate(values.link!, '--link');
  return up({ dir, image, imageMiB, rootGb, bandwidth, link, linkIndex, keep: !!values.keep, json: !!values.json, verify: !values['no-verify'], holdHydration: !!values['hold-hydration'] });
}

main().then(
  (code) => process.exit(code),
  (err: Error) => {
    process.stderr.write(`lab: ${err.message}\n`);
    process.exit(1);
  },
);
