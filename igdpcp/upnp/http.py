"""The HTTP face of one tunnel's IGD: description, SCPDs, SOAP control (twisted.web).

A thin adapter: paths come from the ``Device`` models, answers from
``description.py`` and ``control.py``.  Framing follows clients.md R14:
control answers always carry Content-Length (never chunked) and close the
connection, like miniupnpd.  Request bodies above ``soap.MAX_BODY`` get 413
and the connection is closed without reading the rest.  404 for an unknown
path, 405 for a known path with the wrong method (miniupnpd does the same).
GENA paths are served by resources handed in as ``event_resources``.
"""

from __future__ import annotations

from typing import Callable, Mapping

from ..logs import logger
from twisted.web import resource, server

from ..interfaces import IPortMappingService
from ..subscriber import Caller
from . import soap
from .control import Control, LinkProperties, Reply
from .description import DeviceInfo, build_description, description_version
from .device import ROOT_DESC_PATH, Device
from .scpd import ScpdError, ServiceSpec, default_specs
from .ssdp import SERVER as _SERVER

SERVER = _SERVER.encode("latin-1")  # the same product token as SSDP and GENA send
XML_TYPE = b'text/xml; charset="utf-8"'  # igd.md section 8
_PRESENTATION = b"<!DOCTYPE html><html><body><p>Port mappings are managed by your provider.</p></body></html>"


class UPnPRequest(server.Request):
    """A request whose body may not exceed ``soap.MAX_BODY``.

    An oversized body (by Content-Length, or counted as chunks arrive) gets
    413 at once and the connection is closed; the rest is never stored.
    """

    max_body = soap.MAX_BODY
    _received = 0
    _refused = False

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # UPnP bodies are SOAP, never forms; Twisted's form sniffing parses the
        # Content-Type with the email package, about 55 us per POST.
        self._parsePOSTFormSubmission = False

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._refuse()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse()
            return
        super().handleContentChunk(data)

    def process(self):
        if not self._refused:
            super().process()

    def _refuse(self):
        self._refused = True
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after the 413
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\n"
                        b"Connection: close\r\n\r\n")
        transport.loseConnection()


class UPnPSite(server.Site):
    """A Site for UPnP: body cap, and no access log (it would name subscriber
    hosts in clear, ARCHITECTURE.md "Identifiers are private")."""

    requestFactory = UPnPRequest
    displayTracebacks = False

    def log(self, request):
        pass


def make_site(root: resource.IResource, *, timeout: float = 60) -> UPnPSite:
    """The Site for one tunnel's listener.  ``timeout`` bounds idle connections;
    Twisted suspends it while an answer is pending, so slow PCP exchanges are fine."""
    return UPnPSite(root, timeout=timeout)


class UPnPResource(resource.Resource):
    """Everything one tunnel's IGD serves over HTTP, dispatched on the exact path.

    ``models`` maps IGD version to the device model (``description.igd_models``);
    the highest is the version served, a lower one is the description for
    clients.md R1 clients.  ``caller_for(request)`` names the control point
    (``None`` -> 403).  ``event_resources`` maps GENA eventSubURL paths to
    their resources.
    """

    isLeaf = True
    _log = logger(__name__)

    def __init__(self, models: Mapping[int, Device], iwf: IPortMappingService,
                 caller_for: Callable[[server.Request], Caller | None], reactor, *,
                 info: DeviceInfo = DeviceInfo(),
                 specs: Mapping[tuple[str, int], ServiceSpec] | None = None,
                 link: LinkProperties = LinkProperties(),
                 event_resources: Mapping[str | bytes, resource.IResource] | None = None):
        super().__init__()
        specs = specs if specs is not None else default_specs()
        self._models = dict(models)
        self.version = max(self._models)
        self._info = info
        self._caller_for = caller_for
        self._control = Control(iwf, self.version, reactor, specs=specs, link=link)
        self._descriptions: dict[int, bytes] = {}
        # path -> {method: render function}, or a resource rendering for itself
        self._routes: dict[bytes, dict[bytes, Callable] | resource.IResource] = {
            b"/": {b"GET": lambda request: self._static(request, _PRESENTATION, b"text/html; charset=utf-8")},
            ROOT_DESC_PATH.encode(): {b"GET": self._render_description},
        }
        for model in self._models.values():
            for device in model.walk():
                for service in device.services:
                    spec = specs.get((service.name, service.version))
                    if spec is None:
                        raise ScpdError(f"no SCPD for {service.service_type}")
                    self._routes[service.scpd_path.encode()] = {
                        b"GET": lambda request, doc=spec.document: self._static(request, doc, XML_TYPE)}
                    self._routes[service.control_path.encode()] = {
                        b"POST": lambda request, name=service.name: self._render_control(request, name)}
        for path, child in (event_resources or {}).items():
            self._routes[path.encode() if isinstance(path, str) else path] = child

    def render(self, request):
        request.setHeader(b"server", SERVER)
        route = self._routes.get(request.path)
        if route is None:
            return self._error(request, 404, b"Not Found")
        if not isinstance(route, dict):
            return route.render(request)
        method = b"GET" if request.method == b"HEAD" else request.method
        handler = route.get(method)
        if handler is None:
            request.setHeader(b"allow", b", ".join(sorted(route)))
            return self._error(request, 405, b"Method Not Allowed")
        return handler(request)

    def _render_description(self, request) -> bytes:
        """The root description; IGD:1 for R1 clients when serving IGD:2 (clients.md R1)."""
        version = description_version(self.version, request.getHeader(b"user-agent"))
        if version not in self._models:
            version = self.version
        if version not in self._descriptions:
            self._descriptions[version] = build_description(self._models[version], self._info)
        return self._static(request, self._descriptions[version], XML_TYPE)

    def _render_control(self, request, service_name: str):
        _close_after(request)
        body = request.content.read(soap.MAX_BODY + 1)
        if len(body) > soap.MAX_BODY:  # only without UPnPRequest, which refuses earlier
            return self._error(request, 413, b"Request Entity Too Large")
        caller = self._caller_for(request)
        if caller is None:
            return self._error(request, 403, b"Forbidden")
        gone = []
        request.notifyFinish().addErrback(gone.append)
        d = self._control.handle(caller, service_name, request.getHeader(b"soapaction"), body)
        d.addCallback(self._answer, request, gone)
        d.addErrback(lambda failure: self._log.failure("control answer failed", failure))
        return server.NOT_DONE_YET

    @staticmethod
    def _answer(reply: Reply, request, gone: list) -> None:
        """Write a control answer in one piece, unless the client has gone."""
        if gone:
            return
        request.setResponseCode(reply.status)
        request.setHeader(b"content-type", XML_TYPE)
        request.setHeader(b"content-length", b"%d" % len(reply.body))
        request.setHeader(b"ext", b"")
        request.write(reply.body)
        request.finish()

    @staticmethod
    def _static(request, body: bytes, content_type: bytes) -> bytes:
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"ext", b"")
        return body  # twisted.web sets Content-Length for a bytes result

    @staticmethod
    def _error(request, code: int, text: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return text + b"\n"


def _close_after(request) -> None:
    """``Connection: close``, and make twisted.web really close (clients.md R14)."""
    request.setHeader(b"connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False
