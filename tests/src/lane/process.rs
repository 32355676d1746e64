//! Starting the lane's processes (QEMU for L1, the direct lane's host script) as
//! [`OwnedChild`]ren: stdin from /dev/null, stdout piped to the console reader.

use std::process::{Command, Stdio};

pub use crate::owned_child::OwnedChild;

use super::error::LaneError;

/// Spawns `cmd` with stdin from /dev/null and stdout piped; `what` names it in errors.
pub fn spawn_piped(cmd: &mut Command, what: &str, group: bool) -> Result<OwnedChild, LaneError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    OwnedChild::spawn(cmd, group)
        .map_err(|e| LaneError::io(format!("starting {what} ({cmd:?})"), e))
}
