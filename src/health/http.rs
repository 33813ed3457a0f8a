//! The HTTP side of a check: the request a probe sends (one HTTP/1.0 `GET`
//! with `Connection: close`) and the reading of the response's status
//! line, which is all a check looks at.

use crate::health::target::HttpCheck;

/// Longest status line read before the response is called garbage.
pub const MAX_STATUS_LINE: usize = 1024;

/// The request of a check.
pub fn request(check: &HttpCheck) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: pktdist-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        check.path, check.host
    )
    .into_bytes()
}

/// What the bytes of a response received so far say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusLine {
    /// Not enough bytes yet.
    Incomplete,
    /// The status code.
    Status(u16),
    /// Not an HTTP response; why.
    Garbage(String),
}

/// Reads the status line ("HTTP/1.1 200 OK\r\n") at the start of `buf`.
pub fn status_line(buf: &[u8]) -> StatusLine {
    const PREFIX: &[u8] = b"HTTP/";
    let n = buf.len().min(PREFIX.len());
    if buf[..n] != PREFIX[..n] {
        return StatusLine::Garbage(format!("not an HTTP response: {}", shown(buf)));
    }
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_STATUS_LINE {
            StatusLine::Garbage(format!("status line longer than {MAX_STATUS_LINE} bytes"))
        } else {
            StatusLine::Incomplete
        };
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    // "HTTP/" DIGIT "." DIGIT SP 3DIGIT [SP reason]
    let bad = || StatusLine::Garbage(format!("bad status line: {}", shown(line)));
    let rest = &line[PREFIX.len()..];
    if rest.len() < 7
        || !rest[0].is_ascii_digit()
        || rest[1] != b'.'
        || !rest[2].is_ascii_digit()
        || rest[3] != b' '
        || !rest[4..7].iter().all(u8::is_ascii_digit)
        || rest.get(7).is_some_and(|&b| b != b' ')
    {
        return bad();
    }
    let code = rest[4..7]
        .iter()
        .fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    if !(100..=599).contains(&code) {
        return bad();
    }
    StatusLine::Status(code)
}

/// Up to 40 bytes of `b`, printable, for an error message.
fn shown(b: &[u8]) -> String {
    let mut s: String = b
        .iter()
        .take(40)
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '.'
            }
        })
        .collect();
    if b.len() > 40 {
        s.push_str("...");
    }
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_line(b""), StatusLine::Incomplete);
        assert_eq!(status_line(b"HT"), StatusLine::Incomplete);
        assert_eq!(status_line(b"HTTP/1.1 200 O"), StatusLine::Incomplete);
        assert_eq!(status_line(b"HTTP/1.1 200 OK\r\n"), StatusLine::Status(200));
        assert_eq!(status_line(b"HTTP/1.0 503\r\nx"), StatusLine::Status(503));
        assert_eq!(
            status_line(b"HTTP/1.1 404 Not Found\n"),
            StatusLine::Status(404)
        );
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"\x16\x03\x01",
            b"HTTP/1.1 20 OK\r\n",
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/x.1 200 OK\r\n",
            b"HTTP/1.1 099 OK\r\n",
            b"HTTP/1.1\r\n",
        ] {
            assert!(
                matches!(status_line(bad), StatusLine::Garbage(_)),
                "{bad:?}"
            );
        }
        let long = [b"HTTP/1.1 200 ".as_slice(), &[b'a'; MAX_STATUS_LINE]].concat();
        assert!(matches!(status_line(&long), StatusLine::Garbage(_)));
    }

    #[test]
    fn the_request_names_path_and_host() {
        let r = request(&HttpCheck {
            path: "/healthz".into(),
            host: "10.0.0.1:8080".into(),
            expect: Default::default(),
        });
        let r = String::from_utf8(r).unwrap();
        assert!(
            r.starts_with("GET /healthz HTTP/1.0\r\nHost: 10.0.0.1:8080\r\n"),
            "{r}"
        );
        assert!(r.ends_with("\r\n\r\n"));
    }
}
