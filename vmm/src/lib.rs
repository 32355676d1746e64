//! splitvmm: CPU and memory virtualization through KVM.
