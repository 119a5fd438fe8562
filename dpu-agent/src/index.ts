/** The DPU agent's public surface. */
export type { BlockBackend, BlockCapabilities, MaybePromise, WriteZeroesOptions } from './block/backend.js';
export { DpuError, ERRORS, NbdErrno, toNbdErrno, type DpuErrorCode } from './errors.js';
export { LocalTarget } from './local/target.js';
export { NbdServer, parseEndpoint, type Endpoint, type NbdExport } from './nbd/server.js';
export { loadNbdTls, TLS_MODES, type NbdTls, type NbdTlsFiles, type TlsMode } from './nbd/tls.js';
export { RegionMap, RegionState, REGION_STATE_NAMES } from './region/region-map.js';
export { HttpSource, type HttpSourceOptions } from './remote/http-source.js';
export { Qcow2Source, parseQcow2Header, unsupportedFeature, type Qcow2Header, type Qcow2SourceOptions, type ZeroRange } from './remote/qcow2.js';
export type { RemoteSource, RemoteSourceStats, FetchPriority } from './remote/source.js';
export { redactUrl, redactHeaders } from './remote/redact.js';
export { StreamingDisk, type DiskProgress } from './streaming/disk.js';
export { Hydrator, type HydratorOptions, type HydratorState } from './streaming/hydrator.js';
export { openStreamingDisk, DEFAULT_REGION_SIZE, IMAGE_FORMATS, type ImageFormat, type OpenDiskOptions, type OpenedDisk } from './streaming/open.js';
