"""igdpcp's loggers and the one place their level is set (config ``log.level``).

Every igdpcp module logs through :func:`logger`, whose events pass a level
filter before reaching Twisted's global publisher (and so twistd's log file).
Nothing identifying is logged in clear: subscribers appear as keyed
pseudonyms (:func:`igdpcp.subscriber.pseudonym`).
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_predicate])


def logger(namespace: str) -> Logger:
    """A Logger for ``namespace`` (pass ``__name__``) that honours ``log.level``."""
    return Logger(namespace, observer=_observer)


def set_level(name: str) -> None:
    """``debug``, ``info``, ``warn``, ``error`` or ``critical``."""
    _predicate.setLogLevelForNamespace("igdpcp", LogLevel.levelWithName(name))
