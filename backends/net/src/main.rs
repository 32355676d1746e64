//! `splitvmm-net`: parse the command line, serve the tap until SIGTERM/SIGINT.
//!
//! Exit status: 0 after SIGTERM/SIGINT, 2 for a bad command line, 1 when the backend cannot run
//! (tap not creatable, socket in use, ...). Failures print one line on stderr.

use clap::Parser;
use splitvmm_net::config::{one_line_clap_error, Args, Config};
use splitvmm_net::{run, EXIT_USAGE};

fn main() {
    splitvmm_common::logging::init("splitvmm-net");
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                // Help and version text go to stdout with status 0.
                let _ = error.print();
                std::process::exit(0);
            }
            eprintln!("splitvmm-net: {}", one_line_clap_error(&error));
            std::process::exit(EXIT_USAGE);
        }
    };
    let config = match Config::try_from(args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("splitvmm-net: {error}");
            std::process::exit(EXIT_USAGE);
        }
    };
    if let Err(error) = run(config) {
        eprintln!("splitvmm-net: {error}");
        std::process::exit(error.exit_code());
    }
}
