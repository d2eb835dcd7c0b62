"""twistd plugin: ``twistd -n pcplab`` runs igdpcp's lab CGN (PCP server)."""

from twisted.application.service import ServiceMaker

serviceMaker = ServiceMaker(
    "igdpcp lab CGN",
    "igdpcp.pcplab.tap",
    "A lab carrier-grade NAT: PCP server with THIRD_PARTY_ID (RFC 6887, RFC 7843)",
    "pcplab",
)
