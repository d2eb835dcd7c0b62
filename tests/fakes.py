"""Small in-memory stand-ins for the layers a test is not about."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

from twisted.internet import defer
from zope.interface import implementer

from igdpcp.interfaces import IPortMappingService
from igdpcp.iwf import errors
from igdpcp.iwf.model import MappingView


@implementer(IPortMappingService)
class FakePortMappingService:
    """A per-subscriber mapping table with miniupnpd-like semantics and no PCP.

    ``fail_next[method] = error`` makes the next call of ``method`` fail with it;
    ``hold = True`` leaves add_mapping's Deferred unfired (in ``held``).
    ``calls`` records (method, args) of every call.
    """

    def __init__(self, external: IPv4Address | None = IPv4Address("198.51.100.7")):
        self.tables: dict[str, list[MappingView]] = {}
        self.external = external
        self.connected = True
        self.fail_next: dict[str, Exception] = {}
        self.hold = False
        self.held: list[defer.Deferred] = []
        self.calls: list[tuple[str, tuple]] = []
        self.observers: dict[str, list] = {}

    def _enter(self, method, *args):
        self.calls.append((method, args))
        error = self.fail_next.pop(method, None)
        if error is not None:
            raise error

    def _table(self, subscriber) -> list[MappingView]:
        return self.tables.setdefault(subscriber.key, [])

    def add_mapping(self, caller, request, any_port=False):
        try:
            self._enter("add_mapping", caller, request, any_port)
        except errors.IWFError:
            return defer.fail()
        table = self._table(caller.subscriber)
        client = request.internal_client or caller.address

        def holder(port):
            return next((v for v in table if (v.remote_host, v.external_port, v.protocol)
                         == (request.remote_host, port, request.protocol)), None)

        port = request.external_port
        current = holder(port) if port else None
        if current is not None and current.internal_client != client:
            if not any_port:
                return defer.fail(errors.Conflict())
            current = None
            port = 0
        if port == 0:
            port = next(p for p in range(1024, 65536) if holder(p) is None)
        view = MappingView(
            remote_host=request.remote_host, external_port=port, protocol=request.protocol,
            internal_port=request.internal_port, internal_client=client, enabled=request.enabled,
            description=request.description, lease=request.lease,
            lease_remaining=request.lease or 0, external_address=self.external,
        )
        if current is not None:
            table[table.index(current)] = view
        else:
            table.append(view)
        d = defer.Deferred() if self.hold else defer.succeed(view)
        if self.hold:
            self.held.append((d, view))
        return d

    def delete_mapping(self, caller, key):
        try:
            self._enter("delete_mapping", caller, key)
        except errors.IWFError:
            return defer.fail()
        table = self._table(caller.subscriber)
        for view in table:
            if view.key == key:
                table.remove(view)
                return defer.succeed(None)
        return defer.fail(errors.NoSuchEntry())

    def delete_range(self, caller, start_port, end_port, protocol, manage):
        try:
            self._enter("delete_range", caller, start_port, end_port, protocol, manage)
        except errors.IWFError:
            return defer.fail()
        table = self._table(caller.subscriber)
        doomed = self._select(caller, table, start_port, end_port, protocol, manage)
        for view in doomed:
            table.remove(view)
        return defer.succeed(len(doomed))

    def get_specific(self, caller, key):
        try:
            self._enter("get_specific", caller, key)
        except errors.IWFError:
            return defer.fail()
        for view in self._table(caller.subscriber):
            if view.key == key:
                return defer.succeed(view)
        return defer.fail(errors.NoSuchEntry())

    def get_generic(self, caller, index):
        self._enter("get_generic", caller, index)
        table = self._table(caller.subscriber)
        if index >= len(table):
            raise errors.IndexOutOfRange()
        return table[index]

    def list_mappings(self, caller, start_port, end_port, protocol, manage, limit):
        self._enter("list_mappings", caller, start_port, end_port, protocol, manage, limit)
        found = self._select(caller, self._table(caller.subscriber), start_port, end_port, protocol, manage)
        return found[:limit] if limit else found

    def mapping_count(self, subscriber):
        self._enter("mapping_count", subscriber)
        return len(self._table(subscriber))

    def external_address(self, caller):
        self._enter("external_address", caller)
        return defer.succeed(self.external)

    def connection_status(self, caller):
        self._enter("connection_status", caller)
        return defer.succeed(self.connected)

    def state(self, subscriber):
        return {"mappings": len(self._table(subscriber)), "update_id": 0, "external_address": None}

    def add_observer(self, subscriber, observer):
        self.observers.setdefault(subscriber.key, []).append(observer)

    def remove_observer(self, subscriber, observer):
        self.observers.get(subscriber.key, []).remove(observer)

    @staticmethod
    def _select(caller, table, start, end, protocol, manage):
        return [v for v in table if start <= v.external_port <= end and v.protocol == protocol
                and (manage or v.internal_client == caller.address)]

    def set_lease_remaining(self, subscriber, index, seconds):
        """Let time pass for one mapping (tests of lease reporting)."""
        table = self._table(subscriber)
        table[index] = replace(table[index], lease_remaining=seconds)
