//! The `pktdist` command: run the distributor, check a configuration, and
//! talk to a running instance over the control protocol. The command line
//! itself is defined in [`pktdist::command`].

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

use pktdist::client::cli;
use pktdist::command::{self, Cli, Cmd, RunArgs};
use pktdist::config::Config;
use pktdist::control::state_file;
use pktdist::run::memory::{self, TableMemory};

/// `pktdist status`'s exit code for an instance that answers, not ready.
const EXIT_NOT_READY: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = pktdist::run::logging::init(cli.log_level.as_deref()) {
        eprintln!("pktdist: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.cmd {
        Cmd::Check { config } => check(&config),
        Cmd::Run(args) => run(args),
        Cmd::Affinity(cmd) => cli::run_affinity(&cmd),
        Cmd::Backend(cmd) => cli::run_backend(&cmd),
        Cmd::Stats(args) => cli::run_stats(&args),
        Cmd::Reload(conn) => cli::run_reload(&conn),
        Cmd::Status(args) => match cli::run_status(&args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(EXIT_NOT_READY),
            Err(e) => Err(e),
        },
        Cmd::Generate { what } => command::generate(&what),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pktdist: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pktdist check`: the plan, and what the state file holds (or why `run`
/// would refuse it). Its exit status is the configuration's alone: a bad
/// state file is reported, as the machine's memory is, but does not fail
/// a check that gates a start or a reload (the packaged unit's
/// `ExecStartPre` and `ExecReload`), so that `run --discard-bad-state`
/// can start without the file.
fn check(config: &std::path::Path) -> Result<(), String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    print!("{}", cfg.plan());
    let tables = TableMemory::of(&cfg);
    println!("tables: {tables}");
    if let Some(Err(e)) = memory::available().map(|free| tables.check(free)) {
        println!("on this machine, run would refuse to start: {e}");
    }
    if let Some(e) = pktdist::run::cores::refused(&cfg) {
        println!("on this machine, run would refuse to start: {e}");
    }
    if let Some(path) = &cfg.affinity.state_file {
        match state_file::load(path) {
            Ok(None) => println!("state file {}: none yet", path.display()),
            Ok(Some(s)) => println!(
                "state file {}: {} requested affinit(ies), saved at Unix time {}.{:03}",
                path.display(),
                s.affinities.len(),
                s.saved_unix_ms / 1000,
                s.saved_unix_ms % 1000
            ),
            Err(e) => println!(
                "run would refuse to start: {e}{}",
                if matches!(e.kind, state_file::LoadErrorKind::Bad(_)) {
                    " (pktdist run --discard-bad-state starts without it)"
                } else {
                    ""
                }
            ),
        }
    }
    Ok(())
}

#[cfg(feature = "dpdk")]
fn run(args: RunArgs) -> Result<(), String> {
    use pktdist::run::{run, RunOptions};
    let cfg = Config::load(&args.config).map_err(|e| e.to_string())?;
    if cfg.affinity.state_file.is_none() && cfg.cluster.is_none() {
        log::warn!(
            "requested affinities are kept in memory only and a restart loses them: \
             [affinity] state_file keeps them across restarts"
        );
    }
    let opts = RunOptions {
        duration: args.duration,
        status: !args.quiet,
        config_path: Some(args.config),
        discard_bad_state: args.discard_bad_state,
    };
    let summary = run(&cfg, &opts)?;
    print!("{}", summary.render());
    if let Some(path) = args.summary_json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(&path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(not(feature = "dpdk"))]
fn run(_: RunArgs) -> Result<(), String> {
    Err("this pktdist was built without the `dpdk` feature: it can check configurations and talk to a running instance, not run".into())
}
