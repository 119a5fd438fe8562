/** A typed client of the driver service's API (openapi/driver.yaml). */
import type { AxiosInstance } from 'axios';
import type { components } from '../generated/driver.js';
import { call, type ClientOptions, createHttp } from './http.js';

export type Deployment = components['schemas']['Deployment'];
export type DeploymentCreate = components['schemas']['DeploymentCreate'];
export type DeploymentImage = components['schemas']['DeploymentImage'];
export type ValidateRequest = components['schemas']['ValidateRequest'];
export type ValidateResult = components['schemas']['ValidateResult'];
export type DriverHealth = components['schemas']['Health'];
export type Cleaning = components['schemas']['Cleaning'];
export type CleaningCreate = components['schemas']['CleaningCreate'];
export type BootProfile = components['schemas']['BootProfile'];
export type BootProfileSummary = components['schemas']['BootProfileSummary'];

export class DriverClient {
  private readonly http: AxiosInstance;

  constructor(opts: ClientOptions) {
    this.http = createHttp(opts);
  }

  health(): Promise<DriverHealth> {
    return call(this.http.get<DriverHealth>('/v1/health', { validateStatus: (s) => s === 200 || s === 503 }), 'driver health');
  }

  validate(body: ValidateRequest): Promise<ValidateResult> {
    return call(this.http.post<ValidateResult>('/v1/validate', body), 'validate');
  }

  createDeployment(body: DeploymentCreate): Promise<Deployment> {
    return call(this.http.post<Deployment>('/v1/deployments', body), `deploy node ${body.node_uuid}`);
  }

  listDeployments(): Promise<Deployment[]> {
    return call(this.http.get<{ deployments: Deployment[] }>('/v1/deployments'), 'list deployments').then((r) => [...r.deployments]);
  }

  getDeployment(node: string): Promise<Deployment> {
    return call(this.http.get<Deployment>(`/v1/deployments/${encodeURIComponent(node)}`), `deployment of ${node}`);
  }

  /** A new URL of the same image for the node's deployment (a renewed temp URL). */
  replaceDeploymentImage(node: string, body: DeploymentImage): Promise<Deployment> {
    return call(this.http.put<Deployment>(`/v1/deployments/${encodeURIComponent(node)}/image`, body), `image of ${node}`);
  }

  deleteDeployment(node: string, wipe = true): Promise<Deployment> {
    return call(this.http.delete<Deployment>(`/v1/deployments/${encodeURIComponent(node)}`, { params: { wipe } }), `tear down ${node}`);
  }

  /** Runs an Ironic clean step on the node's DPU target (a `clean` job); see POST /v1/nodes/{node}/cleaning. */
  startCleaning(node: string, body: CleaningCreate): Promise<Cleaning> {
    return call(this.http.post<Cleaning>(`/v1/nodes/${encodeURIComponent(node)}/cleaning`, body), `clean node ${node} (${body.step})`);
  }

  getCleaning(node: string): Promise<Cleaning> {
    return call(this.http.get<Cleaning>(`/v1/nodes/${encodeURIComponent(node)}/cleaning`), `cleaning of ${node}`);
  }

  cancelCleaning(node: string): Promise<Cleaning> {
    return call(this.http.delete<Cleaning>(`/v1/nodes/${encodeURIComponent(node)}/cleaning`), `cancel the cleaning of ${node}`);
  }

  listBootProfiles(): Promise<BootProfileSummary[]> {
    return call(this.http.get<{ profiles: BootProfileSummary[] }>('/v1/boot-profiles'), 'list boot profiles').then((r) => [...r.profiles]);
  }

  getBootProfile(id: string): Promise<BootProfile> {
    return call(this.http.get<BootProfile>(`/v1/boot-profiles/${encodeURIComponent(id)}`), `boot profile ${id}`);
  }

  deleteBootProfile(id: string): Promise<BootProfile> {
    return call(this.http.delete<BootProfile>(`/v1/boot-profiles/${encodeURIComponent(id)}`), `delete boot profile ${id}`);
  }

  metrics(): Promise<string> {
    return call(this.http.get<string>('/metrics', { responseType: 'text' }), 'driver metrics');
  }
}
