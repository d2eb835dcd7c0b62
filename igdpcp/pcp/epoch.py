"""Detecting PCP server state loss from the Epoch Time (RFC 6887 section 8.5)."""

from __future__ import annotations


class EpochTracker:
    """One per server.  ``observe`` is fed each valid response's epoch and the
    client's monotonic time; it says whether the server's epoch is consistent."""

    __slots__ = ("prev_client", "prev_server")

    def __init__(self) -> None:
        self.prev_client: float | None = None
        self.prev_server: int | None = None

    def observe(self, now: float, server_epoch: int) -> bool:
        """Section 8.5 steps 1-4, integer arithmetic on whole seconds."""
        valid = True
        if self.prev_server is not None:
            if server_epoch + 1 < self.prev_server:
                valid = False
            else:
                client_delta = int(now) - int(self.prev_client)
                server_delta = server_epoch - self.prev_server
                if (client_delta + 2 < server_delta - server_delta // 16
                        or server_delta + 2 < client_delta - client_delta // 16):
                    valid = False
        self.prev_client = now
        self.prev_server = server_epoch
        return valid

    def reset(self) -> None:
        self.prev_client = self.prev_server = None
