"""Ironic plugin for SmartNIC/DPU streaming deploy.

The ``smartnic-streaming`` deploy interface asks the SmartNIC driver service
(``smartnic-driver serve``, openapi/driver.yaml) to present the node's image as
a streaming NVMe disk on the node's DPU, then boots the host from that disk
with Ironic's own power and management interfaces. The node is ACTIVE as soon
as the disk can boot; the DPU copies the rest of the image in the background.
"""

__version__ = '0.1.0'
