//! Where the lanes find their images, binaries and host tools.

use std::path::{Path, PathBuf};

use super::error::LaneError;

const IMAGES_HINT: &str = "run scripts/guest-images (or point SPLITVMM_IMAGES at its output)";
const STATIC_HINT: &str =
    "run scripts/build-static (or point SPLITVMM_STATIC_BIN_DIR at statically linked binaries)";

/// The workspace root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$SPLITVMM_IMAGES`, else `<root>/images`.
pub fn images_dir() -> PathBuf {
    std::env::var_os("SPLITVMM_IMAGES").map_or_else(|| repo_root().join("images"), PathBuf::from)
}

/// `$SPLITVMM_STATIC_BIN_DIR`, else `<root>/target/static/x86_64-unknown-linux-gnu/release`.
pub fn static_bin_dir() -> PathBuf {
    std::env::var_os("SPLITVMM_STATIC_BIN_DIR").map_or_else(
        || repo_root().join("target/static/x86_64-unknown-linux-gnu/release"),
        PathBuf::from,
    )
}

/// The files `scripts/guest-images` makes.
#[derive(Debug, Clone)]
pub struct Images {
    pub dir: PathBuf,
    pub vmlinuz: PathBuf,
    pub vmlinux: PathBuf,
    pub l2_initramfs: PathBuf,
    pub l1_initramfs: PathBuf,
    pub l1_sysroot: PathBuf,
}

impl Images {
    pub fn locate() -> Self {
        let dir = images_dir();
        Images {
            vmlinuz: dir.join("vmlinuz"),
            vmlinux: dir.join("vmlinux"),
            l2_initramfs: dir.join("l2-initramfs.cpio.gz"),
            l1_initramfs: dir.join("l1-initramfs.cpio.gz"),
            l1_sysroot: dir.join("l1-sysroot.ext4"),
            dir,
        }
    }

    /// The L2 images exist (both lanes need them).
    pub fn check_l2(&self) -> Result<(), LaneError> {
        require(&self.vmlinuz, "guest kernel (vmlinuz)", IMAGES_HINT)?;
        require(&self.vmlinux, "guest kernel (vmlinux)", IMAGES_HINT)?;
        require(&self.l2_initramfs, "L2 initramfs", IMAGES_HINT)
    }

    /// The L1 images exist too (nested lane).
    pub fn check_l1(&self) -> Result<(), LaneError> {
        self.check_l2()?;
        require(&self.l1_initramfs, "L1 initramfs", IMAGES_HINT)?;
        require(&self.l1_sysroot, "L1 sysroot", IMAGES_HINT)
    }
}

/// The executables (no extension, executable bit) at the top of the static bin dir.
pub fn static_binaries(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut bins: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_none())
        .filter(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect();
    bins.sort();
    bins
}

/// The `splitvmm` binary in `dir`, which the default host script runs.
pub fn require_splitvmm(dir: &Path) -> Result<PathBuf, LaneError> {
    let path = dir.join("splitvmm");
    require(&path, "static splitvmm binary", STATIC_HINT)?;
    Ok(path)
}

/// A host program, from `PATH` or the sbin folders (`mke2fs` lives there).
pub fn host_tool(name: &str, package: &str) -> Result<PathBuf, LaneError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LaneError::Missing {
            what: format!("host program `{name}`"),
            path: PathBuf::from(name),
            hint: format!("install the Debian package {package} (scripts/guest-images does)"),
        })
}

fn require(path: &Path, what: &str, hint: &str) -> Result<(), LaneError> {
    if path.exists() {
        Ok(())
    } else {
        Err(LaneError::Missing {
            what: what.to_owned(),
            path: path.to_path_buf(),
            hint: hint.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_images_say_what_to_run() {
        let images = Images {
            dir: "/nonexistent".into(),
            vmlinuz: "/nonexistent/vmlinuz".into(),
            vmlinux: "/nonexistent/vmlinux".into(),
            l2_initramfs: "/nonexistent/l2".into(),
            l1_initramfs: "/nonexistent/l1".into(),
            l1_sysroot: "/nonexistent/sysroot".into(),
        };
        let text = images
            .check_l1()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(text.contains("/nonexistent/vmlinuz"), "{text}");
        assert!(text.contains("scripts/guest-images"), "{text}");
        let text = require_splitvmm(Path::new("/nonexistent"))
            .err()
            .map(|e| e.to_string());
        assert!(text.unwrap_or_default().contains("scripts/build-static"));
    }
}
