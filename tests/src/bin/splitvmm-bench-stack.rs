//! `splitvmm-bench-stack`: the full-stack disk benchmark (`scripts/bench stack` runs it after
//! setting up): the same guest's dd through splitvmm-blk under splitvmm and under QEMU with
//! vhost-user-blk-pci, side by side in one lane run. See `splitvmm_tests::bench::stack`.

use std::process::ExitCode;

use splitvmm_tests::bench::stack::StackBench;
use splitvmm_tests::bench::BenchError;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match StackBench::parse(&args).and_then(|bench| bench.run()) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(BenchError::Help(text)) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(BenchError::Usage(text)) => {
            eprintln!("{text}");
            ExitCode::from(2)
        }
        Err(BenchError::RunsFailed(text)) => {
            // The report of what ran, then what failed: stdout like a successful report.
            println!("{text}");
            eprintln!("splitvmm-bench-stack: some boots failed (see above)");
            ExitCode::from(1)
        }
        Err(error @ (BenchError::Setup(_) | BenchError::Lane(_))) => {
            eprintln!("splitvmm-bench-stack: {error}");
            ExitCode::from(3)
        }
    }
}
