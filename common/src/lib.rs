//! What the VMM and the vhost-user backends share: size parsing, the one-line stderr logger and
//! listening unix sockets.

pub mod logging;
pub mod size;
pub mod socket;
