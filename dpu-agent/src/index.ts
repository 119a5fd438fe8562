/**
 * The DPU agent's public surface. Image access (HTTP source, qcow2, manifest, redaction)
 * and the DPU error registry are the shared package image-access/src/index.ts.
 */
export type { BlockBackend, BlockCapabilities, MaybePromise, WriteZeroesOptions } from './block/backend.js';
export { LocalTarget } from './local/target.js';
export { NbdServer, parseEndpoint, type Endpoint, type NbdExport } from './nbd/server.js';
export { loadNbdTls, TLS_MODES, type NbdTls, type NbdTlsFiles, type TlsMode } from './nbd/tls.js';
export { RegionMap, RegionState, REGION_STATE_NAMES } from './region/region-map.js';
export { StreamingDisk, type DiskProgress } from './streaming/disk.js';
export { Hydrator, type HydratorOptions, type HydratorState } from './streaming/hydrator.js';
export { openStreamingDisk, DEFAULT_REGION_SIZE, IMAGE_FORMATS, type ImageFormat, type OpenDiskOptions, type OpenedDisk } from './streaming/open.js';
