//! The process's log: one line per event on standard error, through the
//! `log` facade (`log::info!` and friends anywhere in the crate) and
//! `env_logger`'s filter syntax (`info`, `warn,pktdist::control=debug`).
//!
//! The level comes from `--log-level`, else `PKTDIST_LOG`, else `RUST_LOG`,
//! else `info`. Under systemd, when standard error is the journal's stream
//! (`JOURNAL_STREAM` names its device and inode), each line starts with the
//! syslog priority as `<N>` (sd-daemon(3)) and carries no timestamp: the
//! journal keeps both. Elsewhere a line is `2026-12-03T01:02:03.456Z INFO
//! message`.

use std::io::Write;

use log::Level;

/// Installs the logger; a second call is a no-op (tests may call it often).
/// Refuses a filter given as `--log-level` or `PKTDIST_LOG` with a bare
/// word that is neither a level nor one of pktdist's module paths
/// (`warning`): the filter syntax would read it as the name of a module,
/// and with no other directive nothing would be logged at all, errors
/// included. `RUST_LOG`, which other programs share, is only warned of
/// such a word, and `info` used instead.
pub fn init(filter: Option<&str>) -> Result<(), String> {
    let spec = match filter {
        Some(f) => checked(f, "--log-level")?,
        None => match std::env::var("PKTDIST_LOG") {
            Ok(v) => checked(&v, "PKTDIST_LOG")?,
            Err(_) => match std::env::var("RUST_LOG") {
                Ok(v) => checked(&v, "RUST_LOG").unwrap_or_else(|e| {
                    eprintln!("pktdist: {e}; logging at info");
                    "info".to_string()
                }),
                Err(_) => "info".to_string(),
            },
        },
    };
    let journal = stderr_is_journal();
    let _ = env_logger::Builder::new()
        .parse_filters(&spec)
        .format(move |buf, record| {
            if journal {
                writeln!(buf, "<{}>{}", priority(record.level()), record.args())
            } else {
                writeln!(
                    buf,
                    "{} {:<5} {}",
                    buf.timestamp_millis(),
                    record.level(),
                    record.args()
                )
            }
        })
        .try_init();
    Ok(())
}

/// `spec` if [`check_filter`] takes it, else why not, naming `from`.
fn checked(spec: &str, from: &str) -> Result<String, String> {
    check_filter(spec)
        .map(|()| spec.to_string())
        .map_err(|e| format!("{from} {spec:?}: {e}"))
}

/// Checks a filter's directives (`level`, `path=level` or `path`, comma
/// separated, optionally followed by `/regex`): a bare word must be a
/// level or a path in pktdist.
fn check_filter(spec: &str) -> Result<(), String> {
    let directives = spec.split_once('/').map_or(spec, |(d, _)| d);
    for d in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        let is_level = |w: &str| w.parse::<log::LevelFilter>().is_ok();
        match d.split_once('=') {
            Some((_, level)) if !is_level(level.trim()) => {
                return Err(format!(
                    "{level:?} in {d:?} is not a level (off, error, warn, info, debug, trace)"
                ));
            }
            Some(_) => {}
            None if is_level(d) || d == "pktdist" || d.starts_with("pktdist::") => {}
            None => {
                return Err(format!(
                    "{d:?} is neither a level (off, error, warn, info, debug, trace) nor a \
                     module of pktdist (pktdist::...)"
                ));
            }
        }
    }
    Ok(())
}

/// The syslog priority of a level, as sd-daemon(3) prefixes use them.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Whether standard error is the stream systemd connected to the journal:
/// `JOURNAL_STREAM` is `DEVICE:INODE` of that stream, and stays set in
/// children whose standard error was redirected elsewhere, so both must
/// match (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word that is not a level would be read as a module name, and
    /// silence the whole log: refused, with the word named.
    #[test]
    fn filters_with_a_word_that_is_no_level_are_refused() {
        for ok in [
            "info",
            "WARN",
            "off",
            "warn,pktdist::control=debug",
            "pktdist::health",
            "pktdist",
            "tokio=debug, info",
            "debug/affinity",
            "",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok:?}");
        }
        for (bad, named) in [
            ("warning", "\"warning\" is neither a level"),
            ("info,verbose", "\"verbose\" is neither"),
            (
                "pktdist=warning",
                "\"warning\" in \"pktdist=warning\" is not a level",
            ),
        ] {
            let e = check_filter(bad).unwrap_err();
            assert!(e.contains(named), "{bad:?}: {e}");
        }
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
    }
}
