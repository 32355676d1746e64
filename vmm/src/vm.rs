//! One VM: KVM set-up, guest RAM, the platform devices, the vCPU threads, and waiting for the
//! guest to end. This is what `splitvmm` runs.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::{self, acpi};
use crate::bus::{Bus, BusError};
use crate::config::{VmConfig, MAX_VCPUS};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::power::AcpiPowerDevice;
use crate::devices::serial::{self, SerialConsole, COM1_BASE, COM1_GSI, COM1_LEN};
use crate::devices::GuestExit;
use crate::interrupts::InterruptRoutes;
use crate::memory::{GuestRam, MemoryError};
use crate::pci::host_bridge::HostBridge;
use crate::pci::{self, PciBarWindow, PciConfigIo, PciConfigMmio, PciError, PciRoot};
use crate::terminal::RawTerminal;
use crate::vcpu::{self, Vcpu, VcpuError};
use crate::vhost_user::VhostUserError;
use crate::vhost_user::{blk, net};
use crate::virtio::pci::{TransportError, VirtioPciDevice};
use crate::virtio::VirtioDevice;

/// KVM needs three pages for the TSS and one for the identity map in guest-physical space
/// that is not RAM: they sit at the top of the 32-bit hole, below the BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// What the devices and vCPU threads report to the VM's main thread.
#[derive(Debug)]
pub enum VmEvent {
    Exit(GuestExit),
    VcpuFailed { index: u8, reason: String },
}

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM on this host lacks {0}, which splitvmm needs")]
    MissingCapability(&'static str),
    #[error("--vcpus {requested} is more than this host's KVM allows ({maximum})")]
    TooManyVcpus { requested: u8, maximum: usize },
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set up {what}: {source}")]
    Platform {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot register guest RAM with KVM: {0}")]
    RegisterMemory(kvm_ioctls::Error),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("cannot create the console's interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a platform device: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Backend(#[from] VhostUserError),
    #[error("cannot place a PCI device: {0}")]
    Pci(#[from] PciError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot start the console input thread: {0}")]
    Stdin(std::io::Error),
    #[error("vCPU {index} failed: {reason}")]
    VcpuFailed { index: u8, reason: String },
    #[error("all vCPU threads ended without the guest powering off or resetting")]
    VcpusGone,
}

/// The VM's shape, independent of what it boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub memory_bytes: u64,
    pub vcpus: u8,
}

/// What the boot vCPU starts.
pub enum Payload<'a> {
    /// A Linux kernel with initrd and command line, as `splitvmm` boots it.
    Linux(&'a VmConfig),
    /// Raw real-mode code loaded at [`boot::REAL_MODE_LOAD_ADDRESS`] and entered there with no
    /// firmware and no boot tables: the fast lane's tiny test guests.
    RealMode(&'a [u8]),
}

/// Where the guest console's output goes and where its input comes from.
pub struct Console {
    pub output: Box<dyn Write + Send>,
    pub input: Option<Box<dyn Read + Send>>,
    /// Put an interactive terminal into raw mode while the guest runs.
    pub raw_terminal: bool,
}

impl Console {
    /// The VMM's own stdout and stdin.
    pub fn stdio() -> Self {
        Console {
            output: Box::new(std::io::stdout()),
            input: Some(Box::new(std::io::stdin())),
            raw_terminal: true,
        }
    }
}

/// Boots the guest described by `config` on the VMM's stdio and returns how it ended.
pub fn run(config: VmConfig) -> Result<GuestExit, VmError> {
    let machine = Machine {
        memory_bytes: config.memory_bytes,
        vcpus: config.vcpus,
    };
    run_machine(machine, Payload::Linux(&config), Console::stdio())
}

/// Builds `machine`, starts `payload` on it and returns how the guest ended.
pub fn run_machine(
    machine: Machine,
    payload: Payload<'_>,
    console: Console,
) -> Result<GuestExit, VmError> {
    if machine.vcpus == 0 {
        return Err(VmError::TooManyVcpus {
            requested: 0,
            maximum: 0,
        });
    }
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::Pit2, "an in-kernel PIT"),
        (Cap::UserMemory, "user memory regions"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    let maximum = kvm.get_max_vcpus().min(usize::from(MAX_VCPUS));
    if usize::from(machine.vcpus) > maximum {
        return Err(VmError::TooManyVcpus {
            requested: machine.vcpus,
            maximum,
        });
    }

    log::debug!("creating the VM");
    // Shared with the PCI devices, which register ioeventfds, irqfds and MSI routes while the
    // guest runs.
    let vm = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
    let platform = |what| move |source| VmError::Platform { what, source };
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(platform("the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(platform("the identity map address"))?;
    vm.create_irq_chip()
        .map_err(platform("the in-kernel irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(platform("the in-kernel PIT"))?;

    log::debug!("mapping {} MiB of guest RAM", machine.memory_bytes >> 20);
    let ram = GuestRam::new(machine.memory_bytes)?;
    register_ram(&vm, &ram)?;
    // Every backend must answer before anything of the guest is loaded: a missing or refusing
    // socket is the VMM's error, not a device the guest finds broken.
    let devices = match payload {
        Payload::Linux(config) => connect_devices(config, &ram)?,
        Payload::RealMode(_) => Vec::new(),
    };
    let entry = match payload {
        Payload::Linux(config) => boot::load_guest(config, &ram)?,
        Payload::RealMode(code) => boot::load_real_mode(&ram, code)?,
    };

    let (events, event_receiver) = channel();
    let console_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm.register_irqfd(&console_irq, COM1_GSI)
        .map_err(platform("the console interrupt"))?;
    let serial_device = Arc::new(Mutex::new(SerialConsole::new(console_irq, console.output)));
    let mut pio = Bus::default();
    pio.insert("COM1", COM1_BASE, COM1_LEN, serial_device.clone())?;
    pio.insert(
        "i8042",
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(events.clone()))),
    )?;
    pio.insert(
        "ACPI sleep/reset",
        u64::from(acpi::ACPI_SLEEP_CONTROL_PORT),
        2,
        Arc::new(Mutex::new(AcpiPowerDevice::new(events.clone()))),
    )?;
    let routes = Arc::new(InterruptRoutes::new(vm.clone()));
    let pci_root = Arc::new(build_pci(devices, &routes)?);
    pio.insert(
        "PCI config ports",
        pci::PCI_CONFIG_IO_PORT,
        pci::PCI_CONFIG_IO_LEN,
        Arc::new(Mutex::new(PciConfigIo::new(pci_root.clone()))),
    )?;
    let pio = Arc::new(pio);
    let mut mmio = Bus::default();
    mmio.insert(
        "PCI ECAM",
        pci::PCI_ECAM_START,
        pci::PCI_ECAM_SIZE,
        Arc::new(Mutex::new(PciConfigMmio::new(pci_root.clone()))),
    )?;
    mmio.insert(
        "PCI BAR window",
        pci::PCI_MMIO_WINDOW_START,
        pci::PCI_MMIO_WINDOW_SIZE,
        Arc::new(Mutex::new(PciBarWindow::new(
            pci_root,
            pci::PCI_MMIO_WINDOW_START,
        ))),
    )?;
    let mmio = Arc::new(mmio);

    log::debug!("creating {} vCPUs", machine.vcpus);
    let vcpus = (0..machine.vcpus)
        .map(|index| Vcpu::new(&kvm, &vm, index, &ram.memory, entry))
        .collect::<Result<Vec<_>, _>>()?;
    vcpu::install_kick_handler()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut terminal = console.raw_terminal.then(RawTerminal::enter);
    if let Some(input) = console.input {
        serial::spawn_input_forwarder(serial_device, input).map_err(VmError::Stdin)?;
    }
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        match vcpu.spawn(pio.clone(), mmio.clone(), events.clone(), stop.clone()) {
            Ok(handle) => threads.push(handle),
            Err(error) => {
                stop_vcpus(&stop, threads);
                return Err(error.into());
            }
        }
    }
    drop(events);
    log::debug!("vCPUs running");
    let outcome = wait_for_guest(&event_receiver);
    // vCPUs must be out of KVM_RUN before guest RAM is unmapped when `ram` drops.
    stop_vcpus(&stop, threads);
    if let Some(terminal) = terminal.as_mut() {
        terminal.restore();
    }
    drop(vm);
    drop(ram);
    outcome
}

/// Connects to every disk's and NIC's backend and negotiates, in command-line order (disks
/// first).
fn connect_devices(
    config: &VmConfig,
    ram: &GuestRam,
) -> Result<Vec<Box<dyn VirtioDevice>>, VmError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> =
        Vec::with_capacity(config.disks.len() + config.nics.len());
    for (index, disk) in config.disks.iter().enumerate() {
        log::debug!("disk {index}: connecting to {}", disk.socket.display());
        devices.push(Box::new(blk::connect(index, disk, ram)?));
    }
    for (index, nic) in config.nics.iter().enumerate() {
        log::debug!("nic {index}: connecting to {}", nic.socket.display());
        devices.push(Box::new(net::connect(index, nic, ram)?));
    }
    Ok(devices)
}

/// Bus 0: the host bridge in slot 0, then the devices in order.
fn build_pci(
    devices: Vec<Box<dyn VirtioDevice>>,
    routes: &Arc<InterruptRoutes>,
) -> Result<PciRoot, VmError> {
    let mut root = PciRoot::default();
    root.add(Arc::new(Mutex::new(HostBridge::new())))?;
    for device in devices {
        let bar = PciRoot::bar_address(root.next_slot());
        let device = VirtioPciDevice::new(device, bar, routes.clone())?;
        root.add(Arc::new(Mutex::new(device)))?;
    }
    Ok(root)
}

fn register_ram(vm: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, region) in ram.memory.iter().enumerate() {
        let host_address = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::RegisterMemory(kvm_ioctls::Error::new(libc::EFAULT)))?;
        let memory_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_address as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by `ram`, which
        // outlives every vCPU: `run` stops and joins the vCPU threads before dropping it.
        unsafe { vm.set_user_memory_region(memory_region) }.map_err(VmError::RegisterMemory)?;
    }
    Ok(())
}

fn wait_for_guest(events: &Receiver<VmEvent>) -> Result<GuestExit, VmError> {
    match events.recv() {
        Ok(VmEvent::Exit(exit)) => Ok(exit),
        Ok(VmEvent::VcpuFailed { index, reason }) => Err(VmError::VcpuFailed { index, reason }),
        Err(_) => Err(VmError::VcpusGone),
    }
}

/// Sets the stop flag and kicks every vCPU thread out of KVM_RUN until it has returned.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for thread in threads {
        let deadline = Instant::now() + Duration::from_secs(5);
        // A signal that lands just before the thread enters KVM_RUN is not seen, so keep
        // kicking until the thread has finished.
        while !thread.is_finished() && Instant::now() < deadline {
            let _ = thread.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!("a vCPU thread did not stop within 5 s");
        }
    }
}
