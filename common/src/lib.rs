//! What the VMM and the vhost-user backends share: size parsing and the one-line stderr logger.

pub mod logging;
pub mod size;
