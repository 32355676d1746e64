//! `splitvmm-bench-boot`: the boot benchmark (`scripts/bench boot` runs it after setting up).
//!
//! ```text
//! splitvmm-bench-boot [--rounds N] [--vcpus LIST] [...]   run the benchmark, print the table
//! splitvmm-bench-boot probe --key K --ram-mapping S [--chroot DIR] -- VMM ARGS...
//!                                                          (in the lane's host) measure one run
//! splitvmm-bench-boot clock                                (in the lane's host) clock facts
//! ```
//! See `splitvmm_tests::bench::boot` for what is measured and how.

use std::process::ExitCode;

use splitvmm_tests::bench::boot::BootBench;
use splitvmm_tests::bench::probe::{self, ProbeArgs};
use splitvmm_tests::bench::BenchError;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("probe") => match ProbeArgs::parse(&args[1..]) {
            Ok(probe_args) => exit(probe::main(&probe_args)),
            Err(error) => fail(&error),
        },
        Some("clock") => {
            println!(
                "SPLITVMM-RESULT host.clock_res_ns={}",
                probe::monotonic_resolution_ns()
            );
            ExitCode::SUCCESS
        }
        _ => match BootBench::parse(&args).and_then(|bench| bench.run()) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error),
        },
    }
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn fail(error: &BenchError) -> ExitCode {
    match error {
        BenchError::Help(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        BenchError::Usage(text) => {
            eprintln!("{text}");
            ExitCode::from(2)
        }
        BenchError::RunsFailed(text) => {
            // The report of what ran, then what failed: stdout like a successful report.
            println!("{text}");
            eprintln!("splitvmm-bench-boot: some VMM runs failed (see above)");
            ExitCode::from(1)
        }
        BenchError::Setup(_) | BenchError::Lane(_) => {
            eprintln!("splitvmm-bench-boot: {error}");
            ExitCode::from(3)
        }
    }
}
