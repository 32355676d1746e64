//! splitvmm-blk: the vhost-user blk backend. Not implemented yet; see the issue tracker.

fn main() {
    eprintln!("splitvmm-blk: not implemented yet");
    std::process::exit(2);
}
