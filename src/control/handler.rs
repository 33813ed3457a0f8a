//! Between the protocol server and what answers its requests: the server
//! authenticates and decodes a request and hands it, with the [`Call`]'s
//! circumstances, to a [`ControlHandler`]; the handler's [`Response`] goes
//! back in a signed reply.

use std::borrow::Cow;
use std::net::SocketAddr;

use crate::cluster::Ticket;
use crate::control::counters::ServerCounters;
use crate::protocol::message::{AffinityEntry, BackendEntry, Request, ReturnCode};
use crate::protocol::rate_limit::RateLimiter;

/// What answers the protocol's requests: the affinity table, the backends,
/// reload and the statistics behind the protocol.
pub trait ControlHandler {
    /// An authenticated, fresh, decoded request, with who sent it, from
    /// where and when ([`Call`]).
    ///
    /// For affinity operations the server has already filled in
    /// `owner` (the sender unless an admin named another) and `notify` (the
    /// source unless the request named one), and refused a non-admin naming
    /// an owner other than itself. The handler must still check that the
    /// owner belongs to the service (else [`ReturnCode::NotAuthorized`]) and
    /// decide which backend operations a non-admin may do.
    ///
    /// For list requests, `limit` is already lowered to what fits one reply;
    /// returning more is harmless (the excess is left for the next page).
    /// `Request::Stats` reaches the handler only for a first chunk.
    fn handle(&mut self, call: &Call<'_>, request: &Request<'_>) -> Response;
}

/// The circumstances of one request.
pub struct Call<'a> {
    /// A backend name, or [`crate::protocol::message::ADMIN_NAME`] with
    /// `is_admin`.
    pub sender: &'a str,
    pub is_admin: bool,
    /// Where the datagram came from.
    pub source: SocketAddr,
    /// The wall clock at the datagram's arrival (ms since the UNIX epoch).
    pub now_ms: u64,
    /// The server's own counters, as of this request (for statistics).
    pub server: &'a ServerCounters,
    /// The server's handling time per datagram so far (ns), for statistics.
    pub server_latency: &'a hdrhistogram::Histogram<u64>,
    /// The senders' request rates and refusals so far, for statistics.
    pub server_rates: &'a RateLimiter,
    /// Whether the server can park one more reply for later
    /// ([`Payload::Deferred`]); when false, a handler that would defer
    /// answers UNAVAILABLE instead.
    pub may_defer: bool,
}

/// The handler's answer: a return code and additional information.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub code: ReturnCode,
    /// Seconds left on the affinity concerned.
    pub remaining_secs: u32,
    /// The current owner (for CONFLICT).
    pub owner: Option<String>,
    pub message: Cow<'static, str>,
    pub payload: Payload,
}

/// What a response carries besides its code.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Payload {
    #[default]
    None,
    /// Entries starting at the request's offset; `more` = entries remain
    /// after the ones returned.
    Affinities {
        entries: Vec<AffinityEntry>,
        more: bool,
    },
    Backends {
        entries: Vec<BackendEntry>,
        more: bool,
    },
    /// The whole statistics document (JSON); the server sends it in chunks.
    Stats(String),
    /// No answer yet (cluster mode: the change waits for the shared
    /// store). The server parks what it needs to sign the reply, and
    /// [`ControlServer::reply_later`](crate::control::server::ControlServer::reply_later)
    /// with this ticket sends it.
    Deferred(Ticket),
}

impl Response {
    pub fn new(code: ReturnCode) -> Response {
        Response {
            code,
            remaining_secs: 0,
            owner: None,
            message: Cow::Borrowed(""),
            payload: Payload::None,
        }
    }

    pub fn ok() -> Response {
        Response::new(ReturnCode::Ok)
    }

    /// CONFLICT naming the current owner and its remaining time.
    pub fn conflict(owner: &str, remaining_secs: u32) -> Response {
        Response {
            owner: Some(owner.to_string()),
            remaining_secs,
            ..Response::new(ReturnCode::Conflict)
        }
    }

    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Response {
        self.message = message.into();
        self
    }

    pub fn with_remaining(mut self, secs: u32) -> Response {
        self.remaining_secs = secs;
        self
    }

    pub fn affinities(entries: Vec<AffinityEntry>, more: bool) -> Response {
        Response {
            payload: Payload::Affinities { entries, more },
            ..Response::ok()
        }
    }

    pub fn backends(entries: Vec<BackendEntry>, more: bool) -> Response {
        Response {
            payload: Payload::Backends { entries, more },
            ..Response::ok()
        }
    }

    /// The answer comes later, under `ticket`.
    pub fn deferred(ticket: Ticket) -> Response {
        Response {
            payload: Payload::Deferred(ticket),
            ..Response::ok()
        }
    }

    /// UNAVAILABLE with why.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Response {
        Response::new(ReturnCode::Unavailable).with_message(message)
    }

    pub fn stats(json: String) -> Response {
        Response {
            payload: Payload::Stats(json),
            ..Response::ok()
        }
    }
}
