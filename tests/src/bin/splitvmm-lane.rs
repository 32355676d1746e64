//! `splitvmm-lane`: run one scenario by hand, in the lane the tests would use, under the same
//! machine-wide lock. The console streams to stderr; a summary and the results go to stdout.
//!
//! ```text
//! splitvmm-lane [--guest FILE|-c SCRIPT] [--host FILE] [--elf] [--cmdline STR]
//!               [--timeout SECS] [--lane nested|direct] [-- VMM_ARGS...]
//! ```
//! Exit status: 0 when the run succeeded (host script, guest scenario and VMM all 0), 1 when it
//! completed otherwise, 2 on usage errors, 3 when the lane failed (timeout, L1 trouble).

use std::process::ExitCode;
use std::time::Duration;

use splitvmm_tests::lane::{self, KernelImage, Lane, Scenario};

const USAGE: &str = "usage: splitvmm-lane [--guest FILE | -c SCRIPT] [--host FILE] [--elf] \
[--cmdline STR] [--timeout SECS] [--lane nested|direct] [-- VMM_ARGS...]";

fn parse(args: &[String]) -> Result<(Scenario, Option<Lane>), String> {
    let mut scenario = Scenario::new("manual", "echo SPLITVMM-RESULT hello=world\n");
    let mut lane = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--guest" => {
                let path = value("--guest")?;
                scenario.guest_script =
                    std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            }
            "-c" => scenario.guest_script = value("-c")?,
            "--host" => {
                let path = value("--host")?;
                scenario.host_script =
                    Some(std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?);
            }
            "--elf" => scenario.kernel = KernelImage::ElfVmlinux,
            "--cmdline" => scenario.cmdline = value("--cmdline")?,
            "--timeout" => {
                let secs = value("--timeout")?;
                let secs: u64 = secs
                    .parse()
                    .map_err(|_| format!("--timeout {secs}: not seconds"))?;
                scenario.timeout = Duration::from_secs(secs);
            }
            "--lane" => {
                let name = value("--lane")?;
                lane = Some(Lane::parse(&name).ok_or(format!("--lane {name}: nested or direct"))?);
            }
            "--" => {
                scenario.vmm_args = it.by_ref().cloned().collect();
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok((scenario, lane))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (scenario, lane) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    if std::env::var_os("SPLITVMM_LANE_ECHO").is_none() {
        std::env::set_var("SPLITVMM_LANE_ECHO", "1");
    }
    let result = match lane {
        Some(lane) => lane::run_in(lane, &scenario),
        None => lane::run(&scenario),
    };
    match result {
        Ok(outcome) => {
            println!("{}", outcome.summary());
            for (time, marker) in &outcome.timeline {
                println!("{:8.2} s  {marker}", time.as_secs_f64());
            }
            match outcome.ensure_success() {
                Ok(_) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            }
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(3)
        }
    }
}
