/**
 * A config drive as Nova would give a tenant's instance, for the lab and the tests: an SSH
 * key in meta_data's public_keys and user data whose commands report, on the serial
 * console, what a test can only learn from inside the guest — that cloud-init found the
 * config drive (`cloud-id`), the root filesystem's size after growpart and resize2fs, and
 * that the key was installed. cloud-init's final message marks the end of its run.
 *
 * Passed to Ironic in the dict form (`baremetal node deploy --config-drive '<JSON>'`),
 * which Ironic builds into the ISO itself, as Metal3 and Bifrost do.
 */
import fs from 'node:fs';
import path from 'node:path';
import { run } from './run.js';

/** Printed by the user data's runcmd: `SMARTNIC-USERDATA ds=<cloud-id> root=<bytes> keys=<n>`. */
export const USERDATA_MARKER = 'SMARTNIC-USERDATA';
/** cloud-init's final_message: its last stage has finished. */
export const CLOUD_INIT_DONE = 'SMARTNIC-CLOUD-INIT-DONE';
/** The serial console's login prompt: the OS has booted. */
export const LOGIN_PROMPT = / login: /;

export function userData(): string {
  // One line each, to /dev/ttyS0 (the serial console a test reads), from runcmd (as root).
  const report = `echo "${USERDATA_MARKER} ds=$(cloud-id) root=$(df -B1 --output=size / | tail -1 | tr -d ' ') keys=$(cat /home/*/.ssh/authorized_keys 2>/dev/null | grep -c smartnic-lab)" > /dev/ttyS0`;
  return ['#cloud-config', 'runcmd:', `  - [sh, -c, ${JSON.stringify(report)}]`, `final_message: "${CLOUD_INIT_DONE} after $UPTIME s"`, ''].join('\n');
}

/** The `--config-drive` dict: the key as meta_data public_keys, the user data above. */
export function configDriveDict(publicKey: string): Record<string, unknown> {
  return {
    meta_data: { public_keys: { 'smartnic-lab': publicKey }, hostname: 'smartnic-lab-host' },
    user_data: userData(),
  };
}

/** An ed25519 key pair in `dir` (made once): the private key's path and the public key. */
export async function sshKey(dir: string): Promise<{ privateKey: string; publicKey: string }> {
  const privateKey = path.join(dir, 'id_ed25519');
  if (!fs.existsSync(privateKey)) {
    fs.mkdirSync(dir, { recursive: true });
    await run('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'smartnic-lab', '-f', privateKey]);
  }
  return { privateKey, publicKey: fs.readFileSync(`${privateKey}.pub`, 'utf8').trim() };
}

export interface GuestReport {
  /** cloud-init's datasource as cloud-id names it (`configdrive` when the drive was used). */
  datasource: string;
  /** The root filesystem's size in bytes, after growpart and resize2fs. */
  rootBytes: number;
  /** How many authorized_keys lines carry the lab's key. */
  keys: number;
}

/** The user data's report from the serial console, or null if it has not printed it yet. */
export function guestReport(serial: string): GuestReport | null {
  const m = new RegExp(`${USERDATA_MARKER} ds=(\\S*) root=(\\d+) keys=(\\d+)`).exec(serial);
  return m ? { datasource: m[1]!, rootBytes: Number(m[2]), keys: Number(m[3]) } : null;
}
