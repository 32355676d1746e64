//! Bad input on the command line: one clear line on stderr naming the problem, a documented
//! exit status (2 for usage errors, 1 when the VMM cannot run), never a panic.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

const SPLITVMM: &str = env!("CARGO_BIN_EXE_splitvmm");

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("splitvmm-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A file that passes the bzImage magic check, readable by everyone.
fn fake_bzimage(test: &str) -> PathBuf {
    let path = scratch_dir(test).join("bzImage");
    let mut image = vec![0u8; 0x400];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&path, image).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path
}

fn splitvmm(args: &[&str]) -> Output {
    Command::new(SPLITVMM).args(args).output().unwrap()
}

/// Asserts a failure with `status`, exactly one stderr line containing each of `needles`, and
/// no panic.
fn assert_one_line_error(output: &Output, status: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(status), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "stderr: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    }
}

#[test]
fn missing_kernel_is_named() {
    let output = splitvmm(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_one_line_error(&output, 2, &["/nonexistent/vmlinuz", "cannot read kernel"]);
}

#[test]
fn non_kernel_file_is_refused() {
    let path = scratch_dir("non-kernel").join("notes.txt");
    std::fs::write(&path, "definitely not a kernel image, just some words").unwrap();
    let output = splitvmm(&["--kernel", path.to_str().unwrap()]);
    assert_one_line_error(&output, 2, &["neither a bzImage nor an ELF"]);
}

#[test]
fn missing_initrd_is_named() {
    let kernel = fake_bzimage("initrd");
    let output = splitvmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd.img",
    ]);
    assert_one_line_error(&output, 2, &["/nonexistent/initrd.img"]);
}

#[test]
fn memory_out_of_range_is_refused() {
    let kernel = fake_bzimage("memory");
    let kernel = kernel.to_str().unwrap();
    for (memory, needle) in [
        ("64M", "below the minimum"),
        ("100T", "more than this host's"),
        ("lots", "--memory"),
        ("0", "below the minimum"),
    ] {
        let output = splitvmm(&["--kernel", kernel, "--memory", memory]);
        assert_one_line_error(&output, 2, &[needle]);
    }
}

#[test]
fn vcpus_out_of_range_are_refused() {
    let kernel = fake_bzimage("vcpus");
    let kernel = kernel.to_str().unwrap();
    for vcpus in ["0", "255", "100000"] {
        let output = splitvmm(&["--kernel", kernel, "--vcpus", vcpus]);
        assert_eq!(output.status.code(), Some(2), "--vcpus {vcpus}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "stderr: {stderr}");
        assert!(stderr.contains("vcpus"), "stderr: {stderr}");
    }
    let output = splitvmm(&["--kernel", kernel, "--vcpus", "-1"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn usage_errors_exit_2() {
    let output = splitvmm(&[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--kernel"));
    let output = splitvmm(&["--kernel", "x", "--bogus"]);
    assert_eq!(output.status.code(), Some(2));
}

/// /dev/kvm that the user may not open: run as `nobody` (the test runs as root in CI).
#[test]
fn unopenable_kvm_is_a_clear_vmm_error() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "this test drops to the user 'nobody' with setpriv and must start as root"
    );
    let kernel = fake_bzimage("kvm");
    // The checkout may sit in a folder `nobody` cannot enter: run a copy from the scratch dir.
    let binary = kernel.with_file_name("splitvmm");
    std::fs::copy(SPLITVMM, &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--",
            binary.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "128M",
        ])
        .output()
        .unwrap();
    assert_one_line_error(&output, 1, &["cannot open /dev/kvm", "ermission denied"]);
}
