"""Hardware types that accept the smartnic-streaming deploy interface.

Ironic only lets a node use a deploy interface its hardware type lists (except
for fake-hardware). These are the stock IPMI and Redfish hardware types with
smartnic-streaming added first, so it is their default deploy interface when
enabled; every other interface is the stock type's, except rescue: Ironic's
rescue (AgentRescue) boots the ramdisk and waits for IPA to heartbeat through
the deploy interface, which the SmartNIC interface neither boots nor answers,
so a rescue would only time out. The types offer no-rescue, which refuses
``baremetal node rescue`` at once.
"""

from ironic.drivers import ipmi
from ironic.drivers.modules import noop

from smartnic_ironic import deploy


class SmartNICIPMIHardware(ipmi.IPMIHardware):
    """IPMI (ipmitool) power and management, SmartNIC streaming deploy."""

    @property
    def supported_deploy_interfaces(self):
        return ([deploy.SmartNICStreamingDeploy]
                + super().supported_deploy_interfaces)

    @property
    def supported_rescue_interfaces(self):
        return [noop.NoRescue]


try:
    # Needs sushy (Debian: python3-sushy); without it only the IPMI type is
    # offered, and enabling smartnic-redfish fails at conductor start with
    # the import error.
    from ironic.drivers import redfish
except ImportError:  # pragma: no cover
    redfish = None


if redfish is not None:
    class SmartNICRedfishHardware(redfish.RedfishHardware):
        """Redfish power and management, SmartNIC streaming deploy."""

        @property
        def supported_deploy_interfaces(self):
            return ([deploy.SmartNICStreamingDeploy]
                    + super().supported_deploy_interfaces)

        @property
        def supported_rescue_interfaces(self):
            return [noop.NoRescue]
