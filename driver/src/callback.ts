/**
 * The push to Ironic: when a deployment that carries a `callback` (openapi/driver.yaml
 * DeploymentCallback) becomes bootable or fails for good, the service POSTs an agent
 * heartbeat to Ironic's `/v1/heartbeat/{node}`, so the conductor resumes (or fails) the
 * deploy at once instead of at its next poll. Best effort by design: a few short attempts,
 * then a warning; the job's outcome never depends on it, since the conductor's periodic
 * poll is the fallback and the plugin checks the deployment with this service before it
 * acts on a heartbeat. The agent token is a secret: it is sent, never logged.
 */
import axios from 'axios';
import type { Logger } from 'pino';
import { redactUrl } from '../../image-access/src/index.js';
import type { DeploymentRecord } from './store.js';

/** Ironic's microversion that accepts agent_status/agent_status_message (and agent_token). */
export const HEARTBEAT_API_VERSION = '1.72';
const ATTEMPTS = 3;
const TIMEOUT_MS = 5000;
const BACKOFF_MS = 500;

/** What Ironic 21.4 accepts as agent_status (ramdisk.py AGENT_VALID_STATES: start, end, error). */
export type CallbackStatus = 'end' | 'error';

export interface CallbackOptions {
  log: Logger;
  version: string;
  attempts?: number;
  timeoutMs?: number;
  backoffMs?: number;
}

/**
 * Sends the heartbeat if the deployment asked for one; resolves to whether Ironic took it
 * (false also when there was nothing to send). Never rejects.
 */
export async function notifyIronic(rec: DeploymentRecord, status: CallbackStatus, message: string, opts: CallbackOptions): Promise<boolean> {
  const cb = rec.spec.callback;
  if (!cb) return false;
  const attempts = opts.attempts ?? ATTEMPTS;
  const body = {
    callback_url: `smartnic://${rec.node_uuid}`,
    agent_token: cb.agent_token,
    agent_version: opts.version,
    agent_status: status,
    agent_status_message: message.slice(0, 1000),
  };
  const where = redactUrl(cb.url);
  let last = '';
  for (let i = 1; i <= attempts; i++) {
    try {
      const res = await axios.post(cb.url, body, {
        timeout: opts.timeoutMs ?? TIMEOUT_MS,
        headers: { 'content-type': 'application/json', 'x-openstack-ironic-api-version': HEARTBEAT_API_VERSION },
        validateStatus: () => true,
        maxRedirects: 0,
      });
      if (res.status >= 200 && res.status < 300) {
        opts.log.info({ node: rec.node_uuid, deployment: rec.deployment_id, status, url: where }, 'Ironic notified');
        return true;
      }
      last = `HTTP ${res.status}: ${describe(res.data)}`;
      // A refusal (bad token, node not waiting, no such node) does not get better by asking again.
      if (res.status < 500 && res.status !== 409 && res.status !== 429) break;
    } catch (err) {
      last = (err as Error).message;
    }
    if (i < attempts) await new Promise((r) => setTimeout(r, (opts.backoffMs ?? BACKOFF_MS) * 2 ** (i - 1)));
  }
  opts.log.warn({ node: rec.node_uuid, deployment: rec.deployment_id, status, url: where }, `could not notify Ironic (its poll will notice): ${last}`);
  return false;
}

function describe(data: unknown): string {
  const text = typeof data === 'string' ? data : JSON.stringify(data);
  return (text ?? '').slice(0, 300);
}
