#!/usr/bin/env bash
# Installs the Debian packages the project's tests, demo and benchmarks use, if any is
# missing. Needs root (or sudo). Safe to run again: it does nothing when all are present.
set -euo pipefail
PACKAGES=(
  qemu-system-x86 qemu-utils qemu-block-extra seabios   # the host (QEMU, NVMe over NBD) and qemu-img/qemu-io
  nbdkit libnbd-bin fio gnuplot-nox nginx-light         # NBD peers and clients; the benchmarks' origin and plots
  busybox-static syslinux syslinux-common extlinux mtools e2fsprogs openssl  # bootable test image
  mmdebstrap gdisk dosfstools grub-common grub-efi-amd64-bin grub-pc-bin  # the Debian 12 cloud image, built without mounting (GRUB -bin packages ship files only, they leave the host's boot loader alone)
  ovmf                                                  # UEFI firmware for QEMU, to boot that image the UEFI way
  redis-server                                          # the driver service's queues and records
  chromium                                              # the dashboard's browser test (playwright-core drives it)
  swift swift-proxy swift-object swift-container swift-account python3-swiftclient memcached glance-api  # Swift and Glance for the image-source tests
  ironic-api ironic-conductor python3-ironicclient python3-pip  # Ironic standalone and the plugin's install
  openipmi ipmitool                                     # ipmi_sim as the virtual BMC, Ironic's ipmitool driver
  shellcheck                                            # the DevStack plugin's scripts (tests/integration/devstack.test.ts)
  genisoimage fdisk openssh-client                      # config drives (Ironic builds them with genisoimage; isoinfo, sfdisk check them), the lab's SSH key
  iproute2                                              # network namespaces, veth, bridges and tc: the fleet test and bench (tests/helpers/netns.ts)
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}"
# The benchmarks start nginx themselves, inside their own network namespaces; the
# package's own service (listening on every address, port 80) is not wanted.
if [[ " ${missing[*]} " == *" nginx-light "* ]] && command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
  "${SUDO[@]}" systemctl disable --now nginx >/dev/null 2>&1 || true
fi
