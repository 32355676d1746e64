//! What the VMM and the vhost-user backends share: size parsing, the one-line stderr logger,
//! listening unix sockets and systemd socket activation.

pub mod activation;
pub mod logging;
pub mod size;
pub mod socket;
