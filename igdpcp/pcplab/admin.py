"""The lab CGN's operator view: a little JSON over HTTP (twisted.web).

    GET  /mappings          the live mappings (THIRD_PARTY_ID in hex)
    GET  /stats             counters, epoch, table size, silent flag
    POST /reboot            lose all state, send unsolicited ANNOUNCEs
    POST /silent  on=1|0    drop every request (query, form body or JSON body)

It shows THIRD_PARTY_IDs in clear, so it listens on 127.0.0.1 by default
(RFC 7843 section 7: only the operator may see them).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from twisted.web import resource, server

from .server import PCPLabServer

_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


class BadRequest(ValueError):
    pass


def _reply(request, status: int, value) -> bytes:
    body = json.dumps(value, indent=1).encode() + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.setHeader(b"cache-control", b"no-store")
    return body


class _Endpoint(resource.Resource):
    """One path: ``methods`` maps an HTTP method to a function returning a JSON value."""

    isLeaf = True

    def __init__(self, methods: dict):
        super().__init__()
        self.methods = methods

    def render(self, request):
        handler = self.methods.get(request.method.decode("ascii", "replace"))
        if handler is None:
            request.setHeader(b"allow", ", ".join(self.methods).encode())
            return _reply(request, 405, {"error": f"use {' or '.join(self.methods)}"})
        try:
            return _reply(request, 200, handler(request))
        except BadRequest as e:
            return _reply(request, 400, {"error": str(e)})


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        return _reply(request, 404, {"error": "not found",
                                     "paths": ["/mappings", "/stats", "/reboot", "/silent"]})


def _switch(request) -> bool:
    """``on`` from the query, a form body, a bare ``1``/``0`` body or JSON ``{"on": true}``."""
    values = request.args.get(b"on")
    raw = values[-1].decode("utf-8", "replace") if values else None
    if raw is None:
        body = request.content.read(1024).decode("utf-8", "replace").strip()
        if body.startswith("{"):
            try:
                value = json.loads(body).get("on")
            except (ValueError, AttributeError):
                raise BadRequest("body is not a JSON object") from None
            if isinstance(value, bool):
                return value
            raw = str(value)
        else:
            raw = parse_qs(body).get("on", [body])[-1]
    raw = raw.strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise BadRequest(f"on must be 1 or 0, got {raw!r}")


class AdminRoot(resource.Resource):
    """The four paths, over one :class:`PCPLabServer`."""

    def __init__(self, pcp: PCPLabServer):
        super().__init__()
        self.pcp = pcp
        self.putChild(b"mappings", _Endpoint({"GET": self.mappings}))
        self.putChild(b"stats", _Endpoint({"GET": self.stats}))
        self.putChild(b"reboot", _Endpoint({"POST": self.reboot}))
        self.putChild(b"silent", _Endpoint({"POST": self.silent}))

    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)

    def _now(self):
        return self.pcp.clock.seconds()

    def mappings(self, request):
        return self.pcp.cgn.snapshot(self._now())

    def stats(self, request):
        return dict(self.pcp.cgn.stats(self._now()), silent=self.pcp.silent)

    def reboot(self, request):
        delays = self.pcp.reboot()
        return {"rebooted": True, "epoch": self.pcp.cgn.epoch(self._now()),
                "announces": len(delays)}

    def silent(self, request):
        self.pcp.set_silent(_switch(request))
        return {"silent": self.pcp.silent}


def make_site(pcp: PCPLabServer, timeout: float = 60.0) -> server.Site:
    site = server.Site(AdminRoot(pcp), timeout=timeout)
    site.displayTracebacks = False
    site.noisy = False
    return site
