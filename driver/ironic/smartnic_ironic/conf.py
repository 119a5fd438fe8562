"""The ``[smartnic]`` section of ironic.conf."""

from oslo_config import cfg

from ironic.common.i18n import _

GROUP = cfg.OptGroup(
    'smartnic',
    title=_('SmartNIC streaming deploy'),
    help=_('Options of the smartnic-streaming deploy interface, which asks '
           'the SmartNIC driver service to prepare a streaming disk on the '
           'node\'s DPU.'))

opts = [
    cfg.URIOpt('driver_url',
               default='http://127.0.0.1:9612',
               schemes=['http', 'https'],
               help=_('Base URL of the SmartNIC driver service '
                      '(smartnic-driver serve), without /v1.')),
    cfg.StrOpt('token',
               secret=True,
               help=_('Bearer token for the driver service API (one of the '
                      'tokens in its auth.tokens or auth.token_file).')),
    cfg.StrOpt('cafile',
               help=_('CA bundle to verify an https driver_url with. '
                      'Defaults to the system CAs.')),
    cfg.BoolOpt('insecure',
                default=False,
                help=_('Do not verify the TLS certificate of an https '
                       'driver_url. Only for labs.')),
    cfg.IntOpt('request_timeout',
               default=30,
               min=1,
               help=_('Timeout, in seconds, of one request to the driver '
                      'service.')),
    cfg.IntOpt('request_attempts',
               default=3,
               min=1,
               help=_('Attempts of one request to the driver service when it '
                      'is unreachable or answers 5xx (every request the '
                      'plugin makes is idempotent).')),
    cfg.IntOpt('poll_interval',
               default=2,
               min=1,
               help=_('How often, in seconds, the conductor asks the driver '
                      'service whether the streaming disks of nodes in "wait '
                      'call-back" are ready to boot (one GET per waiting '
                      'node). It bounds how long a ready disk waits for its '
                      'host to be powered on. Read when the conductor loads '
                      'the driver: changing it needs a restart.')),
    cfg.URIOpt('heartbeat_url',
               schemes=['http', 'https'],
               help=_('Base URL of the Ironic API as the driver service reaches '
                      'it (e.g. http://ironic.example:6385, with or without '
                      '/v1). When set, a deploy pregenerates the node\'s agent '
                      'token and asks the driver service to POST an agent '
                      'heartbeat to /v1/heartbeat/{node} as soon as the '
                      'streaming disk is ready or has failed, so the deploy '
                      'resumes at once instead of at the next poll; the poll '
                      '(poll_interval) stays as the fallback. The heartbeat '
                      'endpoint must be enabled ([api]'
                      'enable_ramdisk_endpoints). Unset (the default) '
                      'disables the push.')),
    cfg.IntOpt('deploy_timeout',
               default=600,
               min=0,
               help=_('Seconds a deployment may take to become ready to boot '
                      '(the driver service retries transient failures inside '
                      'this time) before the node goes to "deploy failed". '
                      '0 waits forever. Keep it below '
                      '[conductor]deploy_callback_timeout, which fails the '
                      'node with a less helpful message.')),
    cfg.IntOpt('teardown_timeout',
               default=300,
               min=1,
               help=_('Seconds tear_down waits for the driver service to '
                      'delete (and wipe) the streaming disk before the '
                      'undeploy fails.')),
    cfg.IntOpt('progress_interval',
               default=30,
               min=0,
               help=_('How often, in seconds, the hydration progress of '
                      'ACTIVE nodes is copied into '
                      'driver_internal_info["smartnic_progress"] (until every '
                      'region is local). 0 disables it. Read when the '
                      'conductor loads the driver.')),
    cfg.BoolOpt('resolve_images_in_ironic',
                default=True,
                help=_('Resolve Glance images with Ironic\'s own image service '
                       '(its Keystone credentials and [glance] options), as '
                       'the direct deploy interface does: validate looks the '
                       'image up, prepare turns it into image_url (a Swift '
                       'temp URL with [agent]image_download_source = swift, '
                       'the conductor\'s HTTP copy with http or local), '
                       'image_checksum, image_os_hash_* and '
                       'image_disk_format, and the driver service is given '
                       'that URL and those hashes: it needs no Glance '
                       'credentials. false: the Glance image id is passed on '
                       'and the driver service resolves it with its own '
                       'glance configuration.')),
    cfg.BoolOpt('wipe_on_teardown',
                default=True,
                help=_('Destroy the local copy on the DPU\'s target when the '
                       'node is undeployed.')),
]

CONF = cfg.CONF
CONF.register_group(GROUP)
CONF.register_opts(opts, group=GROUP)


def list_opts():
    """For oslo-config-generator (entry point group oslo.config.opts)."""
    return [(GROUP, opts)]
