"""The interworking: subscribers' port-mapping tables, leases, policy, RFC 6970 translation.

This package meets ``pcp/`` (below) and is called by ``upnp/`` (and later other
front ends).  Its API takes a :class:`~igdpcp.subscriber.Caller` and plain
mapping values and returns values or raises :mod:`igdpcp.iwf.errors`; it knows
no UPnP types or codes.
"""
