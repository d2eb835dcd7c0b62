"""PCP (RFC 6887) wire codec and client.  Speaks PCP only; knows nothing of UPnP."""
