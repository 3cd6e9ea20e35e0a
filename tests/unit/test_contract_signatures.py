"""Each implementation of a typed contract (cna_agent/contracts.py) has every method the
Protocol declares, with the same parameters. Protocols are not checked at run time, and a
method of the same name defined twice in a class silently keeps the last one: a DiskProvider
method once shadowed by the storage service's RPC method of the same name, and only the e2e
deploy found it."""

from __future__ import annotations

import inspect

import pytest

from cna_agent.compute.resolvers import LocalFileResolver, NoNetworkResolver
from cna_agent.contracts import DiskProvider, PortProvider
from cna_agent.storage.service import StorageService


def _methods(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(protocol).items()
            if callable(fn) and not name.startswith("_")}


#: (protocol, implementation, whether it implements all of it). The local-file resolver stands in
#: for storage only where compute binds disks without a storage subsystem (compute/binder.py);
#: what it does define must still match.
CASES = [(DiskProvider, StorageService, True), (DiskProvider, LocalFileResolver, False),
         (PortProvider, NoNetworkResolver, True)]


@pytest.mark.parametrize("protocol,impl,complete", CASES)
def test_implementations_match_their_protocol(protocol: type, impl: type, complete: bool) -> None:
    for name, want in _methods(protocol).items():
        got = getattr(impl, name, None)
        if got is None and not complete:
            continue
        assert got is not None, f"{impl.__name__} lacks {protocol.__name__}.{name}"
        params = [(p.name, p.kind) for p in inspect.signature(got).parameters.values()]
        expected = [(p.name, p.kind) for p in want.parameters.values()]
        # an implementation may take more keyword arguments with defaults, never fewer
        assert params[:len(expected)] == expected, f"{impl.__name__}.{name}{inspect.signature(got)} vs {want}"
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(getattr(protocol, name)), name
