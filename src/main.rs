use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    luadriver::cli::main(luadriver::cli::Cli::parse())
}
