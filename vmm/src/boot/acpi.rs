//! TEMPORARY STUB until the real ACPI module lands.
use vm_memory::{GuestAddress, GuestMemoryMmap};
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x600;
pub const ACPI_RESET_VALUE: u8 = 1;
pub const ACPI_S5_SLP_TYP: u8 = 5;
pub const ACPI_TABLES_START: u64 = 0x000e_0000;
pub const ACPI_TABLES_END: u64 = 0x0010_0000;
pub struct AcpiConfig {
    pub num_vcpus: u8,
}
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("stub")]
    Stub,
}
pub enum SleepRequest {
    PowerOff,
}
pub fn create_acpi_tables(
    _mem: &GuestMemoryMmap,
    _config: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    Ok(GuestAddress(0xe0000))
}
pub fn decode_sleep_control(value: u8) -> Option<SleepRequest> {
    (value == (5 << 2) | (1 << 5)).then_some(SleepRequest::PowerOff)
}
