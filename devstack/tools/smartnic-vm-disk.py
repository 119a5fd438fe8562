#!/usr/bin/env python3
"""Adds the streaming NVMe disk to a libvirt domain XML (stdin to stdout).

    virsh dumpxml --inactive VM | smartnic-vm-disk.py --socket SOCK > vm.xml
    virsh define vm.xml

The disk is passed to QEMU through <qemu:commandline>, as the DPU presents it to a
real host: an NVMe controller whose namespace is the DPU agent's NBD export, here
reached through the VM's relay socket (smartnic-nbd-relay.mjs). bootindex 0 puts it
before every device libvirt numbers (from 1), so the VM boots from it whatever boot
device Ironic sets. Running it again replaces the disk it added; --remove drops it.
"""

import argparse
import sys
import xml.etree.ElementTree as ET

QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0'
DRIVE_ID = 'smartnic-nvme'


def _q(tag):
    return '{%s}%s' % (QEMU_NS, tag)


def _ours(value):
    return 'id=%s' % DRIVE_ID in value.split(',') or \
        'drive=%s' % DRIVE_ID in value.split(',')


def update(domain, socket):
    """Removes the disk this tool added; adds it again when socket is given."""
    cmdline = domain.find(_q('commandline'))
    if cmdline is not None:
        args = list(cmdline.findall(_q('arg')))
        for flag, value in zip(args, args[1:]):
            if flag.get('value') in ('-drive', '-device') and \
                    _ours(value.get('value', '')):
                cmdline.remove(flag)
                cmdline.remove(value)
        if not len(cmdline):
            domain.remove(cmdline)
            cmdline = None
    if socket is None:
        return
    if ':' in socket or ',' in socket:
        raise ValueError('socket path must not contain ":" or ",": %s' % socket)
    if cmdline is None:
        cmdline = ET.SubElement(domain, _q('commandline'))
    for value in ('-drive',
                  'file=nbd:unix:%s,if=none,id=%s,format=raw'
                  % (socket, DRIVE_ID),
                  '-device',
                  'nvme,drive=%s,serial=smartnic0,bootindex=0' % DRIVE_ID):
        ET.SubElement(cmdline, _q('arg'), value=value)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument('--socket', help='the VM\'s NBD relay socket')
    group.add_argument('--remove', action='store_true',
                       help='remove the disk instead')
    args = parser.parse_args(argv)
    ET.register_namespace('qemu', QEMU_NS)
    domain = ET.fromstring(sys.stdin.read())
    if domain.tag != 'domain':
        parser.error('stdin is not a libvirt domain XML')
    update(domain, None if args.remove else args.socket)
    sys.stdout.write(ET.tostring(domain, encoding='unicode') + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
