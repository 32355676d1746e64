//! What a test asks a lane to run.

use std::time::Duration;

/// The L2 kernel command line when a scenario sets none. `quiet` matters in the nested lane:
/// every byte on the L2 serial port is a chain of nested exits, and a full boot log costs the
/// L2 boot about ten seconds there. Errors and panics still print.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet";

/// Which form of the Debian kernel `$KERNEL` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelImage {
    /// `vmlinuz`: the bzImage (64-bit boot protocol).
    #[default]
    BzImage,
    /// `vmlinux`: the ELF cut out of the bzImage (it has a PVH entry note).
    ElfVmlinux,
}

/// An extra file for the L2 initramfs, next to `/scenario.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// Absolute path inside the guest, e.g. `/opt/check.sh`; missing folders are created.
    pub path: String,
    pub contents: Vec<u8>,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
}

/// Sizes of the L1 machine (nested lane only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Config {
    pub memory_mib: u32,
    pub cpus: u32,
    /// Free space on the payload disk beyond what the fixture puts there (the image is sparse,
    /// so unused space costs nothing on the host).
    pub payload_free_mib: u64,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config {
            memory_mib: 2048,
            cpus: 2,
            payload_free_mib: 256,
        }
    }
}

/// One end-to-end run: a guest script for L2 and how the lane's host boots it.
///
/// The host script (the default one, or [`Scenario::host_script`]) runs with `sh` in the lane's
/// host — L1 in the nested lane, this machine in the direct lane — with these variables:
///
/// | variable          | nested                     | direct                          |
/// |-------------------|----------------------------|---------------------------------|
/// | `SPLITVMM`        | `/payload/bin/splitvmm`    | `<static bin dir>/splitvmm`     |
/// | `SPLITVMM_BIN_DIR`| `/payload/bin` (also first in `PATH`) | the static bin dir   |
/// | `KERNEL`          | `/boot/vmlinuz` or `/boot/vmlinux` (per [`KernelImage`]) | `images/…` |
/// | `VMLINUZ`, `VMLINUX` | `/boot/vmlinuz`, `/boot/vmlinux` | `images/vmlinuz`, `images/vmlinux` |
/// | `INITRD`          | `/payload/initrd.cpio.gz`  | `<tmp>/initrd.cpio.gz`          |
/// | `CMDLINE`         | [`Scenario::cmdline`]      | the same                        |
/// | `SYSROOT`         | `/sysroot`                 | `/`                             |
/// | `IN_SYSROOT`      | `chroot /sysroot /usr/bin/env` | (empty)                     |
/// | `PAYLOAD`         | `/payload` (ext4, writable)| `<tmp>` (the run's folder)      |
/// | `LANE`            | `nested`                   | `direct`                        |
///
/// In the nested lane `/boot`, `/payload`, `/tmp`, `/dev`, `/proc` and `/sys` have the same paths
/// inside and outside the sysroot, so `$IN_SYSROOT qemu-system-x86_64 … -kernel "$KERNEL"` runs
/// the sysroot's QEMU (or `qemu-storage-daemon`, `ip`) in both lanes. Its stdout and stderr are
/// the console. The script's exit status becomes [`super::Outcome::host_rc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// Names the run in errors and temp folders.
    pub name: String,
    /// Becomes `/scenario.sh` in L2, run with `sh` by the L2 init; report with
    /// `echo SPLITVMM-RESULT key=value`. Its exit status is [`super::Outcome::guest_rc`].
    pub guest_script: String,
    pub guest_files: Vec<GuestFile>,
    /// Extra `splitvmm` arguments for the default host script, e.g. `["--vcpus", "2"]`.
    pub vmm_args: Vec<String>,
    pub kernel: KernelImage,
    /// The L2 kernel command line (`$CMDLINE`).
    pub cmdline: String,
    /// Replaces the default host script, which is
    /// `"$SPLITVMM" --kernel "$KERNEL" --initrd "$INITRD" --cmdline "$CMDLINE" <vmm_args>`
    /// followed by `echo SPLITVMM-VMM-EXIT rc=$?`.
    pub host_script: Option<String>,
    /// For the whole run, L1 boot included.
    pub timeout: Duration,
    pub l1: L1Config,
    /// Keep the run's folder (scripts, payload, console log) when it fails (default true); a
    /// test that expects the failure turns it off.
    pub keep_failed: bool,
    /// Nested lane: how many times to run the scenario again after a fault of the nested lane
    /// itself (see [`super::retry`]); 0 for scenarios that provoke resets on purpose.
    pub nested_retries: u32,
}

impl Scenario {
    /// A scenario with the defaults: bzImage, [`DEFAULT_CMDLINE`], the default host script,
    /// 180 s.
    pub fn new(name: impl Into<String>, guest_script: impl Into<String>) -> Self {
        Scenario {
            name: name.into(),
            guest_script: guest_script.into(),
            guest_files: Vec::new(),
            vmm_args: Vec::new(),
            kernel: KernelImage::default(),
            cmdline: DEFAULT_CMDLINE.to_owned(),
            host_script: None,
            timeout: Duration::from_secs(180),
            l1: L1Config::default(),
            keep_failed: true,
            nested_retries: super::retry::DEFAULT_NESTED_RETRIES,
        }
    }

    pub fn vmm_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.vmm_args = args.into_iter().map(Into::into).collect();
        self
    }

    pub fn kernel(mut self, kernel: KernelImage) -> Self {
        self.kernel = kernel;
        self
    }

    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    pub fn host_script(mut self, script: impl Into<String>) -> Self {
        self.host_script = Some(script.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn guest_file(
        mut self,
        path: impl Into<String>,
        contents: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Self {
        self.guest_files.push(GuestFile {
            path: path.into(),
            contents: contents.into(),
            mode,
        });
        self
    }

    pub fn l1(mut self, l1: L1Config) -> Self {
        self.l1 = l1;
        self
    }

    pub fn keep_failed(mut self, keep: bool) -> Self {
        self.keep_failed = keep;
        self
    }

    /// For scenarios whose guest resets or triple-faults on purpose: a fault is the result.
    pub fn no_nested_retries(mut self) -> Self {
        self.nested_retries = 0;
        self
    }

    /// Whether the host script is the default one, which needs the `splitvmm` binary.
    pub fn uses_default_host_script(&self) -> bool {
        self.host_script.is_none()
    }
}
