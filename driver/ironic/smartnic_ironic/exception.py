"""Exceptions of the smartnic-streaming deploy interface.

Every message says what failed and, where the plugin can know it, what the
operator should fix; the driver service's own message is always included.
"""

from ironic.common import exception
from ironic.common.i18n import _


class SmartNICError(exception.IronicException):
    _msg_fmt = _('SmartNIC streaming deploy failed: %(reason)s')


class ServiceUnreachable(SmartNICError):
    _msg_fmt = _('Cannot reach the SmartNIC driver service at %(url)s: '
                 '%(error)s. Check that smartnic-driver is running and that '
                 '[smartnic]driver_url points to it.')


class ServiceError(SmartNICError):
    """The driver service answered with an error body {code, message}."""

    _msg_fmt = _('The SmartNIC driver service refused %(what)s '
                 '(HTTP %(status)s): %(error_code)s: %(error)s')

    def __init__(self, message=None, **kwargs):
        # Kept apart from the message: callers map them to Ironic's
        # exceptions (a bad field is an invalid parameter, not a crash).
        self.status = kwargs.get('status')
        self.error_code = kwargs.get('error_code')
        self.error = kwargs.get('error')
        self.retryable = kwargs.pop('retryable', False)
        self.field = kwargs.pop('field', None)
        super().__init__(message, **kwargs)


class DeploymentFailed(SmartNICError):
    _msg_fmt = _('The SmartNIC driver service could not prepare the '
                 'streaming disk of node %(node)s: %(error)s')


class DeploymentTimeout(SmartNICError):
    _msg_fmt = _('Timed out after %(timeout)s s waiting for the SmartNIC '
                 'driver service to make the streaming disk of node %(node)s '
                 'ready (deployment state %(state)s%(detail)s). Check that '
                 'the DPU agent at driver_info["smartnic_agent_url"] is up '
                 'and reachable from the driver service, or raise '
                 '[smartnic]deploy_timeout.')


class TeardownFailed(SmartNICError):
    _msg_fmt = _('The SmartNIC driver service did not tear down the '
                 'streaming disk of node %(node)s: %(error)s')


class CleaningFailed(SmartNICError):
    _msg_fmt = _('The SmartNIC driver service could not run clean step '
                 '%(step)s on the DPU target of node %(node)s: %(error)s')
