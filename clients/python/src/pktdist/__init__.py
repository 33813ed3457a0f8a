"""pktdist: a client for pktdist's control protocol (version 1).

A server application asks pktdist, the load balancer in front of it, to keep
a client on this backend for a while, extends or cancels that request, lists
affinities, and is told when one ends::

    import pktdist

    client = pktdist.Client("10.99.0.1:7400", "be1", pktdist.key_from_hex(KEY_HEX))
    client.create("10.99.100.1:80", "198.51.100.7", duration=600)
    for ended in client.iter_ended():
        print(ended.client, ended.reason_name)

A backend also reports its own state (``client.set_state("drain")`` before
a graceful shutdown, ``"up"`` when ready, ``"down"`` to leave at once).

The protocol is specified in pktdist's docs/PROTOCOL.md. Standard library
only.
"""

from ._wire import (
    MAX_DATAGRAM,
    STATIC_REMAINING,
    VERSION as PROTOCOL_VERSION,
    Affinity,
    Backend,
    Declared,
    EndReason,
    Ended,
    MsgType,
    Reply,
    ReplyBody,
    ReturnCode,
    key_from_hex,
)
from .client import DEFAULT_RETRIES, DEFAULT_TIMEOUT, Client
from .errors import (
    Conflict,
    Draining,
    Error,
    Internal,
    Invalid,
    NotAuthorized,
    NotFound,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    Unavailable,
    Refused,
    TableFull,
    Timeout,
    Unsupported,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Affinity",
    "Backend",
    "Ended",
    "Reply",
    "ReplyBody",
    "ReturnCode",
    "EndReason",
    "Declared",
    "MsgType",
    "key_from_hex",
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
    "Unavailable",
    "Draining",
    "Timeout",
    "ProtocolError",
    "PROTOCOL_VERSION",
    "MAX_DATAGRAM",
    "STATIC_REMAINING",
    "DEFAULT_TIMEOUT",
    "DEFAULT_RETRIES",
    "__version__",
]
