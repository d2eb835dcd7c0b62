"""The UPnP face: SSDP, device description, SOAP control, GENA eventing.

Speaks UPnP only and knows nothing of PCP; it calls the IWF through
:class:`igdpcp.interfaces.IPortMappingService`.
"""
