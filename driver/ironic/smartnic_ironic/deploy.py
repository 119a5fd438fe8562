"""The ``smartnic-streaming`` deploy interface.

The host boots from an NVMe disk its DPU presents. The DPU agent serves every
read of that disk from the DPU's local SSD when the region is already there and
from the image store otherwise, and copies the rest in the background. So the
node can be powered on as soon as the disk is *ready* (its export serves the
image), seconds after the request, whatever the image size.

The flow, as deploy steps and a periodic task::

    deploy (step, priority 100)
        power off -> tenant networks -> POST /v1/deployments -> DEPLOYWAIT
    heartbeat (pushed by the driver service when [smartnic]heartbeat_url is
    set: the deploy step pregenerates the node's agent token and passes it
    with Ironic's heartbeat URL as the deployment's callback)
        node in "wait call-back" (or still "deploying": wait for the deploy
        step's lock) -> the same check as the poll below; the push itself is
        not trusted, the service's deployment decides
    _check_deployments (periodic, every [smartnic]poll_interval, nodes in
    "wait call-back"; the fallback when a push is lost or disabled)
        GET /v1/deployments/{node}:
          ready | complete    -> resume the deploy
          failed | vanished   -> "deploy failed", last_error = the service's
          still attaching     -> wait; past [smartnic]deploy_timeout:
                                 abandon it (DELETE) and "deploy failed"
    boot_instance (step, priority 20)
        boot device := disk (persistent) -> power on -> ACTIVE
    _record_progress (periodic, every [smartnic]progress_interval, ACTIVE
    nodes whose disk is still hydrating)
        driver_internal_info["smartnic_progress"] := the service's progress
    tear_down
        power off -> DELETE /v1/deployments/{node}?wipe=true -> wait until it
        is gone (bounded by [smartnic]teardown_timeout) -> DELETED
    take_over (adoption; or another conductor took an ACTIVE node over from
    one that died: Ironic's _sync_local_state)
        GET /v1/deployments/{node} -> recorded with its progress, and an entry
        in the node's history naming both conductors

The conductor holds the node's lock for power and boot-device changes; the
driver service never touches them. The id of the deployment a deploy asked for
is kept in driver_internal_info: the poll trusts only that deployment. A new
deploy first removes any earlier deployment of the node (one that failed or
was abandoned), since the service holds one per node.

Cleaning runs on the DPU too: the tenant's data is on the DPU's target, so no
ramdisk boots on the host (prepare_cleaning and tear_down_cleaning boot
nothing)::

    erase_devices_metadata (clean step, priority 99 or
    [deploy]erase_devices_metadata_priority), erase_devices (priority 10 or
    [deploy]erase_devices_priority)
        POST /v1/nodes/{node}/cleaning -> CLEANWAIT
    _check_cleanings (periodic, every [smartnic]poll_interval, nodes in
    "clean wait")
        GET /v1/nodes/{node}/cleaning:
          done                -> resume the cleaning
          failed | cancelled  -> "clean failed", last_error = the service's
          running             -> driver_internal_info["smartnic_cleaning"]
                                 := its progress
    tear_down_cleaning (also on abort and failure)
        a cleaning still running is cancelled (DELETE)
"""

import re
import time

from ironic_lib import metrics_utils
from ironic_lib import utils as il_utils
from oslo_log import log as logging
from oslo_utils import strutils
from oslo_utils import units
from oslo_utils import uuidutils

from ironic.common import boot_devices
from ironic.common import exception
from ironic.common.i18n import _
from ironic.common import states
from ironic.conductor import periodics
from ironic.conductor import task_manager
from ironic.conductor import utils as manager_utils
from ironic.drivers import base
from ironic.drivers.modules import boot_mode_utils
from ironic.drivers.modules import deploy_utils
from ironic import objects

from smartnic_ironic import client as service_client
from smartnic_ironic import conf as smartnic_conf
from smartnic_ironic import exception as smartnic_exc
from smartnic_ironic import image_policy

LOG = logging.getLogger(__name__)
METRICS = metrics_utils.get_metrics_logger(__name__)
CONF = smartnic_conf.CONF

INTERFACE_NAME = 'smartnic-streaming'

REQUIRED_PROPERTIES = {
    'smartnic_agent_url': _('URL of the management API of the DPU agent on '
                            'this node\'s SmartNIC (dpu-agent serve), e.g. '
                            'https://dpu-12.example:9611 (http:// for an '
                            'agent without listen.tls). Required.'),
    'smartnic_target': _('The DPU-local device the image is copied to, e.g. '
                         '/dev/nvme0n1; it must lie under the agent\'s '
                         'allowed_targets. Required.'),
}

OPTIONAL_PROPERTIES = {
    'smartnic_agent_token': _('Bearer token of the DPU agent API. Defaults to '
                              'the driver service\'s agent.token. Optional.'),
    'smartnic_region_size': _('Size in bytes of the regions the disk is '
                              'copied in: a power of two from 4096 to '
                              '1073741824. Defaults to the agent\'s (1 MiB). '
                              'Optional.'),
    'smartnic_bandwidth': _('Cap on the background copy, in bytes/s; 0 (the '
                            'default) means unlimited. Optional.'),
    'smartnic_require_verification': _(
        'true: the streaming disk is created only once the driver service has '
        'read the whole image and checked it against its checksum (the first '
        'deploy of an image waits for that read), so the host never reads an '
        'unverified byte; false: it boots at once and regions are verified '
        'once the check is done. Defaults to the driver service\'s '
        'manifests.require. Optional.'),
    'smartnic_peer_url': _('Where the DPU agents of other nodes reach this '
                           'node\'s agent to copy regions of the same image '
                           'from it (the driver service\'s peers.enabled), '
                           'e.g. https://10.0.12.7:9611. Defaults to '
                           'smartnic_agent_url. Optional.'),
    'smartnic_rack': _('A topology label, such as the rack: disks of nodes '
                       'with the same label are asked first for regions of '
                       'the same image. Optional.'),
}

COMMON_PROPERTIES = dict(REQUIRED_PROPERTIES, **OPTIONAL_PROPERTIES)

# driver_internal_info keys this interface owns.
DEPLOYMENT_KEY = 'smartnic_deployment'
STARTED_KEY = 'smartnic_deploy_started'
PROGRESS_KEY = 'smartnic_progress'

# Deployment states (openapi/driver.yaml, Deployment.state).
BOOTABLE = ('ready', 'complete')
HYDRATING = ('attaching', 'ready')

_MIN_REGION, _MAX_REGION = 4096, 1 << 30


def parse_driver_info(node):
    """Checks the driver_info fields of this interface.

    :returns: a dict of the fields, region size and bandwidth as integers.
    :raises: MissingParameterValue, InvalidParameterValue
    """
    info = node.driver_info or {}
    missing = [k for k in REQUIRED_PROPERTIES if not info.get(k)]
    if missing:
        raise exception.MissingParameterValue(
            _('Node %(node)s is missing driver_info %(keys)s, needed by the '
              '%(iface)s deploy interface: %(help)s')
            % {'node': node.uuid, 'keys': ', '.join(missing),
               'iface': INTERFACE_NAME,
               'help': ' '.join(REQUIRED_PROPERTIES[k] for k in missing)})
    parsed = {k: info[k] for k in COMMON_PROPERTIES if info.get(k) not in
              (None, '')}
    url = str(parsed['smartnic_agent_url'])
    if not url.startswith(('http://', 'https://')):
        raise exception.InvalidParameterValue(
            _('driver_info["smartnic_agent_url"] must be an http:// or '
              'https:// URL of the DPU agent, not "%s"') % url)
    if not str(parsed['smartnic_target']).startswith('/'):
        raise exception.InvalidParameterValue(
            _('driver_info["smartnic_target"] must be an absolute path on '
              'the DPU, not "%s"') % parsed['smartnic_target'])
    if 'smartnic_region_size' in parsed:
        size = _as_int(parsed, 'smartnic_region_size')
        if not (_MIN_REGION <= size <= _MAX_REGION) or size & (size - 1):
            raise exception.InvalidParameterValue(
                _('driver_info["smartnic_region_size"] must be a power of two '
                  'from %(lo)d to %(hi)d, not %(v)d')
                % {'lo': _MIN_REGION, 'hi': _MAX_REGION, 'v': size})
    if 'smartnic_require_verification' in parsed:
        try:
            parsed['smartnic_require_verification'] = (
                strutils.bool_from_string(
                    parsed['smartnic_require_verification'], strict=True))
        except ValueError:
            raise exception.InvalidParameterValue(
                _('driver_info["smartnic_require_verification"] must be true '
                  'or false, not "%s"')
                % parsed['smartnic_require_verification'])
    if 'smartnic_peer_url' in parsed:
        peer = str(parsed['smartnic_peer_url'])
        if not re.match(r'^https?://[^/?#]+/?$', peer):
            raise exception.InvalidParameterValue(
                _('driver_info["smartnic_peer_url"] must be the base URL of '
                  'the DPU agent as other DPUs reach it (http(s)://host:port, '
                  'no path), not "%s"') % peer)
    if 'smartnic_bandwidth' in parsed:
        if _as_int(parsed, 'smartnic_bandwidth') < 0:
            raise exception.InvalidParameterValue(
                _('driver_info["smartnic_bandwidth"] must be 0 (unlimited) '
                  'or a positive number of bytes/s'))
    return parsed


def _as_int(parsed, key):
    try:
        parsed[key] = int(parsed[key])
    except (TypeError, ValueError):
        raise exception.InvalidParameterValue(
            _('driver_info["%(k)s"] must be an integer, not "%(v)s"')
            % {'k': key, 'v': parsed[key]})
    return parsed[key]


def check_instance_info(node):
    """Checks that instance_info names an image.

    Which sources it may name (an http(s) URL, a Glance image, a Swift
    object) is the driver service's to decide: validate() asks it, so the
    plugin never refuses a scheme a newer service accepts. What the image
    must be (whole-disk, checksummed, raw or qcow2) is Ironic's policy:
    image_policy.

    :raises: MissingParameterValue
    """
    info = node.instance_info or {}
    if not info.get('image_source'):
        raise exception.MissingParameterValue(
            _('Node %s has no instance_info["image_source"]: set it to the '
              'image to deploy (an http(s) URL of a raw disk image, or what '
              'else the SmartNIC driver service accepts)') % node.uuid)
    root_gb = info.get('root_gb')
    if root_gb not in (None, ''):
        try:
            ok = int(root_gb) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise exception.InvalidParameterValue(
                _('instance_info["root_gb"] of node %(node)s must be a whole '
                  'number of GiB (the root disk the DPU emulates; 0 for the '
                  'whole DPU target), not "%(v)s"')
                % {'node': node.uuid, 'v': root_gb})


# Root device hints (properties.root_device) and the emulated NVMe disk.
DISK_NAME = '/dev/nvme0n1'
EUI_WWN = re.compile(r'^eui\.[0-9a-f]{16}$')
# Hints a DPU-emulated NVMe namespace has no value for.
UNSUPPORTED_HINTS = ('vendor', 'hctl', 'by_path', 'wwn_with_extension',
                     'wwn_vendor_extension')


_OPERATOR = re.compile(r'^\s*(s?(==|!=|>=|<=|>|<)|<in>|<or>)(\s|$)')


def _equal_value(hint):
    """X when a hint asks for exactly X ("X", "s== X", "== X"), else None.

    Read from the hint as the operator wrote it: ironic-lib's parsed form is
    lowercased and URL-quoted, and the disk should present the value itself.
    """
    if isinstance(hint, int) and not isinstance(hint, bool):
        return str(hint)
    if not isinstance(hint, str):
        return None
    m = re.match(r'^\s*s?==\s*(.+?)\s*$', hint)
    if m:
        return m.group(1)
    return None if _OPERATOR.match(hint) else hint.strip()


def emulated_disk(node):
    """The identity the node's emulated NVMe disk presents, fitted to its hints.

    The DPU chooses what its disk is, so where properties.root_device names a
    serial, model or WWN exactly, the disk presents that; the rest is derived
    from the node by the driver service. The whole disk is then matched with
    ironic-lib's own matcher, so the host boots the disk the hints name.

    :returns: (device, root_gb): the DeploymentCreate "device" (only the
        fields the hints fix) and the root disk size in GiB a size hint asks
        for when instance_info has no root_gb, else None.
    :raises: InvalidParameterValue naming the hint.
    """
    raw = (node.properties or {}).get('root_device') or {}
    if not raw:
        return {}, None
    try:
        hints = il_utils.parse_root_device_hints(raw)
    except ValueError as e:
        raise exception.InvalidParameterValue(
            _('properties["root_device"] of node %(node)s: %(err)s')
            % {'node': node.uuid, 'err': e})
    bad = [h for h in UNSUPPORTED_HINTS if h in hints]
    if bad:
        raise exception.InvalidParameterValue(
            _('Node %(node)s boots from the NVMe disk its DPU emulates, which '
              'has no %(hints)s; use serial, wwn (eui.<16 hex digits>), model, '
              'size, name (%(name)s) or rotational (false) in '
              'properties["root_device"]')
            % {'node': node.uuid, 'hints': ', '.join(bad), 'name': DISK_NAME})
    device = {}
    for key, limit in (('serial', 20), ('model', 40), ('wwn', None)):
        value = _equal_value(raw.get(key))
        if value is None:
            continue
        if key == 'wwn' and not EUI_WWN.match(value):
            raise exception.InvalidParameterValue(
                _('properties["root_device"]["wwn"] of node %(node)s is '
                  '"%(v)s", but an emulated NVMe namespace has an EUI-64 WWN '
                  '(eui. and 16 hex digits)') % {'node': node.uuid, 'v': value})
        if limit and len(value) > limit:
            raise exception.InvalidParameterValue(
                _('properties["root_device"]["%(k)s"] of node %(node)s is '
                  'longer than an NVMe %(k)s (%(n)d characters)')
                % {'k': key, 'node': node.uuid, 'n': limit})
        device[key] = value
    root_gb = (node.instance_info or {}).get('root_gb')
    size_gb = None
    if root_gb in (None, '', 0, '0'):
        size = _equal_value(raw.get('size'))
        size_gb = int(size) if size and size.isdigit() else None
    # What the host will see: ironic-lib decides whether the hints match it.
    # Fields the driver service derives are not known here and match any
    # hint that is not an exact value (which was adopted above).
    gb = int(root_gb) if root_gb not in (None, '', 0, '0') else size_gb
    candidate = {'name': DISK_NAME, 'rotational': False,
                 'size': gb * units.Gi if gb else None,
                 'serial': device.get('serial'), 'model': device.get('model'),
                 'wwn': device.get('wwn')}
    # The hints as written: the matcher parses them itself.
    checked = {k: v for k, v in raw.items()
               if candidate.get(k) is not None or k in ('name', 'rotational')}
    if checked and il_utils.match_root_device_hints([candidate],
                                                    checked) is None:
        raise exception.InvalidParameterValue(
            _('properties["root_device"] of node %(node)s (%(hints)s) does not '
              'match the NVMe disk its DPU emulates (%(disk)s): the host would '
              'not boot from it')
            % {'node': node.uuid, 'hints': raw,
               'disk': ', '.join('%s=%s' % (k, v) for k, v in
                                 sorted(candidate.items()) if v is not None)})
    return device, size_gb


def check_boot_mode(task):
    """Checks the boot mode and the other capabilities Ironic knows.

    Values as Ironic checks them (boot_mode bios|uefi, secure_boot
    true|false, disk_label msdos|gpt, from properties/capabilities or
    instance_info/capabilities), an instance_info boot mode that contradicts
    the node's properties, and root device hints. Secure boot is refused
    unless the management interface can switch it on: the host boots the
    image straight from the streaming disk, with no boot interface that could
    do it instead. The mode itself is set in the deploy step.

    :raises: InvalidParameterValue
    """
    node = task.node
    deploy_utils.validate_capabilities(node)
    boot_mode_utils.get_boot_mode_for_deploy(node)
    if (boot_mode_utils.is_secure_boot_requested(node)
            and not _implements(task.driver.management,
                                'set_secure_boot_state')):
        raise exception.InvalidParameterValue(
            _('Node %(node)s requests secure boot (capabilities '
              'secure_boot:true), but its management interface %(iface)s '
              'cannot enable it; use one that can (e.g. redfish) or unset '
              'secure_boot') % {'node': node.uuid,
                                'iface': node.management_interface})
    # The syntax only: the streaming disk is the one disk the DPU presents,
    # smartnic_target picks the DPU's device (see docs/ironic.md).
    deploy_utils.get_root_device_for_deploy(node)


def _implements(interface, method):
    """Whether a driver interface overrides a base method (supports it)."""
    impl = getattr(type(interface), method, None)
    return impl is not None and impl is not getattr(base.ManagementInterface,
                                                    method)


def progress_of(deployment):
    """What driver_internal_info["smartnic_progress"] shows of a deployment."""
    p = deployment.get('progress') or {}
    return {
        'deployment_id': deployment.get('deployment_id'),
        'state': deployment.get('state'),
        'fraction': round(float(p.get('fraction') or 0), 4),
        'regions_local': p.get('regions_local'),
        'regions_total': p.get('regions_total'),
        'bytes_fetched': p.get('bytes_fetched'),
        'fetch_rate_bps': p.get('fetch_rate_bps'),
        'export_uri': deployment.get('export_uri'),
        'last_error': deployment.get('last_error'),
        'updated_at': deployment.get('updated_at'),
    }


def _is_ours(node):
    return node.deploy_interface == INTERFACE_NAME


def _still_hydrating(node):
    dii = node.driver_internal_info or {}
    return (node.deploy_interface == INTERFACE_NAME
            and (dii.get(PROGRESS_KEY) or {}).get('state') in HYDRATING)


# ironic-python-agent's priorities of its two erase steps, which Ironic uses
# when [deploy]erase_devices_priority / erase_devices_metadata_priority are
# unset (their default): ours take the same places in automated cleaning.
ERASE_DEVICES_PRIORITY = 10
ERASE_DEVICES_METADATA_PRIORITY = 99
_PRIORITY_OPTIONS = {'erase_devices': 'erase_devices_priority',
                     'erase_devices_metadata':
                         'erase_devices_metadata_priority'}

# driver_internal_info key of the clean step under way: the cleaning's id and
# step, and its progress as last recorded.
CLEANING_KEY = 'smartnic_cleaning'


def cleaning_progress_of(cleaning):
    """What driver_internal_info["smartnic_cleaning"] shows of a cleaning."""
    return {
        'cleaning_id': cleaning.get('cleaning_id'),
        'step': cleaning.get('step'),
        'state': cleaning.get('state'),
        'fraction': round(float(cleaning.get('fraction') or 0), 4),
        'bytes_done': cleaning.get('bytes_done'),
        'bytes_total': cleaning.get('bytes_total'),
        'method': cleaning.get('method'),
        'last_error': cleaning.get('last_error'),
        'recorded_at': time.time(),
    }


def _previous(task):
    """' from <hostname>' of the conductor a node is taken over from, or ''.

    The node's conductor_affinity (the id of the conductor that deployed or
    last took it over) still names it while take_over runs: Ironic updates
    it afterwards. Only for the history entry: a failure to look it up is
    not the take-over's.
    """
    affinity = task.node.conductor_affinity
    if affinity is None:
        return ''
    try:
        for conductor in objects.Conductor.list(task.context):
            if conductor.id == affinity:
                return _(' from %s') % conductor.hostname
    except Exception as e:
        LOG.debug('Cannot look up conductor %(id)s: %(err)s',
                  {'id': affinity, 'err': e})
    return _(' from conductor id %s') % affinity


class SmartNICStreamingDeploy(base.DeployInterface):
    """Deploys by streaming the image to an NVMe disk emulated by the DPU."""

    def get_properties(self):
        return COMMON_PROPERTIES

    @METRICS.timer('SmartNICStreamingDeploy.validate')
    def validate(self, task):
        """Checks the node's fields and image, then asks the service.

        The image must be a whole-disk image in a format the DPU serves, with
        a checksum unless it is in Glance (image_policy); the boot mode must
        be one Ironic knows and the management interface can honour. The
        driver service then checks that the DPU agent answers and that the
        image source honours Range requests, so an unusable node or image is
        refused before the node is touched.

        :raises: MissingParameterValue, InvalidParameterValue
        """
        node = task.node
        parse_driver_info(node)
        check_instance_info(node)
        check_boot_mode(task)
        emulated_disk(node)
        image = image_policy.validate(task)
        if image is None:
            LOG.debug('The image of node %s is checked by the driver service '
                      'in prepare, once the conductor serves it', node.uuid)
            return
        self._service_validate(node, image)

    @staticmethod
    def _service_validate(node, image):
        try:
            service_client.DriverServiceClient().validate(node, image=image)
        except smartnic_exc.ServiceError as e:
            field = (' (%s)' % e.field) if e.field else ''
            raise exception.InvalidParameterValue(
                _('The SmartNIC driver service finds node %(node)s not '
                  'deployable%(field)s: %(err)s')
                % {'node': node.uuid, 'field': field, 'err': e.error})
        except smartnic_exc.ServiceUnreachable as e:
            raise exception.InvalidParameterValue(str(e))

    @METRICS.timer('SmartNICStreamingDeploy.prepare')
    @task_manager.require_exclusive_lock
    def prepare(self, task):
        """Before the deploy steps: Ironic resolves a Glance image.

        As the direct interface does (AgentDeploy._update_instance_info):
        instance_info gets image_url, the hashes and the disk format, which
        the deploy step forwards; the driver service checks the resolved URL
        at once, so a bad one fails here, before the node is touched.
        """
        node = task.node
        if node.provision_state != states.DEPLOYING:
            return
        task.driver.network.validate(task)
        if image_policy.resolved_in_ironic(node):
            image_policy.resolve(task)
            self._service_validate(node, image_policy.forwarded(node))

    @METRICS.timer('SmartNICStreamingDeploy.deploy')
    @base.deploy_step(priority=100)
    @task_manager.require_exclusive_lock
    def deploy(self, task):
        """Powers off and asks the driver service for a streaming disk.

        :returns: DEPLOYWAIT; the periodic task resumes the deploy once the
            disk is ready to boot.
        """
        node = task.node
        # Off before the disk changes under the host.
        manager_utils.node_power_action(task, states.POWER_OFF)
        # Ironic's rule (as the pxe boot interface applies it): the node's
        # boot mode or [deploy]default_boot_mode, set through the management
        # interface where it can; a node that reports another mode and cannot
        # be switched fails here. ipmitool has no boot mode call: the mode
        # goes with the boot device (the EFI bit) in boot_instance.
        boot_mode_utils.sync_boot_mode(task)
        with manager_utils.power_state_for_network_configuration(task):
            task.driver.network.configure_tenant_networks(task)

        client = service_client.DriverServiceClient()
        existing = client.get_deployment(node.uuid)
        if existing is not None:
            # An earlier attempt's deployment (failed, abandoned after a
            # timeout, or interrupted): a node has one deployment at most.
            LOG.info('Removing the earlier SmartNIC deployment %(dep)s '
                     '(%(state)s) of node %(node)s before deploying',
                     {'dep': existing.get('deployment_id'),
                      'state': existing.get('state'), 'node': node.uuid})
            self._delete_deployment(task, client)

        deployment_id = 'ironic-%s' % uuidutils.generate_uuid()[:18]
        callback = self._callback(task)
        # A dict config drive (API 1.56+) is built into an ISO by Ironic's own
        # builder, as for any deploy interface; a string or URL passes as is.
        configdrive = manager_utils.get_configdrive_image(node)
        device, size_gb = emulated_disk(node)
        deployment = client.create_deployment(
            node, deployment_id, callback=callback,
            image=image_policy.forwarded(node), configdrive=configdrive,
            device=device, root_gb=size_gb)
        node.set_driver_internal_info(DEPLOYMENT_KEY, deployment_id)
        node.set_driver_internal_info(STARTED_KEY, time.time())
        node.set_driver_internal_info(PROGRESS_KEY, progress_of(deployment))
        node.save()
        LOG.info('SmartNIC deployment %(dep)s of node %(node)s requested '
                 '(image %(image)s); waiting for the streaming disk%(push)s',
                 {'dep': deployment_id, 'node': node.uuid,
                  'image': deployment.get('image_url'),
                  'push': ' (push to %s)' % callback['url'] if callback
                  else ''})
        return states.DEPLOYWAIT

    @staticmethod
    def heartbeat_url(node_uuid):
        """Ironic's heartbeat URL of a node, or None when push is off."""
        base_url = (CONF.smartnic.heartbeat_url or '').rstrip('/')
        if not base_url:
            return None
        if base_url.endswith('/v1'):
            base_url = base_url[:-3]
        return '%s/v1/heartbeat/%s' % (base_url, node_uuid)

    def _callback(self, task):
        """The deployment's callback, with a fresh pregenerated token.

        The token is saved before the service is asked, so that a push that
        arrives at once finds it.
        """
        node = task.node
        url = self.heartbeat_url(node.uuid)
        if not url:
            return None
        manager_utils.add_secret_token(node, pregenerated=True)
        node.save()
        return {'url': url,
                'agent_token': node.driver_internal_info['agent_secret_token']}

    @METRICS.timer('SmartNICStreamingDeploy.heartbeat')
    def heartbeat(self, task, callback_url, agent_version,
                  agent_verify_ca=None, agent_status=None,
                  agent_status_message=None):
        """A push from the driver service: check the deployment now.

        The conductor has checked the agent token. The push only says when
        to look: the service's deployment decides, exactly as for the poll.
        """
        node = task.node
        LOG.debug('SmartNIC heartbeat for node %(node)s (%(state)s): '
                  '%(status)s %(msg)s from %(url)s version %(ver)s',
                  {'node': node.uuid, 'state': node.provision_state,
                   'status': agent_status, 'msg': agent_status_message,
                   'url': callback_url, 'ver': agent_version})
        if node.provision_state == states.DEPLOYING:
            # The disk became ready before the deploy step returned: wait
            # for the step's lock, then the node is in "wait call-back".
            try:
                task.upgrade_lock(purpose='SmartNIC heartbeat')
            except exception.NodeLocked:
                LOG.info('SmartNIC heartbeat for node %s: the node stays '
                         'locked; the poll will check it', node.uuid)
                return
        if task.node.provision_state != states.DEPLOYWAIT:
            LOG.debug('Ignoring a SmartNIC heartbeat for node %(node)s in '
                      'state %(state)s',
                      {'node': task.node.uuid,
                       'state': task.node.provision_state})
            return
        self.check_deployment(task, via='push')

    @METRICS.timer('SmartNICStreamingDeploy.boot_instance')
    @base.deploy_step(priority=20)
    @task_manager.require_exclusive_lock
    def boot_instance(self, task):
        """Boots the host from the streaming disk: disk first, power on."""
        node = task.node
        deployment = service_client.DriverServiceClient().get_deployment(
            node.uuid)
        if deployment is None or deployment.get('state') not in BOOTABLE:
            raise smartnic_exc.DeploymentFailed(
                node=node.uuid,
                error=_('the deployment is %s, not ready to boot')
                % (deployment.get('state') if deployment else 'gone'))
        node.set_driver_internal_info(PROGRESS_KEY, progress_of(deployment))
        node.del_driver_internal_info(STARTED_KEY)
        node.save()
        boot_mode_utils.configure_secure_boot_if_needed(task)
        self._boot_from_disk(task)
        manager_utils.node_power_action(task, states.POWER_ON)
        LOG.info('Node %(node)s boots from its SmartNIC streaming disk '
                 'in %(mode)s mode (%(pct).1f%% local)',
                 {'node': node.uuid,
                  'mode': boot_mode_utils.get_boot_mode(node),
                  'pct': 100 * node.driver_internal_info[PROGRESS_KEY][
                      'fraction']})

    def _boot_from_disk(self, task):
        supported = task.driver.management.get_supported_boot_devices(task)
        if boot_devices.DISK not in supported:
            # fake and noop management cannot choose a disk: the firmware's
            # boot order has to start from it.
            LOG.warning('The management interface of node %(node)s cannot '
                        'select the disk as boot device (it supports '
                        '%(sup)s); relying on the firmware boot order',
                        {'node': task.node.uuid, 'sup': supported})
            return
        manager_utils.node_set_boot_device(task, boot_devices.DISK,
                                           persistent=True)

    @METRICS.timer('SmartNICStreamingDeploy.tear_down')
    @task_manager.require_exclusive_lock
    def tear_down(self, task):
        """Powers off and deletes (wipes) the streaming disk.

        :returns: DELETED
        :raises: TeardownFailed if the service could not delete it in time.
        """
        node = task.node
        manager_utils.node_power_action(task, states.POWER_OFF)
        with manager_utils.power_state_for_network_configuration(task):
            task.driver.network.unconfigure_tenant_networks(task)
        self._delete_deployment(task, service_client.DriverServiceClient())
        for key in (DEPLOYMENT_KEY, STARTED_KEY, PROGRESS_KEY):
            node.del_driver_internal_info(key)
        node.save()
        return states.DELETED

    def _delete_deployment(self, task, client):
        """DELETEs the node's deployment and waits until it is gone."""
        node_uuid = task.node.uuid
        if client.delete_deployment(
                node_uuid, wipe=CONF.smartnic.wipe_on_teardown) is None:
            return
        deadline = time.monotonic() + CONF.smartnic.teardown_timeout
        while True:
            deployment = client.get_deployment(node_uuid)
            if deployment is None:
                LOG.info('SmartNIC deployment of node %s deleted', node_uuid)
                return
            # The teardown job's own state decides: the deployment's state may
            # still show what an attach that was running said last.
            failed = [j for j in deployment.get('jobs') or ()
                      if j.get('queue') == 'teardown'
                      and j.get('state') == 'failed']
            if failed:
                raise smartnic_exc.TeardownFailed(
                    node=node_uuid,
                    error=_('%(err)s (teardown job %(job)s failed: fix the '
                            'cause, run smartnic-driver jobs retry %(job)s, '
                            'then undeploy again)')
                    % {'err': deployment.get('last_error'),
                       'job': failed[0].get('id')})
            if time.monotonic() > deadline:
                raise smartnic_exc.TeardownFailed(
                    node=node_uuid,
                    error=_('still %(state)s after %(t)d s (%(err)s); see '
                            'smartnic-driver jobs list --queue teardown')
                    % {'state': deployment.get('state'),
                       't': CONF.smartnic.teardown_timeout,
                       'err': deployment.get('last_error') or 'no error'})
            time.sleep(1)

    def clean_up(self, task):
        """Nothing to do: tear_down removes the streaming disk.

        The conductor also calls this when a deploy fails; the failed
        deployment stays in the driver service for inspection until the node
        is deployed again or undeployed.
        """

    @METRICS.timer('SmartNICStreamingDeploy.take_over')
    def take_over(self, task):
        """Adoption, or another conductor taking the node over.

        The driver service keeps the deployment in Redis, so nothing moves:
        the node's deployment is looked up and recorded. Adoption needs one
        that serves the disk (ready or complete): the host already runs from
        it; without one there is nothing to adopt, and the node is deployed
        instead. A conductor that takes over an ACTIVE node resumes showing
        its progress.

        Either way the node's history (``baremetal node history list``) gets
        an entry naming this conductor, the one it took the node from and the
        deployment: Ironic itself records a successful take-over nowhere an
        operator can see.

        :raises: InstanceDeployFailure when adopting a node without a
            bootable deployment. Any other error (the service unreachable)
            propagates: Ironic then leaves the node's conductor affinity as
            it was and tries again at its next [conductor]
            sync_local_state_interval.
        """
        node = task.node
        deployment = service_client.DriverServiceClient().get_deployment(
            node.uuid)
        adopting = node.provision_state == states.ADOPTING
        if adopting:
            if deployment is None or deployment.get('state') not in BOOTABLE:
                raise exception.InstanceDeployFailure(
                    _('Node %(node)s cannot be adopted by the %(iface)s deploy '
                      'interface: the SmartNIC driver service has %(what)s. '
                      'Adopt only a node whose host runs from a streaming '
                      'disk the service serves; otherwise deploy it.')
                    % {'node': node.uuid, 'iface': INTERFACE_NAME,
                       'what': ('no deployment of it' if deployment is None
                                else 'its deployment in state %s (%s)'
                                % (deployment.get('state'),
                                   deployment.get('last_error')))})
        if deployment is None:
            event = (_('Taken over by conductor %(host)s%(prev)s; the '
                       'SmartNIC driver service has no deployment of it')
                     % {'host': CONF.host, 'prev': _previous(task)})
            LOG.warning('Node %(node)s: %(event)s',
                        {'node': node.uuid, 'event': event})
            manager_utils.node_history_record(node, event=event,
                                              event_type=states.TAKEOVER)
            return
        node.set_driver_internal_info(DEPLOYMENT_KEY,
                                      deployment.get('deployment_id'))
        node.set_driver_internal_info(PROGRESS_KEY, progress_of(deployment))
        node.save()
        event = (_('SmartNIC deployment %(dep)s (%(state)s, %(pct).1f%% '
                   'local) %(how)s by conductor %(host)s%(prev)s')
                 % {'dep': deployment.get('deployment_id'),
                    'state': deployment.get('state'),
                    'pct': 100 * node.driver_internal_info[PROGRESS_KEY][
                        'fraction'],
                    'how': _('adopted') if adopting else _('taken over'),
                    'host': CONF.host,
                    'prev': '' if adopting else _previous(task)})
        LOG.info('Node %(node)s: %(event)s', {'node': node.uuid,
                                               'event': event})
        manager_utils.node_history_record(
            node, event=event,
            event_type=states.ADOPTION if adopting else states.TAKEOVER)

    # ---- periodic tasks ---------------------------------------------------

    @METRICS.timer('SmartNICStreamingDeploy._check_deployments')
    @periodics.node_periodic(
        purpose='checking SmartNIC streaming deployments',
        spacing=CONF.smartnic.poll_interval,
        filters={'provision_state': states.DEPLOYWAIT, 'reserved': False,
                 'maintenance': False},
        predicate_extra_fields=['deploy_interface'],
        predicate=_is_ours,
    )
    def _check_deployments(self, task, manager, context):
        self.check_deployment(task)

    def check_deployment(self, task, via='poll'):
        """Resumes, fails or leaves waiting a node in "wait call-back".

        :param via: what asked (poll or push), for the log.
        """
        node = task.node
        if DEPLOYMENT_KEY not in node.driver_internal_info:
            return  # waiting for something other than our deployment
        self.renew_image_url(task)
        try:
            deployment = service_client.DriverServiceClient().get_deployment(
                node.uuid)
        except smartnic_exc.SmartNICError as e:
            LOG.warning('Cannot check the SmartNIC deployment of node '
                        '%(node)s: %(err)s', {'node': node.uuid, 'err': e})
            self._fail_if_timed_out(task, 'unknown', str(e))
            return
        if deployment is None:
            self._fail(task, _('the driver service has no deployment for '
                               'this node any more (it was deleted outside '
                               'Ironic); deploy again'))
            return
        if deployment.get('deployment_id') != node.driver_internal_info.get(
                DEPLOYMENT_KEY):
            self._fail(task, _('the driver service now holds another '
                               'deployment (%s) for this node; deploy again')
                       % deployment.get('deployment_id'))
            return
        state = deployment.get('state')
        if state in BOOTABLE:
            task.upgrade_lock(purpose='resuming SmartNIC streaming deploy')
            if task.node.provision_state != states.DEPLOYWAIT:
                return
            task.node.set_driver_internal_info(PROGRESS_KEY,
                                               progress_of(deployment))
            task.node.save()
            LOG.info('The SmartNIC streaming disk of node %(node)s is ready; '
                     'resuming the deploy (%(via)s)',
                     {'node': node.uuid, 'via': via})
            manager_utils.notify_conductor_resume_deploy(task)
        elif state == 'failed':
            self._fail(task, deployment.get('last_error')
                       or _('no reason given'))
        else:
            self._fail_if_timed_out(task, state, deployment.get('last_error'))

    def _fail_if_timed_out(self, task, state, last_error):
        timeout = CONF.smartnic.deploy_timeout
        started = task.node.driver_internal_info.get(STARTED_KEY)
        if not timeout or started is None or time.time() - started < timeout:
            return
        detail = '; last error: %s' % last_error if last_error else ''
        err = smartnic_exc.DeploymentTimeout(
            timeout=timeout, node=task.node.uuid, state=state, detail=detail)
        task.upgrade_lock(purpose='failing a timed-out SmartNIC deploy')
        if task.node.provision_state != states.DEPLOYWAIT:
            return
        # Abandon it: a disk that becomes ready later must not stay exported
        # for a node that is not deployed.
        try:
            service_client.DriverServiceClient().delete_deployment(
                task.node.uuid, wipe=CONF.smartnic.wipe_on_teardown)
        except smartnic_exc.SmartNICError as e:
            LOG.warning('Could not abandon the timed-out SmartNIC deployment '
                        'of node %(node)s: %(err)s',
                        {'node': task.node.uuid, 'err': e})
        manager_utils.deploying_error_handler(task, str(err), str(err))

    def _fail(self, task, reason):
        err = smartnic_exc.DeploymentFailed(node=task.node.uuid, error=reason)
        task.upgrade_lock(purpose='failing a SmartNIC deploy')
        if task.node.provision_state != states.DEPLOYWAIT:
            return
        manager_utils.deploying_error_handler(task, str(err), str(err))

    def renew_image_url(self, task):
        """Before Ironic's temp URL of the image expires, a new one for the copy.

        The streaming disk reads the image long after the deploy step (the
        copy goes on after ACTIVE), so a Swift temp URL that Ironic signed in
        prepare would expire under it. Called from the two polls (wait
        call-back, and ACTIVE while the disk still copies); a failure is
        logged and tried again at the next poll, while the old URL still
        works.
        """
        node = task.node
        deployment_id = node.driver_internal_info.get(DEPLOYMENT_KEY)
        if not deployment_id or not image_policy.renewal_due(node):
            return
        old = node.instance_info.get('image_url')
        try:
            url = image_policy.renewed_url(task)
            if url == old:
                # [glance]swift_temp_url_cache_enabled hands out the cached
                # URL until it is about to expire.
                return
            service_client.DriverServiceClient().replace_image(
                node.uuid, deployment_id,
                dict(image_policy.forwarded(node), image_source=url))
        except (exception.IronicException, smartnic_exc.SmartNICError) as e:
            LOG.warning('Could not renew the image URL of node %(node)s (it '
                        'expires at %(exp)s): %(err)s',
                        {'node': node.uuid,
                         'exp': image_policy.temp_url_expiry(old), 'err': e})
            return
        task.upgrade_lock(purpose='recording a renewed image URL')
        task.node.set_instance_info('image_url', url)
        task.node.save()
        LOG.info('Renewed the Swift temp URL of the image of node %(node)s; '
                 'it now expires at %(exp)s',
                 {'node': node.uuid, 'exp': image_policy.temp_url_expiry(url)})

    @METRICS.timer('SmartNICStreamingDeploy._record_progress')
    @periodics.node_periodic(
        purpose='recording SmartNIC hydration progress',
        spacing=CONF.smartnic.progress_interval,
        filters={'provision_state': states.ACTIVE, 'reserved': False,
                 'maintenance': False},
        predicate_extra_fields=['deploy_interface', 'driver_internal_info'],
        predicate=_still_hydrating,
    )
    def _record_progress(self, task, manager, context):
        self.record_progress(task)

    def record_progress(self, task):
        """Copies the service's progress of an ACTIVE node's disk."""
        node = task.node
        self.renew_image_url(task)
        try:
            deployment = service_client.DriverServiceClient().get_deployment(
                node.uuid)
        except smartnic_exc.SmartNICError as e:
            LOG.debug('No SmartNIC progress for node %(node)s: %(err)s',
                      {'node': node.uuid, 'err': e})
            return
        progress = (progress_of(deployment) if deployment is not None
                    else {'state': 'gone'})
        if progress == node.driver_internal_info.get(PROGRESS_KEY):
            return
        task.upgrade_lock(purpose='recording SmartNIC hydration progress')
        if task.node.provision_state != states.ACTIVE:
            return
        task.node.set_driver_internal_info(PROGRESS_KEY, progress)
        task.node.save()
        if progress['state'] == 'complete':
            LOG.info('Every region of the SmartNIC streaming disk of node %s '
                     'is local', node.uuid)

    # ---- cleaning -----------------------------------------------------------

    def get_clean_steps(self, task):
        """The clean steps, with the priorities [deploy] gives them.

        Read at each call, as Ironic's agent interfaces read them: the options
        are mutable. Unset (their default), the steps keep IPA's priorities.
        """
        steps = []
        for step in super().get_clean_steps(task):
            step = dict(step)
            option = _PRIORITY_OPTIONS.get(step['step'])
            if option is not None:
                value = getattr(CONF.deploy, option)
                if value is not None:
                    step['priority'] = value
            steps.append(step)
        return steps

    @METRICS.timer('SmartNICStreamingDeploy.prepare_cleaning')
    def prepare_cleaning(self, task):
        """Boots nothing: the DPU agent erases, not a ramdisk on the host.

        Checks the node's driver_info, so that a node that cannot be cleaned
        fails here, before its first step.

        :returns: None (synchronous).
        :raises: MissingParameterValue, InvalidParameterValue
        """
        parse_driver_info(task.node)
        return None

    @METRICS.timer('SmartNICStreamingDeploy.tear_down_cleaning')
    def tear_down_cleaning(self, task):
        """Cancels a clean step of ours that still runs (abort or failure).

        After a successful cleaning there is nothing left to do. A
        cancellation the service cannot be asked for is logged, not raised:
        the erasure then runs to its end on the DPU, which harms nothing.
        """
        node = task.node
        info = node.driver_internal_info.get(CLEANING_KEY)
        if not info:
            return
        try:
            service_client.DriverServiceClient().cancel_cleaning(node.uuid)
            LOG.info('SmartNIC cleaning %(id)s (%(step)s) of node %(node)s '
                     'cancelled', {'id': info.get('cleaning_id'),
                                   'step': info.get('step'),
                                   'node': node.uuid})
        except smartnic_exc.SmartNICError as e:
            LOG.warning('Could not cancel the SmartNIC cleaning of node '
                        '%(node)s: %(err)s', {'node': node.uuid, 'err': e})
        node.del_driver_internal_info(CLEANING_KEY)
        node.save()

    @METRICS.timer('SmartNICStreamingDeploy.erase_devices_metadata')
    @base.clean_step(priority=ERASE_DEVICES_METADATA_PRIORITY, abortable=True,
                     requires_ramdisk=False)
    def erase_devices_metadata(self, task):
        """Zeroes partition tables and signatures on the DPU target.

        The DPU agent zeroes the first and last MiB of the target and of each
        partition its GPT or MBR names: what ironic-python-agent's step of
        this name destroys (wipefs on every partition and the disk, the
        primary and backup GPT).

        :returns: CLEANWAIT; _check_cleanings resumes the cleaning.
        """
        return self._start_cleaning(task, 'erase_devices_metadata')

    @METRICS.timer('SmartNICStreamingDeploy.erase_devices')
    @base.clean_step(priority=ERASE_DEVICES_PRIORITY, abortable=True,
                     requires_ramdisk=False)
    def erase_devices(self, task):
        """Zeroes every byte of the DPU target.

        BLKZEROOUT on a device (zeros written where it is refused); a file
        target is truncated and extended again, sparse.

        :returns: CLEANWAIT; _check_cleanings resumes the cleaning.
        """
        return self._start_cleaning(task, 'erase_devices')

    def _start_cleaning(self, task, step):
        node = task.node
        parse_driver_info(node)
        client = service_client.DriverServiceClient()
        existing = client.get_deployment(node.uuid)
        if existing is not None:
            # Left by a failed or abandoned deploy: its disk uses the target
            # this step erases, and the node is not deployed.
            LOG.info('Removing the SmartNIC deployment %(dep)s (%(state)s) of '
                     'node %(node)s before cleaning',
                     {'dep': existing.get('deployment_id'),
                      'state': existing.get('state'), 'node': node.uuid})
            self._delete_deployment(task, client)
        try:
            cleaning = client.start_cleaning(node, step)
        except smartnic_exc.ServiceError as e:
            raise smartnic_exc.CleaningFailed(
                node=node.uuid, step=step,
                error='%s: %s' % (e.error_code, e.error))
        node.set_driver_internal_info(CLEANING_KEY,
                                      cleaning_progress_of(cleaning))
        node.save()
        LOG.info('SmartNIC cleaning %(id)s of node %(node)s requested: '
                 '%(step)s of %(target)s on the DPU',
                 {'id': cleaning.get('cleaning_id'), 'node': node.uuid,
                  'step': step, 'target': cleaning.get('target')})
        return states.CLEANWAIT

    @METRICS.timer('SmartNICStreamingDeploy._check_cleanings')
    @periodics.node_periodic(
        purpose='checking SmartNIC cleanings',
        spacing=CONF.smartnic.poll_interval,
        filters={'provision_state': states.CLEANWAIT, 'reserved': False,
                 'maintenance': False},
        predicate_extra_fields=['deploy_interface'],
        predicate=_is_ours,
    )
    def _check_cleanings(self, task, manager, context):
        self.check_cleaning(task)

    def check_cleaning(self, task):
        """Resumes, fails or records the progress of a clean step of ours."""
        node = task.node
        info = node.driver_internal_info.get(CLEANING_KEY)
        if not info:
            return  # waiting for another interface's step
        try:
            cleaning = service_client.DriverServiceClient().get_cleaning(
                node.uuid)
        except smartnic_exc.SmartNICError as e:
            # [conductor]clean_callback_timeout bounds how long this lasts.
            LOG.warning('Cannot check the SmartNIC cleaning of node %(node)s: '
                        '%(err)s', {'node': node.uuid, 'err': e})
            return
        if cleaning is None or cleaning.get('cleaning_id') != info.get(
                'cleaning_id'):
            self._fail_cleaning(task, _(
                'the driver service no longer has cleaning %s of this node '
                '(deleted or replaced outside Ironic); clean again')
                % info.get('cleaning_id'))
            return
        state = cleaning.get('state')
        if state == 'done':
            task.upgrade_lock(purpose='resuming SmartNIC cleaning')
            if task.node.provision_state != states.CLEANWAIT:
                return
            task.node.del_driver_internal_info(CLEANING_KEY)
            task.node.save()
            LOG.info('SmartNIC clean step %(step)s of node %(node)s done '
                     '(%(bytes)s bytes, %(method)s); resuming the cleaning',
                     {'step': cleaning.get('step'), 'node': node.uuid,
                      'bytes': cleaning.get('bytes_total'),
                      'method': cleaning.get('method')})
            manager_utils.notify_conductor_resume_clean(task)
        elif state in ('failed', 'cancelled'):
            self._fail_cleaning(task, cleaning.get('last_error') or state)
        else:
            self._record_cleaning_progress(task, info, cleaning)

    def _record_cleaning_progress(self, task, info, cleaning):
        """Copies a running cleaning's progress, every progress_interval."""
        interval = CONF.smartnic.progress_interval
        progress = cleaning_progress_of(cleaning)
        if not interval or time.time() - (info.get('recorded_at') or 0) < \
                interval:
            return
        if all(progress[k] == info.get(k) for k in progress
               if k != 'recorded_at'):
            return
        task.upgrade_lock(purpose='recording SmartNIC cleaning progress')
        if task.node.provision_state != states.CLEANWAIT:
            return
        task.node.set_driver_internal_info(CLEANING_KEY, progress)
        task.node.save()

    def _fail_cleaning(self, task, reason):
        info = task.node.driver_internal_info.get(CLEANING_KEY) or {}
        err = smartnic_exc.CleaningFailed(node=task.node.uuid,
                                          step=info.get('step'), error=reason)
        task.upgrade_lock(purpose='failing a SmartNIC clean step')
        if task.node.provision_state != states.CLEANWAIT:
            return
        # Nothing left to cancel: tear_down_cleaning (which the handler calls)
        # finds no step of ours.
        task.node.del_driver_internal_info(CLEANING_KEY)
        task.node.save()
        manager_utils.cleaning_error_handler(task, str(err))
