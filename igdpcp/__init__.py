"""igdpcp: a carrier-hosted UPnP IGD-PCP Interworking Function (RFC 6970, RFC 7843)."""

__version__ = "0.1.0"
