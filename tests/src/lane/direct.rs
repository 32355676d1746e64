//! The direct lane: on a host whose CPU has vmx or svm, the host script runs right here, with
//! the same environment shape as in L1 (paths into `images/`, the static bin dir, this run's
//! folder as `$PAYLOAD`, `SYSROOT=/`, empty `IN_SYSROOT`).

use std::fs::File;
use std::process::Command;
use std::time::Instant;

use super::artifacts::{require_splitvmm, static_bin_dir, Images};
use super::console::Console;
use super::error::{ConsoleTail, IoContext, LaneError, TAIL_LINES};
use super::host_script::{host_sh, run_sh, HostEnv};
use super::initrd::write_scenario_initrd;
use super::lock::LaneLock;
use super::markers::Marker;
use super::outcome::Outcome;
use super::process::spawn_piped;
use super::pump::{pump, End};
use super::scenario::{KernelImage, Scenario};
use super::workdir::WorkDir;
use super::Lane;

pub fn run(scenario: &Scenario) -> Result<Outcome, LaneError> {
    let images = Images::locate();
    images.check_l2()?;
    let bin_dir = static_bin_dir();
    if scenario.uses_default_host_script() {
        require_splitvmm(&bin_dir)?;
    }
    let mut work = WorkDir::create(&scenario.name, scenario.keep_failed)?;
    let dir = work.path().to_path_buf();
    let initrd = dir.join("initrd.cpio.gz");
    write_scenario_initrd(&images.l2_initramfs, scenario, &initrd)?;
    let kernel = match scenario.kernel {
        KernelImage::BzImage => &images.vmlinuz,
        KernelImage::ElfVmlinux => &images.vmlinux,
    };
    let text = |p: &std::path::Path| p.display().to_string();
    let env = HostEnv {
        lane: "direct",
        bin_dir: text(&bin_dir),
        kernel: text(kernel),
        vmlinuz: text(&images.vmlinuz),
        vmlinux: text(&images.vmlinux),
        initrd: text(&initrd),
        cmdline: scenario.cmdline.clone(),
        sysroot: "/".into(),
        in_sysroot: String::new(),
        payload: text(&dir),
    };
    for (name, script) in [("run.sh", run_sh(&env)), ("host.sh", host_sh(scenario))] {
        let path = dir.join(name);
        std::fs::write(&path, script).ctx(|| format!("writing {}", path.display()))?;
    }
    let stderr_path = dir.join("sh.stderr");
    let stderr =
        File::create(&stderr_path).ctx(|| format!("creating {}", stderr_path.display()))?;
    let log = File::create(dir.join("console.log")).ok();
    let mut cmd = Command::new("sh");
    cmd.arg(dir.join("run.sh")).current_dir(&dir).stderr(stderr);

    let _lock = LaneLock::acquire(&scenario.name)?;
    let start = Instant::now();
    let mut child = spawn_piped(&mut cmd, "the host script", true)?;
    let stdout = child
        .take_stdout()
        .ok_or_else(|| LaneError::io("host script", std::io::Error::other("no stdout pipe")))?;
    let mut console = Console::spawn(stdout, start, log);
    let end = pump(&mut console, &mut child, start + scenario.timeout, |m| {
        matches!(m, Marker::HostDone { .. })
    });
    // Whatever the host script left behind (a backend in the background) goes with it.
    let killed = child.kill();
    let sh_stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    if !sh_stderr.trim().is_empty() {
        console.note(&format!("[sh stderr]\n{sh_stderr}"));
    }
    let elapsed = console.elapsed();
    match end {
        End::Deadline => Err(LaneError::Timeout {
            scenario: scenario.name.clone(),
            lane: Lane::Direct,
            after: scenario.timeout,
            kept: work.keep(),
            tail: ConsoleTail::of(console.text(), TAIL_LINES),
        }),
        End::Exited(status) => {
            let done = console
                .timeline()
                .iter()
                .any(|(_, m)| matches!(m, Marker::HostDone { .. }));
            if !done {
                let how = status
                    .or(killed)
                    .map_or_else(|| "was killed".to_owned(), |s| s.to_string());
                return Err(LaneError::Failed {
                    scenario: scenario.name.clone(),
                    lane: Lane::Direct,
                    reason: format!(
                        "run.sh ended ({how}) without reporting the host script's status"
                    ),
                    kept: work.keep(),
                    tail: ConsoleTail::of(console.text(), TAIL_LINES),
                });
            }
            let (text, timeline) = console.into_parts();
            Ok(Outcome::from_console(
                &scenario.name,
                Lane::Direct,
                text,
                timeline,
                elapsed,
            ))
        }
    }
}
