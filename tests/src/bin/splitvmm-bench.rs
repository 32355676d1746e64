//! `splitvmm-bench`: the guest-less block benchmark (`scripts/bench-blk` runs it).
//!
//! ```text
//! splitvmm-bench blk --socket PATH [--queues N] [--qd N] [--pattern P] [--bs SIZE] ...
//! splitvmm-bench pread --file PATH [--bs SIZE] [--seconds S] ...
//! ```
//! See `splitvmm_tests::bench::blk` for what is measured and how. Exit status: 0 done, 1 the
//! run failed or a request completed with an error, 2 bad command line.

use std::process::ExitCode;

use splitvmm_tests::bench::blk::{self, BlkArgs, PreadArgs};
use splitvmm_tests::bench::BenchError;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    let result =
        match args.first().map(String::as_str) {
            Some("blk") => BlkArgs::parse(rest).and_then(|a| match a {
                None => Ok(None),
                Some(a) => blk::run_blk(&a)
                    .map(|(rec, ok)| Some((rec.render(a.format, blk::text_blk), ok))),
            }),
            Some("pread") => PreadArgs::parse(rest).and_then(|a| match a {
                None => Ok(None),
                Some(a) => blk::run_pread(&a)
                    .map(|rec| Some((rec.render(a.format, blk::text_pread), true))),
            }),
            Some("-h" | "--help" | "help") => Ok(None),
            Some(other) => Err(BenchError::Usage(format!(
                "splitvmm-bench: unknown benchmark '{other}'\n{}",
                blk::USAGE
            ))),
            None => Err(BenchError::Usage(blk::USAGE.to_owned())),
        };
    match result {
        Ok(None) => {
            println!("{}", blk::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Some((out, ok))) => {
            println!("{out}");
            if ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("splitvmm-bench: some requests failed or none completed");
                ExitCode::from(1)
            }
        }
        Err(BenchError::Usage(text)) => {
            eprintln!("{text}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(1)
        }
    }
}
