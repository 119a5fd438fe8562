/**
 * The chassis of a virtual bare-metal host, as ipmi_sim's `chassis_control` program:
 * ipmi_sim runs `node chassis-control.js CONFIG get power boot` and expects `power:1` /
 * `boot:default` lines back, or `… set power "1"`, `set boot "pxe"`, `set reset "1"`
 * (OpenIPMI lanserv/extcmd.c). Power is whether the host's QEMU runs.
 *
 * Power-on plays the DPU's part: it looks up, on the DPU agent, the disk whose target is
 * this host's, and starts QEMU with that disk's NBD export as its NVMe drive, so firmware,
 * bootloader and OS read through the streaming disk. QEMU is started in its own session
 * with its output in files: ipmi_sim waits for this program's stdout to close, and does
 * not kill what it started when it exits. Power-off kills QEMU by the PID in the state
 * directory. Everything it does is appended to `chassis.log`.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { type Firmware, firmwareArgs, nbdUriToQemu } from './boot-image.js';

export interface ChassisConfig {
  stateDir: string;
  agentUrl: string;
  agentToken: string;
  /** The smartnic_target of this host's node: how its disk is found on the agent. */
  target: string;
  serialLog: string;
  memoryMiB?: number;
  /** The host's firmware: SeaBIOS (legacy BIOS boot) or OVMF (UEFI). @default 'seabios' */
  firmware?: Firmware;
  /** Give the host a NIC (QEMU user networking, DHCP) whose port 22 is forwarded to 127.0.0.1:sshPort. */
  sshPort?: number;
}

interface AgentDisk {
  id: string;
  target: { path: string };
  export: { uri: string };
  device: { serial: string; model: string; wwn: string };
}

/**
 * The NVMe controller and namespace the DPU presents, with the disk's identity: QEMU's
 * nvme takes the serial, its namespace the EUI-64 (Linux's wwid `eui.…`); QEMU cannot set
 * the model number (it is always "QEMU NVMe Ctrl"), which SNAP on a BlueField can.
 */
export function nvmeArgs(drive: string, device: AgentDisk['device']): string[] {
  const eui64 = /^eui\.([0-9a-f]{16})$/.exec(device.wwn)?.[1];
  return [
    '-drive', `file=${drive},if=none,id=d0,format=raw`,
    '-device', `nvme,id=nvme0,serial=${device.serial.replace(/,/g, ',,')}`,
    // bootindex: the firmware boots the disk, never the NIC first (PXE costs minutes under TCG).
    '-device', `nvme-ns,drive=d0,bus=nvme0,nsid=1,bootindex=0${eui64 ? `,eui64=0x${eui64}` : ''}`,
  ];
}

const pidFile = (c: ChassisConfig): string => path.join(c.stateDir, 'qemu.pid');
const bootFile = (c: ChassisConfig): string => path.join(c.stateDir, 'boot');

function log(c: ChassisConfig, msg: string): void {
  fs.appendFileSync(path.join(c.stateDir, 'chassis.log'), `${new Date().toISOString()} ${msg}\n`);
}

/** The PID of the running QEMU, or null (a stale PID file or a reused PID count as off). */
export function qemuPid(stateDir: string): number | null {
  let pid: number;
  try {
    pid = Number(fs.readFileSync(path.join(stateDir, 'qemu.pid'), 'utf8').trim());
  } catch {
    return null;
  }
  try {
    const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // A zombie is off, too (its parent, this program, exited long ago: init reaps it soon).
    if (!cmdline.includes('qemu-system') || / Z /.test(stat.slice(stat.lastIndexOf(')')))) return null;
    return pid;
  } catch {
    return null;
  }
}

async function powerOff(c: ChassisConfig): Promise<void> {
  const pid = qemuPid(c.stateDir);
  if (pid === null) return;
  process.kill(pid, 'SIGKILL');
  for (let i = 0; i < 100 && qemuPid(c.stateDir) !== null; i++) await new Promise((r) => setTimeout(r, 50));
  log(c, `power off: killed qemu ${pid}`);
}

async function powerOn(c: ChassisConfig): Promise<void> {
  if (qemuPid(c.stateDir) !== null) return;
  const res = await fetch(`${c.agentUrl}/v1/disks`, { headers: { authorization: `Bearer ${c.agentToken}` } });
  if (!res.ok) throw new Error(`agent ${c.agentUrl}: HTTP ${res.status}`);
  const { disks } = (await res.json()) as { disks: AgentDisk[] };
  const disk = disks.find((d) => d.target.path === c.target);
  // Without a disk the DPU presents no NVMe namespace: the host has nothing to boot.
  if (!disk) throw new Error(`no disk on the agent targets ${c.target}; have ${disks.map((d) => d.target.path).join(', ') || 'none'}`);
  const drive = nbdUriToQemu(disk.export.uri).replace(/,/g, ',,');
  const out = fs.openSync(path.join(c.stateDir, 'qemu.out'), 'a');
  const args = [
    '-machine', 'q35', '-m', String(c.memoryMiB ?? 512), '-nographic', '-nodefaults',
    '-serial', `file:${c.serialLog}`, '-monitor', 'none',
    ...firmwareArgs(c.firmware ?? 'seabios', () => c.stateDir),
    ...nvmeArgs(drive, disk.device),
    ...(c.sshPort ? ['-netdev', `user,id=n0,hostfwd=tcp:127.0.0.1:${c.sshPort}-:22`, '-device', 'virtio-net-pci,netdev=n0,romfile='] : []),
    '-boot', 'c', '-no-reboot',
  ];
  // detached: QEMU runs in a session of its own (setsid), so neither ipmi_sim nor this
  // program's exit takes it down; only power-off does.
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', out, out], detached: true });
  child.unref();
  fs.closeSync(out);
  if (child.pid === undefined) throw new Error('qemu-system-x86_64 could not be started');
  fs.writeFileSync(pidFile(c), `${child.pid}\n`);
  log(c, `power on: qemu ${child.pid} boots from ${disk.export.uri} (disk ${disk.id})`);
}

async function main(argv: string[]): Promise<number> {
  const [configFile, op, ...rest] = argv;
  const c = JSON.parse(fs.readFileSync(configFile!, 'utf8')) as ChassisConfig;
  log(c, `${op} ${rest.join(' ')}`);
  if (op === 'get') {
    const lines = rest.map((name) => {
      if (name === 'power') return `power:${qemuPid(c.stateDir) === null ? 0 : 1}`;
      if (name === 'boot') return `boot:${fs.existsSync(bootFile(c)) ? fs.readFileSync(bootFile(c), 'utf8').trim() : 'default'}`;
      return `${name}:0`;
    });
    process.stdout.write(lines.join('\n') + '\n');
    return 0;
  }
  if (op === 'set') {
    // Pairs: NAME VALUE (ipmi_sim quotes values; the shell has removed the quotes).
    for (let i = 0; i + 1 < rest.length; i += 2) {
      const [name, value] = [rest[i]!, rest[i + 1]!];
      if (name === 'power') await (Number(value) ? powerOn(c) : powerOff(c));
      else if (name === 'reset') {
        await powerOff(c);
        await powerOn(c);
      } else if (name === 'boot') fs.writeFileSync(bootFile(c), `${value}\n`);
      else log(c, `ignored: set ${name} ${value}`);
    }
    return 0;
  }
  if (op === 'check') return 0;
  log(c, `unknown operation ${op}`);
  return 1;
}

if (process.argv[1] && import.meta.url.endsWith(path.basename(process.argv[1]))) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: Error) => {
      try {
        const c = JSON.parse(fs.readFileSync(process.argv[2]!, 'utf8')) as ChassisConfig;
        log(c, `error: ${err.message}`);
      } catch {
        /* no config to log to */
      }
      process.stderr.write(`${err.message}\n`);
      process.exit(1);
    },
  );
}
