"""SOAP 1.1 envelopes of UPnP control, as pure functions (igd.md section 9).

Parsing is lenient in what real clients get wrong (clients.md R10, R12: quoted or
bare SOAPACTION, any namespace prefix, miniupnpc's unescaped ``&``) and strict
where it matters: no DTD, no entity expansion, a size cap, and the action
element's namespace must be the service type named in SOAPACTION.

Error codes of :class:`SoapError`: 402 Invalid Args when the action is known
(from SOAPACTION) but its arguments cannot be read; 401 Invalid Action when the
action itself cannot be told.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from lxml import etree

NS_ENVELOPE = "http://schemas.xmlsoap.org/soap/envelope/"
NS_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"
NS_CONTROL = "urn:schemas-upnp-org:control-1-0"
_ENVELOPE = f"{{{NS_ENVELOPE}}}Envelope"
_BODY = f"{{{NS_ENVELOPE}}}Body"

#: Largest request body we parse.  Real requests are < 2 KiB (AddPortMapping
#: with a long description); a cap keeps a hostile body cheap.
MAX_BODY = 16 * 1024

_XML_DECL = b'<?xml version="1.0" encoding="utf-8"?>\n'
_DTD = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY)", re.IGNORECASE)
# A "&" that does not start one of XML's own references is literal text
# (miniupnpc copies values unescaped, clients.md R12).  Named entities other
# than the five predefined ones are made literal too: there is no DTD to define them.
_BARE_AMP = re.compile(rb"&(?!(?:amp|lt|gt|quot|apos|#[0-9]{1,7}|#x[0-9A-Fa-f]{1,6});)")
# One parser for every request (the reactor thread is the only user).
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          huge_tree=False, recover=True, remove_comments=True, remove_pis=True)
# Characters XML 1.0 cannot carry; dropped from answers rather than failing them.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class SoapError(Exception):
    """A request the codec cannot take; ``code`` is 401 or 402 (see module doc)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class SoapRequest(NamedTuple):
    service_type: str  # the namespace the client used; the answer uses it too
    action: str
    args: dict[str, str]  # in document order


def parse_soap_action(header: str | bytes | None) -> tuple[str, str]:
    """``"serviceType#Action"`` (quotes optional, whitespace ignored) -> (serviceType, Action)."""
    if header is None:
        raise SoapError(401, "no SOAPACTION header")
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    value = header.strip().strip('"').strip()
    service_type, sep, action = value.rpartition("#")
    if not sep or not service_type or not action:
        raise SoapError(401, "SOAPACTION is not serviceType#Action")
    return service_type, action


def parse_request(body: bytes, soapaction: str | bytes | None) -> SoapRequest:
    """The action call in a control request; raises SoapError and nothing else.

    Without a SOAPACTION header the action is read from the body alone.
    """
    named = parse_soap_action(soapaction) if soapaction is not None else None
    code = 401 if named is None else 402

    if len(body) > MAX_BODY:
        raise SoapError(code, "body too large")
    if b"<!" in body and _DTD.search(body):  # the substring test is C-fast and rules most bodies out
        raise SoapError(code, "DTDs and entity declarations are refused")
    if b"&" in body:
        body = _BARE_AMP.sub(b"&amp;", body)
    try:
        root = etree.fromstring(body, _PARSER)
    except (etree.XMLSyntaxError, ValueError):
        root = None
    if root is None:
        raise SoapError(code, "not XML")
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.doctype:
        raise SoapError(code, "DTDs are refused")  # e.g. a UTF-16 body the byte check missed
    if root.tag != _ENVELOPE:
        raise SoapError(code, "not a SOAP envelope")
    body_el = next(root.iterchildren(_BODY), None)
    call = next(body_el.iterchildren(etree.Element), None) if body_el is not None else None
    if call is None:
        raise SoapError(code, "no action in the SOAP body")
    qname = etree.QName(call)
    if named is not None and (qname.namespace, qname.localname) != named:
        raise SoapError(401, "body does not match SOAPACTION")
    if not qname.namespace:
        raise SoapError(401, "action element has no namespace")

    if next(root.iter(etree.Entity), None) is not None:
        raise SoapError(code, "entity references are refused")
    args: dict[str, str] = {}
    for el in call.iterchildren(etree.Element):  # elements only: no comments, PIs or entities
        name = el.tag.rpartition("}")[2]  # arguments are unqualified; tolerate a namespace
        if name in args:
            raise SoapError(402, f"argument {name} given twice")
        # .text unless the value has child elements (lenient); itertext costs 8x more.
        args[name] = "".join(el.itertext()) if len(el) else (el.text or "")
    return SoapRequest(qname.namespace, qname.localname, args)


# Out-arguments that carry an XML document (A_ARG_TYPE_PortListing).  miniupnpc
# copies element text without unescaping it, so these go as CDATA, as miniupnpd
# sends them; lxml has escaped every ">" in the document, so "]]>" cannot occur.
CDATA_ARGUMENTS = frozenset({"NewPortListing"})


def build_response(service_type: str, action: str, out_args: list[tuple[str, str]]) -> bytes:
    """``<u:ActionResponse xmlns:u=serviceType>`` with unqualified out-arguments in order."""
    if not out_args:  # AddPortMapping, DeletePortMapping...: the same bytes every time
        return _empty_response(service_type, action)
    return _response(service_type, action, out_args)


@functools.lru_cache(maxsize=64)
def _empty_response(service_type: str, action: str) -> bytes:
    return _response(service_type, action, ())


def _response(service_type: str, action: str, out_args) -> bytes:
    envelope, body = _envelope()
    response = etree.SubElement(body, f"{{{service_type}}}{action}Response", nsmap={"u": service_type})
    for name, value in out_args:
        text = xml_safe(value)
        etree.SubElement(response, name).text = etree.CDATA(text) if name in CDATA_ARGUMENTS else text
    return _XML_DECL + etree.tostring(envelope)


def build_fault(code: int, description: str) -> bytes:
    """The UPnPError fault (igd.md section 9; clients.md R13).  Sent with HTTP 500."""
    envelope, body = _envelope()
    fault = etree.SubElement(body, f"{{{NS_ENVELOPE}}}Fault")
    etree.SubElement(fault, "faultcode").text = "s:Client"
    etree.SubElement(fault, "faultstring").text = "UPnPError"
    detail = etree.SubElement(fault, "detail")
    error = etree.SubElement(detail, f"{{{NS_CONTROL}}}UPnPError", nsmap={None: NS_CONTROL})
    etree.SubElement(error, f"{{{NS_CONTROL}}}errorCode").text = str(code)
    etree.SubElement(error, f"{{{NS_CONTROL}}}errorDescription").text = xml_safe(description)[:255]
    return _XML_DECL + etree.tostring(envelope)


def xml_safe(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot carry (they would fail the answer)."""
    return _NOT_XML.sub("", text)


def _envelope():
    envelope = etree.Element(_ENVELOPE, nsmap={"s": NS_ENVELOPE})
    envelope.set(f"{{{NS_ENVELOPE}}}encodingStyle", NS_ENCODING)
    return envelope, etree.SubElement(envelope, _BODY)

