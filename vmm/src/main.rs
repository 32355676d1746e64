//! `splitvmm`: parse the command line, run the VM, turn how it ended into the exit status.

use clap::Parser;
use splitvmm_vmm::{exit_code, vm, Args, GuestExit, VmConfig, EXIT_USAGE, EXIT_VMM_ERROR};

fn main() {
    splitvmm_common::logging::init("splitvmm");
    let config = match VmConfig::try_from(Args::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("splitvmm: {error}");
            std::process::exit(EXIT_USAGE);
        }
    };
    match vm::run(config) {
        Ok(exit) => {
            eprintln!(
                "splitvmm: guest {}",
                match exit {
                    GuestExit::PowerOff => "powered off",
                    GuestExit::Reset => "reset",
                }
            );
            std::process::exit(exit_code(exit));
        }
        Err(error) => {
            eprintln!("splitvmm: {error}");
            std::process::exit(EXIT_VMM_ERROR);
        }
    }
}
