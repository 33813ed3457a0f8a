"""pktdist: a client for pktdist's control protocol (version 1).

A server application asks pktdist, the load balancer in front of it, to keep
a client on this backend for a while, extends or cancels that request, lists
affinities, and is told when one ends::

    import pktdist

    client = pktdist.Client("10.99.0.1:7400", "be1", pktdist.key_from_hex(KEY_HEX))
    client.create("10.99.100.1:80", "198.51.100.7", duration=600)
    for ended in client.iter_ended():
        print(ended.client, ended.reason_name)

The protocol is specified in pktdist's docs/PROTOCOL.md. Standard library
only. The backend state request (a backend reporting UP, DRAIN or DOWN) is
not in pktdist yet, so it is not here either.
"""

from ._wire import (
    MAX_DATAGRAM,
    VERSION as PROTOCOL_VERSION,
    Affinity,
    Backend,
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
    Error,
    Internal,
    Invalid,
    NotAuthorized,
    NotFound,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
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
    "Timeout",
    "ProtocolError",
    "PROTOCOL_VERSION",
    "MAX_DATAGRAM",
    "DEFAULT_TIMEOUT",
    "DEFAULT_RETRIES",
    "__version__",
]
