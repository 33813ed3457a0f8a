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
pub fn init(filter: Option<&str>) {
    let spec = filter
        .map(str::to_string)
        .or_else(|| std::env::var("PKTDIST_LOG").ok())
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
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

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
    }
}
