"""Which images the smartnic-streaming interface deploys, read as Ironic reads them.

The DPU presents one NVMe disk to the host and serves it from the image, so the
image must *be* the disk:

* **Whole-disk images only.** A partition image needs a ramdisk to partition
  the disk, write the root filesystem and install a bootloader; the host here
  boots straight from the image. Ironic's own signs of a partition image are
  refused at validate, naming the field: ``instance_info["image_type"] =
  partition``, ``instance_info["kernel"]``/``["ramdisk"]``, and a Glance image
  with ``img_type = partition`` or ``kernel_id``/``ramdisk_id``
  (``ironic.common.images.is_whole_disk_image``).
* **Checksums, Ironic's rule** (``AgentDeploy.validate`` in Ironic 21.4): an
  image that is not a Glance image needs ``image_checksum``, or
  ``image_os_hash_algo`` and ``image_os_hash_value`` together. Ironic 21.4 has
  no option to waive it. The digest is handed to the driver service, which
  checks it while it builds the image's manifest (docs/ironic.md,
  "Checksums"). ``image_checksum`` is read as Ironic reads it
  (``checksum_utils.get_checksum_and_algo``): a checksum-file URL is fetched by
  the conductor (unless ``[conductor]disable_support_for_checksum_files``), a
  bare value is md5 (32 hex digits, legacy), sha256 (64) or sha512 (128), and
  ``algo:value`` names its algorithm.
* **Disk formats** the DPU agent serves: ``raw``, and ``qcow2``, which it
  decodes as it reads. Anything else (vmdk, vhd, vhdx, vdi, iso, ploop, aki…)
  is refused naming ``image_disk_format`` (or the Glance image's
  ``disk_format``).
* **Glance images through Ironic** (``[smartnic]resolve_images_in_ironic``,
  default on): Ironic's own image service, with its Keystone credentials and
  ``[glance]`` options, looks the image up at validate and resolves it in
  ``prepare`` with ``deploy_utils.build_instance_info_for_deploy`` — as the
  ``direct`` interface does — into ``image_url`` (a Swift temp URL with
  ``[agent]image_download_source = swift``; the conductor's own HTTP copy with
  ``http``/``local``), the hashes and the disk format. The driver service is
  then given that URL, so it needs no Glance credentials. A temp URL outlives
  the deploy (the copy goes on after ACTIVE), so while the disk still copies
  the interface has Ironic sign a new one before a third of
  ``[glance]swift_temp_url_duration`` is left and hands it to the service
  (``PUT /v1/deployments/{node}/image``). Off, the Glance id is passed on and
  the driver service resolves (and renews) it with its own ``glance`` config
  (standalone use).
"""

import time
from urllib import parse as urlparse

from ironic.common import checksum_utils
from ironic.common import exception
from ironic.common.glance_service import image_service as glance_image_service
from ironic.common.glance_service import service_utils
from ironic.common.i18n import _
from ironic.common import images
from ironic.drivers.modules import agent
from ironic.drivers.modules import deploy_utils

from smartnic_ironic import conf as smartnic_conf

CONF = smartnic_conf.CONF

# What the DPU agent serves (openapi/driver.yaml InstanceInfo.image_disk_format).
DISK_FORMATS = ('raw', 'qcow2')

# The instance_info fields that describe the image, as the plugin forwards them.
IMAGE_FIELDS = ('image_source', 'image_checksum', 'image_os_hash_algo',
                'image_os_hash_value', 'image_disk_format')

_HASH_LENGTHS = {32: 'md5', 64: 'sha256', 128: 'sha512'}

_WHOLE_DISK_ONLY = _('the SmartNIC streaming interface streams whole-disk '
                     'images only: the host boots straight from the image, '
                     'there is no ramdisk to partition the disk or install a '
                     'bootloader')


def is_glance(node):
    return service_utils.is_glance_image(
        (node.instance_info or {}).get('image_source'))


def resolved_in_ironic(node):
    """Whether Ironic resolves this node's image (a Glance image, option on)."""
    return CONF.smartnic.resolve_images_in_ironic and is_glance(node)


def check_whole_disk(node, glance_image=None):
    """Refuses partition images, naming the field that makes it one.

    The fields the user sets are named first; ``image_type`` last, since
    Ironic itself sets it to "partition" (update_image_type, before any
    validate) when it sees kernel/ramdisk or a Glance image's kernel_id,
    ramdisk_id or img_type.

    :param glance_image: the Glance image (Ironic's image service's show())
        when the source is one and Ironic resolves it.
    :raises: InvalidParameterValue
    """
    ii = node.instance_info or {}
    for field in ('kernel', 'ramdisk'):
        if ii.get(field):
            raise exception.InvalidParameterValue(
                _('Node %(node)s: instance_info["%(f)s"] is set, which makes '
                  'the image a partition image, but %(why)s. Unset '
                  'instance_info["%(f)s"] and deploy a whole-disk image.')
                % {'node': node.uuid, 'f': field, 'why': _WHOLE_DISK_ONLY})
    if glance_image is not None:
        props = glance_image.get('properties') or {}
        img_type = props.get('img_type')
        partition = (img_type == images.IMAGE_TYPE_PARTITION if img_type
                     else [k for k in ('kernel_id', 'ramdisk_id')
                           if props.get(k)])
        if partition:
            field = ('img_type = partition' if img_type
                     else ' and '.join(partition))
            raise exception.InvalidParameterValue(
                _('Node %(node)s: Glance image %(image)s is a partition image '
                  '(its property %(field)s), but %(why)s.')
                % {'node': node.uuid, 'image': glance_image.get('id'),
                   'field': field, 'why': _WHOLE_DISK_ONLY})
    image_type = ii.get('image_type')
    if image_type and image_type not in images.VALID_IMAGE_TYPES:
        raise exception.InvalidParameterValue(
            _('instance_info["image_type"] is "%(v)s"; valid are %(valid)s')
            % {'v': image_type,
               'valid': ', '.join(sorted(images.VALID_IMAGE_TYPES))})
    if image_type == images.IMAGE_TYPE_PARTITION:
        raise exception.InvalidParameterValue(
            _('Node %(node)s: instance_info["image_type"] is "partition" (set '
              'by the user, or by Ironic from kernel/ramdisk or the Glance '
              'image\'s kernel_id, ramdisk_id or img_type), but %(why)s. '
              'Deploy a whole-disk image.')
            % {'node': node.uuid, 'why': _WHOLE_DISK_ONLY})


def check_checksum(node):
    """Ironic's rule: a non-Glance image needs a checksum or a hash.

    Word for word the check of Ironic's AgentDeploy.validate (which exempts
    file:// sources too; the driver service refuses those anyway).

    :raises: MissingParameterValue naming the fields
    """
    ii = node.instance_info or {}
    source = ii.get('image_source') or ''
    if service_utils.is_glance_image(source) or source.startswith('file://'):
        return
    checksum = ii.get('image_checksum')
    algo = ii.get('image_os_hash_algo')
    value = ii.get('image_os_hash_value')
    if (value and not algo) or (algo and not value) or not (value or checksum):
        raise exception.MissingParameterValue(
            _('Node %(node)s: image_source\'s "image_checksum", or '
              '"image_os_hash_algo" and "image_os_hash_value" must be '
              'provided in instance_info (Ironic\'s rule for images that are '
              'not in Glance; the SmartNIC driver service checks the image '
              'against it)') % {'node': node.uuid})
    if checksum and not value:
        try:
            checksum_utils.is_checksum_url(checksum)
        except exception.ImageChecksumURLNotSupported:
            raise exception.InvalidParameterValue(
                _('Node %(node)s: instance_info["image_checksum"] is a URL, '
                  'but [conductor]disable_support_for_checksum_files forbids '
                  'checksum files: give the checksum itself, or '
                  'image_os_hash_algo and image_os_hash_value')
                % {'node': node.uuid})


def check_disk_format(disk_format, what):
    """:raises: InvalidParameterValue unless the DPU serves that format."""
    if disk_format and disk_format not in DISK_FORMATS:
        raise exception.InvalidParameterValue(
            _('%(what)s is "%(fmt)s": the SmartNIC streaming interface serves '
              '%(ok)s images only (the DPU agent decodes qcow2 as it reads '
              'it); convert the image, e.g. qemu-img convert -O raw')
            % {'what': what, 'fmt': disk_format,
               'ok': ' and '.join(DISK_FORMATS)})


def glance_image(task):
    """The node's Glance image, looked up by Ironic's image service.

    :raises: InvalidParameterValue saying why Ironic could not use it.
    """
    node = task.node
    href = node.instance_info['image_source']
    try:
        return glance_image_service.GlanceImageService(
            context=task.context).show(href)
    except exception.ImageNotFound:
        raise exception.InvalidParameterValue(
            _('Glance image %(image)s of node %(node)s cannot be found by '
              'Ironic (without a Keystone token Ironic sees only public '
              'images and images of its own project)')
            % {'image': href, 'node': node.uuid})
    except exception.ImageUnacceptable as e:
        raise exception.InvalidParameterValue(str(e))
    except exception.IronicException as e:
        raise exception.InvalidParameterValue(
            _('Ironic could not look up Glance image %(image)s of node '
              '%(node)s: %(err)s. Check the [glance] section of ironic.conf, '
              'or set [smartnic]resolve_images_in_ironic = false to let the '
              'SmartNIC driver service resolve Glance images itself.')
            % {'image': href, 'node': node.uuid, 'err': e})


def validate(task):
    """The image checks of validate(); returns what to ask the service with.

    :returns: the image fields to pass to POST /v1/validate, or None when the
        image cannot be probed yet (a Glance image that the conductor caches
        and serves itself: prepare() probes it once it is there).
    :raises: MissingParameterValue, InvalidParameterValue
    """
    node = task.node
    image = glance_image(task) if resolved_in_ironic(node) else None
    check_whole_disk(node, image)
    check_checksum(node)
    check_disk_format((node.instance_info or {}).get('image_disk_format'),
                      'instance_info["image_disk_format"]')
    if image is None:
        return forwarded(node)
    check_disk_format(image.get('disk_format'),
                      'the disk_format of Glance image %s' % image.get('id'))
    if deploy_utils.get_image_download_source(node) != 'swift':
        # The conductor downloads the image and serves it from [deploy]
        # http_url: that needs these options (Ironic's own check).
        agent.validate_http_provisioning_configuration(node)
        return None
    try:
        url = glance_image_service.GlanceImageService(
            context=task.context).swift_temp_url(image)
    except exception.IronicException as e:
        raise exception.InvalidParameterValue(
            _('Ironic cannot make a Swift temp URL for Glance image %(image)s '
              '([glance] swift_* options of ironic.conf): %(err)s')
            % {'image': image.get('id'), 'err': e})
    return _fields(url, image.get('checksum'), image.get('os_hash_algo'),
                   image.get('os_hash_value'), image.get('disk_format'))


def resolve(task):
    """prepare(): Ironic resolves a Glance image into instance_info.

    deploy_utils.build_instance_info_for_deploy sets image_url,
    image_checksum, image_os_hash_algo/value and image_disk_format (as for
    the direct interface); they are saved on the node, so the deploy step
    forwards them and ``baremetal node show`` shows what was deployed.
    """
    node = task.node
    node.instance_info = deploy_utils.build_instance_info_for_deploy(task)
    node.save()
    check_disk_format(node.instance_info.get('image_disk_format'),
                      'the disk format of Glance image %s'
                      % node.instance_info.get('image_source'))


def forwarded(node):
    """The image fields the driver service is given for this node.

    A Glance image Ironic resolved: its image_url and what Ironic recorded.
    Otherwise instance_info's own fields, image_checksum read as Ironic reads
    it (see the module doc) and passed as image_os_hash_algo/value.
    """
    ii = node.instance_info or {}
    if resolved_in_ironic(node) and ii.get('image_url'):
        return _fields(ii['image_url'], ii.get('image_checksum'),
                       ii.get('image_os_hash_algo'),
                       ii.get('image_os_hash_value'),
                       ii.get('image_disk_format'))
    return _fields(ii.get('image_source'), ii.get('image_checksum'),
                   ii.get('image_os_hash_algo'), ii.get('image_os_hash_value'),
                   ii.get('image_disk_format'), source=ii.get('image_source'))


def _fields(url, checksum, algo, value, disk_format, source=None):
    if not value and checksum:
        algo, value = checksum_of(checksum, source)
        checksum = None
    fields = {'image_source': url, 'image_checksum': checksum,
              'image_os_hash_algo': algo if value else None,
              'image_os_hash_value': value, 'image_disk_format': disk_format}
    return {k: v for k, v in fields.items() if v not in (None, '')}


def checksum_of(checksum, image_source=None):
    """image_checksum as (algorithm, value), the way Ironic reads it.

    A checksum-file URL is fetched by the conductor (Ironic's
    checksum_utils.get_checksum_from_url, which finds the line of the image's
    file name); ``algo:value`` names its algorithm; otherwise the length of
    the hex value says md5, sha256 or sha512.
    """
    if checksum_utils.is_checksum_url(checksum):
        try:
            checksum = checksum_utils.get_checksum_from_url(
                checksum, image_source or '')
        except exception.IronicException as e:
            raise exception.InvalidParameterValue(
                _('instance_info["image_checksum"] %(url)s: %(err)s')
                % {'url': checksum, 'err': e})
    if ':' in checksum:
        algo, _sep, value = checksum.partition(':')
        return algo.strip().lower(), value.strip()
    return _HASH_LENGTHS.get(len(checksum.strip()), 'md5'), checksum.strip()


def temp_url_expiry(url):
    """The temp_url_expires of a Swift temp URL (unix seconds), or None."""
    try:
        query = urlparse.parse_qs(urlparse.urlparse(url or '').query)
        return int(query['temp_url_expires'][0])
    except (KeyError, IndexError, ValueError):
        return None


def renewal_due(node, now=None):
    """Whether the Swift temp URL Ironic made for the node's image is to renew.

    A third or less of [glance]swift_temp_url_duration left, as the driver
    service renews the temp URLs it makes itself. Only temp URLs expire: the
    conductor's own HTTP copy (image_download_source http/local) does not.
    """
    if not resolved_in_ironic(node):
        return False
    expires = temp_url_expiry((node.instance_info or {}).get('image_url'))
    if expires is None:
        return False
    left = expires - (time.time() if now is None else now)
    return left <= CONF.glance.swift_temp_url_duration / 3.0


def renewed_url(task):
    """A new Swift temp URL of the node's Glance image, made by Ironic."""
    image_id = service_utils.parse_image_id(
        task.node.instance_info['image_source'])
    return glance_image_service.GlanceImageService(
        context=task.context).swift_temp_url({'id': image_id})
