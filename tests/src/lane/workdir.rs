//! A run's temporary folder: removed when the run succeeded, kept (and named in the error) when
//! it failed (unless the scenario says otherwise), kept always with `SPLITVMM_LANE_KEEP=1`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::error::{IoContext, Kept, LaneError};

pub struct WorkDir {
    path: PathBuf,
    keep: bool,
    keep_failed: bool,
}

impl WorkDir {
    /// A fresh folder for `scenario`; `keep_failed` says whether [`WorkDir::keep`] keeps it.
    pub fn create(scenario: &str, keep_failed: bool) -> Result<Self, LaneError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name: String = scenario
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let path = std::env::temp_dir().join(format!(
            "splitvmm-lane-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover of a previous process with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).ctx(|| format!("creating {}", path.display()))?;
        let keep = std::env::var_os("SPLITVMM_LANE_KEEP").is_some_and(|v| v != "0");
        Ok(WorkDir {
            path,
            keep,
            keep_failed,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For a failed run: marks the folder to be kept (unless the scenario said not to) and says
    /// where it is (for the error).
    pub fn keep(&mut self) -> Kept {
        if !self.keep_failed && !self.keep {
            return Kept(None);
        }
        self.keep = true;
        Kept(Some(self.path.clone()))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
