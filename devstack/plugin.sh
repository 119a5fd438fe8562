#!/bin/bash
# plugin.sh - DevStack plugin of smartnic-streaming: the Ironic deploy interface that
# boots bare metal from a streaming NVMe disk on the node's DPU.
#
# DevStack's plugin contract: https://docs.openstack.org/devstack/latest/plugins.html
# Enable it after Ironic's plugin (local.conf): its post-config appends to the
# ironic.conf Ironic's post-config wrote, its extra runs once Ironic has started
# and enrolled the virtual bare-metal nodes.

# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib/smartnic
source "$SMARTNIC_DIR/devstack/lib/smartnic"

if [[ "$SMARTNIC_ENABLED" == "True" ]]; then
    if [[ "$1" == "stack" && "$2" == "install" ]]; then
        # After the layer 1 and 2 projects (Ironic among them) are installed.
        echo_summary "Installing smartnic-streaming"
        install_smartnic

    elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
        # Every service's configuration file exists now, ironic.conf included.
        echo_summary "Configuring smartnic-streaming"
        configure_smartnic_ironic
        configure_smartnic_driver
        configure_smartnic_redis
        configure_smartnic_agents

    elif [[ "$1" == "stack" && "$2" == "extra" ]]; then
        # Ironic runs and has enrolled its VMs.
        echo_summary "Starting smartnic-streaming"
        start_smartnic
        attach_smartnic_vm_disks
        configure_smartnic_nodes
    fi

    if [[ "$1" == "unstack" ]]; then
        stop_smartnic
    fi

    if [[ "$1" == "clean" ]]; then
        # clean.sh has run unstack.sh first.
        cleanup_smartnic
    fi
fi
