/**
 * The identity of the NVMe disk a DPU emulates for its host: the controller's serial and
 * model numbers and the namespace's EUI-64, which Linux shows as the disk's WWN
 * (`eui.` + 16 hex digits). Ironic's root device hints name the boot disk by them, and an
 * OS may mount by /dev/disk/by-id, so they are stable: derived from a seed (the node, for
 * the driver service; the disk id, for an agent used on its own) unless given.
 */
import { createHash } from 'node:crypto';

export interface DeviceIdentity {
  serial: string;
  model: string;
  wwn: string;
}

/** The model number presented unless told otherwise. */
export const DEFAULT_MODEL = 'SmartNIC Streaming Disk';

/**
 * Each field as given, else derived from `seed`: a serial of 20 hex digits (an NVMe serial
 * holds 20 characters) and an EUI-64 with the locally administered bit set (no OUI is claimed).
 */
export function deviceIdentity(seed: string, given: Partial<DeviceIdentity> = {}): DeviceIdentity {
  const h = createHash('sha256').update(`smartnic-disk:${seed}`).digest();
  const eui = Buffer.from(h.subarray(20, 28));
  eui[0] = (eui[0]! & 0xfc) | 0x02;
  return {
    serial: given.serial ?? h.subarray(0, 10).toString('hex'),
    model: given.model ?? DEFAULT_MODEL,
    wwn: given.wwn ?? `eui.${eui.toString('hex')}`,
  };
}
