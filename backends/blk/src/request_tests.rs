//! Unit tests of request parsing: every well-formed kind, and every bad-guest-input case.

use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const MEM_SIZE: usize = 0x10_0000;
const R: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
const W_LAST: u16 = VRING_DESC_F_WRITE as u16;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x9000;

fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

fn limits() -> Limits {
    Limits {
        capacity_sectors: 2048,
        readonly: false,
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 1024,
        max_write_zeroes_seg: 4,
    }
}

fn header(mem: &GuestMem, addr: u64, request_type: u32, sector: u64) {
    let mut bytes = [0u8; HEADER_LEN];
    bytes[0..4].copy_from_slice(&request_type.to_le_bytes());
    bytes[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(addr)).expect("header");
}

fn segment(mem: &GuestMem, addr: u64, sector: u64, num_sectors: u32, flags: u32) {
    let mut bytes = [0u8; SEGMENT_LEN];
    bytes[0..8].copy_from_slice(&sector.to_le_bytes());
    bytes[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    bytes[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(addr))
        .expect("segment");
}

fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, 0)
}

fn run(
    descs: &[Descriptor],
    mem: &GuestMem,
    limits: &Limits,
) -> Result<(Request, Vec<GuestRange>), Rejected> {
    let mut data = Vec::new();
    let mut scratch = Vec::new();
    parse(descs, mem, limits, &mut data, &mut scratch).map(|r| (r, data))
}

fn range(addr: u64, len: u32) -> GuestRange {
    GuestRange {
        addr: GuestAddress(addr),
        len,
    }
}

fn rejected(descs: &[Descriptor], mem: &GuestMem, limits: &Limits) -> Rejected {
    run(descs, mem, limits).expect_err("request must be rejected")
}

fn classic(
    op_type: u32,
    sector: u64,
    data_len: u32,
    data_flags: u16,
) -> (GuestMem, Vec<Descriptor>) {
    let mem = mem();
    header(&mem, HDR, op_type, sector);
    let mut descs = vec![d(HDR, HEADER_LEN as u32, R)];
    if data_len > 0 {
        descs.push(d(DATA, data_len, data_flags));
    }
    descs.push(d(STATUS, 1, W_LAST));
    (mem, descs)
}

#[test]
fn read_request() {
    let (mem, descs) = classic(VIRTIO_BLK_T_IN, 8, 4096, W);
    let (request, data) = run(&descs, &mem, &limits()).expect("valid read");
    assert_eq!(
        request,
        Request {
            op: Op::Read {
                offset: 8 * 512,
                len: 4096
            },
            status: GuestAddress(STATUS)
        }
    );
    assert_eq!(data, vec![range(DATA, 4096)]);
}

#[test]
fn write_request_with_split_data() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 2046);
    let descs = [
        d(HDR, 16, R),
        d(DATA, 512, R),
        d(DATA + 0x1000, 512, R),
        d(STATUS, 1, W_LAST),
    ];
    let (request, data) = run(&descs, &mem, &limits()).expect("valid write");
    assert_eq!(
        request.op,
        Op::Write {
            offset: 2046 * 512,
            len: 1024
        }
    );
    assert_eq!(data, vec![range(DATA, 512), range(DATA + 0x1000, 512)]);
}

#[test]
fn any_layout_header_with_data_and_data_with_status() {
    let mem = mem();
    // Write: header and data in one device-readable buffer.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let descs = [d(HDR, 16 + 512, R), d(STATUS, 1, W_LAST)];
    let (request, data) = run(&descs, &mem, &limits()).expect("write");
    assert_eq!(
        request.op,
        Op::Write {
            offset: 0,
            len: 512
        }
    );
    assert_eq!(data, vec![range(HDR + 16, 512)]);

    // Read: data and status in one device-writable buffer; zero-length descriptors ignored.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    let descs = [d(HDR, 16, R), d(0, 0, R), d(DATA, 513, W_LAST)];
    let (request, data) = run(&descs, &mem, &limits()).expect("read");
    assert_eq!(
        request.op,
        Op::Read {
            offset: 512,
            len: 512
        }
    );
    assert_eq!(request.status, GuestAddress(DATA + 512));
    assert_eq!(data, vec![range(DATA, 512)]);
}

#[test]
fn flush_and_get_id() {
    let (mem, descs) = classic(VIRTIO_BLK_T_FLUSH, 0, 0, W);
    assert_eq!(run(&descs, &mem, &limits()).expect("flush").0.op, Op::Flush);

    let (mem, descs) = classic(VIRTIO_BLK_T_GET_ID, 0, 20, W);
    let (request, data) = run(&descs, &mem, &limits()).expect("get id");
    assert_eq!(request.op, Op::GetId { len: 20 });
    assert_eq!(data, vec![range(DATA, 20)]);

    let (mem, descs) = classic(VIRTIO_BLK_T_GET_ID, 0, 0, W);
    assert_eq!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::NoIdBuffer
    );
}

#[test]
fn discard_and_write_zeroes() {
    let (mem, descs) = classic(VIRTIO_BLK_T_DISCARD, 0, 32, R);
    segment(&mem, DATA, 0, 8, 0);
    segment(&mem, DATA + 16, 100, 1024, 0);
    let (request, _) = run(&descs, &mem, &limits()).expect("discard");
    assert_eq!(
        request.op,
        Op::Discard(vec![
            Segment {
                sector: 0,
                num_sectors: 8,
                unmap: false
            },
            Segment {
                sector: 100,
                num_sectors: 1024,
                unmap: false
            },
        ])
    );

    let (mem, descs) = classic(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, R);
    segment(&mem, DATA, 2040, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (request, _) = run(&descs, &mem, &limits()).expect("write zeroes");
    assert_eq!(
        request.op,
        Op::WriteZeroes(vec![Segment {
            sector: 2040,
            num_sectors: 8,
            unmap: true
        }])
    );
}

#[test]
fn empty_and_unterminated_chains() {
    let mem = mem();
    let err = rejected(&[], &mem, &limits());
    assert_eq!(err.error, RequestError::EmptyChain);
    assert_eq!(err.status, None);

    // What the queue crate yields for a loop or a chain longer than the queue: it stops, and
    // the last descriptor it gave still says "next".
    let descs = [d(HDR, 16, R), d(DATA, 512, W), d(STATUS, 1, W)];
    let err = rejected(&descs, &mem, &limits());
    assert_eq!(err.error, RequestError::Unterminated(3));
    assert_eq!(err.error.status(), VIRTIO_BLK_S_IOERR as u8);
    // The last descriptor is device-writable: IOERR goes to its last byte.
    assert_eq!(err.status, Some(GuestAddress(STATUS)));
}

#[test]
fn buffers_outside_guest_memory() {
    let (mem, mut descs) = classic(VIRTIO_BLK_T_IN, 0, 512, W);
    descs[1] = d(MEM_SIZE as u64 - 256, 512, W);
    let err = rejected(&descs, &mem, &limits());
    assert!(matches!(
        err.error,
        RequestError::OutsideMemory { index: 1, .. }
    ));
    assert_eq!(err.status, Some(GuestAddress(STATUS)));

    // Address + length wrapping around 2^64.
    descs[1] = d(u64::MAX - 8, 512, W);
    assert!(matches!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::OutsideMemory { .. }
    ));

    // The status byte itself outside memory: nowhere to report.
    let (mem, mut descs) = classic(VIRTIO_BLK_T_IN, 0, 512, W);
    descs[2] = d(MEM_SIZE as u64, 1, W_LAST);
    let err = rejected(&descs, &mem, &limits());
    assert!(matches!(
        err.error,
        RequestError::OutsideMemory { index: 2, .. }
    ));
    assert_eq!(err.status, None);

    // The header outside memory.
    let (mem, mut descs) = classic(VIRTIO_BLK_T_IN, 0, 512, W);
    descs[0] = d(MEM_SIZE as u64 + 0x1000, 16, R);
    assert!(matches!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::OutsideMemory { index: 0, .. }
    ));
}

#[test]
fn wrong_direction() {
    let mem = mem();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // Readable after writable.
    let descs = [
        d(HDR, 16, R),
        d(DATA, 512, W),
        d(DATA + 512, 1, R),
        d(STATUS, 1, W_LAST),
    ];
    assert_eq!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::ReadableAfterWritable(2)
    );
    // Nothing device-writable: no status.
    let descs = [d(HDR, 16, R), d(DATA, 512, 0)];
    let err = rejected(&descs, &mem, &limits());
    assert_eq!(err.error, RequestError::NoStatus);
    assert_eq!(err.status, None);

    // A read whose data buffer is device-readable.
    let (mem, descs) = classic(VIRTIO_BLK_T_IN, 0, 512, R);
    assert_eq!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::DataNotWritable {
            kind: "read",
            len: 512
        }
    );
    // A write whose data buffer is device-writable.
    let (mem, descs) = classic(VIRTIO_BLK_T_OUT, 0, 512, W);
    let err = rejected(&descs, &mem, &limits());
    assert_eq!(
        err.error,
        RequestError::DataNotReadable {
            kind: "write",
            len: 512
        }
    );
    assert_eq!(err.status, Some(GuestAddress(STATUS)));
    assert_eq!(err.error.status(), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn short_header_and_unknown_type() {
    let mem = mem();
    let descs = [d(HDR, 8, R), d(STATUS, 1, W_LAST)];
    assert_eq!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::ShortHeader(8)
    );

    let (mem, descs) = classic(99, 0, 0, W);
    let err = rejected(&descs, &mem, &limits());
    assert_eq!(err.error, RequestError::UnknownType(99));
    assert_eq!(err.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(err.status, Some(GuestAddress(STATUS)));
}

#[test]
fn lengths_and_sectors_out_of_range() {
    let (mem, descs) = classic(VIRTIO_BLK_T_IN, 0, 100, W);
    assert_eq!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::UnalignedLength(100)
    );
    // Last sector is 2047: a two-sector read there runs past the end.
    let (mem, descs) = classic(VIRTIO_BLK_T_IN, 2047, 1024, W);
    assert!(matches!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::BeyondCapacity { sector: 2047, .. }
    ));
    let (mem, descs) = classic(VIRTIO_BLK_T_OUT, u64::MAX, 512, R);
    assert!(matches!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::BeyondCapacity { .. }
    ));
    // The very last sector is fine.
    let (mem, descs) = classic(VIRTIO_BLK_T_IN, 2047, 512, W);
    assert!(run(&descs, &mem, &limits()).is_ok());
}

#[test]
fn read_only_disk_refuses_writes() {
    let ro = Limits {
        readonly: true,
        ..limits()
    };
    let (mem, descs) = classic(VIRTIO_BLK_T_OUT, 0, 512, R);
    let err = rejected(&descs, &mem, &ro);
    assert_eq!(err.error, RequestError::ReadOnly("write"));
    assert_eq!(err.error.status(), VIRTIO_BLK_S_IOERR as u8);
    let (mem, descs) = classic(VIRTIO_BLK_T_DISCARD, 0, 16, R);
    segment(&mem, DATA, 0, 8, 0);
    assert_eq!(
        rejected(&descs, &mem, &ro).error,
        RequestError::ReadOnly("discard")
    );
    let (mem, descs) = classic(VIRTIO_BLK_T_IN, 0, 512, W);
    assert!(run(&descs, &mem, &ro).is_ok());
}

#[test]
fn discard_and_write_zeroes_bad_input() {
    let not_negotiated = Limits {
        discard: false,
        write_zeroes: false,
        ..limits()
    };
    let (mem, descs) = classic(VIRTIO_BLK_T_DISCARD, 0, 16, R);
    segment(&mem, DATA, 0, 8, 0);
    let err = rejected(&descs, &mem, &not_negotiated);
    assert_eq!(err.error, RequestError::NotNegotiated("discard"));
    assert_eq!(err.error.status(), VIRTIO_BLK_S_UNSUPP as u8);

    // Discard with the unmap flag (reserved for discard) or any unknown flag: UNSUPP.
    segment(&mem, DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let err = rejected(&descs, &mem, &limits());
    assert_eq!(err.error.status(), VIRTIO_BLK_S_UNSUPP as u8);
    let (mem, descs) = classic(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, R);
    segment(&mem, DATA, 0, 8, 2);
    assert_eq!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::BadFlags {
            kind: "write-zeroes",
            flags: 2
        }
    );

    // Segment table not a multiple of 16, empty, or too many segments: IOERR.
    for len in [15, 0] {
        let (mem, descs) = classic(VIRTIO_BLK_T_DISCARD, 0, len, R);
        let err = rejected(&descs, &mem, &limits());
        assert!(
            matches!(err.error, RequestError::BadSegmentTable { .. }),
            "{err:?}"
        );
        assert_eq!(err.error.status(), VIRTIO_BLK_S_IOERR as u8);
    }
    let (mem, descs) = classic(VIRTIO_BLK_T_DISCARD, 0, 5 * 16, R);
    assert!(matches!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::TooManySegments {
            count: 5,
            max: 4,
            ..
        }
    ));

    // A segment larger than offered, or beyond the capacity: IOERR.
    let (mem, descs) = classic(VIRTIO_BLK_T_DISCARD, 0, 16, R);
    segment(&mem, DATA, 0, 1025, 0);
    assert!(matches!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::SegmentTooLarge {
            num_sectors: 1025,
            ..
        }
    ));
    segment(&mem, DATA, 2047, 2, 0);
    let err = rejected(&descs, &mem, &limits());
    assert!(matches!(err.error, RequestError::BeyondCapacity { .. }));
    assert_eq!(err.error.status(), VIRTIO_BLK_S_IOERR as u8);
    segment(&mem, DATA, u64::MAX, 1, 0);
    assert!(matches!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::BeyondCapacity { .. }
    ));
    // A discard whose segment table is device-writable.
    let (mem, descs) = classic(VIRTIO_BLK_T_DISCARD, 0, 16, W);
    assert!(matches!(
        rejected(&descs, &mem, &limits()).error,
        RequestError::DataNotReadable { .. }
    ));
}
