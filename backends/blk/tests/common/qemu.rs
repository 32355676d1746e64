//! QEMU (TCG) as a vhost-user-blk frontend no one here wrote, booting the Debian cloud kernel
//! from `scripts/guest-images` with the L2 initramfs plus an appended archive holding the
//! scenario (and any host programs it needs, with their libraries).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use splitvmm_tests::lane::initrd::write_scenario_initrd;
use splitvmm_tests::lane::Scenario;

use super::wait_until;

/// QEMU boots one at a time in this test binary: the host has two cores.
static QEMU_LOCK: Mutex<()> = Mutex::new(());

pub fn qemu_lock() -> MutexGuard<'static, ()> {
    QEMU_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub use splitvmm_tests::lane::artifacts::images_dir;

fn require(path: &Path) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/guest-images (or point SPLITVMM_IMAGES at its output)",
        path.display()
    );
    path.to_owned()
}

/// The scenario and the files the guest gets beside it (the lane fixture's initramfs builder).
pub struct GuestFiles {
    scenario: Scenario,
}

impl GuestFiles {
    /// Starts with `/scenario.sh`.
    pub fn new(scenario: &str) -> Self {
        GuestFiles {
            scenario: Scenario::new("blk-qemu-interop", scenario),
        }
    }

    pub fn add(&mut self, guest_path: &str, mode: u32, data: Vec<u8>) {
        let scenario = std::mem::replace(&mut self.scenario, Scenario::new("", ""));
        self.scenario = scenario.guest_file(guest_path, data, mode);
    }

    /// Copies a dynamically linked host program to `guest_path`, with the libraries `ldd`
    /// lists at their host paths (the guest initramfs has only static busybox).
    pub fn add_host_program(&mut self, host: &Path, guest_path: &str) {
        let data = std::fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display()));
        self.add(guest_path, 0o755, data);
        let out = Command::new("ldd")
            .arg(host)
            .output()
            .expect("run ldd (libc-bin)");
        let listing = String::from_utf8_lossy(&out.stdout);
        for line in listing.lines() {
            // "libx.so => /lib/.../libx.so (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                let lib = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
                self.add(path, 0o755, lib);
            }
        }
    }

    /// The base L2 initramfs followed by a gzip'ed archive of the scenario and these files.
    pub fn build_initrd(&self, out: &Path) {
        let base = require(&images_dir().join("l2-initramfs.cpio.gz"));
        write_scenario_initrd(&base, &self.scenario, out)
            .unwrap_or_else(|e| panic!("building the guest initrd: {e}"));
    }
}

/// A vhost-user-blk disk for QEMU: the backend's socket and the queue count to ask for.
pub struct Disk<'a> {
    pub socket: &'a Path,
    pub num_queues: u16,
}

/// A running QEMU; killed on drop.
pub struct Qemu {
    child: Child,
    console: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Qemu {
    pub fn start(initrd: &Path, disks: &[Disk], smp: u32) -> Qemu {
        let images = images_dir();
        let mut command = Command::new("qemu-system-x86_64");
        command.args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            &smp.to_string(),
            "-m",
            "512M",
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
        ]);
        for (i, disk) in disks.iter().enumerate() {
            command
                .arg("-chardev")
                .arg(format!("socket,id=c{i},path={}", disk.socket.display()))
                .arg("-device")
                .arg(format!(
                    "vhost-user-blk-pci,chardev=c{i},num-queues={}",
                    disk.num_queues
                ));
        }
        command
            .arg("-kernel")
            .arg(require(&images.join("vmlinuz")))
            .arg("-initrd")
            .arg(initrd)
            .args([
                "-append",
                "console=ttyS0 panic=1 quiet",
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .expect("spawn qemu-system-x86_64 (Debian package qemu-system-x86)");
        let console = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let console = console.clone();
            std::thread::spawn(move || pump(pipe, &console));
        }
        Qemu {
            child,
            console,
            status: None,
        }
    }

    pub fn console(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last `n` console lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn wait_console(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || self.console().contains(needle))
    }

    /// Waits for QEMU to exit (the guest powers off after its scenario).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = &mut self.child;
        let mut status = self.status;
        wait_until(limit, || {
            if status.is_none() {
                status = child.try_wait().ok().flatten();
            }
            status.is_some()
        });
        self.status = status;
        status
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }

    /// `SPLITVMM-RESULT key=value` lines, in order.
    pub fn results(&self) -> Vec<(String, String)> {
        self.console()
            .lines()
            .filter_map(|l| l.split_once("SPLITVMM-RESULT ").map(|(_, kv)| kv))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    }

    /// The value of result `key`; panics with the console tail when it is missing.
    pub fn result(&self, key: &str) -> String {
        self.results()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("guest reported no {key}; console tail:\n{}", self.tail(60)))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("--- QEMU console tail ---\n{}", self.tail(60));
        }
    }
}

fn pump(mut pipe: Box<dyn Read + Send>, console: &Mutex<String>) {
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                if std::env::var_os("SPLITVMM_QEMU_ECHO").is_some() {
                    eprint!("{text}");
                }
                console
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&text);
            }
        }
    }
}

/// sha256 of a host file, by `sha256sum` (coreutils).
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}
