//! QEMU (TCG) as a vhost-user-blk frontend no one here wrote, booting the Debian cloud kernel
//! from `scripts/guest-images` with the L2 initramfs plus an appended archive holding the
//! scenario (and any host programs it needs, with their libraries).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flate2::write::GzEncoder;
use flate2::Compression;

use super::wait_until;

/// QEMU boots one at a time in this test binary: the host has two cores.
static QEMU_LOCK: Mutex<()> = Mutex::new(());

pub fn qemu_lock() -> MutexGuard<'static, ()> {
    QEMU_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// `$SPLITVMM_IMAGES`, else `<workspace>/images`.
pub fn images_dir() -> PathBuf {
    std::env::var_os("SPLITVMM_IMAGES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images"),
        PathBuf::from,
    )
}

fn require(path: &Path) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/guest-images (or point SPLITVMM_IMAGES at its output)",
        path.display()
    );
    path.to_owned()
}

const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

/// A `newc` cpio archive.
struct Newc {
    out: Vec<u8>,
    next_ino: u32,
}

impl Newc {
    fn new() -> Self {
        // Inode numbers away from the base archive's, so nothing looks like a hard link.
        Newc {
            out: Vec::new(),
            next_ino: 0x5000_0000,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0,
            u32::try_from(data.len()).expect("file fits a cpio entry"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("short name"),
            0,
        ];
        self.next_ino += 1;
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.out.resize(self.out.len().next_multiple_of(4), 0);
    }
}

/// Guest files: (absolute guest path, mode, contents).
pub struct GuestFiles {
    files: Vec<(String, u32, Vec<u8>)>,
}

impl GuestFiles {
    /// Starts with `/scenario.sh`.
    pub fn new(scenario: &str) -> Self {
        GuestFiles {
            files: vec![("/scenario.sh".into(), 0o755, scenario.as_bytes().to_vec())],
        }
    }

    pub fn add(&mut self, guest_path: &str, mode: u32, data: Vec<u8>) {
        self.files.push((guest_path.to_owned(), mode, data));
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

    /// The base L2 initramfs followed by a gzip'ed archive of these files.
    pub fn build_initrd(&self, out: &Path) {
        let images = images_dir();
        let mut initrd = std::fs::read(require(&images.join("l2-initramfs.cpio.gz")))
            .expect("read base initramfs");
        let mut dirs = BTreeSet::new();
        for (path, _, _) in &self.files {
            let rel = path.trim_start_matches('/');
            let parts: Vec<&str> = rel.split('/').collect();
            for depth in 1..parts.len() {
                dirs.insert(parts[..depth].join("/"));
            }
        }
        let mut cpio = Newc::new();
        for dir in &dirs {
            cpio.entry(dir, S_IFDIR | 0o755, &[]);
        }
        for (path, mode, data) in &self.files {
            cpio.entry(path.trim_start_matches('/'), S_IFREG | mode, data);
        }
        cpio.entry("TRAILER!!!", 0, &[]);
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(&cpio.out).expect("gzip");
        initrd.extend(gz.finish().expect("gzip"));
        std::fs::write(out, initrd).expect("write initrd");
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
