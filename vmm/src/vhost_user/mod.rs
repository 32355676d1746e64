//! vhost-user frontends: the VMM side of the control channel to a backend process, and the
//! virtio devices built on it. The VMM hands the backend its guest RAM (the memfd), each
//! queue's ring addresses, kick eventfd (a KVM ioeventfd) and call eventfd (a KVM irqfd), and
//! then stays out of the data path. The one queue the VMM serves itself is a multi-queue
//! NIC's control queue (`net_ctrl`): control-plane commands only, no packet data.
//!
//! - `frontend`: the protocol (negotiation, memory table, vrings, in-flight buffer);
//! - `link`: the connection that comes and goes and what a new one must be given again;
//!   `reconnect`: getting a restarted backend back (and `wait=on`); `watch`: hang-up detection;
//! - `device`: what every vhost-user device does the same way; `blk`, `net`: what differs.

pub mod blk;
pub mod device;
pub mod frontend;
pub mod link;
pub mod net;
pub mod net_ctrl;
pub mod reconnect;
pub mod watch;

pub use frontend::{VhostUserConnection, VhostUserError};
