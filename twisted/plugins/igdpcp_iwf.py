from twisted.application.service import ServiceMaker

igdpcp = ServiceMaker(
    "igdpcp",
    "igdpcp.tap",
    "UPnP IGD-PCP Interworking Function (RFC 6970, RFC 7843)",
    "igdpcp",
)
