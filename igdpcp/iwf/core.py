"""The interworking function: RFC 6970 section 5 on per-subscriber tables.

Front ends call the :class:`IPortMappingService` methods with a Caller; this
module applies policy, talks PCP through the client, stores each promised
mapping before answering, and hands live mappings to the :class:`Keeper`.
Design choices (also in the README):

* Own-address rule: a control point maps only to itself; an empty
  InternalClient means the caller.  Hosts on one subscriber LAN may list each
  other's mappings (as on a home router) but change only their own.
* PCP names a mapping by (internal host, protocol, internal port), so one
  internal port gets one external port (iwf.md G.4): a second AddPortMapping
  for the same internal tuple on another external port is a Conflict.
* GetSpecificPortMappingEntry probes the CGN only when the caller has no such
  entry (RFC 6970 section 5.7), deletes the probe mapping at once, and keeps
  its nonce until the delete is confirmed, so a following AddPortMapping on the
  same internal tuple reuses it instead of being refused (iwf.md G.5).
* GetExternalIPAddress comes from the subscriber's own mappings, else from a
  short probe mapping (Discard, TCP 9) deleted at once; reserved addresses are
  never reported (clients.md R7).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

from twisted.internet import defer
from ..logs import logger
from zope.interface import implementer

from ..interfaces import IPCPClientListener, IPortMappingService
from ..pcp.client import MapSpec, PCPTimeout, new_nonce
from ..pcp.constants import ResultCode
from .errors import (
    Conflict,
    IWFError,
    IndexOutOfRange,
    InconsistentParameters,
    InvalidArgument,
    NoSuchEntry,
    NotAuthorized,
    ServerFailure,
    WildcardNotPermitted,
)
from .exchange import CallBound, bounded_map
from .keeper import Keeper, map_spec
from .model import PROTOCOLS, MappingKey
from .policy import Policy
from .records import PROTOCOL_NUMBERS, MappingRecord, SubscriberTable
from .store import StoreError

log = logger(__name__)

PROBE_LIFETIME = 60  # RFC 6970 section 5.7 suggests a short probe, e.g. 60 s
DISCARD_PORT = 9  # RFC 6970 section 4.2: GetExternalIPAddress may map Discard
EXTERNAL_ADDRESS_TTL = 300.0
LIVENESS_TTL = 60.0


def is_reportable(address) -> bool:
    """Whether miniupnpc-based clients would accept this as an external address."""
    return address is not None and address.is_global and not address.is_multicast


@implementer(IPortMappingService, IPCPClientListener)
class InterworkingFunction:
    def __init__(self, reactor, client, store, policy: Policy = Policy(), *,
                 bound: CallBound = CallBound(), probe_specific: bool = True,
                 recovery_rate: float = 200.0, rng: random.Random | None = None):
        self.reactor = reactor
        self.client = client
        self.store = store
        self.policy = policy
        self.bound = bound
        self.probe_specific = probe_specific
        self.rng = rng or random.Random()  # renewal and recovery jitter: no secret in it
        self.stats: Counter = Counter()
        self.tables: dict[str, SubscriberTable] = {}
        self.observers: dict[str, list] = {}
        self.observed_server: dict[str, str] = {}  # tunnel -> its PCP server, for ConnectionStatus
        self.busy: dict[tuple, list] = {}  # (tunnel, protocol, port) -> Deferreds waiting their turn
        self.probes: dict[tuple, bytes] = {}  # (tunnel, internal tuple) -> nonce of an undeleted probe
        # nonce -> (server, spec) of PREFER_FAILURE requests awaiting an answer (see mapping_update)
        self.exact: dict[bytes, tuple] = {}
        self.exact_refused: set[bytes] = set()
        self.external_cache: dict[str, tuple] = {}
        self.server_seen: dict[str, float] = {}
        self.server_down: set[str] = set()
        self.keeper = Keeper(reactor, client, self, pcp_lifetime=policy.pcp_lifetime, rng=self.rng,
                             recovery_rate=recovery_rate)
        client.add_listener(self)

    # ------------------------------------------------------------ lifecycle
    def restore(self) -> int:
        """Load the store and renew every mapping with its persisted nonce (paced)."""
        now = self.reactor.seconds()
        live = []
        for row in self.store.load_all():
            record = MappingRecord.from_row(row)
            if record.lease_end is not None and record.lease_end <= now:
                self._write_quietly(self.store.delete, row)
                self._delete_on_cgn(record)
                continue
            self._table(record.subscriber.tunnel).put(record)
            live.append(record)
        self.keeper.recreate(live)
        self.stats["restored"] += len(live)
        return len(live)

    def stop(self) -> None:
        self.keeper.stop()

    # ------------------------------------------------------------ helpers
    def _table(self, tunnel: str) -> SubscriberTable:
        table = self.tables.get(tunnel)
        if table is None:
            table = self.tables[tunnel] = SubscriberTable()
        return table

    def _locked(self, caller, protocol, port, fn, *args):
        """Run the coroutine ``fn(*args)`` alone for its (tunnel, protocol, port): calls on
        one mapping are serialized.  Uncontended, it runs at once, without a lock object."""
        key = (caller.subscriber.tunnel, protocol, port)
        waiting = self.busy.get(key)
        if waiting is None:
            self.busy[key] = []
            return self._run_locked(key, fn, args)
        turn = defer.Deferred()
        waiting.append(turn)
        return turn.addCallback(lambda _: self._run_locked(key, fn, args))

    def _run_locked(self, key, fn, args):
        def release(result):
            waiting = self.busy[key]
            if waiting:
                waiting.pop(0).callback(None)
            else:
                del self.busy[key]
            return result

        return defer.ensureDeferred(fn(*args)).addBoth(release)

    def _seen(self, server: str) -> None:
        self.server_seen[server] = self.reactor.seconds()
        if server in self.server_down:
            self.server_reachable(server)

    def current(self, record: MappingRecord) -> MappingRecord | None:
        """The table's live version of ``record`` (None once removed or replaced)."""
        table = self.tables.get(record.subscriber.tunnel)
        live = table.get(record.key) if table else None
        return live if live is not None and live.nonce == record.nonce else None

    def _notify(self, tunnel: str, external_address: bool = False) -> None:
        table = self.tables.get(tunnel)
        observers = self.observers.get(tunnel)
        if not observers or table is None:
            return
        changes = {"mappings": len(table), "update_id": table.update_id}
        if external_address:
            changes["external_address"] = _reportable_or_none(table.external_address)
        for observer in list(observers):
            try:
                observer(changes)
            except Exception:
                log.failure("observer failed")

    def _store(self, record: MappingRecord, old: MappingRecord | None = None) -> None:
        if old is not None and old.key != record.key:
            self.store.replace(old.to_row(), record.to_row())
        else:
            self.store.put(record.to_row())

    async def _persist(self, write, *args, granted: MappingRecord | None = None) -> None:
        """Make a store write durable before the SOAP answer (RFC 6970 section 5.3).  A
        failed write is a 501, and a just ``granted`` mapping is deleted on the CGN
        rather than kept without a record."""
        try:
            write(*args)
            await self.store.durable()
        except StoreError:
            self.stats["store_failed"] += 1
            if granted is not None:
                self._delete_on_cgn(granted)
            raise ServerFailure("the mapping could not be stored") from None

    def _write_quietly(self, write, *args) -> None:
        """A store write nobody waits for (renewals, lease ends): the store logs a
        failure, the table stays the truth until the next restart."""
        try:
            write(*args)
        except StoreError:
            self.stats["store_failed"] += 1

    def _install(self, record: MappingRecord, old: MappingRecord | None = None) -> None:
        """Show a stored record in the table and keep it alive."""
        table = self._table(record.subscriber.tunnel)
        if old is not None and old.key != record.key:
            table.remove(old.key)
            self.keeper.cancel(old)
        table.put(record)
        self.keeper.schedule(record)
        learned = self._learn_address(record.subscriber.tunnel, record.external_address)
        self._notify(record.subscriber.tunnel, external_address=learned)

    def _unlist(self, record: MappingRecord) -> bool:
        """Take a record out of the table and the keeper; False if it was not there."""
        table = self.tables.get(record.subscriber.tunnel)
        if table is None or table.remove(record.key) is None:
            return False
        self.keeper.cancel(record)
        self._notify(record.subscriber.tunnel)
        return True

    def _remove(self, record: MappingRecord) -> None:
        if self._unlist(record):
            self._write_quietly(self.store.delete, record.to_row())

    def _learn_address(self, tunnel: str, address) -> bool:
        """Remember the subscriber's external address; True when it changed (an event is due)."""
        table = self._table(tunnel)
        if address is None or address == table.external_address:
            return False
        table.external_address = address
        self.external_cache.pop(tunnel, None)
        return True

    # ------------------------------------------------------------ add
    def add_mapping(self, caller, request, any_port=False):
        try:
            _validate(request, any_port)
        except IWFError as e:
            return defer.fail(e)
        return self._locked(caller, request.protocol, request.external_port,
                            self._add, caller, request, any_port)

    async def _add(self, caller, req, any_port):
        sub = _identified(caller.subscriber)
        table = self._table(sub.tunnel)
        client_address = req.internal_client if req.internal_client is not None else caller.address
        self.policy.check_client(caller.address, client_address)
        self.policy.check_rules(req.external_port or req.internal_port, client_address, req.internal_port)
        lease = self.policy.clamp_lease(req.lease)
        key = MappingKey(req.remote_host, req.external_port, req.protocol)
        internal_tuple = (client_address, req.protocol, req.internal_port)
        existing = table.get(key)
        if existing is not None and existing.internal_client != client_address:
            raise Conflict("the external port is mapped to another host")
        same_tuple = table.by_tuple(internal_tuple)
        if same_tuple is not None and same_tuple.key != key:
            if not any_port:
                raise Conflict("this internal host and port already has another external port")
            existing, key = same_tuple, same_tuple.key
        if existing is None:
            self.policy.check_quota(len(table))
        if existing is not None and existing.internal_tuple == internal_tuple:
            nonce = existing.nonce
        else:
            nonce = self.probes.get((sub.tunnel, internal_tuple)) or new_nonce()
        now = self.reactor.seconds()
        record = MappingRecord(
            subscriber=sub, remote_host=req.remote_host, external_port=key.external_port,
            protocol=req.protocol, internal_client=client_address, internal_port=req.internal_port,
            description=req.description, enabled=req.enabled, lease=lease,
            lease_end=None if lease is None else now + lease, any_port=any_port, nonce=nonce,
            server=sub.server,
            external_address=existing.external_address if existing else None,
        )
        spec = map_spec(record, self.keeper.lifetime_for(record, now))
        self.stats["add_requests"] += 1
        result = await self._exact_map(sub.server, spec)
        self.probes.pop((sub.tunnel, internal_tuple), None)
        now = self.reactor.seconds()
        granted = record.granted(result.external_address, result.lifetime, now)
        if any_port and result.external_port != granted.external_port:
            granted = _moved(granted, result.external_port)
        await self._persist(self._store, granted, existing, granted=granted)
        if existing is not None and existing.internal_tuple != internal_tuple:
            self._delete_on_cgn(existing)  # the same UPnP key now names another internal port
        self._install(granted, old=existing)
        self.stats["add_ok"] += 1
        return granted.view(now)

    async def _map(self, server: str, spec: MapSpec, **kwargs):
        """A bounded exchange for a UPnP call; a SUCCESS also shows the CGN is alive."""
        result = await bounded_map(self.reactor, self.client, server, spec, self.bound, **kwargs)
        self._seen(server)
        return result

    async def _exact_map(self, server, spec):
        """bounded_map, plus a guard for servers that ignore PREFER_FAILURE.

        miniupnpd 2.3.1 answers SUCCESS on *another* port when the asked one is
        held by another host.  The client rightly does not take that as the
        answer (RFC 6887 section 13.2) and reports it as a mapping update;
        :meth:`mapping_update` then deletes the stray mapping, which supersedes
        the request, and the caller gets a Conflict (UPnP 718).
        """
        if not spec.prefer_failure:
            return await self._map(server, spec)
        self.exact[spec.nonce] = (server, spec)
        try:
            return await self._map(server, spec)
        except ServerFailure:
            if spec.nonce in self.exact_refused:
                raise Conflict("the CGN could only offer another external port") from None
            raise
        finally:
            self.exact.pop(spec.nonce, None)
            self.exact_refused.discard(spec.nonce)

    # ------------------------------------------------------------ delete
    def delete_mapping(self, caller, key):
        return self._locked(caller, key.protocol, key.external_port, self._delete, caller, key)

    async def _delete(self, caller, key):
        table = self.tables.get(caller.subscriber.tunnel)
        record = table.get(key) if table else None
        if record is None:
            raise NoSuchEntry("no such mapping")
        if record.internal_client != caller.address:
            raise NotAuthorized("only the host a mapping points to may delete it")
        try:
            await self._map(record.server, map_spec(record, 0), delete=True, retry_short=False)
        except Conflict:
            self._remove(record)  # RFC 6970 section 5.8: CANNOT_PROVIDE_EXTERNAL -> 714
            raise NoSuchEntry("the CGN holds no such mapping") from None
        if self._unlist(record):  # already deleted on the CGN
            await self._persist(self.store.delete, record.to_row())
        self.stats["delete_ok"] += 1

    def delete_range(self, caller, start_port, end_port, protocol, manage):
        if start_port > end_port:
            return defer.fail(InconsistentParameters("NewStartPort is above NewEndPort"))
        table = self.tables.get(caller.subscriber.tunnel)
        # NewManage 1 asks for all entries, but access control still limits a
        # control point to its own (igd.md section 4.4).
        keys = [r.key for r in (table.records() if table else [])
                if r.protocol == protocol and start_port <= r.external_port <= end_port
                and r.internal_client == caller.address]
        if not keys:
            return defer.fail(NoSuchEntry("no mapping in that range"))
        results = [self.delete_mapping(caller, k) for k in keys]
        return defer.DeferredList(results, consumeErrors=True).addCallback(_count_or_first_error)

    def _delete_on_cgn(self, record: MappingRecord) -> None:
        """Fire-and-forget delete (lease end, replaced tuple, restore)."""
        self._delete_in_background(record.server, map_spec(record, 0))

    def _delete_in_background(self, server: str, spec: MapSpec,
                              failed: str = "background_delete_failed") -> defer.Deferred:
        """A delete nobody waits for; PCP lifetimes bound what a lost one leaves behind.
        Fires with the MapResult, or None (counted in ``stats[failed]``)."""
        d = self.client.delete(server, spec)
        return d.addErrback(lambda f: self.stats.update([failed]))

    # ------------------------------------------------------------ reads
    def get_specific(self, caller, key):
        table = self.tables.get(caller.subscriber.tunnel)
        record = table.get(key) if table else None
        if record is not None:
            return defer.succeed(record.view(self.reactor.seconds()))
        if not self.probe_specific:
            return defer.fail(NoSuchEntry("no such mapping"))
        return self._locked(caller, key.protocol, key.external_port, self._probe, caller, key)

    async def _probe(self, caller, key):
        """RFC 6970 section 5.7 probe; the answer is 714 whichever way it goes."""
        sub = _identified(caller.subscriber)
        internal_tuple = (caller.address, key.protocol, key.external_port)
        table = self._table(sub.tunnel)
        if table.by_tuple(internal_tuple) is None and key.external_port:
            spec = self._probe_spec(sub, internal_tuple, exact=True)
            self.stats["probes"] += 1
            try:
                await self._map(sub.server, spec, retry_short=False)
            except Conflict:
                self.probes.pop((sub.tunnel, internal_tuple), None)
            else:
                self._drop_probe(sub, internal_tuple, spec)
        raise NoSuchEntry("no such mapping")

    def _probe_spec(self, sub, internal_tuple, *, exact: bool) -> MapSpec:
        """A short probe mapping for (caller, protocol, port); its nonce is kept in
        ``probes`` until its delete is confirmed, so a real mapping can take it over."""
        client, protocol, port = internal_tuple
        nonce = self.probes.setdefault((sub.tunnel, internal_tuple), new_nonce())
        return MapSpec(nonce, PROTOCOL_NUMBERS[protocol], client, port, PROBE_LIFETIME,
                       external_port=port if exact else 0, third_party_id=sub.third_party_id,
                       prefer_failure=exact)

    def _drop_probe(self, sub, internal_tuple, spec: MapSpec) -> None:
        def done(result):
            if getattr(result, "ok", False) and self.probes.get((sub.tunnel, internal_tuple)) == spec.nonce:
                del self.probes[(sub.tunnel, internal_tuple)]
        self._delete_in_background(sub.server, spec, "probe_delete_failed").addCallback(done)

    def get_generic(self, caller, index):
        table = self.tables.get(caller.subscriber.tunnel)
        record = table.at(index) if table else None
        if record is None:
            raise IndexOutOfRange(f"no entry at index {index}")
        return record.view(self.reactor.seconds())

    def list_mappings(self, caller, start_port, end_port, protocol, manage, limit):
        if start_port > end_port:
            raise InconsistentParameters("NewStartPort is above NewEndPort")
        table = self.tables.get(caller.subscriber.tunnel)
        now = self.reactor.seconds()
        out = []
        for record in table.records() if table else []:
            if record.protocol != protocol or not start_port <= record.external_port <= end_port:
                continue
            if not manage and record.internal_client != caller.address:
                continue
            out.append(record.view(now))
            if limit and len(out) >= limit:
                break
        return out

    def mapping_count(self, subscriber):
        table = self.tables.get(subscriber.tunnel)
        return len(table) if table else 0

    def state(self, subscriber) -> dict:
        """The subscriber's evented values now: mappings, update_id, external_address, connected."""
        table = self.tables.get(subscriber.tunnel)
        connected = subscriber.server not in self.server_down
        if table is None:
            return {"mappings": 0, "update_id": 0, "external_address": None, "connected": connected}
        return {"mappings": len(table), "update_id": table.update_id,
                "external_address": _reportable_or_none(table.external_address),
                "connected": connected}

    # ------------------------------------------------------------ connection
    def external_address(self, caller):
        table = self.tables.get(caller.subscriber.tunnel)
        if table is not None and table.external_address is not None:
            address = table.external_address
            return defer.succeed(address if is_reportable(address) else None)
        cached = self.external_cache.get(caller.subscriber.tunnel)
        if cached and self.reactor.seconds() - cached[1] < EXTERNAL_ADDRESS_TTL:
            return defer.succeed(cached[0])
        return self._locked(caller, "TCP", DISCARD_PORT, self._probe_address, caller)

    async def _probe_address(self, caller):
        sub = _identified(caller.subscriber)
        internal_tuple = (caller.address, "TCP", DISCARD_PORT)
        spec = self._probe_spec(sub, internal_tuple, exact=False)
        result = await self._map(sub.server, spec)
        self._drop_probe(sub, internal_tuple, spec)
        address = result.external_address if is_reportable(result.external_address) else None
        if address is None:
            log.warn("CGN gave a reserved external address; not reporting it to subscribers")
        if self._learn_address(sub.tunnel, result.external_address):
            self._notify(sub.tunnel, external_address=True)
        self.external_cache[sub.tunnel] = (address, self.reactor.seconds())
        return address

    def connection_status(self, caller):
        server = caller.subscriber.server
        seen = self.server_seen.get(server)
        if seen is not None and self.reactor.seconds() - seen < LIVENESS_TTL:
            return defer.succeed(True)
        d = self.client.announce(server, deadline=self.bound.deadline / 2, policy=self.bound.policy)

        def answered(response):
            self._seen(server)
            return response.result == ResultCode.SUCCESS

        def silent(failure):
            failure.trap(PCPTimeout)
            if server not in self.server_down:
                self.server_unreachable(server)  # also an evented ConnectionStatus change
            return False

        return d.addCallbacks(answered, silent)

    # ------------------------------------------------------------ observers
    def add_observer(self, subscriber, observer):
        self.observers.setdefault(subscriber.tunnel, []).append(observer)
        self.observed_server[subscriber.tunnel] = subscriber.server

    def remove_observer(self, subscriber, observer):
        observers = self.observers.get(subscriber.tunnel, [])
        if observer in observers:
            observers.remove(observer)

    def release_subscriber(self, subscriber) -> int:
        """The subscriber is gone for good (its tunnel stayed down past the grace
        time): delete all its mappings on the CGN and locally.  RFC 6970 section
        5.10's rapid recovery, carrier analogue (iwf.md E.27)."""
        table = self.tables.get(subscriber.tunnel)
        records = table.records() if table else []
        for record in records:
            self._remove(record)
            self._delete_on_cgn(record)
        self.tables.pop(subscriber.tunnel, None)
        self.external_cache.pop(subscriber.tunnel, None)
        self.stats["subscribers_released"] += 1
        return len(records)

    # ------------------------------------------------------------ from the keeper
    def renewed(self, record: MappingRecord, result) -> None:
        self._seen(record.server)
        now = self.reactor.seconds()
        granted = record.granted(result.external_address, result.lifetime, now)
        moved = result.external_port != record.external_port
        if moved:
            granted = _moved(granted, result.external_port)
        if moved or result.external_address != record.external_address:
            self._write_quietly(self._store, granted, record)  # persist what changed
            self._install(granted, old=record)
        else:
            self._table(record.subscriber.tunnel).put(granted)
            self.keeper.schedule(granted)

    def lost(self, record: MappingRecord, result: int) -> None:
        log.warn("CGN refused to keep a mapping ({result}); removing it", result=ResultCode(result).name)
        self.stats["mappings_lost"] += 1
        self._remove(record)

    def lease_ended(self, record: MappingRecord) -> None:
        self._remove(record)
        self._delete_on_cgn(record)

    # ------------------------------------------------------------ from the PCP client
    def server_state_lost(self, server):
        self.stats["state_loss_events"] += 1
        self.external_cache.clear()
        for table in self.tables.values():
            if not len(table):
                table.external_address = None  # learned by a probe; ask again
        records = [r for t in self.tables.values() for r in t.records() if r.server == server]
        log.info("PCP server {server} lost state: re-creating {n} mappings", server=server, n=len(records))
        # RFC 6887 section 14.1.3: wait a random 0-5 s, then re-issue requests.
        self.keeper.recreate(records, initial_delay=self.rng.uniform(0, 5))

    def server_unreachable(self, server):
        self.server_down.add(server)
        self._notify_connection(server, False)

    def server_reachable(self, server):
        self.server_down.discard(server)
        self._seen(server)
        self._notify_connection(server, True)

    def _notify_connection(self, server: str, connected: bool) -> None:
        """ConnectionStatus is evented: tell the subscribers of that server."""
        for tunnel, observers in list(self.observers.items()):
            if self.observed_server.get(tunnel) == server:
                for observer in list(observers):
                    observer({"connected": connected})

    def mapping_update(self, server, result):
        self.stats["mapping_updates"] += 1
        body = result.response.body
        pending = self.exact.get(getattr(body, "nonce", None))
        if pending is not None and result.ok and pending[0] == server:
            self.stats["prefer_failure_ignored"] += 1
            self.exact_refused.add(body.nonce)
            self._delete_in_background(server, pending[1])


def _identified(subscriber):
    """Never send a PCP request without the subscriber's THIRD_PARTY_ID (RFC 7843 section 3.1)."""
    if not subscriber.third_party_id:
        raise ServerFailure("no THIRD_PARTY_ID for this tunnel")
    return subscriber


def _reportable_or_none(address):
    return address if is_reportable(address) else None


def _validate(req, any_port: bool) -> None:
    if req.protocol not in PROTOCOLS:
        raise InvalidArgument("protocol must be TCP or UDP")
    if not 1 <= req.internal_port <= 65535:
        raise WildcardNotPermitted("internal_port")
    if not 0 <= req.external_port <= 65535:
        raise InvalidArgument("external port out of range")
    if req.external_port == 0 and not any_port:
        raise WildcardNotPermitted("external_port")
    if req.internal_client is not None and (req.internal_client.is_unspecified
                                            or req.internal_client.is_multicast):
        raise WildcardNotPermitted("internal_client")


def _moved(record: MappingRecord, port: int) -> MappingRecord:
    return replace(record, external_port=port)


def _count_or_first_error(results):
    failures = [r for ok, r in results if not ok]
    if failures and len(failures) == len(results):
        failures[0].raiseException()
    return len(results) - len(failures)

