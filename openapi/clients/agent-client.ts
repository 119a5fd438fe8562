/** A typed client of the DPU agent's management API (openapi/dpu-agent.yaml). */
import type { AxiosInstance } from 'axios';
import type { components } from '../generated/dpu-agent.js';
import { call, type ClientOptions, createHttp } from './http.js';

export type Disk = components['schemas']['Disk'];
export type DiskCreate = components['schemas']['DiskCreate'];
export type RegionMap = components['schemas']['RegionMap'];
export type BootProfile = components['schemas']['BootProfile'];
export type HydrationUpdate = components['schemas']['HydrationUpdate'];
export type SourceUpdate = components['schemas']['SourceUpdate'];
export type PeerList = components['schemas']['PeerList'];
export type AgentHealth = components['schemas']['Health'];
export type Erasure = components['schemas']['Erasure'];
export type ErasureCreate = components['schemas']['ErasureCreate'];

export class AgentClient {
  private readonly http: AxiosInstance;

  constructor(opts: ClientOptions) {
    this.http = createHttp(opts);
  }

  health(): Promise<AgentHealth> {
    return call(this.http.get<AgentHealth>('/v1/health'), 'agent health');
  }

  listDisks(): Promise<Disk[]> {
    return call(this.http.get<{ disks: Disk[] }>('/v1/disks'), 'list disks').then((r) => [...r.disks]);
  }

  createDisk(body: DiskCreate): Promise<Disk> {
    return call(this.http.post<Disk>('/v1/disks', body), `create disk ${body.id}`);
  }

  getDisk(id: string): Promise<Disk> {
    return call(this.http.get<Disk>(`/v1/disks/${encodeURIComponent(id)}`), `get disk ${id}`);
  }

  deleteDisk(id: string, wipe: boolean): Promise<Disk> {
    return call(this.http.delete<Disk>(`/v1/disks/${encodeURIComponent(id)}`, { params: { wipe } }), `delete disk ${id}`);
  }

  regionMap(id: string): Promise<RegionMap> {
    return call(this.http.get<RegionMap>(`/v1/disks/${encodeURIComponent(id)}/regions`), `region map of ${id}`);
  }

  /** The regions the host read first while it booted, in order (GET /v1/disks/{id}/boot-profile). */
  bootProfile(id: string): Promise<BootProfile> {
    return call(this.http.get<BootProfile>(`/v1/disks/${encodeURIComponent(id)}/boot-profile`), `boot profile of ${id}`);
  }

  updateHydration(id: string, body: HydrationUpdate): Promise<Disk> {
    return call(this.http.patch<Disk>(`/v1/disks/${encodeURIComponent(id)}/hydration`, body), `hydration of ${id}`);
  }

  /** Peer agents streaming the same image, read before the origin (docs/fleet.md). */
  setPeers(id: string, body: PeerList): Promise<Disk> {
    return call(this.http.put<Disk>(`/v1/disks/${encodeURIComponent(id)}/peers`, body), `peers of ${id}`);
  }

  updateSource(id: string, body: SourceUpdate): Promise<Disk> {
    return call(this.http.patch<Disk>(`/v1/disks/${encodeURIComponent(id)}/source`, body), `source of ${id}`);
  }

  /** Uploads an encoded manifest (image-access/src/manifest.ts); the disk is then `verified`. */
  setManifest(id: string, manifest: Buffer): Promise<Disk> {
    return call(
      this.http.put<Disk>(`/v1/disks/${encodeURIComponent(id)}/manifest`, manifest, { headers: { 'Content-Type': 'application/octet-stream' }, maxBodyLength: Infinity }),
      `manifest of ${id}`,
    );
  }

  /** Writes a config drive (the ISO itself) onto the disk as ironic-python-agent would; see PUT /v1/disks/{id}/config-drive. */
  setConfigDrive(id: string, drive: Buffer): Promise<Disk> {
    return call(
      this.http.put<Disk>(`/v1/disks/${encodeURIComponent(id)}/config-drive`, drive, { headers: { 'Content-Type': 'application/octet-stream' }, maxBodyLength: Infinity }),
      `config drive of ${id}`,
    );
  }

  /** Starts erasing a target no disk uses (or returns the erasure running on it in this mode); see POST /v1/erasures. */
  createErasure(body: ErasureCreate): Promise<Erasure> {
    return call(this.http.post<Erasure>('/v1/erasures', body), `erase ${body.target.path} (${body.mode})`);
  }

  getErasure(id: string): Promise<Erasure> {
    return call(this.http.get<Erasure>(`/v1/erasures/${encodeURIComponent(id)}`), `get erasure ${id}`);
  }

  listErasures(): Promise<Erasure[]> {
    return call(this.http.get<{ erasures: Erasure[] }>('/v1/erasures'), 'list erasures').then((r) => [...r.erasures]);
  }

  /** Stops a running erasure; answers once it has stopped (state failed, DPU_ERR_ERASE_CANCELLED). */
  cancelErasure(id: string): Promise<Erasure> {
    return call(this.http.post<Erasure>(`/v1/erasures/${encodeURIComponent(id)}/cancel`, {}), `cancel erasure ${id}`);
  }

  metrics(): Promise<string> {
    return call(this.http.get<string>('/metrics', { responseType: 'text' }), 'agent metrics');
  }
}
