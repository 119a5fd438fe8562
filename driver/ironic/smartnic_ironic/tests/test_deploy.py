"""Unit tests of the plugin's own logic: field checks, the service client
against a real local HTTP server, and the poll's decisions (Ironic's conductor
utilities mocked; the end-to-end behaviour on a real Ironic is
tests/integration/ironic.test.ts).

Run: /usr/bin/python3 -m unittest discover -s driver/ironic -t driver/ironic
"""

import http.server
import json
import os
import re
import threading
import time
import unittest
from unittest import mock

from ironic.common import exception
from ironic.common import states

from smartnic_ironic import client as service_client
from smartnic_ironic import conf as smartnic_conf
from smartnic_ironic import deploy
from smartnic_ironic import exception as smartnic_exc

CONF = smartnic_conf.CONF
DOCS = os.path.join(os.path.dirname(__file__), '..', '..', '..', '..', 'docs',
                    'ironic.md')


class FakeNode(object):
    def __init__(self, driver_info=None, instance_info=None,
                 provision_state=states.AVAILABLE, dii=None, properties=None):
        self.uuid = '1be26c0b-03f2-4d2e-ae87-c02d7f33c123'
        self.properties = properties or {}
        self.driver_info = driver_info or {}
        self.instance_info = instance_info or {}
        self.driver_internal_info = dict(dii or {})
        self.properties = properties or {}
        self.provision_state = provision_state
        self.deploy_interface = deploy.INTERFACE_NAME
        self.management_interface = 'fake'
        self.saved = 0

    def set_driver_internal_info(self, k, v):
        self.driver_internal_info[k] = v

    def set_instance_info(self, k, v):
        self.instance_info[k] = v

    def del_driver_internal_info(self, k):
        return self.driver_internal_info.pop(k, None)

    def save(self):
        self.saved += 1


GOOD_DI = {'smartnic_agent_url': 'http://dpu:9611',
           'smartnic_target': '/dev/nvme0n1'}


class TestFields(unittest.TestCase):

    def test_missing_required_names_the_keys(self):
        node = FakeNode({'smartnic_agent_url': 'http://dpu:9611'})
        with self.assertRaisesRegex(exception.MissingParameterValue,
                                    'smartnic_target'):
            deploy.parse_driver_info(node)

    def test_parses_and_converts(self):
        node = FakeNode(dict(GOOD_DI, smartnic_region_size='65536',
                             smartnic_bandwidth='0', ipmi_address='x'))
        info = deploy.parse_driver_info(node)
        self.assertEqual(65536, info['smartnic_region_size'])
        self.assertEqual(0, info['smartnic_bandwidth'])
        self.assertNotIn('ipmi_address', info)

    def test_require_verification_is_a_boolean_and_is_forwarded(self):
        # The documented driver_info switch used to be dropped on the way to
        # the service: Ironic's nodes could never require verification.
        node = FakeNode(dict(GOOD_DI, smartnic_require_verification='True'),
                        {'image_source': 'http://i/x.raw'})
        self.assertIs(True, deploy.parse_driver_info(node)[
            'smartnic_require_verification'])
        body = service_client.DriverServiceClient.request_body(node)
        self.assertIs(True,
                      body['driver_info']['smartnic_require_verification'])
        with self.assertRaisesRegex(exception.InvalidParameterValue,
                                    'true or false'):
            deploy.parse_driver_info(FakeNode(dict(
                GOOD_DI, smartnic_require_verification='maybe')))

    def test_refuses_bad_values(self):
        for extra, pattern in (
                ({'smartnic_agent_url': 'dpu:9611'}, 'http'),
                ({'smartnic_target': 'nvme0n1'}, 'absolute'),
                ({'smartnic_region_size': 3000}, 'power of two'),
                ({'smartnic_region_size': 'big'}, 'integer'),
                ({'smartnic_bandwidth': -1}, 'bytes/s'),
                ({'smartnic_peer_url': 'dpu-7:9611'}, 'base URL'),
                ({'smartnic_peer_url': 'http://dpu-7:9611/agent'},
                 'no path')):
            with self.subTest(extra=extra):
                with self.assertRaisesRegex(exception.InvalidParameterValue,
                                            pattern):
                    deploy.parse_driver_info(FakeNode(dict(GOOD_DI, **extra)))

    def test_peer_url_and_rack_are_forwarded(self):
        node = FakeNode(dict(GOOD_DI, smartnic_peer_url='http://10.0.12.7:9611',
                             smartnic_rack='r12'),
                        {'image_source': 'http://i/x.raw'})
        info = deploy.parse_driver_info(node)
        self.assertEqual('r12', info['smartnic_rack'])
        body = service_client.DriverServiceClient.request_body(node)
        self.assertEqual('http://10.0.12.7:9611',
                         body['driver_info']['smartnic_peer_url'])
        self.assertEqual('r12', body['driver_info']['smartnic_rack'])

    def test_image_source_required(self):
        with self.assertRaisesRegex(exception.MissingParameterValue,
                                    'image_source'):
            deploy.check_instance_info(FakeNode(GOOD_DI))
        deploy.check_instance_info(
            FakeNode(GOOD_DI, {'image_source': 'glance://x'}))

    def test_root_gb_must_be_whole_gib(self):
        for bad in ('ten', -1, '1.5'):
            with self.assertRaisesRegex(exception.InvalidParameterValue,
                                        'root_gb'):
                deploy.check_instance_info(FakeNode(
                    GOOD_DI, {'image_source': 'http://i/x', 'root_gb': bad}))
        deploy.check_instance_info(
            FakeNode(GOOD_DI, {'image_source': 'http://i/x', 'root_gb': '8'}))

    def test_request_body_carries_only_known_fields(self):
        node = FakeNode(dict(GOOD_DI, ipmi_password='secret',
                             smartnic_bandwidth='100'),
                        {'image_source': 'http://i/x.raw', 'root_gb': '10',
                         'capabilities': {'boot_mode': 'uefi'},
                         'configdrive': {'user_data': 'raw dict form'}})
        body = service_client.DriverServiceClient.request_body(
            node, 'd1', configdrive='H4sI...')
        # root_gb as an integer; the config drive as Ironic resolved it, never
        # the raw instance_info value.
        self.assertEqual({'image_source': 'http://i/x.raw', 'root_gb': 10,
                          'configdrive': 'H4sI...'},
                         body['instance_info'])
        node.instance_info['root_gb'] = 0
        self.assertNotIn('root_gb', service_client.DriverServiceClient
                         .request_body(node)['instance_info'])
        self.assertNotIn('ipmi_password', body['driver_info'])
        self.assertEqual(100, body['driver_info']['smartnic_bandwidth'])
        self.assertEqual('d1', body['deployment_id'])


class TestRootDeviceHints(unittest.TestCase):
    """properties.root_device against the NVMe disk the DPU emulates."""

    def disk(self, hints, ii=None):
        node = FakeNode(GOOD_DI, dict({'image_source': 'http://i/x'}, **(ii or {})),
                        properties={'root_device': hints})
        return deploy.emulated_disk(node)

    def test_no_hints_nothing_fixed(self):
        self.assertEqual(({}, None), deploy.emulated_disk(FakeNode(GOOD_DI)))

    def test_exact_serial_wwn_model_are_presented(self):
        device, size = self.disk({'serial': 'SN-42', 'wwn': 'eui.02aabbccddeeff00',
                                  'model': 'DPU Disk'})
        self.assertEqual({'serial': 'SN-42', 'wwn': 'eui.02aabbccddeeff00',
                          'model': 'DPU Disk'}, device)
        self.assertEqual({'serial': 'SN-42'},
                         self.disk({'serial': 's== SN-42'})[0])
        self.assertEqual({}, self.disk({'serial': '<in> SN'})[0])
        self.assertIsNone(size)

    def test_size_hint_sizes_the_disk_or_must_match_root_gb(self):
        self.assertEqual(({}, 40), self.disk({'size': 40}))
        self.assertEqual(({}, None), self.disk({'size': 40}, {'root_gb': 40}))
        with self.assertRaisesRegex(exception.InvalidParameterValue,
                                    'does not match the NVMe disk'):
            self.disk({'size': 40}, {'root_gb': 20})
        self.assertEqual(({}, None), self.disk({'size': '>= 10'},
                                               {'root_gb': 20}))

    def test_what_an_emulated_nvme_cannot_be_is_refused(self):
        for hints, pattern in (({'rotational': True}, 'does not match'),
                               ({'name': '/dev/sda'}, 'does not match'),
                               ({'hctl': '0:0:0:0'}, 'has no hctl'),
                               ({'vendor': 'ATA'}, 'has no vendor'),
                               ({'wwn': '0x5000c500a1b2c3d4'}, 'EUI-64'),
                               ({'serial': 'x' * 21}, 'longer than'),
                               ({'size': 'big'}, 'root_device')):
            with self.assertRaisesRegex(exception.InvalidParameterValue,
                                        pattern):
                self.disk(hints)
        self.assertEqual(({}, None), self.disk({'name': '/dev/nvme0n1',
                                                'rotational': False}))

    def test_request_body_carries_the_identity(self):
        node = FakeNode(GOOD_DI, {'image_source': 'http://i/x'})
        body = service_client.DriverServiceClient.request_body(
            node, device={'serial': 'sn-42'}, root_gb=40)
        self.assertEqual({'serial': 'sn-42'}, body['device'])
        self.assertEqual(40, body['instance_info']['root_gb'])


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers from the class's script: path -> list of (status, body)."""
    script = {}
    seen = []
    bodies = []

    def _answer(self):
        self.seen.append((self.command, self.path,
                          self.headers.get('Authorization')))
        length = int(self.headers.get('Content-Length') or 0)
        if length:
            self.bodies.append(json.loads(self.rfile.read(length)))
        key = '%s %s' % (self.command, self.path.split('?')[0])
        replies = self.script.get(key) or [(500, {'code': 'X',
                                                  'message': 'unscripted'})]
        status, body = replies.pop(0) if len(replies) > 1 else replies[0]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


class TestClient(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        cls.url = 'http://127.0.0.1:%d' % cls.server.server_address[1]
        threading.Thread(target=cls.server.serve_forever, daemon=True).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()

    def setUp(self):
        Handler.script = {}
        Handler.seen = []
        Handler.bodies = []
        CONF.set_override('driver_url', self.url, 'smartnic')
        CONF.set_override('token', 'tok-0123456789abcdef', 'smartnic')
        CONF.set_override('request_attempts', 3, 'smartnic')
        self.addCleanup(CONF.clear_override, 'driver_url', 'smartnic')
        self.addCleanup(CONF.clear_override, 'token', 'smartnic')
        self.addCleanup(CONF.clear_override, 'request_attempts', 'smartnic')

    def test_error_body_becomes_service_error(self):
        Handler.script['POST /v1/validate'] = [(422, {
            'code': 'DRV_ERR_IMAGE_SOURCE', 'retryable': False,
            'message': 'http://i/x answered HTTP 404 to a range request',
            'field': 'instance_info.image_source'})]
        node = FakeNode(GOOD_DI, {'image_source': 'http://i/x'})
        with self.assertRaises(smartnic_exc.ServiceError) as cm:
            service_client.DriverServiceClient().validate(node)
        e = cm.exception
        self.assertEqual(422, e.status)
        self.assertEqual('instance_info.image_source', e.field)
        self.assertIn('answered HTTP 404', str(e))
        self.assertEqual(1, len(Handler.seen), 'a 422 is not retried')
        self.assertEqual('Bearer tok-0123456789abcdef', Handler.seen[0][2])

    def test_validate_maps_to_invalid_parameter(self):
        Handler.script['POST /v1/validate'] = [(422, {
            'code': 'DRV_ERR_INVALID', 'retryable': False,
            'message': 'driver_info.smartnic_agent_url http://dpu does not '
                       'answer', 'field': 'driver_info.smartnic_agent_url'})]
        task = mock.Mock(node=FakeNode(GOOD_DI, {'image_source': 'http://i',
                                                 'image_checksum': 'a' * 64}))
        with self.assertRaisesRegex(exception.InvalidParameterValue,
                                    'does not answer'):
            deploy.SmartNICStreamingDeploy().validate(task)

    def test_5xx_is_retried(self):
        path = '/v1/deployments/%s' % FakeNode().uuid
        Handler.script['GET ' + path] = [
            (503, {'code': 'DRV_ERR_REDIS', 'message': 'down',
                   'retryable': True}),
            (200, {'state': 'ready'})]
        c = service_client.DriverServiceClient()
        d = c.get_deployment(FakeNode().uuid)
        self.assertEqual('ready', d['state'])
        self.assertEqual(2, len(Handler.seen))

    def test_404_is_none_where_absence_is_an_answer(self):
        path = '/v1/deployments/%s' % FakeNode().uuid
        Handler.script['GET ' + path] = [(404, {'code': 'DRV_ERR_NOT_FOUND',
                                                'message': 'no'})]
        Handler.script['DELETE ' + path] = [(404, {'code': 'DRV_ERR_NOT_FOUND',
                                                   'message': 'no'})]
        c = service_client.DriverServiceClient()
        self.assertIsNone(c.get_deployment(FakeNode().uuid))
        self.assertIsNone(c.delete_deployment(FakeNode().uuid))
        self.assertIn('wipe=true', Handler.seen[-1][1])

    def test_unreachable(self):
        CONF.set_override('request_attempts', 1, 'smartnic')
        c = service_client.DriverServiceClient(url='http://127.0.0.1:9')
        with self.assertRaisesRegex(smartnic_exc.ServiceUnreachable,
                                    r'\[smartnic\]driver_url'):
            c.get_deployment('n')


class TestTakeOver(unittest.TestCase):
    """Adoption and conductor take-over look the deployment up and say so."""

    def setUp(self):
        self.iface = deploy.SmartNICStreamingDeploy()
        p = mock.patch.object(service_client, 'DriverServiceClient',
                              autospec=True)
        self.client = p.start().return_value
        self.addCleanup(p.stop)
        p = mock.patch.object(deploy.manager_utils, 'node_history_record',
                              autospec=True)
        self.history = p.start()
        self.addCleanup(p.stop)
        # objects.Conductor exists once the conductor has registered Ironic's
        # objects (objects.register_all), which these tests do not.
        p = mock.patch.object(deploy.objects, 'Conductor', create=True)
        self.conductors = p.start().list
        self.addCleanup(p.stop)
        self.conductors.return_value = [mock.Mock(id=7, hostname='cond-a'),
                                        mock.Mock(id=8, hostname='cond-b')]
        CONF.set_override('host', 'cond-b')
        self.addCleanup(CONF.clear_override, 'host')

    def task(self, state, affinity=None):
        node = FakeNode(GOOD_DI, provision_state=state)
        node.conductor_affinity = affinity
        return mock.Mock(node=node)

    def event(self):
        """The one history entry recorded: (text, event_type)."""
        self.history.assert_called_once()
        kw = self.history.call_args.kwargs
        self.assertNotIn('error', kw)  # an event, not the node's last_error
        return kw['event'], kw['event_type']

    def test_adopting_without_a_deployment_fails_saying_so(self):
        self.client.get_deployment.return_value = None
        with self.assertRaisesRegex(exception.InstanceDeployFailure,
                                    'no deployment of it'):
            self.iface.take_over(self.task(states.ADOPTING))
        self.client.get_deployment.return_value = {
            'deployment_id': 'd1', 'state': 'failed', 'last_error': 'boom'}
        with self.assertRaisesRegex(exception.InstanceDeployFailure,
                                    'state failed .boom'):
            self.iface.take_over(self.task(states.ADOPTING))
        self.history.assert_not_called()

    def test_adopting_a_served_disk_records_it(self):
        self.client.get_deployment.return_value = {
            'deployment_id': 'd1', 'state': 'ready',
            'progress': {'fraction': 0.25}}
        task = self.task(states.ADOPTING)
        self.iface.take_over(task)
        self.assertEqual('d1', task.node.driver_internal_info[
            deploy.DEPLOYMENT_KEY])
        self.assertEqual('ready', task.node.driver_internal_info[
            deploy.PROGRESS_KEY]['state'])
        self.assertEqual(('SmartNIC deployment d1 (ready, 25.0% local) '
                          'adopted by conductor cond-b', states.ADOPTION),
                         self.event())

    def test_take_over_of_an_active_node_records_who_took_it_from_whom(self):
        self.client.get_deployment.return_value = {
            'deployment_id': 'd1', 'state': 'complete',
            'progress': {'fraction': 1}}
        task = self.task(states.ACTIVE, affinity=7)
        self.iface.take_over(task)
        self.assertEqual('d1', task.node.driver_internal_info[
            deploy.DEPLOYMENT_KEY])
        self.assertEqual('complete', task.node.driver_internal_info[
            deploy.PROGRESS_KEY]['state'])
        self.assertEqual(1, task.node.saved)
        self.assertEqual(('SmartNIC deployment d1 (complete, 100.0% local) '
                          'taken over by conductor cond-b from cond-a',
                          states.TAKEOVER), self.event())

    def test_take_over_of_an_active_node_without_one_only_warns(self):
        self.client.get_deployment.return_value = None
        task = self.task(states.ACTIVE, affinity=7)
        self.iface.take_over(task)
        self.assertEqual(0, task.node.saved)
        text, kind = self.event()
        self.assertEqual(states.TAKEOVER, kind)
        self.assertRegex(text, 'cond-b from cond-a; .*no deployment of it')

    def test_a_previous_conductor_that_cannot_be_named_is_given_by_id(self):
        self.client.get_deployment.return_value = {
            'deployment_id': 'd1', 'state': 'complete', 'progress': {}}
        self.conductors.side_effect = RuntimeError('db gone')
        self.iface.take_over(self.task(states.ACTIVE, affinity=9))
        self.assertRegex(self.event()[0], 'by conductor cond-b from conductor '
                         'id 9$')

    def test_an_unreachable_service_fails_the_take_over(self):
        # Ironic keeps the old affinity and tries again at its next sync.
        self.client.get_deployment.side_effect = (
            smartnic_exc.ServiceUnreachable(url='http://x', error='refused'))
        with self.assertRaises(smartnic_exc.ServiceUnreachable):
            self.iface.take_over(self.task(states.ACTIVE, affinity=7))
        self.history.assert_not_called()


class TestCleaningClient(unittest.TestCase):
    """The cleaning calls, against TestClient's scripted server."""

    setUpClass = classmethod(TestClient.setUpClass.__func__)
    tearDownClass = classmethod(TestClient.tearDownClass.__func__)
    setUp = TestClient.setUp

    def test_start_cleaning_posts_the_step_and_driver_info(self):
        node = FakeNode(dict(GOOD_DI, smartnic_region_size='65536',
                             ipmi_password='secret'))
        path = '/v1/nodes/%s/cleaning' % node.uuid
        Handler.script['POST ' + path] = [(202, {'cleaning_id': 'c-1',
                                                 'state': 'queued'})]
        c = service_client.DriverServiceClient().start_cleaning(
            node, 'erase_devices')
        self.assertEqual('c-1', c['cleaning_id'])
        self.assertEqual(('POST', path), Handler.seen[0][:2])
        body = Handler.bodies[0]
        self.assertEqual('erase_devices', body['step'])
        self.assertEqual(65536, body['driver_info']['smartnic_region_size'])
        self.assertNotIn('ipmi_password', body['driver_info'])
        self.assertEqual(['driver_info', 'step'], sorted(body))

    def test_absent_cleaning_is_none(self):
        path = '/v1/nodes/%s/cleaning' % FakeNode().uuid
        for verb in ('GET', 'DELETE'):
            Handler.script['%s %s' % (verb, path)] = [
                (404, {'code': 'DRV_ERR_NOT_FOUND', 'message': 'no'})]
        c = service_client.DriverServiceClient()
        self.assertIsNone(c.get_cleaning(FakeNode().uuid))
        self.assertIsNone(c.cancel_cleaning(FakeNode().uuid))

    def test_conflict_is_not_retried(self):
        node = FakeNode(GOOD_DI)
        Handler.script['POST /v1/nodes/%s/cleaning' % node.uuid] = [
            (409, {'code': 'DRV_ERR_CONFLICT', 'retryable': False,
                   'message': 'node has deployment d1'})]
        with self.assertRaisesRegex(smartnic_exc.ServiceError,
                                    'has deployment'):
            service_client.DriverServiceClient().start_cleaning(
                node, 'erase_devices')
        self.assertEqual(1, len(Handler.seen))


class TestCleanSteps(unittest.TestCase):
    """The clean steps, their priorities, and prepare/tear_down_cleaning."""

    def setUp(self):
        self.iface = deploy.SmartNICStreamingDeploy()
        self.node = FakeNode(GOOD_DI, provision_state=states.CLEANING)
        self.task = mock.Mock(node=self.node)
        p = mock.patch.object(service_client, 'DriverServiceClient',
                              autospec=True)
        self.client = p.start().return_value
        self.addCleanup(p.stop)

    def steps(self):
        return {s['step']: s for s in self.iface.get_clean_steps(self.task)}

    def test_two_steps_on_the_deploy_interface_without_ramdisk(self):
        steps = self.steps()
        self.assertEqual({'erase_devices', 'erase_devices_metadata'},
                         set(steps))
        for s in steps.values():
            self.assertEqual('deploy', s['interface'])
            self.assertTrue(s['abortable'])
            self.assertFalse(s['requires_ramdisk'])
            self.assertIsNone(s['argsinfo'])

    def test_priorities_are_ipas_when_deploy_options_are_unset(self):
        self.assertIsNone(CONF.deploy.erase_devices_priority)
        self.assertIsNone(CONF.deploy.erase_devices_metadata_priority)
        steps = self.steps()
        self.assertEqual(10, steps['erase_devices']['priority'])
        self.assertEqual(99, steps['erase_devices_metadata']['priority'])

    def test_deploy_options_override_the_priorities_at_each_call(self):
        CONF.set_override('erase_devices_priority', 0, 'deploy')
        CONF.set_override('erase_devices_metadata_priority', 42, 'deploy')
        self.addCleanup(CONF.clear_override, 'erase_devices_priority',
                        'deploy')
        self.addCleanup(CONF.clear_override,
                        'erase_devices_metadata_priority', 'deploy')
        steps = self.steps()
        self.assertEqual(0, steps['erase_devices']['priority'])
        self.assertEqual(42, steps['erase_devices_metadata']['priority'])
        # The interface's own list is not changed by a call.
        own = {s['step']: s['priority'] for s in self.iface.clean_steps}
        self.assertEqual({'erase_devices': 10, 'erase_devices_metadata': 99},
                         own)

    def test_prepare_cleaning_boots_nothing(self):
        self.assertIsNone(self.iface.prepare_cleaning(self.task))
        self.assertEqual([], self.task.driver.boot.mock_calls)
        self.assertEqual([], self.task.driver.power.mock_calls)
        self.node.driver_info = {'smartnic_agent_url': 'http://dpu:9611'}
        with self.assertRaisesRegex(exception.MissingParameterValue,
                                    'smartnic_target'):
            self.iface.prepare_cleaning(self.task)

    def test_a_step_starts_the_cleaning_and_waits(self):
        self.client.get_deployment.return_value = None
        self.client.start_cleaning.return_value = {
            'cleaning_id': 'c-7', 'step': 'erase_devices', 'state': 'queued',
            'target': '/dev/nvme0n1', 'fraction': 0}
        self.assertEqual(states.CLEANWAIT,
                         self.iface.erase_devices(self.task))
        self.client.start_cleaning.assert_called_once_with(self.node,
                                                           'erase_devices')
        info = self.node.driver_internal_info[deploy.CLEANING_KEY]
        self.assertEqual('c-7', info['cleaning_id'])
        self.assertEqual('erase_devices', info['step'])
        self.assertGreaterEqual(self.node.saved, 1)
        self.client.start_cleaning.reset_mock()
        self.assertEqual(states.CLEANWAIT,
                         self.iface.erase_devices_metadata(self.task))
        self.client.start_cleaning.assert_called_once_with(
            self.node, 'erase_devices_metadata')

    def test_a_leftover_deployment_is_removed_first(self):
        self.client.get_deployment.return_value = {
            'deployment_id': 'd1', 'state': 'failed'}
        self.client.start_cleaning.return_value = {'cleaning_id': 'c-8'}
        with mock.patch.object(self.iface, '_delete_deployment',
                               autospec=True) as delete:
            self.iface.erase_devices(self.task)
        delete.assert_called_once_with(self.task, self.client)

    def test_a_refused_step_raises_with_the_service_reason(self):
        self.client.get_deployment.return_value = None
        self.client.start_cleaning.side_effect = smartnic_exc.ServiceError(
            what='x', status=409, error_code='DRV_ERR_CONFLICT',
            error='node has a cleaning running (erase_devices)')
        with self.assertRaisesRegex(smartnic_exc.CleaningFailed,
                                    'erase_devices_metadata .* '
                                    'DRV_ERR_CONFLICT: node has a cleaning'):
            self.iface.erase_devices_metadata(self.task)
        self.assertNotIn(deploy.CLEANING_KEY, self.node.driver_internal_info)

    def test_tear_down_cleaning_cancels_a_step_of_ours(self):
        self.node.driver_internal_info[deploy.CLEANING_KEY] = {
            'cleaning_id': 'c-1', 'step': 'erase_devices'}
        self.iface.tear_down_cleaning(self.task)
        self.client.cancel_cleaning.assert_called_once_with(self.node.uuid)
        self.assertNotIn(deploy.CLEANING_KEY, self.node.driver_internal_info)

    def test_tear_down_cleaning_after_success_does_nothing(self):
        self.iface.tear_down_cleaning(self.task)
        self.client.cancel_cleaning.assert_not_called()

    def test_tear_down_cleaning_never_raises(self):
        self.node.driver_internal_info[deploy.CLEANING_KEY] = {
            'cleaning_id': 'c-1'}
        self.client.cancel_cleaning.side_effect = \
            smartnic_exc.ServiceUnreachable(url='http://x', error='refused')
        self.iface.tear_down_cleaning(self.task)
        self.assertNotIn(deploy.CLEANING_KEY, self.node.driver_internal_info)


class TestCleaningPoll(unittest.TestCase):
    """check_cleaning's decisions for a node in "clean wait"."""

    def setUp(self):
        self.iface = deploy.SmartNICStreamingDeploy()
        self.node = FakeNode(GOOD_DI, provision_state=states.CLEANWAIT, dii={
            deploy.CLEANING_KEY: {'cleaning_id': 'c-1',
                                  'step': 'erase_devices', 'state': 'queued',
                                  'fraction': 0, 'recorded_at': 0}})
        self.task = mock.Mock(node=self.node)
        p = mock.patch.object(service_client, 'DriverServiceClient',
                              autospec=True)
        self.client = p.start().return_value
        self.addCleanup(p.stop)
        p = mock.patch.object(deploy, 'manager_utils', autospec=True)
        self.mu = p.start()
        self.addCleanup(p.stop)

    def cleaning(self, state, **kw):
        c = {'cleaning_id': 'c-1', 'step': 'erase_devices', 'state': state,
             'fraction': 0.5, 'bytes_done': 1 << 20, 'bytes_total': 2 << 20,
             'method': 'zeroout', 'last_error': None}
        c.update(kw)
        return c

    def test_done_resumes_the_cleaning(self):
        self.client.get_cleaning.return_value = self.cleaning(
            'done', fraction=1)
        self.iface.check_cleaning(self.task)
        self.task.upgrade_lock.assert_called_once()
        self.mu.notify_conductor_resume_clean.assert_called_once_with(
            self.task)
        self.mu.cleaning_error_handler.assert_not_called()
        self.assertNotIn(deploy.CLEANING_KEY, self.node.driver_internal_info)

    def test_failed_fails_the_cleaning_with_the_service_reason(self):
        self.client.get_cleaning.return_value = self.cleaning(
            'failed', last_error='DRV_ERR_AGENT_REJECTED: erasing /dev/x '
                                 'failed: DPU_ERR_ERASE_FAILED: EIO')
        self.iface.check_cleaning(self.task)
        msg = self.mu.cleaning_error_handler.call_args[0][1]
        self.assertIn('erase_devices', msg)
        self.assertIn('DPU_ERR_ERASE_FAILED: EIO', msg)
        self.mu.notify_conductor_resume_clean.assert_not_called()
        self.assertNotIn(deploy.CLEANING_KEY, self.node.driver_internal_info)

    def test_vanished_or_replaced_fails(self):
        for c in (None, self.cleaning('running', cleaning_id='c-2')):
            with self.subTest(c=c):
                self.mu.reset_mock()
                self.node.driver_internal_info[deploy.CLEANING_KEY] = {
                    'cleaning_id': 'c-1', 'step': 'erase_devices'}
                self.client.get_cleaning.return_value = c
                self.iface.check_cleaning(self.task)
                self.assertIn('no longer has cleaning c-1',
                              self.mu.cleaning_error_handler.call_args[0][1])

    def test_running_records_progress_every_progress_interval(self):
        CONF.set_override('progress_interval', 30, 'smartnic')
        self.addCleanup(CONF.clear_override, 'progress_interval', 'smartnic')
        self.client.get_cleaning.return_value = self.cleaning('running')
        self.iface.check_cleaning(self.task)
        info = self.node.driver_internal_info[deploy.CLEANING_KEY]
        self.assertEqual(0.5, info['fraction'])
        self.assertEqual('running', info['state'])
        self.mu.notify_conductor_resume_clean.assert_not_called()
        self.mu.cleaning_error_handler.assert_not_called()
        # Within the interval: not written again.
        self.task.upgrade_lock.reset_mock()
        self.client.get_cleaning.return_value = self.cleaning(
            'running', fraction=0.75)
        self.iface.check_cleaning(self.task)
        self.task.upgrade_lock.assert_not_called()
        self.assertEqual(0.5, self.node.driver_internal_info[
            deploy.CLEANING_KEY]['fraction'])

    def test_waits_for_other_steps_and_an_unreachable_service(self):
        self.client.get_cleaning.side_effect = \
            smartnic_exc.ServiceUnreachable(url='http://x', error='refused')
        self.iface.check_cleaning(self.task)
        self.mu.cleaning_error_handler.assert_not_called()
        del self.node.driver_internal_info[deploy.CLEANING_KEY]
        self.client.get_cleaning.reset_mock()
        self.iface.check_cleaning(self.task)
        self.client.get_cleaning.assert_not_called()

    def test_a_node_that_left_clean_wait_is_left_alone(self):
        self.client.get_cleaning.return_value = self.cleaning('done')

        def upgrade(purpose=None):
            self.node.provision_state = states.CLEANFAIL
        self.task.upgrade_lock.side_effect = upgrade
        self.iface.check_cleaning(self.task)
        self.mu.notify_conductor_resume_clean.assert_not_called()


class TestPoll(unittest.TestCase):
    """check_deployment's decisions for a node in "wait call-back"."""

    def setUp(self):
        self.iface = deploy.SmartNICStreamingDeploy()
        self.node = FakeNode(GOOD_DI, provision_state=states.DEPLOYWAIT,
                             dii={deploy.DEPLOYMENT_KEY: 'd1',
                                  deploy.STARTED_KEY: time.time()})
        self.task = mock.Mock(node=self.node)
        p = mock.patch.object(service_client, 'DriverServiceClient',
                              autospec=True)
        self.client = p.start().return_value
        self.addCleanup(p.stop)
        p = mock.patch.object(deploy, 'manager_utils', autospec=True)
        self.mu = p.start()
        self.addCleanup(p.stop)

    def deployment(self, state, **kw):
        d = {'deployment_id': 'd1', 'state': state, 'last_error': None,
             'progress': {'fraction': 0.25, 'regions_local': 1,
                          'regions_total': 4, 'bytes_fetched': 1},
             'jobs': []}
        d.update(kw)
        return d

    def test_ready_resumes(self):
        self.client.get_deployment.return_value = self.deployment('ready')
        self.iface.check_deployment(self.task)
        self.task.upgrade_lock.assert_called_once()
        self.mu.notify_conductor_resume_deploy.assert_called_once_with(
            self.task)
        self.assertEqual(
            0.25, self.node.driver_internal_info['smartnic_progress'][
                'fraction'])

    def test_attaching_waits(self):
        self.client.get_deployment.return_value = self.deployment('attaching')
        self.iface.check_deployment(self.task)
        self.task.upgrade_lock.assert_not_called()
        self.mu.deploying_error_handler.assert_not_called()

    def test_failed_fails_with_the_service_reason(self):
        self.client.get_deployment.return_value = self.deployment(
            'failed', last_error='DRV_ERR_AGENT_REJECTED: target refused')
        self.iface.check_deployment(self.task)
        msg = self.mu.deploying_error_handler.call_args[0][2]
        self.assertIn('target refused', msg)
        self.mu.notify_conductor_resume_deploy.assert_not_called()

    def test_timeout_abandons_and_fails(self):
        CONF.set_override('deploy_timeout', 5, 'smartnic')
        self.addCleanup(CONF.clear_override, 'deploy_timeout', 'smartnic')
        self.node.driver_internal_info[deploy.STARTED_KEY] = time.time() - 6
        self.client.get_deployment.return_value = self.deployment(
            'attaching', last_error='agent timeout (attempt 2 of 8)')
        self.iface.check_deployment(self.task)
        self.client.delete_deployment.assert_called_once()
        msg = self.mu.deploying_error_handler.call_args[0][2]
        self.assertRegex(msg, 'Timed out after 5 s .* state attaching; last '
                              'error: agent timeout')

    def test_vanished_or_replaced_fails(self):
        for d in (None, self.deployment('ready', deployment_id='other')):
            with self.subTest(d=d):
                self.mu.reset_mock()
                self.client.get_deployment.return_value = d
                self.iface.check_deployment(self.task)
                self.mu.deploying_error_handler.assert_called_once()


class TestHeartbeat(TestPoll):
    """heartbeat(): a push from the driver service checks like the poll."""

    def beat(self, status='end'):
        self.iface.heartbeat(self.task, 'smartnic://%s' % self.node.uuid,
                             '0.1.0', agent_status=status,
                             agent_status_message='streaming disk ready')

    def test_ready_resumes(self):
        self.client.get_deployment.return_value = self.deployment('ready')
        self.beat()
        self.mu.notify_conductor_resume_deploy.assert_called_once_with(
            self.task)

    def test_the_push_is_not_trusted(self):
        # The push says "end", the service still says attaching: wait.
        self.client.get_deployment.return_value = self.deployment('attaching')
        self.beat()
        self.mu.notify_conductor_resume_deploy.assert_not_called()
        self.mu.deploying_error_handler.assert_not_called()

    def test_failed_fails_with_the_service_reason(self):
        self.client.get_deployment.return_value = self.deployment(
            'failed', last_error='DRV_ERR_AGENT_REJECTED: target refused')
        self.beat('error')
        self.assertIn('target refused',
                      self.mu.deploying_error_handler.call_args[0][2])

    def test_ignored_outside_deploy(self):
        self.node.provision_state = states.ACTIVE
        self.beat()
        self.client.get_deployment.assert_not_called()
        self.task.upgrade_lock.assert_not_called()

    def test_waits_for_the_deploy_step_lock(self):
        self.node.provision_state = states.DEPLOYING

        def upgrade(purpose=None):
            self.node.provision_state = states.DEPLOYWAIT
        self.task.upgrade_lock.side_effect = upgrade
        self.client.get_deployment.return_value = self.deployment('ready')
        self.beat()
        self.mu.notify_conductor_resume_deploy.assert_called_once_with(
            self.task)

    def test_locked_leaves_it_to_the_poll(self):
        self.node.provision_state = states.DEPLOYING
        self.task.upgrade_lock.side_effect = exception.NodeLocked(
            node=self.node.uuid, host='c1')
        self.beat()
        self.client.get_deployment.assert_not_called()


class TestCallback(unittest.TestCase):

    def setUp(self):
        self.iface = deploy.SmartNICStreamingDeploy()
        self.node = FakeNode(GOOD_DI, provision_state=states.DEPLOYING)
        self.task = mock.Mock(node=self.node)

    def test_off_by_default(self):
        self.assertIsNone(self.iface._callback(self.task))
        self.assertNotIn('agent_secret_token', self.node.driver_internal_info)

    def test_pregenerates_and_saves_the_token(self):
        CONF.set_override('heartbeat_url', 'http://ironic:6385/v1/',
                          'smartnic')
        self.addCleanup(CONF.clear_override, 'heartbeat_url', 'smartnic')
        cb = self.iface._callback(self.task)
        dii = self.node.driver_internal_info
        self.assertEqual('http://ironic:6385/v1/heartbeat/%s' % self.node.uuid,
                         cb['url'])
        self.assertEqual(dii['agent_secret_token'], cb['agent_token'])
        self.assertTrue(dii['agent_secret_token_pregenerated'])
        self.assertEqual(1, self.node.saved)


class TestTearDown(unittest.TestCase):

    def test_failed_teardown_job_raises(self):
        iface = deploy.SmartNICStreamingDeploy()
        client = mock.Mock()
        client.delete_deployment.return_value = {'state': 'deleting'}
        client.get_deployment.return_value = {
            'state': 'failed', 'last_error': 'agent gone',
            'jobs': [{'queue': 'teardown', 'id': 'teardown-n-d-1',
                      'state': 'failed'}]}
        task = mock.Mock(node=FakeNode())
        with self.assertRaisesRegex(smartnic_exc.TeardownFailed,
                                    'agent gone.*jobs retry teardown-n-d-1'):
            iface._delete_deployment(task, client)

    def test_a_failed_attach_does_not_fail_the_teardown(self):
        # The record may say "failed" (an attach that ended meanwhile) while
        # the teardown job is still running: keep waiting for it.
        iface = deploy.SmartNICStreamingDeploy()
        client = mock.Mock()
        client.delete_deployment.return_value = {'state': 'deleting'}
        client.get_deployment.side_effect = [
            {'state': 'failed', 'jobs': [{'queue': 'teardown',
                                          'state': 'active'}]},
            None]
        with mock.patch.object(deploy.time, 'sleep'):
            iface._delete_deployment(mock.Mock(node=FakeNode()), client)
        self.assertEqual(2, client.get_deployment.call_count)


class TestHardware(unittest.TestCase):

    def test_no_rescue_only(self):
        # AgentRescue would boot a ramdisk and wait for an IPA heartbeat that
        # this deploy interface never gets: refuse rescue at once instead.
        from ironic.drivers.modules import noop
        from smartnic_ironic import hardware
        types = [hardware.SmartNICIPMIHardware]
        if getattr(hardware, 'SmartNICRedfishHardware', None):
            types.append(hardware.SmartNICRedfishHardware)
        for hw in types:
            self.assertEqual([noop.NoRescue], hw().supported_rescue_interfaces)
            self.assertIs(deploy.SmartNICStreamingDeploy,
                          hw().supported_deploy_interfaces[0])


class TestDocs(unittest.TestCase):
    """docs/ironic.md documents every option and node field."""

    def test_every_option_and_property_is_documented(self):
        with open(DOCS) as f:
            text = f.read()
        for opt in smartnic_conf.opts:
            self.assertRegex(text, r'\| `%s` \|' % re.escape(opt.name))
        for prop in deploy.COMMON_PROPERTIES:
            self.assertRegex(text, r'\| `%s` \|' % re.escape(prop))


if __name__ == '__main__':
    unittest.main()
