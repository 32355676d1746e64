//! The per-run L2 initramfs: the base image followed by a second gzip'ed cpio archive that holds
//! `/scenario.sh` and the scenario's extra files. The kernel unpacks concatenated archives in
//! order, and the result is still one valid `.cpio.gz` (gzip allows several members).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;

use super::error::{IoContext, LaneError};
use super::scenario::{GuestFile, Scenario};

const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

/// A `newc` ("070701") cpio archive being written.
struct Newc {
    out: Vec<u8>,
    next_ino: u32,
}

impl Newc {
    fn new() -> Self {
        // Inode numbers well away from the base archive's, so no entry looks like a hard link.
        Newc {
            out: Vec::new(),
            next_ino: 0x4000_0000,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let namesize = name.len() + 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0, // mtime
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            0,
            0,
            u32::try_from(namesize).unwrap_or(u32::MAX),
            0, // check
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

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// Checks a guest path and returns it without the leading `/`.
fn guest_relative(scenario: &str, path: &str) -> Result<String, LaneError> {
    let bad = |reason: &str| LaneError::BadScenario {
        scenario: scenario.to_owned(),
        reason: format!("guest file {path:?}: {reason}"),
    };
    let rel = path
        .strip_prefix('/')
        .ok_or_else(|| bad("not an absolute path"))?;
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("empty, `.` or `..` component"));
    }
    if rel.len() > 1000 || rel.contains('\0') {
        return Err(bad("too long or contains NUL"));
    }
    Ok(rel.to_owned())
}

/// The uncompressed archive with `/scenario.sh` and the guest files (folders created as needed).
pub fn scenario_cpio(scenario: &Scenario) -> Result<Vec<u8>, LaneError> {
    let mut files: Vec<(String, &GuestFile)> = Vec::new();
    for file in &scenario.guest_files {
        files.push((guest_relative(&scenario.name, &file.path)?, file));
    }
    let mut dirs = BTreeSet::new();
    for (rel, _) in &files {
        let mut prefix = String::new();
        let components: Vec<&str> = rel.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            dirs.insert(prefix.clone());
        }
    }
    let mut cpio = Newc::new();
    // BTreeSet order puts a parent before its children.
    for dir in &dirs {
        cpio.entry(dir, S_IFDIR | 0o755, &[]);
    }
    cpio.entry(
        "scenario.sh",
        S_IFREG | 0o755,
        scenario.guest_script.as_bytes(),
    );
    for (rel, file) in &files {
        cpio.entry(rel, S_IFREG | (file.mode & 0o7777), &file.contents);
    }
    Ok(cpio.finish())
}

/// Writes `base` followed by the scenario's archive (gzip'ed) to `out`.
pub fn write_scenario_initrd(
    base: &Path,
    scenario: &Scenario,
    out: &Path,
) -> Result<(), LaneError> {
    let mut initrd = std::fs::read(base).ctx(|| format!("reading {}", base.display()))?;
    let cpio = scenario_cpio(scenario)?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&cpio)
        .ctx(|| "compressing the scenario archive".to_owned())?;
    initrd.extend(
        gz.finish()
            .ctx(|| "compressing the scenario archive".to_owned())?,
    );
    std::fs::write(out, initrd).ctx(|| format!("writing {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into (name, mode, data).
    fn parse(mut buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&buf[..6], b"070701");
            let field = |i: usize| {
                let text = std::str::from_utf8(&buf[6 + i * 8..14 + i * 8]).expect("hex");
                usize::from_str_radix(text, 16).expect("hex")
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = String::from_utf8(buf[110..110 + namesize - 1].to_vec()).expect("name");
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = buf[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            assert_eq!((offset + next) % 4, 0);
            offset += next;
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode as u32, data));
            buf = &buf[next..];
        }
    }

    #[test]
    fn archive_holds_scenario_and_files_with_parents() {
        let scenario = Scenario::new("t", "echo hi\n")
            .guest_file("/opt/tools/check.sh", "exit 0\n", 0o755)
            .guest_file("/etc/motd", "hello", 0o644);
        let entries = parse(&scenario_cpio(&scenario).expect("archive"));
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "opt",
                "opt/tools",
                "scenario.sh",
                "opt/tools/check.sh",
                "etc/motd"
            ]
        );
        assert_eq!(entries[3].1, S_IFREG | 0o755);
        assert_eq!(entries[3].2, b"echo hi\n");
        assert_eq!(entries[1].1, S_IFDIR | 0o755);
        assert_eq!(
            entries[5],
            ("etc/motd".to_owned(), S_IFREG | 0o644, b"hello".to_vec())
        );
    }

    #[test]
    fn rejects_bad_guest_paths() {
        for path in ["relative", "/", "/a/../b", "/a//b", "/./a"] {
            let scenario = Scenario::new("t", "").guest_file(path, "", 0o644);
            assert!(scenario_cpio(&scenario).is_err(), "{path}");
        }
    }

    #[test]
    fn initrd_is_base_then_gzip_member() {
        let dir = std::env::temp_dir().join(format!("splitvmm-initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let base = dir.join("base");
        std::fs::write(&base, b"BASE").expect("base");
        let out = dir.join("initrd");
        write_scenario_initrd(&base, &Scenario::new("t", "exit 0"), &out).expect("initrd");
        let bytes = std::fs::read(&out).expect("read");
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(&bytes[..4], b"BASE");
        assert_eq!(&bytes[4..6], [0x1f, 0x8b]);
        let mut cpio = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[4..]), &mut cpio)
            .expect("gunzip");
        assert_eq!(parse(&cpio)[0].0, "scenario.sh");
    }
}
