"""The swappable parts of igdpcp, declared in one place (as ``twisted.names`` does)."""

from __future__ import annotations

from zope.interface import Interface


class IPortMappingService(Interface):
    """The IWF operations a front end (UPnP face, later a portal) calls.

    Every method takes a :class:`~igdpcp.subscriber.Caller`; a caller sees and
    changes only its own subscriber's mappings.  Methods that may talk to the
    PCP server return Deferreds; failures are :mod:`igdpcp.iwf.errors` types.
    """

    def add_mapping(caller, request, any_port=False):
        """Create or refresh a mapping (``MappingRequest``).

        ``any_port=False`` is AddPortMapping (exact external port or Conflict);
        ``True`` is AddAnyPortMapping.  Fires with the stored ``MappingView``.
        """

    def delete_mapping(caller, key):
        """Delete the caller's mapping named by ``MappingKey``. Fires with None."""

    def delete_range(caller, start_port, end_port, protocol, manage):
        """Delete the caller's mappings in an external port range. Fires with the count."""

    def get_specific(caller, key):
        """Fires with the ``MappingView`` for ``key`` or fails with NoSuchEntry / Conflict."""

    def get_generic(caller, index):
        """The ``MappingView`` at ``index`` of the subscriber's table (local, synchronous)."""

    def list_mappings(caller, start_port, end_port, protocol, manage, limit):
        """The ``MappingView`` list in a range (local, synchronous)."""

    def mapping_count(subscriber):
        """How many mappings the subscriber holds (PortMappingNumberOfEntries)."""

    def external_address(caller):
        """Fires with the subscriber's external address from the CGN, or None if unknown."""

    def connection_status(caller):
        """Fires with True when the subscriber's CGN answers."""

    def state(subscriber):
        """The subscriber's evented values now: ``mappings``, ``update_id``, ``external_address``."""

    def add_observer(subscriber, observer):
        """Call ``observer(changes)`` when those values change (a dict of the changed ones)."""

    def remove_observer(subscriber, observer):
        """Stop calling ``observer``."""


class IMappingStore(Interface):
    """Durable storage of the mappings the IWF has promised (SQLite by default)."""

    def put(row):
        """Store or replace a mapping row (a dict of plain values); durable once
        :meth:`durable` fires (a store may write in the background)."""

    def replace(old_row, row):
        """Atomically remove ``old_row`` and store ``row``."""

    def delete(row):
        """Remove the row with the same key."""

    def durable():
        """A Deferred firing once every write made so far is durable (fails if one failed)."""

    def load_all():
        """All stored records (used at start-up to restore and renew)."""

    def close():
        """Release the store."""


class IThirdPartyIdSource(Interface):
    """Finds the THIRD_PARTY_ID of a tunnel (static table, the interface itself, AAA).

    Providers are in :mod:`igdpcp.tunnels.idsource` (and ``tunnels.radius``).
    """

    def third_party_id(tunnel):
        """Fires with the THIRD_PARTY_ID octets (1..1016) for ``tunnel``, a
        ``tunnels.idsource.TunnelInfo``, or fails with an ``IdUnavailable``
        (never a guessed ID: the IWF then answers 501 and sends no PCP request)."""

    def forget(tunnel):
        """Drop anything cached about ``tunnel`` (it went away). Stateless sources do nothing."""


class IServerSelector(Interface):
    """Chooses which PCP server holds a subscriber's mappings."""

    def server_for(subscriber):
        """The configured server name for ``subscriber``."""



class IPCPClientListener(Interface):
    """What the PCP client tells upper layers.  A listener may implement any subset."""

    def server_state_lost(server):
        """The epoch check failed or an ANNOUNCE showed the server lost state (RFC 6887 8.5)."""

    def server_unreachable(server):
        """RFC 7488 section 3: MRC transmissions to ``server`` went unanswered."""

    def server_reachable(server):
        """A server reported unreachable answered again."""

    def mapping_update(server, result):
        """An unsolicited MAP response (RFC 6887 14.2) that matched no request."""
