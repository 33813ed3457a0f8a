//! The `pktdist` command line: the clap definition `main.rs` parses, and the
//! one the man pages and shell completions are generated from
//! (`pktdist generate`, run by `scripts/build-deb.sh`), so the three never
//! disagree.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::client::cli::{
    parse_duration, AffinityCmd, BackendCmd, ConnArgs, StatsArgs, StatusArgs,
};

#[derive(Parser, Debug)]
#[command(
    name = "pktdist",
    version,
    about = "DPDK L4 connection distributor with server-application-initiated affinity",
    long_about = "pktdist distributes TCP and UDP connections to a service's virtual \
                  address over its backends (Maglev or weighted round robin, IP-in-IP or \
                  L2 forwarding, direct server return), and lets the backends' \
                  applications pin their clients to themselves over an authenticated \
                  UDP control protocol."
)]
pub struct Cli {
    /// Log level of the messages on standard error: error, warn, info,
    /// debug or trace, or a filter such as `info,pktdist::control=debug`
    /// [default: the PKTDIST_LOG environment variable, else RUST_LOG, else
    /// info].
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Start EAL, ports, workers and the control thread; stop on
    /// SIGINT/SIGTERM or after --duration and print a summary.
    ///
    /// A signal makes it not ready at once (GET /ready answers 503) and,
    /// with `[control] stop_delay`, it forwards on that long before the
    /// workers stop; a second signal ends it at once.
    Run(RunArgs),
    /// Validate a configuration and print the resolved plan.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Create, extend, cancel and list affinities of a running instance.
    #[command(subcommand)]
    Affinity(AffinityCmd),
    /// List backends of a running instance and change them.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Statistics of a running instance (--watch for a live view).
    Stats(StatsArgs),
    /// Make a running instance re-read its configuration file (as SIGHUP).
    Reload(ConnArgs),
    /// Whether a running instance is ready (GET /ready on its metrics
    /// listener): exit 0 ready, 3 not ready (starting or stopping, or the
    /// port forwarded traffic leaves by without link), 1 when it cannot be
    /// asked (or answers busy).
    Status(StatusArgs),
    /// Write the man pages or a shell completion script (for packagers).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

/// `pktdist run`'s arguments.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The configuration file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Stop after forwarding for this long (30, 30s, 5m, ...), counted
    /// from when the workers start.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// No status line, only the summary.
    #[arg(long)]
    pub quiet: bool,
    /// Start without the saved affinities when `[affinity] state_file`
    /// is corrupt, truncated or not a state file (it is moved to
    /// FILE.bad), instead of refusing to start.
    #[arg(long)]
    pub discard_bad_state: bool,
}

#[derive(Subcommand, Debug)]
pub enum Generate {
    /// Man pages, `pktdist.1` and one per subcommand (`pktdist-run.1`, ...),
    /// into a directory.
    Man { dir: PathBuf },
    /// A completion script for a shell, on standard output.
    Completions { shell: Shell },
}

/// The shells completions are generated for.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Runs `pktdist generate`.
pub fn generate(what: &Generate) -> Result<(), String> {
    match what {
        Generate::Man { dir } => write_man_pages(dir),
        Generate::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "pktdist", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .map_err(|e| format!("standard output: {e}"))
        }
    }
}

/// Writes `pktdist.1` and a page for every visible subcommand, nested ones
/// included (`pktdist-affinity-add.1`), as `git` and `cargo` name theirs.
fn write_man_pages(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    write_page(dir, &cmd, "pktdist")
}

fn write_page(dir: &Path, cmd: &clap::Command, name: &str) -> Result<(), String> {
    let page = cmd.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    // clap adds a `help` subcommand to every level: `--help` says the same.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_page(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("pktdist-man-{}", std::process::id()));
        write_man_pages(&dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        for want in [
            "pktdist.1",
            "pktdist-run.1",
            "pktdist-check.1",
            "pktdist-affinity.1",
            "pktdist-affinity-add.1",
            "pktdist-backend-list.1",
            "pktdist-stats.1",
            "pktdist-reload.1",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("generate") || n.contains("help")),
            "{names:?}"
        );
        let top = std::fs::read_to_string(dir.join("pktdist.1")).unwrap();
        assert!(top.contains(".TH pktdist 1"), "{top}");
        assert!(top.contains("\\-\\-log\\-level"), "{top}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
