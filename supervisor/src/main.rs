//! `splitvmm-supervise`: hold a backend's socket and keep the backend running.
//!
//! Exit status: 0 after SIGTERM/SIGINT (the backend stopped with it), 2 for a bad command line,
//! 1 when the supervisor cannot run or gave up (`--max-restarts`). One line on stderr.

use clap::Parser;
use splitvmm_supervise::config::{Args, Config};
use splitvmm_supervise::{run, EXIT_USAGE};

fn main() {
    splitvmm_common::logging::init("splitvmm-supervise");
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = error.print();
                std::process::exit(0);
            }
            let text = error.to_string();
            let line = text.lines().next().unwrap_or("bad command line");
            eprintln!("splitvmm-supervise: {}", line.trim_start_matches("error: "));
            std::process::exit(EXIT_USAGE);
        }
    };
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("splitvmm-supervise: {error}");
            std::process::exit(EXIT_USAGE);
        }
    };
    if let Err(error) = run(config) {
        eprintln!("splitvmm-supervise: {error}");
        std::process::exit(error.exit_code());
    }
}
