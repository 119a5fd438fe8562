/**
 * A virtual BMC for a QEMU host: OpenIPMI's `ipmi_sim` on a free UDP loopback port, in
 * the configuration DESIGN.md §5 verified with Ironic's ipmitool driver (user 2
 * admin/password, cipher suite 3), whose chassis is chassis-control.ts: power-on starts
 * QEMU booting from the DPU agent's export of the host's disk, power-off kills it.
 * Stopped by PID; the QEMU it may have started is killed by PID too (ipmi_sim does not).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ChassisConfig } from './chassis-control.js';
import { qemuPid } from './chassis-control.js';
import { freePort } from './redis.js';
import { run } from './run.js';

const CHASSIS = fileURLToPath(new URL('./chassis-control.js', import.meta.url));
export const IPMI_USER = 'admin';
export const IPMI_PASSWORD = 'password';

export interface VirtualBmcSetup {
  dir: string;
  agentUrl: string;
  agentToken: string;
  /** The node's smartnic_target: the host boots the agent disk with this target. */
  target: string;
  /** The host's firmware, memory and NIC (see ChassisConfig). */
  firmware?: ChassisConfig['firmware'];
  memoryMiB?: number;
  sshPort?: number;
}

export class VirtualBmc {
  child: ChildProcess | null = null;
  port = 0;
  readonly stateDir: string;
  readonly serialLog: string;

  constructor(private readonly s: VirtualBmcSetup) {
    this.stateDir = path.join(s.dir, 'chassis');
    this.serialLog = path.join(s.dir, 'serial.log');
  }

  /** driver_info for an ipmitool node managed through this BMC. */
  driverInfo(): Record<string, string | number> {
    return {
      ipmi_address: '127.0.0.1',
      ipmi_port: this.port,
      ipmi_username: IPMI_USER,
      ipmi_password: IPMI_PASSWORD,
      // Suite 17 is not implemented by ipmi_sim; ipmitool would try it first (~10 s).
      ipmi_cipher_suite: 3,
    };
  }

  async start(): Promise<void> {
    fs.mkdirSync(this.stateDir, { recursive: true });
    this.port = await freePort(); // a free TCP port number; UDP on it is almost surely free too
    const chassis: ChassisConfig = {
      stateDir: this.stateDir,
      agentUrl: this.s.agentUrl,
      agentToken: this.s.agentToken,
      target: this.s.target,
      serialLog: this.serialLog,
      ...(this.s.firmware ? { firmware: this.s.firmware } : {}),
      ...(this.s.memoryMiB ? { memoryMiB: this.s.memoryMiB } : {}),
      ...(this.s.sshPort ? { sshPort: this.s.sshPort } : {}),
    };
    const chassisFile = path.join(this.s.dir, 'chassis.json');
    fs.writeFileSync(chassisFile, JSON.stringify(chassis));
    const lan = path.join(this.s.dir, 'lan.conf');
    fs.writeFileSync(
      lan,
      [
        'name "smartnic-test-bmc"',
        'set_working_mc 0x20',
        '  startlan 1',
        `    addr 127.0.0.1 ${this.port}`,
        '    priv_limit admin',
        '    allowed_auths_callback none md2 md5 straight',
        '    allowed_auths_user none md2 md5 straight',
        '    allowed_auths_operator none md2 md5 straight',
        '    allowed_auths_admin none md2 md5 straight',
        '    guid a123456789abcdefa123456789abcdef',
        '  endlan',
        `  chassis_control "${process.execPath} ${CHASSIS} ${chassisFile}"`,
        `user 2 true "${IPMI_USER}" "${IPMI_PASSWORD}" admin 10 none md2 md5 straight`,
        '',
      ].join('\n'),
    );
    const emu = path.join(this.s.dir, 'bmc.emu');
    fs.writeFileSync(emu, ['mc_setbmc 0x20', 'mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr', 'sel_enable 0x20 1000 0x0a', 'mc_enable 0x20', ''].join('\n'));
    const out = fs.openSync(path.join(this.s.dir, 'ipmi_sim.log'), 'a');
    this.child = spawn('ipmi_sim', ['-c', lan, '-f', emu, '-s', path.join(this.s.dir, 'ipmi-state'), '-n'], { stdio: ['ignore', out, out] });
    fs.closeSync(out);
    this.child.on('error', () => undefined);
    // Ready when ipmitool gets an answer through it.
    const deadline = Date.now() + 15_000;
    for (;;) {
      const r = await this.ipmitool('power', 'status');
      if (r.code === 0 && /Chassis Power is (on|off)/.test(r.stdout)) return;
      if (this.child.exitCode !== null) throw new Error(`ipmi_sim exited (${this.child.exitCode}): ${fs.readFileSync(path.join(this.s.dir, 'ipmi_sim.log'), 'utf8')}`);
      if (Date.now() > deadline) throw new Error(`ipmi_sim does not answer on UDP ${this.port}: ${r.stderr}`);
      await new Promise((res) => setTimeout(res, 200));
    }
  }

  ipmitool(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    return run('ipmitool', ['-I', 'lanplus', '-C', '3', '-H', '127.0.0.1', '-p', String(this.port), '-U', IPMI_USER, '-P', IPMI_PASSWORD, '-N', '1', '-R', '2', ...args], { allowFail: true, timeoutMs: 20_000 });
  }

  /** The PID of the host's QEMU, or null while powered off. */
  qemuPid(): number | null {
    return qemuPid(this.stateDir);
  }

  serial(): string {
    return fs.existsSync(this.serialLog) ? fs.readFileSync(this.serialLog, 'utf8') : '';
  }

  chassisLog(): string {
    const f = path.join(this.stateDir, 'chassis.log');
    return fs.existsSync(f) ? fs.readFileSync(f, 'utf8') : '';
  }

  async stop(): Promise<void> {
    const pid = this.qemuPid();
    if (pid !== null) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        /* already gone */
      }
    }
    const c = this.child;
    this.child = null;
    if (!c || c.exitCode !== null || c.signalCode !== null) return;
    const exited = new Promise<void>((r) => c.once('exit', () => r()));
    c.kill('SIGTERM');
    await exited;
  }
}

/**
 * A recording `ipmitool` for Ironic's PATH: logs each command line, then runs the real
 * one. The boot mode Ironic sets travels only in the boot flags of "Set System Boot
 * Options" (parameter 5: 0xe0 persistent UEFI, 0xc0 persistent legacy, through
 * `raw 0x00 0x08 0x05 …` or `chassis bootdev … options=persistent`), and ipmi_sim hands
 * its chassis_control program only the device selector of those flags (lanserv
 * bmc_chassis.c: `(data[2] >> 2) & 0xf`), so the EFI bit never reaches
 * chassis-control.ts: this is where a test can see the mode.
 */
export class IpmitoolRecorder {
  readonly binDir: string;
  readonly logFile: string;

  constructor(dir: string) {
    this.binDir = path.join(dir, 'bin');
    this.logFile = path.join(dir, 'ipmitool.log');
    fs.mkdirSync(this.binDir, { recursive: true });
    const real = ['/usr/bin/ipmitool', '/bin/ipmitool'].find((p) => fs.existsSync(p)) ?? 'ipmitool';
    fs.writeFileSync(path.join(this.binDir, 'ipmitool'), `#!/bin/sh\nprintf '%s\\n' "$*" >> '${this.logFile}'\nexec ${real} "$@"\n`, { mode: 0o755 });
  }

  /** The recorded command lines, oldest first. */
  commands(): string[] {
    return fs.existsSync(this.logFile) ? fs.readFileSync(this.logFile, 'utf8').split('\n').filter((l) => l) : [];
  }

  /** The boot flags of every boot-device command so far: `uefi`/`legacy` with the device, in order. */
  bootFlags(): { mode: 'uefi' | 'legacy'; device: string; persistent: boolean }[] {
    const out: { mode: 'uefi' | 'legacy'; device: string; persistent: boolean }[] = [];
    for (const c of this.commands()) {
      const raw = /raw 0x00 0x08 0x05 (0x[0-9a-f]{2}) (0x[0-9a-f]{2})/i.exec(c);
      if (raw) {
        const flags = Number(raw[1]);
        const devices: Record<number, string> = { 0x04: 'pxe', 0x08: 'disk', 0x14: 'cdrom', 0x18: 'bios', 0x24: 'disk' };
        out.push({ mode: flags & 0x20 ? 'uefi' : 'legacy', device: devices[Number(raw[2])] ?? raw[2]!, persistent: (flags & 0x40) !== 0 });
        continue;
      }
      const bootdev = /chassis bootdev (\S+)(?: options=(\S+))?/.exec(c);
      if (bootdev) out.push({ mode: bootdev[2]?.includes('efiboot') ? 'uefi' : 'legacy', device: bootdev[1]!, persistent: bootdev[2]?.includes('persistent') ?? false });
    }
    return out;
  }
}
