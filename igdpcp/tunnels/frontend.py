"""One tunnel's IGD: SSDP, description, SOAP and GENA on sockets bound to its interface.

This is where a packet's tunnel becomes a :class:`~igdpcp.subscriber.Subscriber`:
every request that arrives on the interface is from that subscriber, and the
control point is the packet's source address on it.  Nothing below here
looks at sockets.
"""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from typing import Callable
from functools import partial
from ipaddress import ip_address

from twisted.application.service import Service
from twisted.internet import defer
from twisted.web.client import Agent
from ..logs import logger

from ..subscriber import Caller, Subscriber
from ..upnp import gena, gena_http
from ..upnp.description import igd_models
from ..upnp.device import ROOT_DESC_PATH
from ..upnp.http import UPnPResource, make_site
from ..upnp.ssdp_protocol import AdvertiseSchedule, SSDPProtocol
from .listeners import DeviceEndpointFactory, listen_ssdp, listen_tcp

log = logger(__name__)

# IWF state names -> WANIPConnection evented variables (igd.md section 2).
_EVENTED = {"mappings": "PortMappingNumberOfEntries", "update_id": "SystemUpdateID",
            "external_address": "ExternalIPAddress", "connected": "ConnectionStatus"}


@dataclass(frozen=True, slots=True)
class FrontEndSettings:
    """What every tunnel's IGD shares (from the config)."""

    igd_version: int = 1
    http_port: int = 5000
    friendly_name: str = "igdpcp"
    udn_secret: bytes = b""
    advertise_interval: float = 900.0
    boot_id: int = 1
    # A SharedSSDPPort (igd.ssdp_socket = "shared"), or None for a socket per tunnel.
    shared_ssdp: object = None


def upnp_values(state: dict, version: int) -> dict:
    """IWF state -> evented variable values (None address -> "")."""
    out = {}
    for key, value in state.items():
        name = _EVENTED.get(key)
        if name is None or (name == "SystemUpdateID" and version < 2):
            continue
        if name == "ConnectionStatus":
            value = "Connected" if value else "Disconnected"
        out[name] = "" if value is None else value
    return out


class TunnelFrontEnd(Service):
    """The UPnP face of one subscriber tunnel (interface ``interface``, our ``address``).

    ``third_party_id()`` returns a Deferred firing with the tunnel's ID; it is
    asked for each control request (a static or link ID answers at once, an
    AAA one from its cache), so an ID source that fails makes that request fail
    with 501 and no PCP request goes out without the right ID.
    """

    def __init__(self, reactor, iwf, tunnel: str, interface: str, address: str,
                 settings: FrontEndSettings, *, server: str,
                 third_party_id: Callable[[], defer.Deferred], announce_after: float = 0.0):
        self.reactor = reactor
        self.iwf = iwf
        # Names the subscriber for tables, state and events; carries no ID.
        self.subscriber = Subscriber(tunnel, b"", server)
        self.third_party_id = third_party_id
        self.announce_after = announce_after  # first NOTIFY set after this + random 0..0.1 s
        self.interface = interface
        self.address = address
        self.settings = settings
        self.setName(f"tunnel:{tunnel}")
        self.models = igd_models(settings.igd_version, settings.udn_secret, tunnel,
                                 settings.friendly_name)
        self.ports: list = []
        self.ssdp: SSDPProtocol | None = None
        self.managers: dict = {}
        agent = Agent.usingEndpointFactory(reactor, DeviceEndpointFactory(reactor, interface))
        self.sender = gena_http.NotifySender(reactor, agent)

    def caller_for(self, request) -> Caller | None:
        """The control point of a GENA request: no ID needed."""
        try:
            return Caller(self.subscriber, ip_address(request.getClientAddress().host))
        except (AttributeError, ValueError):
            return None

    def control_caller_for(self, request) -> defer.Deferred | None:
        """The control point of a SOAP request, with the tunnel's THIRD_PARTY_ID."""
        caller = self.caller_for(request)
        if caller is None:
            return None
        tunnel, server = self.subscriber.tunnel, self.subscriber.server
        return self.third_party_id().addCallback(
            lambda value: Caller(Subscriber(tunnel, value, server), caller.address))

    def _event_resources(self) -> dict:
        resources = {}
        version = self.settings.igd_version
        for device in self.models[version].walk():
            for service in device.services:
                manager = gena.SubscriptionManager(service, self.reactor)
                self.managers[service.name] = manager
                resources[service.event_path] = gena_http.EventSubResource(
                    manager, self.caller_for, partial(self._initial_state, service.name), self.sender)
        return resources

    def _initial_state(self, service_name: str) -> dict:
        if service_name == "WANCommonInterfaceConfig":
            return {"PhysicalLinkStatus": "Up"}
        values = {"PossibleConnectionTypes": "IP_Routed"}
        values.update(upnp_values(self.iwf.state(self.subscriber), self.settings.igd_version))
        return values

    def _changed(self, changes: dict) -> None:
        manager = self.managers.get("WANIPConnection")
        if manager is not None:
            gena_http.publish(manager, self.sender, upnp_values(changes, self.settings.igd_version))

    def startService(self):
        """Open both listeners or neither (a failed bind, e.g. EMFILE, leaves nothing behind)."""
        s = self.settings
        resource = UPnPResource(self.models, self.iwf, self.control_caller_for, self.reactor,
                                event_resources=self._event_resources())
        location = f"http://{self.address}:{s.http_port}{ROOT_DESC_PATH}"
        self.ssdp = SSDPProtocol(
            self.reactor, self.models[s.igd_version], location, random=random.SystemRandom(),
            boot_id=s.boot_id, advertise=AdvertiseSchedule(
                interval=s.advertise_interval, initial_delay=self.announce_after))
        try:
            self.ports.append(listen_tcp(self.reactor, s.http_port, make_site(resource),
                                         device=self.interface, interface=self.address))
            if s.shared_ssdp is not None:
                self.ports.append(s.shared_ssdp.attach(self.ssdp, socket.if_nametoindex(self.interface)))
            else:
                self.ports.append(listen_ssdp(self.reactor, self.ssdp, device=self.interface))
        except Exception:
            for port in self.ports:
                port.stopListening()
            self.ports = []
            raise
        super().startService()
        self.iwf.add_observer(self.subscriber, self._changed)

    def stopService(self):
        if not self.running:
            return None
        super().stopService()
        self.iwf.remove_observer(self.subscriber, self._changed)
        ports, self.ports = self.ports, []
        # Stopping the SSDP port sends ssdp:byebye from its protocol's stopProtocol.
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in reversed(ports)])
