//! How the PCI host bridge is described to the guest through ACPI: the MCFG table (where ECAM
//! is) and the DSDT's `PCI0` device (PNP0A08 with its bus range, config ports and BAR window),
//! plus a motherboard-resources device that reserves the ECAM region, as Linux wants before it
//! uses MMCONFIG.

use acpi_tables::mcfg::MCFG;
use acpi_tables::{aml, Aml, AmlSink};

use super::{
    PCI_CONFIG_IO_LEN, PCI_CONFIG_IO_PORT, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_WINDOW_SIZE,
    PCI_MMIO_WINDOW_START,
};

// Narrow copies for the AML fields (checked at compile time).
const CONFIG_PORT: u16 = fits(PCI_CONFIG_IO_PORT, u16::MAX as u64) as u16;
const CONFIG_PORT_LEN: u8 = fits(PCI_CONFIG_IO_LEN, u8::MAX as u64) as u8;
const WINDOW_START: u32 = fits(PCI_MMIO_WINDOW_START, u32::MAX as u64) as u32;
const WINDOW_END: u32 = fits(
    PCI_MMIO_WINDOW_START + PCI_MMIO_WINDOW_SIZE - 1,
    u32::MAX as u64,
) as u32;
const ECAM_START: u32 = fits(PCI_ECAM_START, u32::MAX as u64) as u32;
const ECAM_SIZE: u32 = fits(PCI_ECAM_SIZE, u32::MAX as u64) as u32;

/// `value` once it is known to be at most `max`; evaluated at compile time for the constants.
const fn fits(value: u64, max: u64) -> u64 {
    assert!(value <= max, "constant too wide for its ACPI field");
    value
}

/// The MCFG: segment 0, bus 0 only, at [`PCI_ECAM_START`].
pub fn mcfg_bytes(oem_id: [u8; 6], oem_table_id: [u8; 8], oem_revision: u32) -> Vec<u8> {
    let mut mcfg = MCFG::new(oem_id, oem_table_id, oem_revision);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    let mut bytes = Vec::new();
    mcfg.to_aml_bytes(&mut bytes);
    bytes
}

/// `\_SB_.PCI0`: the root bridge of segment 0, bus 0.
pub struct PciHostBridgeAml;

impl Aml for PciHostBridgeAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        // Names and EISA IDs are constants that satisfy the crate's format assertions.
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
        let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
        let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
        let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
        let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
        let config_ports = aml::IO::new(CONFIG_PORT, CONFIG_PORT, 1, CONFIG_PORT_LEN);
        let window = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            WINDOW_START,
            WINDOW_END,
            None,
        );
        let crs_template = aml::ResourceTemplate::new(vec![&bus, &config_ports, &window]);
        let crs = aml::Name::new("_CRS".into(), &crs_template);
        aml::Device::new(
            "PCI0".into(),
            vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
        )
        .to_aml_bytes(sink);

        // Motherboard resources: the ECAM region, so Linux accepts the MCFG entry.
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
        let uid = aml::Name::new("_UID".into(), &aml::ONE);
        let ecam = aml::Memory32Fixed::new(false, ECAM_START, ECAM_SIZE);
        let crs_template = aml::ResourceTemplate::new(vec![&ecam]);
        let crs = aml::Name::new("_CRS".into(), &crs_template);
        aml::Device::new("MRES".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn mcfg_points_at_ecam_for_bus_0() {
        let mcfg = mcfg_bytes(*b"SPLVMM", *b"SPLITVMM", 1);
        assert_eq!(&mcfg[0..4], b"MCFG");
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(
            u32::from_le_bytes([mcfg[4], mcfg[5], mcfg[6], mcfg[7]]) as usize,
            mcfg.len()
        );
        assert_eq!(mcfg.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let entry = &mcfg[44..60];
        assert_eq!(entry[0..8], PCI_ECAM_START.to_le_bytes());
        assert_eq!(entry[8..12], [0, 0, 0, 0], "segment 0, buses 0-0");
    }

    #[test]
    fn host_bridge_describes_its_resources() {
        let mut aml = Vec::new();
        PciHostBridgeAml.to_aml_bytes(&mut aml);
        assert!(has(&aml, b"PCI0") && has(&aml, b"MRES"));
        // EISAID("PNP0A08") and EISAID("PNP0A03").
        assert!(has(&aml, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(has(&aml, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        for name in [b"_SEG", b"_BBN", b"_UID", b"_CRS"] {
            assert!(has(&aml, name));
        }
        // IO(Decode16, 0xcf8, 0xcf8, 1, 8).
        assert!(has(&aml, &[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]));
        // The window's min and max in the DWordMemory descriptor.
        let window = [WINDOW_START.to_le_bytes(), WINDOW_END.to_le_bytes()].concat();
        assert!(has(&aml, &window));
        // Memory32Fixed(ReadOnly, ECAM, 1 MiB).
        let ecam = [
            &[0x86, 0x09, 0x00, 0x00][..],
            &ECAM_START.to_le_bytes(),
            &ECAM_SIZE.to_le_bytes(),
        ]
        .concat();
        assert!(has(&aml, &ecam));
    }
}
