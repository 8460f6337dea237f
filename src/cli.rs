//! The `luadriver` command line: argument parsing and the `run` subcommand.
//!
//! In: the process arguments. Out: an exit code (0 fine, 1 a driver or runtime failure,
//! 2 a usage error) and messages on stderr that say what to do next.

use crate::driver::{self, DriverEvent, DriverNotice, DriverSpec, InitType, IoThread};
use clap::{Parser, Subcommand};
use crossbeam_channel::{Receiver, select};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "luadriver",
    version,
    about = "Run DriverWorks-style Lua drivers outside a controller"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load one driver (.lua or .c4z) and run it until Ctrl-C, SIGTERM or --for elapses.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The driver: a .lua file or a .c4z package.
    pub driver: PathBuf,
    /// Set a property before the driver starts (repeatable).
    #[arg(long = "prop", value_name = "NAME=VALUE", value_parser = parse_prop)]
    pub props: Vec<(String, String)>,
    /// Stop after this long, e.g. 5s, 1m, 250ms.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub run_for: Option<Duration>,
    /// Keep `C4:Persist*` values in this JSON file, so they survive a restart.
    #[arg(long, value_name = "FILE")]
    pub persist: Option<PathBuf>,
    /// Start an MQTT broker inside luadriver on 127.0.0.1 (default port 1883), so a driver
    /// can be tried with nothing else installed.
    #[arg(long, value_name = "PORT", num_args = 0..=1, default_missing_value = "1883")]
    pub embedded_broker: Option<u16>,
    /// A callback running longer than this is reported (and, with --stop-runaway, stopped
    /// with a Lua error).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
    pub busy_limit: Duration,
    /// Stop a runaway callback with a Lua error instead of only reporting it. This runs the
    /// driver on LuaJIT's interpreter (JIT-compiled loops never see a hook), which makes
    /// Lua-heavy code slower.
    #[arg(long)]
    pub stop_runaway: bool,
    /// Memory the driver's Lua may hold, in MiB; past it, allocations fail with a Lua
    /// "not enough memory" error.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub memory_limit: usize,
    /// The device id `C4:GetDeviceID()` returns.
    #[arg(long, default_value_t = 1001)]
    pub device_id: u32,
}

fn parse_prop(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("expected NAME=VALUE, got '{s}'")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 5s or 250ms: {e}"))
}

/// Runs the parsed command line and returns the process's exit code.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => run(args),
    }
}

/// Sets up `env_logger`: `RUST_LOG` when given; otherwise warnings, the runtime's info
/// lines, and everything the named drivers log (their `C4:DebugLog` too).
pub fn init_logging(driver_names: &[String]) {
    let mut builder = env_logger::Builder::new();
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    } else {
        builder.filter_level(log::LevelFilter::Warn);
        builder.filter_module("luadriver", log::LevelFilter::Info);
        for name in driver_names {
            builder.filter_module(name, log::LevelFilter::Debug);
        }
    }
    let _ = builder.try_init();
}

/// A channel that yields once on Ctrl-C or SIGTERM.
fn stop_signal() -> Receiver<()> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = tx.try_send(());
    }) {
        log::warn!("cannot catch Ctrl-C/SIGTERM ({e}); stop with --for or kill");
    }
    rx
}

fn run(args: RunArgs) -> ExitCode {
    let driver_path = args.driver.clone();
    let package = match crate::package::load(&args.driver) {
        Ok(p) => p,
        Err(e) => {
            init_logging(&[]);
            eprintln!("luadriver: {e}");
            return ExitCode::from(1);
        }
    };
    init_logging(std::slice::from_ref(&package.name));
    // Kept alive until the driver has stopped.
    let _broker = match args.embedded_broker {
        Some(port) => {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            match crate::broker::EmbeddedBroker::start(addr) {
                Ok(b) => {
                    log::info!("embedded MQTT broker listening on 127.0.0.1:{}", b.port());
                    Some(b)
                }
                Err(e) => {
                    eprintln!("luadriver: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        None => None,
    };
    crate::driver::watchdog::set_default_limits(crate::driver::DriverLimits {
        busy_limit: args.busy_limit,
        stop_runaway: args.stop_runaway,
        memory_limit: Some(args.memory_limit.saturating_mul(1024 * 1024)),
    });
    let stop = stop_signal();
    let (notices_tx, notices) = crossbeam_channel::unbounded();
    let name = package.name.clone();
    let spec = DriverSpec {
        id: args.device_id,
        package,
        properties: args.props,
        init_type: InitType::Adding,
        persist_path: args.persist,
        io: IoThread::Own,
    };
    let handle = match driver::spawn(spec, notices_tx) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("luadriver: cannot start a thread for the driver: {e}");
            return ExitCode::from(1);
        }
    };

    // `--for` counts from the start; beyond what the clock can hold it is "until stopped".
    let deadline = args.run_for.and_then(|d| Instant::now().checked_add(d));
    let timeout = match deadline {
        Some(d) => crossbeam_channel::at(d),
        None => crossbeam_channel::never(),
    };

    // Wait for the chunk and OnDriverInit; a chunk that never returns must not make
    // --for, Ctrl-C or SIGTERM powerless. Its thread cannot be stopped or joined (dropping
    // the handle would join it), only left behind for the process's exit to end.
    let still_loading = |why: &str| {
        eprintln!(
            "luadriver: {why} while {name} ({}) was still loading (its chunk or \
             OnDriverInit had not returned)",
            driver_path.display()
        );
        ExitCode::from(1)
    };
    let loaded = select! {
        recv(notices) -> notice => notice,
        recv(stop) -> _ => {
            std::mem::forget(handle);
            return still_loading("stopped");
        }
        recv(timeout) -> _ => {
            std::mem::forget(handle);
            return still_loading("--for elapsed");
        }
    };
    match loaded {
        Ok(DriverNotice::Initialized { .. }) => {}
        Ok(DriverNotice::Failed { error, .. }) => {
            eprintln!("luadriver: {error}");
            return ExitCode::from(1);
        }
        other => {
            eprintln!("luadriver: the driver ended before it was initialized ({other:?})");
            return ExitCode::from(1);
        }
    }
    handle.send(DriverEvent::LateInit);
    match args.run_for {
        Some(d) => log::info!(
            "running {name} for {} (Ctrl-C stops it sooner)",
            humantime::format_duration(d)
        ),
        None => log::info!("running {name} (Ctrl-C to stop)"),
    }

    loop {
        select! {
            recv(stop) -> _ => break,
            recv(timeout) -> _ => break,
            recv(notices) -> notice => match notice {
                Ok(DriverNotice::Stopped { .. }) | Err(_) => break,
                Ok(_) => {}
            },
        }
    }
    log::info!("stopping {name}");
    handle.stop("SHUTDOWN");
    ExitCode::SUCCESS
}
