"""The PCP client: MAP / PEER / ANNOUNCE exchanges with named PCP servers.

One connected UDP socket per configured server, so the kernel filters other
sources and ``getsockname`` gives the client address for the header (RFC 6887
section 16.4).  A response completes a request only if it matches it: source,
opcode, nonce, protocol, internal address and port, and THIRD_PARTY_ID (section
11.4 plus RFC 7843; subscribers' addresses overlap).  Everything else is
dropped and counted in :attr:`PCPClient.stats`.

Nonces belong to the caller, who persists them, so a restarted IWF can renew
and delete what it created before (section 11.1).  The client never switches
servers: each request names its server.
"""

from __future__ import annotations

import os
import random
import socket
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Callable

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from ..logs import logger

from .codec import (
    Address,
    Description,
    Filter,
    MapBody,
    PCPDecodeError,
    PeerBody,
    PreferFailure,
    Request,
    Response,
    ThirdParty,
    ThirdPartyId,
    any_address_like,
    decode_response,
    encode_request,
    pack_address,
)
from .constants import NONCE_SIZE, SERVER_PORT, Opcode, ResultCode
from .epoch import EpochTracker
from .schedule import RFC6887_DEFAULT, RFC7488_MRC, RetransmitPolicy

log = logger(__name__)

# Lifetimes beyond this are treated as this (section 8.3 / 15: absurd values).
LIFETIME_SANITY_CAP = 24 * 3600
# Requests on the wire per server; more wait their turn (their deadlines still run), so a
# burst of renewals or SOAP calls cannot overrun socket buffers into a retransmission storm.
MAX_IN_FLIGHT = 256
RECEIVE_BUFFER = 4 << 20


def new_nonce() -> bytes:
    """A fresh 96-bit mapping nonce from the OS RNG (section 11.2)."""
    return os.urandom(NONCE_SIZE)


class PCPTimeout(Exception):
    """The server did not answer within the deadline or the retransmission limits."""

    def __init__(self, server: str, sends: int):
        super().__init__(f"no answer from PCP server {server!r} after {sends} transmission(s)")
        self.server = server
        self.sends = sends


class PCPSuperseded(Exception):
    """A newer request for the same mapping replaced this one before an answer came."""


@dataclass(frozen=True, slots=True)
class ServerAddress:
    host: str
    port: int = SERVER_PORT


@dataclass(frozen=True, slots=True)
class MapSpec:
    """One MAP mapping as the caller knows it.  ``external_*`` are the suggestion."""

    nonce: bytes = field(repr=False)
    protocol: int
    internal_address: Address
    internal_port: int
    lifetime: int
    external_port: int = 0
    external_address: Address | None = None
    third_party_id: bytes | None = field(default=None, repr=False)
    prefer_failure: bool = False
    filters: tuple[Filter, ...] = ()
    description: str | None = None
    third_party: bool = True


@dataclass(frozen=True, slots=True)
class PeerSpec:
    nonce: bytes = field(repr=False)
    protocol: int
    internal_address: Address
    internal_port: int
    lifetime: int
    remote_address: Address
    remote_port: int
    external_port: int = 0
    external_address: Address | None = None
    third_party_id: bytes | None = field(default=None, repr=False)
    third_party: bool = True


@dataclass(frozen=True, slots=True)
class MapResult:
    """The matched answer.  ``lifetime`` is capped at LIFETIME_SANITY_CAP."""

    server: str
    result: int
    lifetime: int
    epoch: int
    external_address: Address | None
    external_port: int
    response: Response = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.result == ResultCode.SUCCESS


def grow_receive_buffer(sock) -> None:
    """Answers to a burst of requests arrive together; the default buffer holds ~190."""
    if sock is None:
        return
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER)
            return
        except OSError:
            continue


def _match_key(opcode: int, body, third_party: Address | None, tpid: bytes | None, own: Address):
    """Section 11.4 match key, plus THIRD_PARTY_ID (iwf.md G.8)."""
    if opcode == Opcode.ANNOUNCE:
        return (Opcode.ANNOUNCE,)
    internal = third_party if third_party is not None else own
    key = (opcode, body.nonce, body.protocol, pack_address(internal), body.internal_port, tpid)
    if opcode == Opcode.PEER:
        key += (body.remote_port, pack_address(body.remote_address))
    return key


def _options(spec, *, mapping: bool, delete: bool = False) -> tuple:
    options = []
    if spec.third_party:
        options.append(ThirdParty(spec.internal_address))
    if spec.third_party_id is not None:
        options.append(ThirdPartyId(spec.third_party_id))
    if mapping and not delete:
        if spec.prefer_failure:
            options.append(PreferFailure())
        options.extend(spec.filters)
        if spec.description:
            options.append(Description(spec.description[:256]))
    return tuple(options)


class _Transaction:
    """One request until its answer, its deadline or its last retransmission.

    It has one timer at a time: the next retransmission, or the deadline when
    that comes first (or while the request waits for room on the wire)."""

    __slots__ = ("server", "key", "data", "deferred", "policy", "sends", "started", "rt",
                 "timer", "deadline_at", "check")

    def __init__(self, server, key, data, policy, started, check):
        self.server = server
        self.key = key
        self.data = data
        self.deferred = defer.Deferred(self._cancel)
        self.policy = policy
        self.sends = 0
        self.started = started
        self.rt = 0.0
        self.timer = None
        self.deadline_at = None
        self.check = check

    def _cancel(self, _d):
        self.server.forget(self)

    def stop_timer(self):
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None


class _ServerProtocol(DatagramProtocol):
    """One connected socket to one server; all logic lives in PCPClient/_Server."""

    def __init__(self, server: "_Server"):
        self.server = server

    def datagramReceived(self, data, addr):
        self.server.received(data, addr)

    def connectionRefused(self):
        # ICMP port unreachable: a hard error (RFC 7488 section 3); keep trying, count it.
        self.server.client.stats["icmp_refused"] += 1


class _Server:
    """Per-server state: socket, pending transactions, epoch, reachability."""

    def __init__(self, client: "PCPClient", name: str, address: ServerAddress):
        self.client = client
        self.name = name
        self.address = address
        self.protocol = _ServerProtocol(self)
        self.server_ip = ip_address(address.host)
        self.port = None
        self.own_address: Address | None = None
        self.pending: dict = {}
        self.waiting: OrderedDict = OrderedDict()  # beyond MAX_IN_FLIGHT, oldest first
        self.epoch = EpochTracker()
        self.unreachable = False

    def start(self, reactor, bind: str | None) -> None:
        family6 = ip_address(self.address.host).version == 6
        interface = bind or ("::" if family6 else "0.0.0.0")
        self.port = reactor.listenUDP(0, self.protocol, interface=interface)
        grow_receive_buffer(getattr(self.port, "socket", None))
        self.protocol.transport.connect(self.address.host, self.address.port)
        self.own_address = ip_address(self.port.getHost().host.split("%")[0])

    def stop(self):
        for tx in list(self.waiting.values()) + list(self.pending.values()):
            self.fail(tx, PCPTimeout(self.name, tx.sends))
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()

    # -- sending
    def submit(self, tx: _Transaction, deadline: float | None) -> None:
        old = self.pending.pop(tx.key, None) or self.waiting.pop(tx.key, None)
        if old is not None:
            old.stop_timer()
            old.deferred.errback(PCPSuperseded())
            self.admit()
        if deadline is not None:
            tx.deadline_at = tx.started + deadline
        if len(self.pending) >= self.client.max_in_flight:
            self.waiting[tx.key] = tx
            self.client.stats["queued"] += 1
            if deadline is not None:  # its deadline runs while it waits
                tx.timer = self.client.reactor.callLater(deadline, self.expire, tx)
            return
        self.launch(tx)

    def launch(self, tx: _Transaction) -> None:
        tx.stop_timer()
        self.pending[tx.key] = tx
        tx.rt = tx.policy.first(self.client.rng)
        self.transmit(tx)

    def admit(self) -> None:
        """Put waiting requests on the wire while there is room."""
        while self.waiting and len(self.pending) < self.client.max_in_flight:
            _key, tx = self.waiting.popitem(last=False)
            self.launch(tx)

    def transmit(self, tx: _Transaction) -> None:
        if self.port is None:
            self.fail(tx, PCPTimeout(self.name, tx.sends))
            return
        tx.sends += 1
        self.client.stats["sent"] += 1
        if tx.sends > 1:
            self.client.stats["retransmitted"] += 1
        self.protocol.transport.write(tx.data)
        if tx.sends >= RFC7488_MRC and not self.unreachable:
            self.unreachable = True
            self.client.stats["server_unreachable"] += 1
            log.warn("PCP server {server} unreachable after {n} transmissions",
                     server=self.name, n=tx.sends)
            self.client.notify("server_unreachable", self.name)
        reactor = self.client.reactor
        left = None if tx.deadline_at is None else tx.deadline_at - reactor.seconds()
        if left is not None and left <= tx.rt:
            tx.timer = reactor.callLater(max(0.0, left), self.expire, tx)
        else:
            tx.timer = reactor.callLater(tx.rt, self.retransmit, tx)

    def retransmit(self, tx: _Transaction) -> None:
        tx.timer = None
        elapsed = self.client.reactor.seconds() - tx.started
        if tx.policy.exhausted(tx.sends, elapsed):
            self.fail(tx, PCPTimeout(self.name, tx.sends))
            return
        tx.rt = tx.policy.next(tx.rt, self.client.rng)
        self.transmit(tx)

    def expire(self, tx: _Transaction) -> None:
        tx.timer = None
        self.client.stats["deadline_expired"] += 1
        self.fail(tx, PCPTimeout(self.name, tx.sends))

    def forget(self, tx: _Transaction) -> None:
        if self.pending.get(tx.key) is tx:
            del self.pending[tx.key]
            self.admit()
        elif self.waiting.get(tx.key) is tx:
            del self.waiting[tx.key]
        tx.stop_timer()

    def fail(self, tx: _Transaction, failure: Exception) -> None:
        self.forget(tx)
        if not tx.deferred.called:
            tx.deferred.errback(failure)

    # -- receiving
    def received(self, data: bytes, addr) -> None:
        stats = self.client.stats
        host, port = addr[0], addr[1]
        if port != self.address.port or (host != self.address.host and ip_address(
                host.split("%")[0]) != self.server_ip):
            stats["dropped_source"] += 1
            return
        try:
            response = decode_response(data)
        except PCPDecodeError as e:
            stats["dropped_malformed"] += 1
            if e.field == "version" and len(data) >= 4 and data[3] == ResultCode.UNSUPP_VERSION:
                stats["unsupported_version"] += 1
                log.warn("PCP server {server} does not speak version 2 (it sent version {v})",
                         server=self.name, v=data[0])
            return
        now = self.client.reactor.seconds()
        if self.unreachable:
            self.unreachable = False
            self.client.notify("server_reachable", self.name)
        stats["received"] += 1
        if not self.epoch.observe(now, response.epoch):
            stats["epoch_invalid"] += 1
            log.info("PCP server {server} lost state (epoch {epoch})",
                     server=self.name, epoch=response.epoch)
            self.client.notify("server_state_lost", self.name)
        if response.opcode == Opcode.ANNOUNCE:
            tx = self.pending.get((Opcode.ANNOUNCE,))
            if tx is None:
                stats["unsolicited_announce"] += 1
                return
            self.forget(tx)
            tx.deferred.callback(response)
            return
        if response.body is None:
            stats["dropped_unmatched"] += 1
            return
        tp = response.option(ThirdParty)
        tpid = response.option(ThirdPartyId)
        key = _match_key(response.opcode, response.body, tp.address if tp else None,
                         tpid.value if tpid else None, self.own_address)
        result = _result(self.name, response)
        tx = self.pending.get(key)
        if tx is None or not tx.check(response):
            stats["dropped_unmatched"] += 1
            if response.opcode == Opcode.MAP:
                self.client.notify("mapping_update", self.name, result)
            return
        self.forget(tx)
        stats[f"result_{result.result}"] += 1
        tx.deferred.callback(result)


def _result(server: str, response: Response) -> MapResult:
    body = response.body
    return MapResult(
        server=server,
        result=response.result,
        lifetime=min(response.lifetime, LIFETIME_SANITY_CAP),
        epoch=response.epoch,
        external_address=body.external_address if body is not None else None,
        external_port=body.external_port if body is not None else 0,
        response=response,
    )


def _prefer_failure_check(spec: MapSpec) -> Callable[[Response], bool]:
    """Section 13.2: a SUCCESS must echo the suggested port (and a non-zero suggested
    address); otherwise it is a stale Mapping Update, not the answer."""
    want_addr = spec.external_address
    if want_addr is not None and want_addr == any_address_like(want_addr):
        want_addr = None

    def check(response: Response) -> bool:
        if response.result != ResultCode.SUCCESS:
            return True
        body = response.body
        return body.external_port == spec.external_port and (
            want_addr is None or body.external_address == want_addr)

    return check


def _accept(_response) -> bool:
    return True


class PCPClient:
    """Sends PCP requests to named servers and matches their answers.

    ``servers`` maps a name (as used in the config and stored with each mapping)
    to its :class:`ServerAddress`.  ``policy`` is the default retransmission
    schedule; callers may pass their own and a ``deadline`` per request.
    """

    def __init__(self, reactor, servers: dict[str, ServerAddress], *, bind: str | None = None,
                 policy: RetransmitPolicy = RFC6887_DEFAULT, rng: random.Random | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT):
        self.reactor = reactor
        self.policy = policy
        self.max_in_flight = max_in_flight
        self.rng = rng or random.Random()
        self.bind = bind
        self.stats: Counter = Counter()
        self.listeners: list = []
        self._servers = {name: _Server(self, name, addr) for name, addr in servers.items()}

    # -- lifecycle
    def start(self) -> None:
        for server in self._servers.values():
            server.start(self.reactor, self.bind)

    def stop(self) -> defer.Deferred:
        return defer.gatherResults(
            [defer.maybeDeferred(s.stop) for s in self._servers.values()])

    @property
    def servers(self) -> list[str]:
        return list(self._servers)

    def client_address(self, server: str) -> Address:
        """Our own address towards ``server`` (the header's PCP Client's IP Address)."""
        return self._server(server).own_address

    def add_listener(self, listener) -> None:
        """``listener`` provides (any methods of) :class:`~igdpcp.interfaces.IPCPClientListener`."""
        self.listeners.append(listener)

    def notify(self, event: str, *args) -> None:
        for listener in list(self.listeners):
            handler = getattr(listener, event, None)
            if handler is not None:
                try:
                    handler(*args)
                except Exception:
                    log.failure("PCP client listener {listener} failed on {event}",
                                listener=listener, event=event)

    def _server(self, name: str) -> _Server:
        try:
            return self._servers[name]
        except KeyError:
            raise ValueError(f"unknown PCP server {name!r}") from None

    # -- requests
    def map(self, server: str, spec: MapSpec, *, deadline: float | None = None,
            policy: RetransmitPolicy | None = None) -> defer.Deferred:
        """Create or renew a mapping.  Fires with a :class:`MapResult` (any result
        code); fails with :class:`PCPTimeout` or :class:`PCPSuperseded`."""
        srv = self._server(server)
        external = spec.external_address
        if external is None:
            external = any_address_like(spec.internal_address)
        body = MapBody(spec.nonce, spec.protocol, spec.internal_port, spec.external_port, external)
        request = Request(Opcode.MAP, spec.lifetime, srv.own_address, body,
                          _options(spec, mapping=True, delete=spec.lifetime == 0))
        check = _prefer_failure_check(spec) if spec.prefer_failure else _accept
        return self._send(srv, request, spec, check, deadline, policy)

    def delete(self, server: str, spec: MapSpec, *, deadline: float | None = None,
               policy: RetransmitPolicy | None = None) -> defer.Deferred:
        """Delete: lifetime 0, external port 0 and the all-zeros external address of
        the family (RFC 6887 section 15 with erratum 3621), no PREFER_FAILURE/FILTER."""
        zero = any_address_like(spec.external_address or spec.internal_address)
        spec = MapSpec(spec.nonce, spec.protocol, spec.internal_address, spec.internal_port, 0,
                       0, zero, spec.third_party_id, third_party=spec.third_party)
        return self.map(server, spec, deadline=deadline, policy=policy)

    def peer(self, server: str, spec: PeerSpec, *, deadline: float | None = None,
             policy: RetransmitPolicy | None = None) -> defer.Deferred:
        srv = self._server(server)
        external = spec.external_address or any_address_like(spec.internal_address)
        body = PeerBody(spec.nonce, spec.protocol, spec.internal_port, spec.external_port,
                        external, spec.remote_port, spec.remote_address)
        request = Request(Opcode.PEER, spec.lifetime, srv.own_address, body,
                          _options(spec, mapping=False))
        return self._send(srv, request, spec, _accept, deadline, policy)

    def announce(self, server: str, *, deadline: float | None = None,
                 policy: RetransmitPolicy | None = None) -> defer.Deferred:
        """Solicited ANNOUNCE (section 14.1.2): a probe of liveness and epoch.
        Fires with the :class:`~igdpcp.pcp.codec.Response`."""
        srv = self._server(server)
        request = Request(Opcode.ANNOUNCE, 0, srv.own_address)
        return self._send(srv, request, None, _accept, deadline, policy)

    def _send(self, srv: _Server, request: Request, spec, check, deadline, policy):
        if srv.own_address is None:
            return defer.fail(RuntimeError("PCP client not started"))
        data = encode_request(request)
        tpid = getattr(spec, "third_party_id", None)
        third_party = spec.internal_address if spec is not None and spec.third_party else None
        key = _match_key(request.opcode, request.body, third_party, tpid, srv.own_address)
        tx = _Transaction(srv, key, data, policy or self.policy, self.reactor.seconds(), check)
        srv.submit(tx, deadline)
        return tx.deferred
