/**
 * The DevStack plugin (devstack/), as far as it runs without a DevStack: shellcheck on its
 * scripts, then plugin.sh's phases sourced into a bash that holds stand-ins for what DevStack
 * defines before it sources a plugin:
 *
 * - `iniset`, `iniget`, `ini_has_option` reproduce DevStack's inc/ini-config (openstack/devstack,
 *   read at commit 93a385c0): the same sed section ranges and option patterns, a missing section
 *   appended at the end of the file after a blank line, a missing option inserted right after
 *   its section header as `name = value`, an existing one replaced in place keeping the text up
 *   to `=` and the blanks after it, values printed by iniget with surrounding blanks dropped;
 * - `run_process` / `stop_process` start the command line in the background (split on blanks,
 *   as systemd splits ExecStart, after the checks DevStack's _common_systemd_pitfalls makes)
 *   and stop it by PID, where DevStack writes and starts a devstack@NAME systemd unit;
 * - `enable_service`, `is_service_enabled`, `trueorfalse`, `die`: same meaning as DevStack's;
 * - `virsh` answers dumpxml with a small domain and records what `define` receives; the
 *   `baremetal` command only prints its arguments.
 *
 * The services it starts are real (redis-server, the driver service, one DPU agent and one NBD
 * relay per VM), so a deployment through the driver is read through the relay socket a VM's
 * QEMU opens, by `qemu-img` and by a QEMU given the arguments of the edited domain. Not
 * covered: install_smartnic (npm ci, pip), systemd, libvirt, Ironic (its e2e tests are
 * tests/integration/ironic.test.ts).
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { DriverClient } from '../../openapi/clients/driver-client.js';
import { ApiError } from '../../openapi/clients/http.js';
import { loadAgentConfig, resolveTokens } from '../../dpu-agent/src/daemon/config.js';
import { resolveDriverConfig } from '../../driver/src/config.js';
import { makeImage } from '../helpers/agent.js';
import { TestOrigin } from '../helpers/origin.js';
import { freePort } from '../helpers/redis.js';
import { run } from '../helpers/run.js';
import { until } from '../helpers/services.js';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
const DEVSTACK = path.join(ROOT, 'devstack');
const MiB = 1 << 20;

// Bash, with `$\{` for `${` (a template literal would substitute those).
const STANDINS = String.raw`
set -eu -o pipefail
# --- inc/ini-config (semantics of DevStack's; see the header of devstack.test.ts) ---
function ini_has_option {
    local file=$1 section=$2 option=$3 line
    line=$(sed -ne "/^\[$section\]/,/^\[.*\]/ { /^$option[ \t]*=/ p; }" "$file")
    [ -n "$line" ]
}
function iniget {
    local file=$1 section=$2 option=$3 line
    line=$(sed -ne "/^\[$section\]/,/^\[.*\]/ { /^$option[ \t]*=/ p; }" "$file")
    echo $\{line#*=}
}
function iniset {
    if [ "$1" == "-sudo" ]; then shift; fi
    local file=$1 section=$2 option=$3 value=$4
    if [[ -z $section || -z $option ]]; then return; fi
    if ! grep -q "^\[$section\]" "$file" 2>/dev/null; then
        printf '\n[%s]\n' "$section" >> "$file"
    fi
    if ! ini_has_option "$file" "$section" "$option"; then
        sed -i -e "/^\[$section\]/ a\\
$option = $value
" "$file"
    else
        local sep=$'\x01'
        sed -i -e "/^\[$section\]/,/^\[.*\]/ s$sep^\($option[ \t]*=[ \t]*\).*\$$sep\1$value$sep" "$file"
    fi
}
# --- functions-common ---
function trueorfalse {
    local default=$1 testval=$\{!2:-}
    case "$testval" in
        1 | [yY]es | YES | [tT]rue | TRUE) echo True ;;
        0 | [nN]o | NO | [fF]alse | FALSE) echo False ;;
        *) echo "$default" ;;
    esac
}
function die { shift; echo "die: $*" >&2; exit 1; }
function echo_summary { :; }
function define_plugin { :; }
function plugin_requires { :; }
ENABLED_SERVICES=
function enable_service {
    local s
    for s in "$@"; do [[ ",$ENABLED_SERVICES," == *",$s,"* ]] || ENABLED_SERVICES+=$\{ENABLED_SERVICES:+,}$s; done
}
function is_service_enabled {
    local s
    for s in "$@"; do [[ ",$ENABLED_SERVICES," == *",$s,"* ]] && return 0; done
    return 1
}
function run_process {
    local service=$1 command=$2
    is_service_enabled "$service" || return 0
    [[ $command == /* && $command != *sudo* ]] || die $LINENO "run_process $service: $command"
    local -a argv
    read -r -a argv <<< "$command"
    "$\{argv[@]}" </dev/null >"$SERVICES_DIR/$service.log" 2>&1 &
    echo "$service $!" >> "$SERVICES_DIR/pids"
}
function stop_process {
    is_service_enabled "$1" || return 0
    local pid
    pid=$(awk -v s="$1" '$1 == s { p = $2 } END { print p }' "$SERVICES_DIR/pids" 2>/dev/null)
    if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
}
function sudo { "$@"; }
function virsh {
    case $1 in
        dumpxml) cat "$FAKE_VIRSH/$\{!#}.xml" ;;
        define) cp "$2" "$FAKE_VIRSH/defined-$(sed -n 's:.*<name>\(.*\)</name>.*:\1:p' "$2").xml" ;;
    esac
}
# --- the plugin, as stack.sh loads it ---
source "$DEVSTACK/settings"
`.replaceAll('$\\{', '${');

const DOMAIN_XML = (name: string): string => `<domain type="qemu">
  <name>${name}</name>
  <memory unit="KiB">3145728</memory>
  <os><type arch="x86_64" machine="pc">hvm</type><boot dev="network"/><boot dev="hd"/></os>
  <devices><disk type="file" device="disk"><source file="/var/lib/libvirt/images/${name}.qcow2"/><target dev="vda" bus="virtio"/></disk></devices>
</domain>
`;

/** What Ironic's DevStack plugin leaves in ironic.conf before ours runs (abridged). */
const IRONIC_CONF = `[DEFAULT]
debug = True
enabled_hardware_types = ipmi,fake-hardware
enabled_deploy_interfaces = fake,direct,ramdisk
enabled_boot_interfaces = fake,ipxe
enabled_power_interfaces = fake,ipmitool
enabled_management_interfaces = fake,ipmitool,noop
#enabled_vendor_interfaces = ipmitool

[conductor]
automated_clean = True

[smartnic]
poll_interval = 5
`;

type Ini = Record<string, Record<string, string>>;

/** Sections and options; throws on an option set twice in one section. */
function parseIni(text: string): Ini {
  const out: Ini = {};
  let section = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = header[1]!;
      out[section] ??= {};
      continue;
    }
    const eq = line.indexOf('=');
    const key = line.slice(0, eq).trim();
    const opts = (out[section] ??= {});
    if (key in opts) throw new Error(`[${section}] ${key} is set twice:\n${text}`);
    opts[key] = line.slice(eq + 1).trim();
  }
  return out;
}

/** Whether pid runs (a zombie does not: the bash that started it is gone, and init may not reap). */
function alive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^ *[ZX]/.test(stat.slice(stat.lastIndexOf(')') + 1));
  } catch {
    return false;
  }
}

interface BlockInfo {
  device: string;
  inserted?: { drv: string; image?: { 'virtual-size': number } };
}

/** Starts QEMU (paused, no devices but `args`), returns its query-block answer, quits it. */
async function qemuQueryBlock(args: string[], qmpSocket: string): Promise<BlockInfo[]> {
  const qemu = spawn('qemu-system-x86_64', ['-machine', 'q35,accel=tcg', '-nodefaults', '-display', 'none', '-S', '-qmp', `unix:${qmpSocket},server=on,wait=off`, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  qemu.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<void>((resolve) => qemu.once('exit', () => resolve()));
  try {
    const sock = await until('QEMU\'s QMP socket', async () => {
      if (qemu.exitCode !== null) throw new Error(`QEMU exited ${qemu.exitCode}: ${stderr}`);
      return new Promise<net.Socket | null>((resolve) => {
        const c = net.connect(qmpSocket).once('connect', () => resolve(c)).once('error', () => resolve(null));
      });
    }, 20_000);
    const replies: Record<string, unknown>[] = [];
    let buf = '';
    sock.setEncoding('utf8').on('data', (d: string) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        replies.push(JSON.parse(buf.slice(0, nl)) as Record<string, unknown>);
        buf = buf.slice(nl + 1);
      }
    });
    sock.write('{"execute":"qmp_capabilities"}\n{"execute":"query-block","id":"q"}\n');
    const answer = await until('query-block', async () => replies.find((r) => r.id === 'q'), 20_000);
    sock.write('{"execute":"quit"}\n');
    await exited;
    return answer.return as BlockInfo[];
  } finally {
    if (qemu.exitCode === null) qemu.kill('SIGKILL');
  }
}

async function freePortPair(): Promise<number> {
  for (;;) {
    const p = await freePort();
    const free = await new Promise<boolean>((resolve) => {
      const s = net.createServer().once('error', () => resolve(false));
      s.listen(p + 1, '127.0.0.1', () => s.close(() => resolve(true)));
    });
    if (free) return p;
  }
}

describe('DevStack plugin (devstack/)', function () {
  this.timeout(120_000);

  let scratch = '';
  let env: NodeJS.ProcessEnv = {};
  let origin: TestOrigin | undefined;

  /** Runs `code` in bash after the stand-ins and devstack/settings; rejects on a non-zero exit. */
  function plugin(code: string, extraEnv: NodeJS.ProcessEnv = {}): Promise<{ stdout: string; stderr: string; code: number }> {
    return new Promise((resolve, reject) => {
      execFile('bash', ['-c', `${STANDINS}\n${code}`], { env: { ...env, ...extraEnv }, timeout: 100_000 }, (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
        if (err) reject(Object.assign(new Error(`bash exited ${code}:\n${stderr}`), { stdout, stderr, code }));
        else resolve({ stdout, stderr, code });
      });
    });
  }
  const read = (p: string): string => fs.readFileSync(path.join(scratch, p), 'utf8');

  before(async function () {
    // Short: the agents' export directories live under it (socket paths ≤ 107 bytes).
    scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'sd-'));
    for (const d of ['services', 'virsh', 'etc/ironic', 'site']) fs.mkdirSync(path.join(scratch, d), { recursive: true });
    for (const vm of ['node-0', 'node-1']) fs.writeFileSync(path.join(scratch, 'virsh', `${vm}.xml`), DOMAIN_XML(vm));
    // cleanup_smartnic asks this "interpreter" where its site-packages are.
    fs.writeFileSync(path.join(scratch, 'python3'), `#!/bin/sh\necho ${path.join(scratch, 'site')}\n`, { mode: 0o755 });
    const base = await freePortPair();
    env = {
      PATH: process.env.PATH,
      HOME: scratch,
      DEVSTACK,
      SERVICES_DIR: path.join(scratch, 'services'),
      FAKE_VIRSH: path.join(scratch, 'virsh'),
      DEST: path.join(scratch, 'opt'),
      DATA_DIR: path.join(scratch, 'data'),
      STACK_USER: os.userInfo().username,
      IRONIC_VM_COUNT: '2',
      IRONIC_CMD: 'echo baremetal',
      SMARTNIC_IRONIC_CONF: path.join(scratch, 'etc/ironic/ironic.conf'),
      SMARTNIC_CONF_DIR: path.join(scratch, 'etc/smartnic'),
      SMARTNIC_RUN_DIR: path.join(scratch, 'run'),
      SMARTNIC_NODE: process.execPath,
      SMARTNIC_PYTHON: path.join(scratch, 'python3'),
      SMARTNIC_DRIVER_PORT: String(await freePort()),
      SMARTNIC_REDIS_PORT: String(await freePort()),
      SMARTNIC_AGENT_BASE_PORT: String(base),
    };
  });

  after(async function () {
    await origin?.stop();
    // Anything unstack did not stop (a failed test): only the PIDs this test started.
    const pids = path.join(scratch, 'services', 'pids');
    if (fs.existsSync(pids)) {
      for (const line of fs.readFileSync(pids, 'utf8').split('\n').filter(Boolean)) {
        try {
          process.kill(Number(line.split(' ')[1]), 'SIGKILL');
        } catch {
          /* already gone */
        }
      }
    }
    if (scratch) fs.rmSync(scratch, { recursive: true, force: true });
  });

  it('passes shellcheck (-x -s bash) on every script', async function () {
    const scripts = ['plugin.sh', 'settings', 'lib/smartnic'].map((f) => path.join(DEVSTACK, f));
    const r = await run('shellcheck', ['-x', '-s', 'bash', ...scripts], { allowFail: true });
    assert.equal(r.code, 0, `shellcheck:\n${r.stdout}${r.stderr}`);
  });

  it('settings: defaults, and the per-VM services enabled for run_process', async function () {
    const { stdout } = await plugin('echo "$SMARTNIC_DIR|$SMARTNIC_VMS|$SMARTNIC_REDIS_URL|$SMARTNIC_DRIVER_URL|$ENABLED_SERVICES"');
    const [dir, vms, redis, driver, services] = stdout.trim().split('|');
    assert.equal(path.resolve(dir!), path.resolve(ROOT));
    assert.equal(vms, 'node-0 node-1');
    assert.equal(redis, `redis://127.0.0.1:${env.SMARTNIC_REDIS_PORT}/0`);
    assert.equal(driver, `http://127.0.0.1:${env.SMARTNIC_DRIVER_PORT}`);
    assert.deepEqual(services!.split(','), ['smartnic-driver', 'smartnic-redis', 'smartnic-agent-node-0', 'smartnic-nbd-node-0', 'smartnic-agent-node-1', 'smartnic-nbd-node-1']);
    const off = await plugin('echo "$SMARTNIC_VIRTUAL_BM|$ENABLED_SERVICES"', { IRONIC_IS_HARDWARE: 'True' });
    assert.equal(off.stdout.trim(), 'False|smartnic-driver,smartnic-redis');
  });

  it('post-config appends to the enabled_* lists Ironic wrote, writes [smartnic], and changes nothing when run again', async function () {
    const conf = path.join(scratch, 'etc/ironic/ironic.conf');
    fs.writeFileSync(conf, IRONIC_CONF);
    await plugin('source "$DEVSTACK/plugin.sh" stack post-config');
    const first = fs.readFileSync(conf, 'utf8');
    const ini = parseIni(first);
    const token = read('data/smartnic/driver.tokens').trim();
    assert.match(token, /^[0-9a-f]{48}$/);
    assert.deepEqual(ini.DEFAULT, {
      debug: 'True',
      enabled_hardware_types: 'ipmi,fake-hardware,smartnic-ipmi',
      enabled_deploy_interfaces: 'fake,direct,ramdisk,smartnic-streaming',
      enabled_boot_interfaces: 'fake,ipxe',
      enabled_power_interfaces: 'fake,ipmitool',
      enabled_management_interfaces: 'fake,ipmitool,noop',
    });
    assert.deepEqual(ini.conductor, { automated_clean: 'True' });
    assert.deepEqual(ini.smartnic, {
      driver_url: `http://127.0.0.1:${env.SMARTNIC_DRIVER_PORT}`,
      token,
      poll_interval: '2',
      deploy_timeout: '600',
      teardown_timeout: '300',
      progress_interval: '30',
    });
    assert.ok(first.includes('#enabled_vendor_interfaces = ipmitool\n'), 'comments are kept');
    // iniset replaces in place and inserts after the header: the layout stays Ironic's.
    assert.ok(first.startsWith('[DEFAULT]\ndebug = True\nenabled_hardware_types = ipmi,fake-hardware,smartnic-ipmi\n'), first);

    const driverYaml = read('etc/smartnic/driver.yaml');
    await plugin('source "$DEVSTACK/plugin.sh" stack post-config');
    assert.equal(fs.readFileSync(conf, 'utf8'), first);
    assert.equal(read('etc/smartnic/driver.yaml'), driverYaml, 'the generated tokens are kept');
  });

  it('post-config on an ironic.conf without the lists starts from Ironic\'s defaults', async function () {
    const conf = path.join(scratch, 'bare.conf');
    fs.writeFileSync(conf, '[DEFAULT]\nenabled_power_interfaces = ipmitool\nenabled_boot_interfaces = fake\n\n[database]\nconnection = sqlite://\n');
    await plugin('source "$DEVSTACK/lib/smartnic"; configure_smartnic_ironic', { SMARTNIC_IRONIC_CONF: conf, SMARTNIC_HARDWARE_TYPES: 'smartnic-ipmi, smartnic-redfish', SMARTNIC_TOKEN: 'a-token-of-24-characters' });
    const ini = parseIni(fs.readFileSync(conf, 'utf8'));
    assert.deepEqual(ini.DEFAULT, {
      enabled_hardware_types: 'ipmi,redfish,smartnic-ipmi,smartnic-redfish',
      enabled_deploy_interfaces: 'direct,ramdisk,smartnic-streaming',
      // Present: extended. enabled_management_interfaces is absent: Ironic derives it.
      enabled_power_interfaces: 'ipmitool,redfish',
      enabled_boot_interfaces: 'fake,ipxe',
    });
    assert.deepEqual(ini.database, { connection: 'sqlite://' });
    assert.equal(ini.smartnic!.token, 'a-token-of-24-characters');

    await assert.rejects(plugin('source "$DEVSTACK/lib/smartnic"; configure_smartnic_ironic', { SMARTNIC_IRONIC_CONF: path.join(scratch, 'missing.conf') }), /enable_plugin ironic before smartnic-streaming/);
    await assert.rejects(plugin('source "$DEVSTACK/lib/smartnic"; configure_smartnic_ironic', { SMARTNIC_IRONIC_CONF: conf, SMARTNIC_HARDWARE_TYPES: 'smartnic-pxe' }), /unknown hardware type smartnic-pxe/);
  });

  it('post-config writes driver and agent configs that the programs accept', async function () {
    const driver = resolveDriverConfig({ file: path.join(scratch, 'etc/smartnic/driver.yaml') });
    const agentToken = read('data/smartnic/agent.tokens').trim();
    assert.equal(driver.listen.port, Number(env.SMARTNIC_DRIVER_PORT));
    assert.deepEqual(driver.auth.tokens, [read('data/smartnic/driver.tokens').trim()]);
    assert.equal(driver.redis.url, `redis://127.0.0.1:${env.SMARTNIC_REDIS_PORT}/0`);
    assert.equal(driver.agent.token, agentToken);
    for (const [i, vm] of ['node-0', 'node-1'].entries()) {
      const agent = loadAgentConfig(path.join(scratch, `etc/smartnic/agent-${vm}.yaml`));
      assert.equal(agent.listen.port, Number(env.SMARTNIC_AGENT_BASE_PORT) + i);
      assert.equal(agent.export_dir, path.join(scratch, 'run', vm));
      assert.deepEqual(agent.allowed_targets, [path.join(scratch, `data/smartnic/vms/${vm}/targets`) + '/']);
      assert.deepEqual(resolveTokens(agent), [agentToken]);
    }
    assert.equal(fs.statSync(path.join(scratch, 'data/smartnic/driver.tokens')).mode & 0o777, 0o600);
  });

  it('extra starts Redis, the driver and an agent and relay per VM; a deployment reaches QEMU through the relay', async function () {
    const { stdout } = await plugin('source "$DEVSTACK/plugin.sh" stack extra');

    // configure_smartnic_nodes: what it asks Ironic.
    const port0 = Number(env.SMARTNIC_AGENT_BASE_PORT);
    const target0 = path.join(scratch, 'data/smartnic/vms/node-0/targets/disk.raw');
    assert.ok(
      stdout.includes(`baremetal node set node-0 --driver smartnic-ipmi --deploy-interface smartnic-streaming --driver-info smartnic_agent_url=http://127.0.0.1:${port0} --driver-info smartnic_target=${target0}\n`),
      stdout,
    );
    // attach_smartnic_vm_disks: the domain virsh got back.
    const defined = read('virsh/defined-node-0.xml');
    const relay0 = path.join(scratch, 'run', 'node-0.nbd');
    assert.ok(defined.includes(`<qemu:arg value="file=nbd:unix:${relay0},if=none,id=smartnic-nvme,format=raw" />`), defined);
    assert.ok(defined.includes('<qemu:arg value="nvme,drive=smartnic-nvme,serial=smartnic0,bootindex=0" />'), defined);
    assert.ok(defined.includes('xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"'), defined);
    assert.ok(defined.includes('<source file="/var/lib/libvirt/images/node-0.qcow2" />'), 'the VM keeps its other devices');
    // Run again (a re-stack): the disk is replaced, not added twice.
    const twice = await new Promise<string>((resolve, reject) => {
      const p = execFile('python3', [path.join(DEVSTACK, 'tools/smartnic-vm-disk.py'), '--socket', relay0], (err, out) => (err ? reject(err) : resolve(out)));
      p.stdin!.end(defined);
    });
    assert.equal(twice.split('id=smartnic-nvme').length - 1, 1, twice);
    assert.equal(twice.split('drive=smartnic-nvme').length - 1, 1, twice);

    // The data path of a virtual bare-metal node, minus libvirt: driver → agent of node-0 →
    // its export → the relay socket QEMU opens.
    const image = path.join(scratch, 'image.raw');
    makeImage(image, 8 * MiB);
    origin = new TestOrigin({ file: image });
    const imageUrl = await origin.start();
    const api = new DriverClient({ baseUrl: `http://127.0.0.1:${env.SMARTNIC_DRIVER_PORT}`, token: read('data/smartnic/driver.tokens').trim() });
    const node = '1d0c5e7a-3b9f-4c2e-9a41-6f0e2d8b7c15';
    await api.createDeployment({
      node_uuid: node,
      deployment_id: 'ironic-3f2a9c4e-1b7d-4a',
      instance_info: { image_source: imageUrl },
      driver_info: { smartnic_agent_url: `http://127.0.0.1:${port0}`, smartnic_target: target0 },
    });
    const ready = await until('deployment ready', async () => {
      const d = await api.getDeployment(node);
      assert.notEqual(d.state, 'failed', d.last_error ?? '');
      return d.state === 'ready' || d.state === 'complete' ? d : null;
    });
    assert.ok(ready.export_uri!.includes(path.join(scratch, 'run', 'node-0')), ready.export_uri!);
    const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, `nbd:unix:${relay0}`], { allowFail: true });
    assert.equal(same.code, 0, `qemu-img compare through the relay: ${same.stdout}${same.stderr}`);
    // QEMU itself accepts the arguments the domain passes it and opens the disk with them.
    const qemuArgs = [...defined.matchAll(/<qemu:arg value="([^"]*)"/g)].map((m) => m[1]!);
    const block = await qemuQueryBlock(qemuArgs, path.join(scratch, 'qmp.sock'));
    assert.equal(block.length, 1, JSON.stringify(block));
    assert.equal(block[0]!.device, 'smartnic-nvme');
    assert.equal(block[0]!.inserted?.drv, 'raw');
    assert.equal(block[0]!.inserted?.image?.['virtual-size'], 8 * MiB);

    // Undeployed: the DPU presents no disk, and the relay says so by closing at once.
    await api.deleteDeployment(node);
    await until('deployment gone', async () => api.getDeployment(node).then(() => null, (e: unknown) => e instanceof ApiError && e.status === 404));
    const none = await run('qemu-img', ['info', '-f', 'raw', `nbd:unix:${relay0}`], { allowFail: true });
    assert.notEqual(none.code, 0);
    assert.match(read('services/smartnic-nbd-node-0.log'), /"event":"refused".*0 export sockets/);
  });

  it('unstack stops what extra started; clean removes the plugin\'s files', async function () {
    await plugin('source "$DEVSTACK/plugin.sh" unstack');
    const pids = read('services/pids').split('\n').filter(Boolean).map((l) => Number(l.split(' ')[1]));
    assert.equal(pids.length, 6, 'redis, driver, 2 agents, 2 relays');
    await until('every service stopped', async () => pids.every((pid) => !alive(pid)));
    fs.writeFileSync(path.join(scratch, 'site', 'smartnic-ironic.pth'), '/somewhere\n');
    await plugin('source "$DEVSTACK/plugin.sh" clean');
    for (const p of ['data/smartnic', 'run', 'etc/smartnic', 'site/smartnic-ironic.pth']) {
      assert.equal(fs.existsSync(path.join(scratch, p)), false, `${p} is left`);
    }
  });
});
