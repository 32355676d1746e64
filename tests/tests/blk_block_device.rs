//! `splitvmm-blk` serving a block device (issue 3: "a block device path works as an image
//! too"): a loop device over a file the test fills, buffered and with `--direct`. The capacity
//! in the config space is the device's size; reads see the file's data; writes, discard and
//! write-zeroes reach the device, and after a FLUSH they are in the backing file.
//!
//! The loop device is this file's fixture ([`LoopDevice`]): attached with `losetup --find
//! --show`, detached on drop; devices left behind by a test process that died are detached by
//! the next one.

use std::path::{Path, PathBuf};
use std::process::Command;

use splitvmm_tests::vhost::blk::{BlkFrontend, BlkOptions, BlkRange, BlkStatus, SECTOR_SIZE};
use splitvmm_tests::vhost::blk_daemon::{BlkDaemon, BlkDaemonOptions};
use splitvmm_tests::vhost::process::TempDir;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const SIZE: u64 = 32 * MIB;
/// Backing files of loop devices live in folders named after this label.
const LABEL: &str = "loopdev";

/// `len` bytes of little-endian words, each `tag << 56 | its offset` counting from `start`.
fn words(start: u64, len: u64, tag: u8) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| ((u64::from(tag) << 56) | (start + i * 8)).to_le_bytes())
        .collect()
}

fn sector(offset: u64) -> u64 {
    offset / SECTOR_SIZE
}

fn losetup(args: &[&str]) -> Result<String, String> {
    let out = Command::new("losetup")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run losetup: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "losetup {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A loop device over a file, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<Self, String> {
        detach_stale();
        let file = file.to_str().ok_or("a non-UTF-8 path")?;
        let mut last = String::new();
        // Two tests may race for the same free device: losetup then fails with EBUSY.
        for _ in 0..5 {
            match losetup(&["--find", "--show", file]) {
                Ok(dev) => {
                    return Ok(LoopDevice {
                        path: PathBuf::from(dev),
                    })
                }
                Err(e) if e.contains("busy") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // While a process still holds the device open the kernel detaches it when it closes.
        if let Err(e) = losetup(&["--detach", &self.path.to_string_lossy()]) {
            eprintln!("{e}");
        }
    }
}

/// Detaches loop devices whose backing file belongs to a test process that no longer exists,
/// and removes such processes' folders.
fn detach_stale() {
    let dead = |name: &str| {
        name.strip_prefix(&format!("splitvmm-vhost-{LABEL}-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let Ok(list) = losetup(&["--list", "--noheadings", "--output", "NAME,BACK-FILE"]) else {
        return;
    };
    let tmp = std::env::temp_dir();
    for line in list.lines() {
        let mut fields = line.split_whitespace();
        let (Some(dev), Some(back)) = (fields.next(), fields.next()) else {
            continue;
        };
        let folder = Path::new(back)
            .strip_prefix(&tmp)
            .ok()
            .and_then(|rel| rel.iter().next())
            .and_then(|name| name.to_str());
        if folder.is_some_and(dead) {
            let _ = losetup(&["--detach", dev]);
        }
    }
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(dead) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn serves_a_loop_device(direct: bool) {
    let dir = TempDir::new(LABEL).unwrap();
    let file = dir.path().join("backing.img");
    let initial = words(0, SIZE, 1);
    std::fs::write(&file, &initial).unwrap();
    let lo = LoopDevice::attach(&file)
        .unwrap_or_else(|e| panic!("attaching a loop device (needs root): {e}"));
    let opts = BlkDaemonOptions {
        direct,
        ..Default::default()
    };
    let mut d = BlkDaemon::start(lo.path(), &opts)
        .unwrap_or_else(|e| panic!("starting splitvmm-blk on {}: {e}", lo.path().display()));
    let mut dev = BlkFrontend::connect(d.socket(), BlkOptions::default()).unwrap();
    let config = *dev.config();
    let what = format!("{} (direct: {direct})", lo.path().display());
    assert_eq!(config.capacity, SIZE / SECTOR_SIZE, "{what}: capacity");
    assert_eq!(config.capacity_bytes(), SIZE);
    if direct {
        assert_eq!(config.blk_size, 4096, "{what}: block size with --direct");
    }
    let log = d.stderr();
    assert!(
        log.contains(&format!(
            "serving {} ({} sectors",
            lo.path().display(),
            SIZE / 512
        )),
        "{what}: {log}"
    );

    let q = dev.queue(0);
    // The file's data, through the device.
    for (at, len) in [(0, 256 * KIB), (SIZE - 64 * KIB, 64 * KIB)] {
        let (status, back) = q.read(sector(at), len).unwrap();
        assert_eq!(status, BlkStatus::Ok, "{what}: read at {at:#x}");
        assert!(
            back == initial[at as usize..(at + len) as usize],
            "{what}: read at {at:#x}"
        );
    }
    // Past the end: IOERR.
    assert_eq!(
        q.read(sector(SIZE), 4096).unwrap().0,
        BlkStatus::IoErr,
        "{what}: read past the device's end"
    );

    // Writes (one in the middle, one ending at the last sector), read back.
    let mut want = initial.clone();
    for (at, len, tag) in [(4 * MIB, 256 * KIB, 0xa1), (SIZE - 8 * KIB, 8 * KIB, 0xa2)] {
        let data = words(at, len, tag);
        assert_eq!(
            q.write(sector(at), &data).unwrap(),
            BlkStatus::Ok,
            "{what}: write at {at:#x}"
        );
        let (status, back) = q.read(sector(at), len).unwrap();
        assert_eq!(status, BlkStatus::Ok);
        assert!(back == data, "{what}: read back at {at:#x}");
        want[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    // Discard and write-zeroes (BLKDISCARD / BLKZEROOUT-style paths for block devices): the
    // ranges read back as zeros.
    let zeroed = [(8 * MIB, MIB), (12 * MIB, 64 * KIB)];
    let range = |(at, len): (u64, u64)| BlkRange {
        sector: sector(at),
        num_sectors: (len / SECTOR_SIZE) as u32,
        flags: 0,
    };
    assert_eq!(
        q.discard(&[range(zeroed[0])]).unwrap(),
        BlkStatus::Ok,
        "{what}: discard"
    );
    assert_eq!(
        q.write_zeroes(&[range(zeroed[1])]).unwrap(),
        BlkStatus::Ok,
        "{what}: write-zeroes"
    );
    for (at, len) in zeroed {
        let (status, back) = q.read(sector(at), len).unwrap();
        assert_eq!(status, BlkStatus::Ok);
        assert!(
            back.iter().all(|&b| b == 0),
            "{what}: {at:#x} does not read back as zeros"
        );
        want[at as usize..(at + len) as usize].fill(0);
    }
    assert_eq!(q.flush().unwrap(), BlkStatus::Ok, "{what}: flush");

    // After the FLUSH, the backing file holds exactly what the device was told.
    let on_file = std::fs::read(&file).unwrap();
    assert_eq!(on_file.len(), want.len(), "{what}: the backing file's size");
    if let Some(i) = on_file.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{what}: the backing file differs first at byte {i:#x}");
    }
    assert!(d.is_running(), "{what}: {}", d.stderr());
    // The read past the end, and nothing else, failed.
    let failed = d.stderr().matches("fails with").count();
    assert_eq!(failed, 1, "{what}: requests failed:\n{}", d.stderr());
    drop(dev);
    drop(d);
    drop(lo);
}

#[test]
fn a_loop_device_serves_as_the_image() {
    serves_a_loop_device(false);
}

#[test]
fn a_loop_device_serves_as_the_image_with_o_direct() {
    serves_a_loop_device(true);
}
