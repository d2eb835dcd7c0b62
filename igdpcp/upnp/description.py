"""The root device description (igd.md section 8), built from a ``Device`` model.

Every value goes through lxml, so nothing a name contains can break the XML
(clients.md R12).  Which IGD version a request sees is chosen here too
(clients.md R1).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

import igdpcp

from .device import Device, igd_model

NS_DEVICE = "urn:schemas-upnp-org:device-1-0"


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What every device element says about the product (same for all tunnels)."""

    manufacturer: str = "igdpcp"
    manufacturer_url: str = ""
    model_name: str = "igdpcp IGD-PCP IWF"
    model_number: str = igdpcp.__version__
    model_description: str = "UPnP IGD-PCP Interworking Function (RFC 6970)"
    # Non-empty: Windows hides a gateway without one (clients.md R6); relative to the description URL.
    presentation_url: str = "/"
    # UDA 1.1, like the SSDP side (SERVER "UPnP/1.1", BOOTID/CONFIGID); configId
    # is the CONFIGID.UPNP.ORG that SSDP announces, when the caller knows it.
    spec_minor: int = 1
    config_id: int | None = None


def build_description(root: Device, info: DeviceInfo = DeviceInfo()) -> bytes:
    """``<root xmlns="urn:schemas-upnp-org:device-1-0">`` for ``root`` and its embedded devices."""
    doc = etree.Element(_q("root"), nsmap={None: NS_DEVICE})
    if info.config_id is not None and info.spec_minor >= 1:
        doc.set("configId", str(info.config_id))
    spec = etree.SubElement(doc, _q("specVersion"))
    _add(spec, "major", "1")
    _add(spec, "minor", str(info.spec_minor))
    _device(doc, root, info, is_root=True)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + etree.tostring(doc, pretty_print=True)


def description_version(serving: int, user_agent: str | bytes | None) -> int:
    """The IGD version to describe to a client: Windows, Xbox and PlayStation
    fail on IGD:2, so a User-Agent with "microsoft" or "FDSSDP" gets IGD:1,
    as miniupnpd does (clients.md R1)."""
    if serving == 1 or not user_agent:
        return serving
    if isinstance(user_agent, bytes):
        user_agent = user_agent.decode("latin-1")
    agent = user_agent.casefold()
    return 1 if "microsoft" in agent or "fdssdp" in agent else serving


def igd_models(version: int, secret: bytes, tunnel: str, friendly_name: str = "igdpcp") -> dict[int, Device]:
    """The models a tunnel serves: IGD:1 alone, or IGD:2 plus its IGD:1 twin for R1 clients.

    The twin has the same UDNs and control/event paths (``igd_model`` derives
    them from the role, not the version); only its types and SCPD URL differ.
    """
    return {v: igd_model(v, secret, tunnel, friendly_name) for v in range(1, version + 1)}


def _device(parent, device: Device, info: DeviceInfo, is_root: bool) -> None:
    el = etree.SubElement(parent, _q("device"))
    _add(el, "deviceType", device.device_type)
    _add(el, "friendlyName", device.friendly_name)
    _add(el, "manufacturer", info.manufacturer)
    if info.manufacturer_url:
        _add(el, "manufacturerURL", info.manufacturer_url)
    _add(el, "modelDescription", info.model_description)
    _add(el, "modelName", info.model_name)
    _add(el, "modelNumber", info.model_number)
    _add(el, "UDN", device.udn)
    if device.services:
        services = etree.SubElement(el, _q("serviceList"))
        for service in device.services:
            s = etree.SubElement(services, _q("service"))
            _add(s, "serviceType", service.service_type)
            _add(s, "serviceId", service.service_id)
            _add(s, "SCPDURL", service.scpd_path)
            _add(s, "controlURL", service.control_path)
            _add(s, "eventSubURL", service.event_path)
    if device.children:
        children = etree.SubElement(el, _q("deviceList"))
        for child in device.children:
            _device(children, child, info, is_root=False)
    if is_root:
        _add(el, "presentationURL", info.presentation_url)


def _add(parent, tag: str, text: str) -> None:
    etree.SubElement(parent, _q(tag)).text = text


def _q(tag: str) -> str:
    return f"{{{NS_DEVICE}}}{tag}"
