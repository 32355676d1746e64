//! The nested lane: QEMU TCG (`-cpu max`, which exposes AMD SVM) boots L1 = the Debian kernel
//! with kvm-amd; L1 mounts the sysroot disk and this run's payload disk and runs the host script,
//! which boots L2 with splitvmm (or whatever the script runs).
//!
//! Disks: `vda` = `images/l1-sysroot.ext4` (read-only), `vdb` = the payload ext4 made here from
//! `run.sh`, `host.sh`, `initrd.cpio.gz` (base L2 initramfs + scenario) and `bin/` (the static
//! binaries).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::artifacts::{host_tool, require_splitvmm, static_bin_dir, static_binaries, Images};
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

/// L1's kernel command line. `quiet` and `mitigations=off` make L1 boot and its nested exits
/// cheaper under TCG; `panic=-1` turns an L1 panic into a reboot, which `-no-reboot` turns into
/// QEMU exiting. `SPLITVMM_L1_APPEND` is appended (e.g. `loglevel=7` to see L1's boot).
const L1_CMDLINE: &str = "console=ttyS0 panic=-1 quiet mitigations=off";

pub fn run(scenario: &Scenario) -> Result<Outcome, LaneError> {
    let images = Images::locate();
    images.check_l1()?;
    let qemu = host_tool("qemu-system-x86_64", "qemu-system-x86")?;
    let mke2fs = host_tool("mke2fs", "e2fsprogs")?;
    let bin_dir = static_bin_dir();
    if scenario.uses_default_host_script() {
        require_splitvmm(&bin_dir)?;
    }
    let mut work = WorkDir::create(&scenario.name, scenario.keep_failed)?;
    let payload = build_payload(scenario, &images, &bin_dir, &mke2fs, work.path())?;
    let _lock = LaneLock::acquire(&scenario.name)?;
    boot_l1(scenario, &images, &qemu, &payload, &mut work)
}

/// Fills `<work>/payload/` and makes `<work>/payload.ext4` from it.
fn build_payload(
    scenario: &Scenario,
    images: &Images,
    bin_dir: &Path,
    mke2fs: &Path,
    work: &Path,
) -> Result<PathBuf, LaneError> {
    let dir = work.join("payload");
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).ctx(|| format!("creating {}", bin.display()))?;
    write_scenario_initrd(&images.l2_initramfs, scenario, &dir.join("initrd.cpio.gz"))?;
    let mut bytes = 0u64;
    for src in static_binaries(bin_dir) {
        let Some(name) = src.file_name() else {
            continue;
        };
        let dst = bin.join(name);
        bytes += std::fs::copy(&src, &dst)
            .ctx(|| format!("copying {} to {}", src.display(), dst.display()))?;
    }
    let kernel = match scenario.kernel {
        KernelImage::BzImage => "/boot/vmlinuz",
        KernelImage::ElfVmlinux => "/boot/vmlinux",
    };
    let env = HostEnv {
        lane: "nested",
        bin_dir: "/payload/bin".into(),
        kernel: kernel.into(),
        vmlinuz: "/boot/vmlinuz".into(),
        vmlinux: "/boot/vmlinux".into(),
        initrd: "/payload/initrd.cpio.gz".into(),
        cmdline: scenario.cmdline.clone(),
        sysroot: "/sysroot".into(),
        in_sysroot: "chroot /sysroot /usr/bin/env".into(),
        payload: "/payload".into(),
    };
    for (name, text) in [("run.sh", run_sh(&env)), ("host.sh", host_sh(scenario))] {
        let path = dir.join(name);
        std::fs::write(&path, text).ctx(|| format!("writing {}", path.display()))?;
    }
    bytes += std::fs::metadata(dir.join("initrd.cpio.gz")).map_or(0, |m| m.len());

    let image = work.join("payload.ext4");
    let mib = bytes.div_ceil(1 << 20) * 5 / 4 + 16 + scenario.l1.payload_free_mib;
    let file = File::create(&image).ctx(|| format!("creating {}", image.display()))?;
    file.set_len(mib << 20)
        .ctx(|| format!("sizing {}", image.display()))?;
    drop(file);
    let out = Command::new(mke2fs)
        .args(["-q", "-t", "ext4", "-m", "0", "-L", "payload", "-F", "-d"])
        .arg(&dir)
        .arg(&image)
        .output()
        .ctx(|| format!("running {}", mke2fs.display()))?;
    if !out.status.success() {
        return Err(LaneError::Tool {
            tool: format!("mke2fs -d {}", dir.display()),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned(),
        });
    }
    Ok(image)
}

fn boot_l1(
    scenario: &Scenario,
    images: &Images,
    qemu: &Path,
    payload: &Path,
    work: &mut WorkDir,
) -> Result<Outcome, LaneError> {
    let mut cmdline = L1_CMDLINE.to_owned();
    if let Some(extra) = std::env::var_os("SPLITVMM_L1_APPEND") {
        cmdline.push(' ');
        cmdline.push_str(&extra.to_string_lossy());
    }
    let stderr_path = work.path().join("qemu.stderr");
    let stderr =
        File::create(&stderr_path).ctx(|| format!("creating {}", stderr_path.display()))?;
    let log = File::create(work.path().join("console.log")).ok();
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
    .args(["-m", &format!("{}M", scenario.l1.memory_mib)])
    .args(["-smp", &scenario.l1.cpus.to_string()])
    .arg("-kernel")
    .arg(&images.vmlinuz)
    .arg("-initrd")
    .arg(&images.l1_initramfs)
    .args(["-append", &cmdline])
    .arg("-drive")
    .arg(drive(&images.l1_sysroot, true))
    .arg("-drive")
    .arg(drive(payload, false))
    .stderr(stderr);

    let start = Instant::now();
    let mut child = spawn_piped(&mut cmd, "QEMU (L1)", false)?;
    let stdout = child
        .take_stdout()
        .ok_or_else(|| LaneError::io("QEMU (L1)", std::io::Error::other("no stdout pipe")))?;
    let mut console = Console::spawn(stdout, start, log);
    let end = pump(&mut console, &mut child, start + scenario.timeout, |m| {
        matches!(m, Marker::L1Done { .. } | Marker::L1Error(_))
    });
    let qemu_stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    if !qemu_stderr.trim().is_empty() {
        console.note(&format!("[QEMU stderr]\n{qemu_stderr}"));
    }
    let elapsed = console.elapsed();
    let fail = |console: &Console, work: &mut WorkDir, reason: String| LaneError::Failed {
        scenario: scenario.name.clone(),
        lane: Lane::Nested,
        reason,
        kept: work.keep(),
        tail: ConsoleTail::of(console.text(), TAIL_LINES),
    };
    let status = match end {
        End::Deadline => {
            return Err(LaneError::Timeout {
                scenario: scenario.name.clone(),
                lane: Lane::Nested,
                after: scenario.timeout,
                kept: work.keep(),
                tail: ConsoleTail::of(console.text(), TAIL_LINES),
            })
        }
        End::Exited(status) => status,
    };
    let l1_error = console.timeline().iter().find_map(|(_, m)| match m {
        Marker::L1Error(text) => Some(text.clone()),
        _ => None,
    });
    if let Some(text) = l1_error {
        return Err(fail(&console, work, format!("L1 could not set up: {text}")));
    }
    if !console
        .timeline()
        .iter()
        .any(|(_, m)| matches!(m, Marker::L1Done { .. }))
    {
        let how = status.map_or_else(|| "was killed".to_owned(), |s| format!("exited ({s})"));
        let stage = if console
            .timeline()
            .iter()
            .any(|(_, m)| *m == Marker::L1Ready)
        {
            "while the host script ran"
        } else if console
            .timeline()
            .iter()
            .any(|(_, m)| *m == Marker::L1Begin)
        {
            "while L1's init set up"
        } else {
            "before L1's init started"
        };
        return Err(fail(&console, work, format!("QEMU {how} {stage}")));
    }
    let (text, timeline) = console.into_parts();
    Ok(Outcome::from_console(
        &scenario.name,
        Lane::Nested,
        text,
        timeline,
        elapsed,
    ))
}

/// A virtio disk; the sysroot is shared by concurrent runs, so it is read-only.
fn drive(path: &Path, read_only: bool) -> String {
    // QEMU's option syntax doubles commas inside values.
    let file = path.display().to_string().replace(',', ",,");
    let ro = if read_only { ",readonly=on" } else { "" };
    format!("file={file},if=virtio,format=raw{ro}")
}
