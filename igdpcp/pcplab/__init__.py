"""igdpcp's lab CGN: a PCP server like RFC 7843's L2-aware CGN, for tests, the demo and labs.

``cgn`` is the sans-IO core, ``server`` its UDP adapter, ``admin`` the JSON
operator view, ``config`` the settings and ``tap`` the ``twistd pcplab`` entry.
"""
