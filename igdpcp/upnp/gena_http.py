"""GENA over HTTP: the eventSubURL resource and the NOTIFY sender (igd.md section 10).

Thin twisted.web adapters around :class:`igdpcp.upnp.gena.SubscriptionManager`.
:class:`EventSubResource` answers SUBSCRIBE / UNSUBSCRIBE; :class:`NotifySender`
delivers :class:`~igdpcp.upnp.gena.Event` messages with an ``Agent`` that
the tunnels layer may bind to the tunnel; :func:`publish` fans a change out.

Delivery rules:

* One NOTIFY in flight per subscription; messages go in SEQ order.  The
  initial event (SEQ 0) waits until the SUBSCRIBE answer has been written.
* Only to the callback URLs the manager validated, in the order given;
  a URL that fails (connection error, timeout, non-2xx) passes the message
  to the next one.  A message no URL takes is lost (the CP sees the SEQ
  gap and may resubscribe).  After :data:`MAX_FAILURES` such messages in a
  row the subscription is dropped: its CP is gone.
* At most :data:`MAX_QUEUE` messages wait per subscription; more are
  dropped and counted, so a stuck CP cannot grow our memory.
"""

from __future__ import annotations

from collections import Counter, deque

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from igdpcp.upnp import gena
from igdpcp.upnp.ssdp import SERVER

MAX_FAILURES = 3
MAX_QUEUE = 32
NOTIFY_TIMEOUT = 30.0  # seconds for one NOTIFY to one URL, connect included
CONTENT_TYPE = b'text/xml; charset="utf-8"'
_GENA_HEADERS = ("sid", "nt", "callback", "timeout")


class EventSubResource(Resource):
    """The eventSubURL of one service on one tunnel.

    ``caller_for(request)`` gives the :class:`igdpcp.subscriber.Caller` (None:
    not from a subscriber tunnel, 403); ``state()`` gives the current
    evented values synchronously, for the initial event.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, manager: gena.SubscriptionManager, caller_for, state,
                 sender: NotifySender, *, server: str = SERVER):
        super().__init__()
        self.manager = manager
        self.caller_for = caller_for
        self.state = state
        self.sender = sender
        self.server_header = server.encode("latin-1")  # not .server: putChild overwrites that

    def render(self, request):
        request.setHeader(b"server", self.server_header)
        if request.method == b"SUBSCRIBE":
            return self._handle(request, self._subscribe)
        if request.method == b"UNSUBSCRIBE":
            return self._handle(request, self._unsubscribe)
        request.setHeader(b"allow", b"SUBSCRIBE, UNSUBSCRIBE")
        return self._status(request, 405)

    def _handle(self, request, action):
        caller = self.caller_for(request)
        if caller is None:
            return self._status(request, 403)
        headers = {}
        for name in _GENA_HEADERS:
            values = request.requestHeaders.getRawHeaders(name.encode())
            if values is not None:
                if len(values) > 1:
                    return self._status(request, 400)
                headers[name] = values[0].decode("latin-1")
        try:
            return action(request, caller, headers)
        except gena.GenaError as e:
            return self._status(request, e.status)

    def _subscribe(self, request, caller, headers):
        result = self.manager.subscribe(caller.address, headers)
        if result.new:
            try:
                event = self.manager.initial_event(result.subscription, self.state())
            except Exception:
                self.manager.drop(result.subscription.sid)
                self.log.failure("evented state unavailable")
                return self._status(request, 500)
            self.sender.send(self.manager, event, after=request.notifyFinish())
        for name, value in result.headers.items():
            request.setHeader(name.encode(), value.encode("latin-1"))
        return self._status(request, 200)

    def _unsubscribe(self, request, caller, headers):
        sub = self.manager.unsubscribe(caller.address, headers)
        self.sender.forget(sub.sid)
        return self._status(request, 200)

    @staticmethod
    def _status(request, code):
        request.setResponseCode(code)
        request.setHeader(b"content-length", b"0")
        return b""


@implementer(IBodyProducer)
class _Body:
    """The whole NOTIFY body at once (FileBodyProducer would use the global cooperator)."""

    def __init__(self, data: bytes):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class NotifySender:
    """Sends NOTIFY messages, one in flight and in order per subscription."""

    log = Logger()

    def __init__(self, reactor, agent=None, *, bind_address: str | None = None,
                 timeout: float = NOTIFY_TIMEOUT, max_failures: int = MAX_FAILURES,
                 max_queue: int = MAX_QUEUE):
        if agent is None:
            agent = Agent(reactor, connectTimeout=timeout,
                          bindAddress=(bind_address, 0) if bind_address else None)
        self.reactor = reactor
        self.agent = agent
        self.timeout = timeout
        self.max_failures = max_failures
        self.max_queue = max_queue
        self.counters: Counter[str] = Counter()
        self._queues: dict[str, deque] = {}

    def send(self, manager: gena.SubscriptionManager, event: gena.Event, after=None):
        """Queue ``event``; fires True when a callback took it, False otherwise.

        ``after`` (a Deferred) holds this message until it fires, success or not.
        """
        done = defer.Deferred()
        queue = self._queues.setdefault(event.sid, deque())
        if len(queue) >= self.max_queue:
            self.counters["dropped_queue_full"] += 1
            done.callback(False)
            return done
        queue.append((event, after, done))
        if len(queue) == 1:
            self._next(manager, event.sid)
        return done

    def forget(self, sid: str) -> None:
        """Send nothing more for ``sid`` (unsubscribed); a message in flight completes."""
        queue = self._queues.get(sid)
        if not queue:
            return
        waiting = list(queue)[1:]
        while len(queue) > 1:
            queue.pop()
        for _, _, done in waiting:
            done.callback(False)

    def _next(self, manager, sid):
        queue = self._queues.get(sid)
        if not queue:
            self._queues.pop(sid, None)
            return
        event, after, done = queue[0]
        gate = defer.succeed(None) if after is None else after
        gate.addErrback(lambda _: None)  # a lost SUBSCRIBE answer does not stop the event
        gate.addCallback(lambda _: self._deliver(manager, event))
        gate.addCallback(self._delivered, manager, sid, done)

    def _deliver(self, manager, event):
        if manager.get(event.sid) is None:
            self.counters["dropped_gone"] += 1
            return defer.succeed(None)
        return defer.ensureDeferred(self._try_urls(event))

    async def _try_urls(self, event) -> bool:
        for url in event.callbacks:
            try:
                ok = await self._post(url, event)
            except Exception as e:  # connection refused, timeout, bad answer: try the next URL
                self.log.debug("NOTIFY failed: {error!r}", error=e)
                ok = False
            if ok:
                self.counters["notify_ok"] += 1
                return True
            self.counters["notify_url_failed"] += 1
        return False

    async def _post(self, url: str, event: gena.Event) -> bool:
        headers = Headers({
            b"content-type": [CONTENT_TYPE],
            b"nt": [gena.NT_EVENT.encode()],
            b"nts": [gena.NTS_PROPCHANGE.encode()],
            b"sid": [event.sid.encode()],
            b"seq": [str(event.seq).encode()],
        })
        d = self.agent.request(b"NOTIFY", url.encode("ascii"), headers, _Body(event.body))
        d.addTimeout(self.timeout, self.reactor)
        response = await d
        body = readBody(response)
        body.addTimeout(self.timeout, self.reactor)
        body.addErrback(lambda _: None)  # the CP's body is of no interest
        return 200 <= response.code < 300

    def _delivered(self, ok, manager, sid, done):
        queue = self._queues.get(sid)
        if queue:
            queue.popleft()
        sub = manager.get(sid)
        if ok:
            if sub is not None:
                sub.failures = 0
        elif ok is False and sub is not None:
            sub.failures += 1
            if sub.failures >= self.max_failures:
                self.counters["dropped_subscription"] += 1
                manager.drop(sid)
        if manager.get(sid) is None and queue:
            for _, _, later in queue:
                later.callback(False)
            queue.clear()
        done.callback(bool(ok))
        self._next(manager, sid)


def publish(manager: gena.SubscriptionManager, sender: NotifySender, changes) -> list:
    """Send ``changes`` (variable -> value) to every subscription of ``manager``'s service.

    Use it as an ``IPortMappingService.add_observer`` callback, e.g.
    ``functools.partial(publish, manager, sender)``.  Returns the Deferreds.
    """
    return [sender.send(manager, event) for event in manager.change_events(changes)]
