"""A small client of the SmartNIC driver service (openapi/driver.yaml).

Retries are policy, not loops: a request that could not reach the service, or
got a 5xx or a ``retryable`` error, is repeated up to
``[smartnic]request_attempts`` times with a short exponential back-off. Every
call the plugin makes is idempotent (deployments carry their deployment_id),
so repeating one is safe.
"""

from oslo_log import log as logging
from oslo_utils import strutils
import requests
import tenacity

from smartnic_ironic import conf as smartnic_conf
from smartnic_ironic import exception

LOG = logging.getLogger(__name__)
CONF = smartnic_conf.CONF

# instance_info keys the service understands; the rest of a node's
# instance_info (capabilities, traits, ...) is Ironic's business. root_gb and
# configdrive are added by request_body (converted).
INSTANCE_INFO_KEYS = ('image_source', 'image_checksum', 'image_os_hash_algo',
                      'image_os_hash_value', 'image_disk_format')
# The ones that describe the image (replaced as a whole by request_body's image).
IMAGE_KEYS = ('image_source', 'image_checksum', 'image_os_hash_algo',
              'image_os_hash_value', 'image_disk_format')
DRIVER_INFO_KEYS = ('smartnic_agent_url', 'smartnic_agent_token',
                    'smartnic_target', 'smartnic_region_size',
                    'smartnic_bandwidth', 'smartnic_require_verification',
                    'smartnic_peer_url', 'smartnic_rack')


def _retryable(exc):
    if isinstance(exc, exception.ServiceUnreachable):
        return True
    return isinstance(exc, exception.ServiceError) and (
        exc.retryable or (exc.status or 0) >= 500)


class DriverServiceClient(object):
    """Calls of the driver service API that the deploy interface needs."""

    def __init__(self, url=None, token=None):
        self.url = (url or CONF.smartnic.driver_url).rstrip('/')
        self.token = token if token is not None else CONF.smartnic.token
        self.session = requests.Session()
        if self.token:
            self.session.headers['Authorization'] = 'Bearer %s' % self.token
        self.session.headers['Accept'] = 'application/json'
        if CONF.smartnic.insecure:
            self.session.verify = False
        elif CONF.smartnic.cafile:
            self.session.verify = CONF.smartnic.cafile

    def _request(self, method, path, what, json=None, params=None,
                 not_found_ok=False):
        retry = tenacity.retry(
            retry=tenacity.retry_if_exception(_retryable),
            stop=tenacity.stop_after_attempt(CONF.smartnic.request_attempts),
            wait=tenacity.wait_exponential(multiplier=0.5, max=5),
            reraise=True)
        return retry(self._request_once)(method, path, what, json, params,
                                         not_found_ok)

    def _request_once(self, method, path, what, json, params, not_found_ok):
        url = self.url + path
        try:
            resp = self.session.request(method, url, json=json, params=params,
                                        timeout=CONF.smartnic.request_timeout)
        except requests.RequestException as e:
            LOG.warning('SmartNIC driver service %(method)s %(url)s: %(err)s',
                        {'method': method, 'url': url, 'err': e})
            raise exception.ServiceUnreachable(url=self.url, error=e)
        if resp.status_code == 404 and not_found_ok:
            return None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            raise exception.ServiceError(
                what=what, status=resp.status_code,
                error_code=body.get('code', 'HTTP_%d' % resp.status_code),
                error=body.get('message') or resp.text[:500] or resp.reason,
                retryable=bool(body.get('retryable')),
                field=body.get('field'))
        if resp.status_code == 204 or not resp.content:
            return {}
        return resp.json()

    @staticmethod
    def request_body(node, deployment_id=None, image=None, configdrive=None,
                     device=None, root_gb=None):
        """The instance_info and driver_info subsets the service accepts.

        :param image: the image fields to send instead of instance_info's
            (image_policy.forwarded: what Ironic resolved, checksums read as
            Ironic reads them); None sends instance_info's as they are.
        :param configdrive: the config drive as Ironic hands it to a deploy
            interface (manager_utils.get_configdrive_image: gzip+base64 or a
            URL), or None.
        :param device: the emulated disk's identity as the root device hints
            fix it (deploy.emulated_disk), or None.
        :param root_gb: the root disk size a size hint asks for, used when
            instance_info has no root_gb.
        """
        ii = {k: node.instance_info[k] for k in INSTANCE_INFO_KEYS
              if node.instance_info.get(k) not in (None, '')}
        if image is not None:
            for k in IMAGE_KEYS:
                ii.pop(k, None)
            ii.update(image)
        given = node.instance_info.get('root_gb')
        if given not in (None, '', 0, '0'):
            # Nova writes an int, the CLI a string; deploy.validate checked it.
            ii['root_gb'] = int(given)
        elif root_gb:
            ii['root_gb'] = int(root_gb)
        if configdrive:
            ii['configdrive'] = configdrive
        di = {k: node.driver_info[k] for k in DRIVER_INFO_KEYS
              if node.driver_info.get(k) not in (None, '')}
        for k in ('smartnic_region_size', 'smartnic_bandwidth'):
            if k in di:
                di[k] = int(di[k])
        if 'smartnic_require_verification' in di:
            # The CLI stores "true"/"false" strings; the service wants a boolean.
            di['smartnic_require_verification'] = strutils.bool_from_string(
                di['smartnic_require_verification'], strict=True)
        body = {'node_uuid': node.uuid, 'instance_info': ii,
                'driver_info': di}
        if deployment_id:
            body['deployment_id'] = deployment_id
        if device:
            body['device'] = device
        return body

    def validate(self, node, image=None):
        return self._request('POST', '/v1/validate',
                             'the node\'s instance_info and driver_info',
                             json=self.request_body(node, image=image))

    def create_deployment(self, node, deployment_id, callback=None,
                          image=None, configdrive=None, device=None,
                          root_gb=None):
        """Asks for the node's deployment.

        :param configdrive: see request_body.
        :param callback: None, or {'url': Ironic's heartbeat URL of the node,
            'agent_token': the node's pregenerated agent token}: the service
            then pushes a heartbeat when the deployment is ready or failed.
        """
        body = self.request_body(node, deployment_id, image=image,
                                 configdrive=configdrive, device=device,
                                 root_gb=root_gb)
        if callback:
            body['callback'] = callback
        return self._request('POST', '/v1/deployments',
                             'to create a deployment', json=body)

    def replace_image(self, node_uuid, deployment_id, image):
        """Gives the deployment a new URL of the same image (a renewed temp URL)."""
        return self._request('PUT', '/v1/deployments/%s/image' % node_uuid,
                             'to replace the image URL',
                             json={'deployment_id': deployment_id,
                                   'instance_info': image})

    def get_deployment(self, node_uuid):
        """The node's deployment, or None if it has none."""
        return self._request('GET', '/v1/deployments/%s' % node_uuid,
                             'to show the deployment', not_found_ok=True)

    def delete_deployment(self, node_uuid, wipe=True):
        """Starts the teardown; None if the node had no deployment."""
        return self._request('DELETE', '/v1/deployments/%s' % node_uuid,
                             'to delete the deployment',
                             params={'wipe': 'true' if wipe else 'false'},
                             not_found_ok=True)

    def start_cleaning(self, node, step):
        """Asks for a clean step on the node's DPU target (a ``clean`` job).

        :param step: erase_devices or erase_devices_metadata.
        :returns: the cleaning; the one already queued or running when it is
            the same step, so a repeated request is harmless.
        """
        body = {'step': step,
                'driver_info': self.request_body(node)['driver_info']}
        return self._request('POST', '/v1/nodes/%s/cleaning' % node.uuid,
                             'to run clean step %s' % step, json=body)

    def get_cleaning(self, node_uuid):
        """The node's last cleaning, or None if it has none."""
        return self._request('GET', '/v1/nodes/%s/cleaning' % node_uuid,
                             'to show the cleaning', not_found_ok=True)

    def cancel_cleaning(self, node_uuid):
        """Cancels the node's cleaning if it runs; None if it has none."""
        return self._request('DELETE', '/v1/nodes/%s/cleaning' % node_uuid,
                             'to cancel the cleaning', not_found_ok=True)
