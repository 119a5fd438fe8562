/**
 * The NVMe identity of a node's emulated disk (common/src/device-identity.ts): as the
 * request gives it (the Ironic plugin derives it from root device hints), else stable per
 * node, so a redeployed node presents the same disk: its serial is the node UUID's first
 * 20 hex digits, which an operator recognises in `nvme list` on the host.
 */
import { type DeviceIdentity, deviceIdentity } from '../../common/src/device-identity.js';
import type { DeploymentCreate } from '../../openapi/clients/driver-client.js';

export function nodeDevice(spec: Pick<DeploymentCreate, 'node_uuid' | 'device'>): DeviceIdentity {
  const hex = spec.node_uuid.toLowerCase().replace(/[^0-9a-f]/g, '');
  const serial = hex.length >= 20 ? hex.slice(0, 20) : undefined;
  return deviceIdentity(spec.node_uuid, { ...(serial ? { serial } : {}), ...spec.device });
}
