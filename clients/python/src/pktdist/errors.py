"""The exceptions the client raises.

Every failure of a request is a :class:`pktdist.Error`:

* :class:`Refused` (and one subclass per known return code) when pktdist
  answered with another code than OK: it carries the code, its name, the
  reply's message, and for CONFLICT the current owner and its remaining
  seconds;
* :class:`Timeout` when no authentic reply came after every attempt;
* :class:`ProtocolError` when an authentic reply makes no sense for the
  request (a list reply without entries, pagination that does not advance);
* :class:`Error` itself for socket failures and a closed client.

Bad arguments (a malformed service address, a negative duration, a key of
the wrong length) raise :class:`ValueError` or :class:`TypeError` before
anything is sent.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

from ._wire import STATIC_REMAINING

__all__ = [
    "Error",
    "Refused",
    "Conflict",
    "NotFound",
    "Invalid",
    "NotAuthorized",
    "TableFull",
    "Internal",
    "Unsupported",
    "QuotaExceeded",
    "RateLimited",
    "Draining",
    "Unavailable",
    "Timeout",
    "ProtocolError",
    "refused",
]


class Error(Exception):
    """Base class of every error of a request to pktdist."""


class Refused(Error):
    """pktdist answered the request with a return code other than OK.

    Attributes:
        code: the return code (a :class:`pktdist.ReturnCode` when this
            client knows it, else the plain number).
        code_name: its name, e.g. ``"CONFLICT"``.
        message: the reply's human-readable detail (may be empty).
        owner: the affinity's current owner (CONFLICT), else None.
        remaining: seconds left on the affinity concerned (CONFLICT), else 0;
            ``STATIC_REMAINING`` (0xFFFFFFFF) for a static affinity from the
            configuration, which never expires (:attr:`static`).
    """

    def __init__(
        self,
        code: int,
        code_name: str,
        message: str = "",
        owner: Optional[str] = None,
        remaining: int = 0,
    ) -> None:
        self.code = code
        self.code_name = code_name
        self.message = message
        self.owner = owner
        self.remaining = remaining
        text = code_name
        if owner is not None:
            left = "static" if self.static else f"{remaining} s remaining"
            text += f" (owner {owner}, {left})"
        if message:
            text += f": {message}"
        super().__init__(text)

    def __reduce__(self) -> Tuple[Any, ...]:
        # The arguments __init__ takes (args holds only the text), so that
        # pickle (multiprocessing, ProcessPoolExecutor) rebuilds it.
        return (
            type(self),
            (self.code, self.code_name, self.message, self.owner, self.remaining),
            self.__dict__,
        )

    @property
    def static(self) -> bool:
        """The affinity concerned is static (declared in the configuration:
        it never expires)."""
        return self.remaining == STATIC_REMAINING


class Conflict(Refused):
    """CONFLICT: an equal affinity key is owned by another backend
    (:attr:`owner`, for :attr:`remaining` more seconds)."""


class NotFound(Refused):
    """NOT_FOUND: no such affinity, service or backend."""


class Invalid(Refused):
    """INVALID: authenticated, but the content is not acceptable (the
    message says why: duration above the service's maximum, a prefix
    shorter than the service allows, ...). An unknown service is
    NotFound."""


class NotAuthorized(Refused):
    """NOT_AUTHORIZED: this sender may not do this (a backend acting for
    another backend, or on a service it does not belong to)."""


class TableFull(Refused):
    """TABLE_FULL: the affinity table is at its configured capacity."""


class Internal(Refused):
    """INTERNAL: pktdist failed to carry out a valid request."""


class Unsupported(Refused):
    """UNSUPPORTED: a message type this pktdist does not know."""


class QuotaExceeded(Refused):
    """QUOTA_EXCEEDED: the backend holds as many affinities as its service
    allows one backend (the message names the quota); cancel one, or let
    one end, before creating another."""


class RateLimited(Refused):
    """RATE_LIMITED: this sender made more requests per second than pktdist
    allows it; nothing was done, retry after a moment."""


class Draining(Refused):
    """DRAINING: the backend is draining or down, so it may not create or
    extend affinities (its existing ones are honoured until they end)."""


class Unavailable(Refused):
    """UNAVAILABLE: cluster mode, and the shared table (etcd) cannot be
    reached: nothing was accepted, or the outcome of a change is unknown
    (list the affinity to find out); retry once the store is back."""


_BY_CODE: Dict[int, Type[Refused]] = {
    1: Conflict,
    2: NotFound,
    3: Invalid,
    4: NotAuthorized,
    5: TableFull,
    6: Internal,
    7: Unsupported,
    8: QuotaExceeded,
    9: RateLimited,
    10: Draining,
    11: Unavailable,
}


def refused(
    code: int, code_name: str, message: str, owner: Optional[str], remaining: int
) -> Refused:
    """The exception for a reply with `code`: its own subclass for the codes
    this client knows, plain :class:`Refused` for codes added later."""
    cls = _BY_CODE.get(int(code), Refused)
    return cls(code, code_name, message, owner, remaining)


class Timeout(Error):
    """No authentic reply after every attempt.

    pktdist sends nothing back to a request it cannot authenticate, so the
    usual causes are: nothing listening at that address, a wrong key or
    name, a clock out of sync by more than the allowed skew, or this host
    outside the allowed networks.
    """

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(
            f"no reply after {attempts} attempt{'s' if attempts != 1 else ''} "
            "(is pktdist listening there, the name and key right, the clock in "
            "sync and this address allowed?)"
        )

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.attempts,), self.__dict__)


class ProtocolError(Error):
    """An authentic reply that makes no sense for the request."""
