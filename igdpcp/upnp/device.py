"""The IGD device tree that SSDP advertises and the description serves.

One model per (tunnel, IGD version).  UDNs are derived from a keyed hash of
the tunnel so they are stable for a tunnel but reveal nothing of it
(ARCHITECTURE.md, "Identifiers are private").
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass

URN_DEVICE = "urn:schemas-upnp-org:device:{}:{}"
URN_SERVICE = "urn:schemas-upnp-org:service:{}:{}"

# Paths served by the HTTP listener (one listener per tunnel).
ROOT_DESC_PATH = "/rootDesc.xml"


@dataclass(frozen=True, slots=True)
class Service:
    name: str  # e.g. "WANIPConnection"
    version: int
    service_id: str  # urn:upnp-org:serviceId:...
    scpd_path: str
    control_path: str
    event_path: str

    @property
    def service_type(self) -> str:
        return URN_SERVICE.format(self.name, self.version)


@dataclass(frozen=True, slots=True)
class Device:
    name: str  # e.g. "InternetGatewayDevice"
    version: int
    udn: str  # "uuid:..."
    friendly_name: str
    services: tuple[Service, ...] = ()
    children: tuple["Device", ...] = ()

    @property
    def device_type(self) -> str:
        return URN_DEVICE.format(self.name, self.version)

    def walk(self):
        """This device and every embedded device, root first."""
        yield self
        for child in self.children:
            yield from child.walk()


def derive_udn(secret: bytes, tunnel: str, role: str) -> str:
    """A stable, unlinkable UUID for a device on a tunnel (keyed hash, UUID version 5 layout)."""
    digest = hmac.new(secret, f"{tunnel}\0{role}".encode(), hashlib.sha256).digest()
    return "uuid:" + str(uuid.UUID(bytes=digest[:16], version=5))


def igd_model(version: int, secret: bytes, tunnel: str, friendly_name: str = "igdpcp") -> Device:
    """InternetGatewayDevice -> WANDevice -> WANConnectionDevice -> WANIPConnection,
    plus WANCommonInterfaceConfig:1 (miniupnpc requires it, clients.md R6).

    ``version`` is 1 or 2 and applies to the three device types and WANIPConnection;
    WANCommonInterfaceConfig is :1 in both (igd.md section 1).
    """
    if version not in (1, 2):
        raise ValueError("IGD version must be 1 or 2")
    wanipconn = Service(
        "WANIPConnection", version, "urn:upnp-org:serviceId:WANIPConn1",
        f"/WANIPCn{version}.xml", "/ctl/IPConn", "/evt/IPConn",
    )
    wancommon = Service(
        "WANCommonInterfaceConfig", 1, "urn:upnp-org:serviceId:WANCommonIFC1",
        "/WANCfg.xml", "/ctl/CmnIfCfg", "/evt/CmnIfCfg",
    )
    wcd = Device("WANConnectionDevice", version, derive_udn(secret, tunnel, "wcd"),
                 "WANConnectionDevice", services=(wanipconn,))
    wan = Device("WANDevice", version, derive_udn(secret, tunnel, "wan"),
                 "WANDevice", services=(wancommon,), children=(wcd,))
    return Device("InternetGatewayDevice", version, derive_udn(secret, tunnel, "igd"),
                  friendly_name, children=(wan,))


def find_service(root: Device, path: str) -> Service | None:
    """The service whose SCPD, control or event path is ``path``."""
    for device in root.walk():
        for service in device.services:
            if path in (service.scpd_path, service.control_path, service.event_path):
                return service
    return None
