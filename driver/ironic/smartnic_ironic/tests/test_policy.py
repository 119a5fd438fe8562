"""Unit tests of the image policy and the boot mode, as Ironic 21.4 states them
(image_policy.py, deploy.check_boot_mode): whole-disk images only, checksums for
non-Glance images, the disk formats the DPU serves, Glance images resolved by
Ironic's own image service, boot mode and secure boot. Ironic's helpers run for
real; Glance, the driver service and the conductor utilities are mocked. The
same behaviour on a real Ironic with Glance on Swift:
tests/integration/ironic-policy.test.ts.

Run: /usr/bin/python3 -m unittest discover -s driver/ironic -t driver/ironic
"""

import unittest
from unittest import mock

from ironic.common import checksum_utils
from ironic.common import exception
from ironic.common.glance_service import image_service as glance_service
from ironic.common import states
from ironic.conductor import task_manager
from ironic.drivers.modules import deploy_utils
from ironic.drivers.modules import fake
from ironic.drivers.modules import ipmitool

from smartnic_ironic import client as service_client
from smartnic_ironic import conf as smartnic_conf
from smartnic_ironic import deploy
from smartnic_ironic import exception as smartnic_exc
from smartnic_ironic import image_policy
from smartnic_ironic.tests.test_deploy import FakeNode
from smartnic_ironic.tests.test_deploy import GOOD_DI

CONF = smartnic_conf.CONF
# The tests below patch DriverServiceClient; request_body is checked for real.
RealClient = service_client.DriverServiceClient
GLANCE_ID = '5d2c2ee6-4a0e-4c5b-9a1e-3f0e6b1f2a10'
SHA256 = 'ab' * 32
SHA512 = 'cd' * 64
MD5 = 'ef' * 16


def override(test, name, value, group='smartnic'):
    CONF.set_override(name, value, group)
    test.addCleanup(CONF.clear_override, name, group)


def glance_image(**props):
    return {'id': GLANCE_ID, 'disk_format': props.pop('disk_format', 'raw'),
            'checksum': MD5, 'os_hash_algo': 'sha512',
            'os_hash_value': SHA512, 'status': 'active',
            'properties': props}


class PolicyCase(unittest.TestCase):

    def setUp(self):
        p = mock.patch.object(service_client, 'DriverServiceClient',
                              autospec=True)
        self.client = p.start().return_value
        self.addCleanup(p.stop)
        self.iface = deploy.SmartNICStreamingDeploy()

    def task(self, instance_info, properties=None, driver_info=None,
             management=None):
        node = FakeNode(dict(GOOD_DI, **(driver_info or {})), instance_info,
                        properties=properties)
        node.provision_state = states.DEPLOYING
        # A TaskManager spec: require_exclusive_lock checks task.shared.
        task = mock.Mock(spec=task_manager.TaskManager, shared=False)
        task.node = node
        task.context = mock.Mock()
        task.driver = mock.Mock(management=management
                                or fake.FakeManagement())
        return task

    def refused(self, instance_info, pattern, exc=exception.InvalidParameterValue,
                **kw):
        task = self.task(instance_info, **kw)
        with self.assertRaisesRegex(exc, pattern):
            self.iface.validate(task)
        self.client.validate.assert_not_called()
        return task

    def accepted(self, instance_info, **kw):
        task = self.task(instance_info, **kw)
        self.iface.validate(task)
        return task


class TestWholeDiskOnly(PolicyCase):

    def test_partition_image_type_is_refused(self):
        self.refused({'image_source': 'http://i/x.img', 'image_checksum': MD5,
                      'image_type': 'partition'},
                     r'instance_info\["image_type"\] is "partition".*'
                     r'whole-disk images only')

    def test_kernel_or_ramdisk_make_a_partition_image(self):
        for field in ('kernel', 'ramdisk'):
            with self.subTest(field=field):
                self.refused({'image_source': 'http://i/x.img',
                              'image_checksum': MD5, field: 'http://i/k'},
                             r'instance_info\["%s"\] is set.*whole-disk '
                             r'images only' % field)

    def test_unknown_image_type(self):
        self.refused({'image_source': 'http://i/x.img', 'image_checksum': MD5,
                      'image_type': 'disk'}, r'image_type.*valid are')

    def test_whole_disk_is_accepted(self):
        self.accepted({'image_source': 'http://i/x.img', 'image_checksum': MD5,
                       'image_type': 'whole-disk'})
        self.client.validate.assert_called_once()


class TestChecksums(PolicyCase):
    """AgentDeploy.validate's rule, and how the digest is forwarded."""

    MISSING = (r'"image_checksum", or "image_os_hash_algo" and '
               r'"image_os_hash_value" must be provided')

    def test_http_image_without_checksum_is_refused(self):
        for ii in ({}, {'image_os_hash_algo': 'sha256'},
                   {'image_os_hash_value': SHA256},
                   {'image_os_hash_value': SHA256, 'image_checksum': MD5}):
            with self.subTest(ii=ii):
                self.refused(dict(ii, image_source='https://i/x.raw'),
                             self.MISSING, exc=exception.MissingParameterValue)

    def test_swift_object_without_checksum_is_refused(self):
        self.refused({'image_source': 'swift://images/x.raw'}, self.MISSING,
                     exc=exception.MissingParameterValue)

    def test_glance_image_needs_none(self):
        override(self, 'resolve_images_in_ironic', False)
        self.accepted({'image_source': GLANCE_ID})
        self.accepted({'image_source': 'glance://%s' % GLANCE_ID})

    def test_checksum_or_hash_pair_is_enough(self):
        self.accepted({'image_source': 'https://i/x.raw',
                       'image_checksum': MD5})
        self.accepted({'image_source': 'https://i/x.raw',
                       'image_os_hash_algo': 'sha256',
                       'image_os_hash_value': SHA256})

    def test_checksum_url_refused_when_the_conductor_may_not_fetch_it(self):
        override(self, 'disable_support_for_checksum_files', True, 'conductor')
        self.refused({'image_source': 'https://i/x.raw',
                      'image_checksum': 'https://i/SHA256SUMS'},
                     r'image_checksum"\] is a URL.*'
                     r'disable_support_for_checksum_files')

    def test_checksum_is_forwarded_with_its_algorithm(self):
        # Ironic's reading: md5 (legacy) by length 32, sha256 by 64, sha512
        # by 128, "algo:value" explicit; the service is told which.
        for checksum, algo, value in (
                (MD5, 'md5', MD5), (SHA256, 'sha256', SHA256),
                (SHA512, 'sha512', SHA512),
                ('SHA256:%s' % SHA256, 'sha256', SHA256)):
            with self.subTest(checksum=checksum):
                node = FakeNode(GOOD_DI, {'image_source': 'https://i/x.raw',
                                          'image_checksum': checksum})
                self.assertEqual(
                    {'image_source': 'https://i/x.raw',
                     'image_os_hash_algo': algo, 'image_os_hash_value': value},
                    image_policy.forwarded(node))

    def test_hash_pair_wins_over_checksum(self):
        node = FakeNode(GOOD_DI, {'image_source': 'https://i/x.raw',
                                  'image_checksum': MD5,
                                  'image_os_hash_algo': 'sha512',
                                  'image_os_hash_value': SHA512})
        self.assertEqual('sha512',
                         image_policy.forwarded(node)['image_os_hash_algo'])

    def test_checksum_file_is_fetched_by_the_conductor(self):
        node = FakeNode(GOOD_DI, {'image_source': 'https://i/x.raw',
                                  'image_checksum': 'https://i/SHA256SUMS'})
        with mock.patch.object(checksum_utils, 'get_checksum_from_url',
                               autospec=True, return_value=SHA256) as get:
            fields = image_policy.forwarded(node)
        get.assert_called_once_with('https://i/SHA256SUMS', 'https://i/x.raw')
        self.assertEqual(('sha256', SHA256), (fields['image_os_hash_algo'],
                                              fields['image_os_hash_value']))

    def test_the_deployment_gets_the_normalised_digest(self):
        task = self.task({'image_source': 'https://i/x.raw',
                          'image_checksum': SHA256})
        self.client.get_deployment.return_value = None
        self.client.create_deployment.return_value = {'state': 'attaching'}
        with mock.patch.object(deploy, 'manager_utils', autospec=True), \
                mock.patch.object(deploy, 'boot_mode_utils', autospec=True):
            self.iface.deploy(task)
        image = self.client.create_deployment.call_args[1]['image']
        self.assertEqual({'image_source': 'https://i/x.raw',
                          'image_os_hash_algo': 'sha256',
                          'image_os_hash_value': SHA256}, image)
        body = RealClient.request_body(
            task.node, 'd', image=image)
        self.assertNotIn('image_checksum', body['instance_info'])


class TestDiskFormat(PolicyCase):

    def test_raw_and_qcow2_are_served(self):
        for fmt in ('raw', 'qcow2'):
            self.accepted({'image_source': 'https://i/x', 'image_checksum': MD5,
                           'image_disk_format': fmt})

    def test_others_are_refused_naming_the_field(self):
        for fmt in ('vmdk', 'vhd', 'vhdx', 'vdi', 'iso', 'ploop', 'aki'):
            with self.subTest(fmt=fmt):
                self.refused({'image_source': 'https://i/x',
                              'image_checksum': MD5,
                              'image_disk_format': fmt},
                             r'instance_info\["image_disk_format"\] is "%s": '
                             r'.*serves raw and qcow2 images only' % fmt)


class TestGlanceThroughIronic(PolicyCase):
    """[smartnic]resolve_images_in_ironic: Ironic's image service resolves."""

    def setUp(self):
        super().setUp()
        p = mock.patch.object(glance_service, 'GlanceImageService',
                              autospec=True)
        self.glance = p.start().return_value
        self.addCleanup(p.stop)
        self.glance.show.return_value = glance_image()
        self.glance.swift_temp_url.return_value = (
            'http://swift:8080/v1/AUTH_g/glance/%s?temp_url_sig=s&'
            'temp_url_expires=1700000000' % GLANCE_ID)
        override(self, 'image_download_source', 'swift', 'agent')

    def test_validate_looks_the_image_up_and_probes_the_temp_url(self):
        self.accepted({'image_source': GLANCE_ID})
        self.glance.show.assert_called_once_with(GLANCE_ID)
        image = self.client.validate.call_args[1]['image']
        self.assertEqual(self.glance.swift_temp_url.return_value,
                         image['image_source'])
        self.assertEqual(('sha512', SHA512, 'raw'),
                         (image['image_os_hash_algo'],
                          image['image_os_hash_value'],
                          image['image_disk_format']))

    def test_partition_glance_image_is_refused(self):
        for props, field in (({'kernel_id': 'k', 'ramdisk_id': 'r'},
                              'kernel_id and ramdisk_id'),
                             ({'img_type': 'partition'}, 'img_type')):
            with self.subTest(props=props):
                self.glance.show.return_value = glance_image(**props)
                self.refused({'image_source': GLANCE_ID},
                             r'Glance image %s is a partition image \(its '
                             r'property %s.*whole-disk' % (GLANCE_ID, field))

    def test_glance_disk_format_is_checked(self):
        self.glance.show.return_value = glance_image(disk_format='vmdk')
        self.refused({'image_source': GLANCE_ID},
                     r'disk_format of Glance image %s is "vmdk"' % GLANCE_ID)

    def test_ironic_glance_errors_say_what_to_configure(self):
        self.glance.show.side_effect = exception.ImageNotFound(
            image_id=GLANCE_ID)
        self.refused({'image_source': GLANCE_ID},
                     r'cannot be found by Ironic.*public')
        self.glance.show.side_effect = exception.GlanceConnectionFailed(
            endpoint='http://g', reason='refused')
        self.refused({'image_source': GLANCE_ID},
                     r'\[glance\] section of ironic.conf.*'
                     r'resolve_images_in_ironic = false')

    def test_http_download_source_needs_ironic_http_options(self):
        override(self, 'image_download_source', 'http', 'agent')
        override(self, 'http_url', None, 'deploy')
        self.refused({'image_source': GLANCE_ID},
                     r'\[deploy\]http_url',
                     exc=exception.MissingParameterValue)
        override(self, 'http_url', 'http://conductor:8080', 'deploy')
        override(self, 'http_root', '/httpboot', 'deploy')
        self.accepted({'image_source': GLANCE_ID})
        # Nothing to probe yet: prepare() does it once the conductor has it.
        self.client.validate.assert_not_called()

    def test_prepare_resolves_and_the_deploy_forwards_the_url(self):
        task = self.task({'image_source': GLANCE_ID})
        url = self.glance.swift_temp_url.return_value

        def build(t):
            return dict(t.node.instance_info, image_url=url,
                        image_checksum=MD5, image_os_hash_algo='sha512',
                        image_os_hash_value=SHA512, image_disk_format='qcow2',
                        image_type='whole-disk')
        with mock.patch.object(deploy_utils, 'build_instance_info_for_deploy',
                               autospec=True, side_effect=build) as b:
            self.iface.prepare(task)
        b.assert_called_once_with(task)
        self.assertEqual(url, task.node.instance_info['image_url'])
        self.assertGreaterEqual(task.node.saved, 1)
        expected = {'image_source': url, 'image_checksum': MD5,
                    'image_os_hash_algo': 'sha512',
                    'image_os_hash_value': SHA512,
                    'image_disk_format': 'qcow2'}
        self.assertEqual(expected, self.client.validate.call_args[1]['image'])
        self.assertEqual(expected, image_policy.forwarded(task.node))
        body = RealClient.request_body(
            task.node, 'd', image=expected)
        self.assertEqual(url, body['instance_info']['image_source'])

    def test_prepare_refuses_a_resolved_format_the_dpu_cannot_serve(self):
        task = self.task({'image_source': GLANCE_ID})
        with mock.patch.object(
                deploy_utils, 'build_instance_info_for_deploy', autospec=True,
                return_value={'image_source': GLANCE_ID, 'image_url': 'u',
                              'image_disk_format': 'vhd'}):
            with self.assertRaisesRegex(exception.InvalidParameterValue,
                                        '"vhd"'):
                self.iface.prepare(task)

    def test_off_passes_the_glance_id_to_the_service(self):
        override(self, 'resolve_images_in_ironic', False)
        self.accepted({'image_source': GLANCE_ID})
        self.glance.show.assert_not_called()
        self.assertEqual({'image_source': GLANCE_ID},
                         self.client.validate.call_args[1]['image'])
        task = self.task({'image_source': GLANCE_ID})
        with mock.patch.object(deploy_utils,
                               'build_instance_info_for_deploy') as b:
            self.iface.prepare(task)
        b.assert_not_called()

    def test_temp_url_expiry(self):
        self.assertEqual(1700000000, image_policy.temp_url_expiry(
            self.glance.swift_temp_url.return_value))
        self.assertIsNone(image_policy.temp_url_expiry('http://i/x.raw'))


class TestTempUrlRenewal(PolicyCase):
    """Ironic's temp URL is renewed while the disk still reads the image."""

    OLD = ('http://swift:8080/v1/AUTH_g/glance/%s?temp_url_sig=old&'
           'temp_url_expires=%d')
    NEW = ('http://swift:8080/v1/AUTH_g/glance/%s?temp_url_sig=new&'
           'temp_url_expires=%d')

    def setUp(self):
        super().setUp()
        p = mock.patch.object(glance_service, 'GlanceImageService',
                              autospec=True)
        self.glance = p.start().return_value
        self.addCleanup(p.stop)
        override(self, 'swift_temp_url_duration', 1200, 'glance')
        self.now = 1700000000

    def node_task(self, left):
        task = self.task({'image_source': GLANCE_ID,
                          'image_url': self.OLD % (GLANCE_ID, self.now + left),
                          'image_os_hash_algo': 'sha512',
                          'image_os_hash_value': SHA512,
                          'image_disk_format': 'raw'})
        task.node.provision_state = states.ACTIVE
        task.node.driver_internal_info[deploy.DEPLOYMENT_KEY] = 'ironic-1'
        self.glance.swift_temp_url.return_value = self.NEW % (
            GLANCE_ID, self.now + 1200)
        return task

    def test_due_in_the_last_third_of_the_duration(self):
        node = self.node_task(400).node
        self.assertTrue(image_policy.renewal_due(node, now=self.now))
        node = self.node_task(401).node
        self.assertFalse(image_policy.renewal_due(node, now=self.now))
        node.instance_info['image_url'] = 'http://conductor/images/x'
        self.assertFalse(image_policy.renewal_due(node, now=self.now),
                         'the conductor\'s own URL does not expire')
        override(self, 'resolve_images_in_ironic', False)
        self.assertFalse(image_policy.renewal_due(self.node_task(10).node,
                                                  now=self.now))

    def renew(self, task):
        with mock.patch.object(image_policy.time, 'time',
                               return_value=self.now):
            self.iface.renew_image_url(task)

    def test_renews_through_ironic_and_tells_the_service(self):
        task = self.node_task(300)
        self.renew(task)
        self.glance.swift_temp_url.assert_called_once_with({'id': GLANCE_ID})
        new = self.NEW % (GLANCE_ID, self.now + 1200)
        self.client.replace_image.assert_called_once_with(
            task.node.uuid, 'ironic-1',
            {'image_source': new, 'image_os_hash_algo': 'sha512',
             'image_os_hash_value': SHA512, 'image_disk_format': 'raw'})
        self.assertEqual(new, task.node.instance_info['image_url'])
        task.upgrade_lock.assert_called_once()
        self.assertEqual(1, task.node.saved)

    def test_not_due_or_cached_asks_nothing(self):
        self.renew(self.node_task(1000))
        task = self.node_task(300)
        self.glance.swift_temp_url.return_value = task.node.instance_info[
            'image_url']
        self.renew(task)
        self.client.replace_image.assert_not_called()
        self.assertEqual(0, task.node.saved)

    def test_a_failure_keeps_the_old_url_for_the_next_poll(self):
        task = self.node_task(300)
        old = task.node.instance_info['image_url']
        self.client.replace_image.side_effect = smartnic_exc.ServiceUnreachable(
            url='http://svc', error='refused')
        self.renew(task)
        self.assertEqual(old, task.node.instance_info['image_url'])
        task.upgrade_lock.assert_not_called()

    def test_both_polls_renew(self):
        for poll in ('record_progress', 'check_deployment'):
            with self.subTest(poll=poll):
                task = self.node_task(300)
                self.client.get_deployment.return_value = None
                with mock.patch.object(self.iface, 'renew_image_url') as r, \
                        mock.patch.object(deploy, 'manager_utils',
                                          autospec=True):
                    getattr(self.iface, poll)(task)
                r.assert_called_once_with(task)


class SecureBootManagement(fake.FakeManagement):
    def set_secure_boot_state(self, task, state):
        pass


class TestBootMode(PolicyCase):
    HTTP = {'image_source': 'http://i/x.raw', 'image_checksum': MD5}

    def test_unknown_boot_mode_is_refused(self):
        self.refused(self.HTTP, r"'boot_mode' from properties/capabilities "
                                r"has an invalid value: 'legacy'",
                     properties={'capabilities': 'boot_mode:legacy'})
        self.refused(dict(self.HTTP, capabilities={'boot_mode': 'efi'}),
                     r"'boot_mode' from instance_info\['capabilities'\]")

    def test_instance_boot_mode_must_agree_with_the_node(self):
        self.refused(dict(self.HTTP, capabilities={'boot_mode': 'uefi'}),
                     r'boot mode uefi violates node properties/capabilities '
                     r'bios', properties={'capabilities': 'boot_mode:bios'})

    def test_secure_boot_needs_a_management_interface_that_does_it(self):
        ii = dict(self.HTTP, capabilities={'secure_boot': 'true'})
        for mgmt in (fake.FakeManagement(),
                     object.__new__(ipmitool.IPMIManagement)):
            with self.subTest(mgmt=type(mgmt).__name__):
                self.refused(ii, r'requests secure boot.*cannot enable it',
                             management=mgmt)
        self.accepted(ii, management=SecureBootManagement())

    def test_bad_root_device_hints_are_refused(self):
        self.refused(dict(self.HTTP, root_device={'size': 'big'}),
                     r'root device hints')

    def test_the_deploy_step_syncs_the_boot_mode_and_boot_sets_secure_boot(
            self):
        task = self.task(self.HTTP)
        self.client.get_deployment.return_value = None
        self.client.create_deployment.return_value = {'state': 'attaching'}
        with mock.patch.object(deploy, 'manager_utils', autospec=True), \
                mock.patch.object(deploy, 'boot_mode_utils',
                                  autospec=True) as bmu:
            self.iface.deploy(task)
            bmu.sync_boot_mode.assert_called_once_with(task)
            bmu.configure_secure_boot_if_needed.assert_not_called()
            self.client.get_deployment.return_value = {'state': 'ready'}
            self.iface.boot_instance(task)
            bmu.configure_secure_boot_if_needed.assert_called_once_with(task)


if __name__ == '__main__':
    unittest.main()
