//! The `pktdist` command: run the distributor, check a configuration, and
//! talk to a running instance over the control protocol.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use pktdist::client::cli::{self, parse_duration, AffinityCmd, BackendCmd, ConnArgs, StatsArgs};
use pktdist::config::Config;
use pktdist::control::state_file;

#[derive(Parser, Debug)]
#[command(
    name = "pktdist",
    version,
    about = "DPDK L4 connection distributor with server-application-initiated affinity"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start EAL, ports, workers and the control thread; stop on
    /// SIGINT/SIGTERM or after --duration and print a summary.
    Run {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Stop after this long (30, 30s, 5m, ...).
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Also write the summary as JSON to this file.
        #[arg(long)]
        summary_json: Option<PathBuf>,
        /// No status line, only the summary.
        #[arg(long)]
        quiet: bool,
        /// Start without the saved affinities when `[affinity] state_file`
        /// is corrupt, truncated or not a state file (it is moved to
        /// FILE.bad), instead of refusing to start.
        #[arg(long)]
        discard_bad_state: bool,
    },
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Check { config } => check(&config),
        Cmd::Run {
            config,
            duration,
            summary_json,
            quiet,
            discard_bad_state,
        } => run(config, duration, summary_json, quiet, discard_bad_state),
        Cmd::Affinity(cmd) => cli::run_affinity(&cmd),
        Cmd::Backend(cmd) => cli::run_backend(&cmd),
        Cmd::Stats(args) => cli::run_stats(&args),
        Cmd::Reload(conn) => cli::run_reload(&conn),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pktdist: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pktdist check`: the configuration's plan, and the state file's
/// content when there is one (a file `run` would refuse is an error here
/// too).
fn check(config: &std::path::Path) -> Result<(), String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    print!("{}", cfg.plan());
    if let Some(path) = &cfg.affinity.state_file {
        match state_file::load(path).map_err(|e| e.to_string())? {
            None => println!("state file {}: none yet", path.display()),
            Some(s) => println!(
                "state file {}: {} requested affinit(ies), saved at Unix time {}.{:03}",
                path.display(),
                s.affinities.len(),
                s.saved_unix_ms / 1000,
                s.saved_unix_ms % 1000
            ),
        }
    }
    Ok(())
}

#[cfg(feature = "dpdk")]
fn run(
    config: PathBuf,
    duration: Option<Duration>,
    summary_json: Option<PathBuf>,
    quiet: bool,
    discard_bad_state: bool,
) -> Result<(), String> {
    use pktdist::run::{run, RunOptions};
    let cfg = Config::load(&config).map_err(|e| e.to_string())?;
    let opts = RunOptions {
        duration,
        status: !quiet,
        config_path: Some(config),
        discard_bad_state,
    };
    let summary = run(&cfg, &opts)?;
    print!("{}", summary.render());
    if let Some(path) = summary_json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(&path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(not(feature = "dpdk"))]
fn run(
    _: PathBuf,
    _: Option<Duration>,
    _: Option<PathBuf>,
    _: bool,
    _: bool,
) -> Result<(), String> {
    Err("this pktdist was built without the `dpdk` feature: it can check configurations and talk to a running instance, not run".into())
}
