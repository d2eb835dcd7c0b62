"""In-memory UDP for PCP client tests: a Clock that can listenUDP."""

from ipaddress import IPv4Address

from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.task import Clock

from igdpcp.pcp.codec import MapBody, Response, ThirdParty, ThirdPartyId, decode_request, encode_response
from igdpcp.pcp.constants import Opcode, ResultCode

CLIENT_IP = "10.200.0.2"
SERVER_IP = "10.200.0.1"


class FakeDatagramTransport:
    def __init__(self, protocol, local_host):
        self.protocol = protocol
        self.local_host = local_host
        self.peer = None
        self.written = []

    def connect(self, host, port):
        self.peer = (host, port)

    def write(self, data, addr=None):
        self.written.append(data)

    def getHost(self):
        return TwistedIPv4Address("UDP", self.local_host, 40000)

    def stopListening(self):
        return None


class UDPClock(Clock):
    """A Clock with just enough of IReactorUDP for PCPClient."""

    def __init__(self, local_host=CLIENT_IP):
        super().__init__()
        self.local_host = local_host
        self.transports = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        transport = FakeDatagramTransport(protocol, self.local_host)
        protocol.transport = transport
        self.transports.append(transport)
        return transport

    def deliver(self, data, source=(SERVER_IP, 5351), index=0):
        self.transports[index].protocol.datagramReceived(data, source)

    def sent(self, index=0):
        return [decode_request(d) for d in self.transports[index].written]


def answer(request, result=ResultCode.SUCCESS, lifetime=None, epoch=100, external_port=None,
           external_address=IPv4Address("5.5.5.5"), options=None):
    """A server's response to ``request`` (decoded Request), as bytes."""
    if request.opcode == Opcode.ANNOUNCE:
        return encode_response(Response(Opcode.ANNOUNCE, result, 0, epoch))
    body = request.body
    new_body = MapBody(body.nonce, body.protocol, body.internal_port,
                       body.external_port if external_port is None else external_port,
                       external_address)
    if options is None:
        options = tuple(o for o in request.options if isinstance(o, (ThirdParty, ThirdPartyId)))
    return encode_response(Response(
        Opcode.MAP, result, request.lifetime if lifetime is None else lifetime, epoch, new_body, options))
