//! splitvmm-net: the vhost-user net backend. Not implemented yet; see the issue tracker.

fn main() {
    eprintln!("splitvmm-net: not implemented yet");
    std::process::exit(2);
}
