"""How a restarted source reads a migration it left behind (compute/migration_recovery.job_state).

libvirt stops and undefines the source domain at the end of a job, so each read may meet the
domain half-gone; real errors are built with libvirt's own error class and codes (the moment
cannot be produced on demand with a real daemon, the e2e fault test meets it only under load).
"""

from __future__ import annotations

import libvirt
import pytest

from cna_agent.compute.migration_recovery import job_state


def _error(code: int, message: str) -> libvirt.libvirtError:
    exc = libvirt.libvirtError(message)
    exc.err = (code, 0, message, 2, "", None, None, 0, 0)
    return exc


NO_DOMAIN = _error(libvirt.VIR_ERR_NO_DOMAIN, "Domain not found: no domain with matching uuid")
NOT_RUNNING = _error(libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running")


class _Dom:
    def __init__(self, job=None, state=None, info=None):
        self._job, self._state, self._info = job, state, info

    @staticmethod
    def _answer(value):
        if isinstance(value, Exception):
            raise value
        return value

    def jobStats(self, flags):
        return self._answer(self._job)

    def state(self):
        return self._answer(self._state)

    def info(self):
        return self._answer(self._info)


class _Conn:
    def __init__(self, dom):
        self.dom = dom

    def lookupByUUIDString(self, uuid):
        if isinstance(self.dom, Exception):
            raise self.dom
        return self.dom


RUNNING = [libvirt.VIR_DOMAIN_RUNNING, 1]


@pytest.mark.parametrize("dom, expected", [
    (NO_DOMAIN, "gone"),
    (_Dom({"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED}, RUNNING, [1, 262144, 262144, 1, 0]), "job"),
    (_Dom({"type": libvirt.VIR_DOMAIN_JOB_NONE}, RUNNING, [1, 262144, 262144, 1, 0]), "idle"),
    # stopped as migrated, not yet undefined
    (_Dom({"type": 0}, [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED], [5, 0, 0, 1, 0]), "gone"),
    # the job read failed as "not running", then the domain was undefined (seen in CI)
    (_Dom(NOT_RUNNING, NO_DOMAIN, NO_DOMAIN), "gone"),
    (_Dom({"type": 0}, RUNNING, NO_DOMAIN), "gone"),
    (_Dom(NO_DOMAIN, NO_DOMAIN, NO_DOMAIN), "gone"),
    # a job read that fails for another reason counts as no job; the state decides
    (_Dom(NOT_RUNNING, RUNNING, NOT_RUNNING), "idle"),
])
def test_job_state_reads_a_half_gone_domain_as_gone(dom, expected):
    assert job_state(_Conn(dom), "u")[0] == expected


def test_other_libvirt_failures_are_not_taken_for_an_answer():
    broken = _error(libvirt.VIR_ERR_INTERNAL_ERROR, "connection broke")
    with pytest.raises(libvirt.libvirtError):
        job_state(_Conn(broken), "u")
    with pytest.raises(libvirt.libvirtError):
        job_state(_Conn(_Dom({"type": 0}, broken, [1, 0, 0, 1, 0])), "u")
