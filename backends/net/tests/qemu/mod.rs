//! QEMU (TCG) as a vhost-user-net frontend no one here wrote: it boots the Debian cloud kernel
//! from `scripts/guest-images` with the L2 initramfs plus an appended archive holding the
//! scenario, with guest RAM in a shared memfd and `-netdev vhost-user` on our socket.
//! `vectors=0` (INTx): QEMU 7.2 under TCG segfaults with a vhost-user NIC on MSI-X.
//!
//! Same approach as splitvmm-blk's QEMU interop fixture (backends/blk/tests/common/qemu.rs).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use splitvmm_tests::lane::artifacts::images_dir;
use splitvmm_tests::lane::initrd::write_scenario_initrd;
use splitvmm_tests::lane::Scenario;

/// QEMU boots one at a time in this test binary: the host has two cores.
static QEMU_LOCK: Mutex<()> = Mutex::new(());

pub fn qemu_lock() -> MutexGuard<'static, ()> {
    QEMU_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn require(path: &Path) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/guest-images (or point SPLITVMM_IMAGES at its output)",
        path.display()
    );
    path.to_owned()
}

/// The base L2 initramfs followed by a gzip'ed archive holding `/scenario.sh`.
pub fn build_initrd(scenario: &str, out: &Path) {
    let base = require(&images_dir().join("l2-initramfs.cpio.gz"));
    write_scenario_initrd(&base, &Scenario::new("net-qemu-interop", scenario), out)
        .unwrap_or_else(|e| panic!("building the guest initrd: {e}"));
}

/// A running QEMU; killed on drop.
pub struct Qemu {
    child: Child,
    console: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Qemu {
    /// One virtio-net NIC with `pairs` queue pairs on the vhost-user socket, `smp` CPUs.
    pub fn start(initrd: &Path, socket: &Path, mac: &str, pairs: u16, smp: u32) -> Qemu {
        let images = images_dir();
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args([
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
                "-chardev",
            ])
            .arg(format!("socket,id=c0,path={}", socket.display()))
            .arg("-netdev")
            .arg(format!("vhost-user,id=n0,chardev=c0,queues={pairs}"))
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=n0,mac={mac},vectors=0{}",
                if pairs > 1 { ",mq=on" } else { "" }
            ))
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
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
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

    /// Waits for QEMU to exit (the guest powers off after its scenario).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
            if self.status.is_some() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.status
    }

    /// The value of the guest's `SPLITVMM-RESULT key=value` line, if any.
    pub fn result(&self, key: &str) -> Option<String> {
        self.console()
            .lines()
            .filter_map(|l| l.split_once("SPLITVMM-RESULT ").map(|(_, kv)| kv))
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
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
