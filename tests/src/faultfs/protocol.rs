//! The slice of the FUSE wire protocol (`include/uapi/linux/fuse.h`, protocol 7.31) that
//! [`super::server`] speaks: opcodes and flags, the request header and the few request bodies
//! it reads, and the replies it writes. Everything is decoded and encoded field by field in
//! little-endian (the byte order of every host this runs on), so no struct is ever transmuted.

use thiserror::Error;

/// The protocol version the server answers INIT with.
pub const KERNEL_MAJOR: u32 = 7;
pub const KERNEL_MINOR: u32 = 31;

/// `struct fuse_in_header` / `struct fuse_out_header` sizes.
pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// `struct fuse_write_in`: the data of a WRITE follows it.
pub const WRITE_IN_LEN: usize = 40;

/// The root directory's node id.
pub const ROOT_ID: u64 = 1;

pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_FSYNC: u32 = 20;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_BATCH_FORGET: u32 = 42;

/// `fuse_open_out.open_flags`: bypass the page cache; every read and write reaches the server.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `fuse_setattr_in.valid`: the size field is set.
pub const FATTR_SIZE: u32 = 1 << 3;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("{what}: the message has {have} bytes, {need} needed")]
    Short {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("the header says {declared} bytes but {read} were read")]
    LengthMismatch { declared: u32, read: usize },
}

/// Reads little-endian fields in order from a byte slice.
struct Fields<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(what: &'static str, buf: &'a [u8], need: usize) -> Result<Self, ProtocolError> {
        if buf.len() < need {
            return Err(ProtocolError::Short {
                what,
                need,
                have: buf.len(),
            });
        }
        Ok(Fields { what, buf, pos: 0 })
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let end = self.pos + N;
        let bytes = self
            .buf
            .get(self.pos..end)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or(ProtocolError::Short {
                what: self.what,
                need: end,
                have: self.buf.len(),
            })?;
        self.pos = end;
        Ok(bytes)
    }

    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.take().map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: usize) {
        self.pos += n;
    }
}

/// `struct fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    /// Splits one message read from /dev/fuse into its header and body.
    pub fn parse(msg: &[u8]) -> Result<(Self, &[u8]), ProtocolError> {
        let mut f = Fields::new("fuse_in_header", msg, IN_HEADER_LEN)?;
        let h = InHeader {
            len: f.u32()?,
            opcode: f.u32()?,
            unique: f.u64()?,
            nodeid: f.u64()?,
            uid: f.u32()?,
            gid: f.u32()?,
            pid: f.u32()?,
        };
        let _extlen = f.u16()?;
        if h.len as usize != msg.len() {
            return Err(ProtocolError::LengthMismatch {
                declared: h.len,
                read: msg.len(),
            });
        }
        Ok((h, &msg[IN_HEADER_LEN..]))
    }
}

/// `struct fuse_init_in` (the fields before `flags2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
}

impl InitIn {
    pub fn parse(body: &[u8]) -> Result<Self, ProtocolError> {
        let mut f = Fields::new("fuse_init_in", body, 16)?;
        Ok(InitIn {
            major: f.u32()?,
            minor: f.u32()?,
            max_readahead: f.u32()?,
            flags: f.u32()?,
        })
    }
}

/// The parts of `struct fuse_read_in` the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
}

impl ReadIn {
    pub fn parse(body: &[u8]) -> Result<Self, ProtocolError> {
        let mut f = Fields::new("fuse_read_in", body, 40)?;
        Ok(ReadIn {
            fh: f.u64()?,
            offset: f.u64()?,
            size: f.u32()?,
        })
    }
}

/// `struct fuse_write_in` and the data after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteIn<'a> {
    pub fh: u64,
    pub offset: u64,
    pub data: &'a [u8],
}

impl<'a> WriteIn<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtocolError> {
        let mut f = Fields::new("fuse_write_in", body, WRITE_IN_LEN)?;
        let fh = f.u64()?;
        let offset = f.u64()?;
        let size = f.u32()? as usize;
        let data = body
            .get(WRITE_IN_LEN..WRITE_IN_LEN + size)
            .ok_or(ProtocolError::Short {
                what: "WRITE data",
                need: WRITE_IN_LEN + size,
                have: body.len(),
            })?;
        Ok(WriteIn { fh, offset, data })
    }
}

/// The parts of `struct fuse_setattr_in` the server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetattrIn {
    pub valid: u32,
    pub size: u64,
}

impl SetattrIn {
    pub fn parse(body: &[u8]) -> Result<Self, ProtocolError> {
        let mut f = Fields::new("fuse_setattr_in", body, 88)?;
        let valid = f.u32()?;
        f.skip(4 + 8); // padding, fh
        Ok(SetattrIn {
            valid,
            size: f.u64()?,
        })
    }
}

/// `struct fuse_fsync_in`: bit 0 of `fsync_flags` is "datasync".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsyncIn {
    pub fh: u64,
    pub fsync_flags: u32,
}

impl FsyncIn {
    pub fn parse(body: &[u8]) -> Result<Self, ProtocolError> {
        let mut f = Fields::new("fuse_fsync_in", body, 16)?;
        Ok(FsyncIn {
            fh: f.u64()?,
            fsync_flags: f.u32()?,
        })
    }
}

/// The name a LOOKUP asks for (NUL-terminated on the wire).
pub fn lookup_name(body: &[u8]) -> &[u8] {
    body.split(|&b| b == 0).next().unwrap_or(body)
}

/// Appends little-endian fields to a reply.
#[derive(Debug, Default)]
pub struct Out(Vec<u8>);

impl Out {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// `struct fuse_attr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

impl Attr {
    fn encode(&self, out: &mut Out) {
        out.u64(self.ino)
            .u64(self.size)
            .u64(self.size.div_ceil(512))
            .zeros(3 * 8 + 3 * 4) // a/m/ctime and their nanoseconds
            .u32(self.mode)
            .u32(self.nlink)
            .u32(self.uid)
            .u32(self.gid)
            .u32(0) // rdev
            .u32(self.blksize)
            .u32(0); // flags
    }
}

/// `struct fuse_entry_out`: the answer to LOOKUP.
pub fn entry_out(attr: &Attr, valid_secs: u64) -> Vec<u8> {
    let mut out = Out::default();
    out.u64(attr.ino)
        .u64(0) // generation
        .u64(valid_secs)
        .u64(valid_secs)
        .u32(0)
        .u32(0);
    attr.encode(&mut out);
    out.into_bytes()
}

/// `struct fuse_attr_out`: the answer to GETATTR and SETATTR.
pub fn attr_out(attr: &Attr, valid_secs: u64) -> Vec<u8> {
    let mut out = Out::default();
    out.u64(valid_secs).u32(0).u32(0);
    attr.encode(&mut out);
    out.into_bytes()
}

/// `struct fuse_open_out`.
pub fn open_out(fh: u64, open_flags: u32) -> Vec<u8> {
    let mut out = Out::default();
    out.u64(fh).u32(open_flags).u32(0);
    out.into_bytes()
}

/// `struct fuse_write_out`.
pub fn write_out(size: u32) -> Vec<u8> {
    let mut out = Out::default();
    out.u32(size).u32(0);
    out.into_bytes()
}

/// `struct fuse_init_out` for protocol [`KERNEL_MAJOR`].[`KERNEL_MINOR`], no optional
/// capability flags.
pub fn init_out(max_readahead: u32, max_write: u32) -> Vec<u8> {
    let mut out = Out::default();
    out.u32(KERNEL_MAJOR)
        .u32(KERNEL_MINOR)
        .u32(max_readahead)
        .u32(0) // flags
        .u16(16) // max_background
        .u16(12) // congestion_threshold
        .u32(max_write)
        .u32(1) // time_gran
        .u16(0) // max_pages (only with FUSE_MAX_PAGES)
        .u16(0) // map_alignment
        .u32(0) // flags2
        .zeros(7 * 4);
    out.into_bytes()
}

/// `struct fuse_statfs_out` of a filesystem with `blocks` 4 KiB blocks, all free.
pub fn statfs_out(blocks: u64) -> Vec<u8> {
    let mut out = Out::default();
    out.u64(blocks)
        .u64(blocks)
        .u64(blocks)
        .u64(16) // files
        .u64(15) // ffree
        .u32(4096) // bsize
        .u32(255) // namelen
        .u32(4096) // frsize
        .u32(0)
        .zeros(6 * 4);
    out.into_bytes()
}

/// A whole reply: `struct fuse_out_header` (error is 0 or a negated errno) and the payload.
pub fn reply(unique: u64, error: i32, payload: &[u8]) -> Vec<u8> {
    let len = OUT_HEADER_LEN + payload.len();
    let mut out = Out::default();
    // Replies are at most one READ's data plus the header, far below 4 GiB.
    out.u32(u32::try_from(len).unwrap_or(u32::MAX))
        .u32(error as u32)
        .u64(unique);
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(payload);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_have_the_kernel_struct_sizes() {
        let attr = Attr::default();
        assert_eq!(entry_out(&attr, 1).len(), 128);
        assert_eq!(attr_out(&attr, 1).len(), 104);
        assert_eq!(open_out(0, 0).len(), 16);
        assert_eq!(write_out(0).len(), 8);
        assert_eq!(init_out(0, 0).len(), 64);
        assert_eq!(statfs_out(0).len(), 80);
        let r = reply(7, -5, &[1, 2, 3]);
        assert_eq!(r.len(), 19);
        assert_eq!(&r[..4], &19u32.to_le_bytes());
        assert_eq!(&r[4..8], &(-5i32).to_le_bytes());
        assert_eq!(&r[8..16], &7u64.to_le_bytes());
    }

    #[test]
    fn parses_a_write_request() {
        let mut msg = Out::default();
        msg.u32(40 + 40 + 3)
            .u32(FUSE_WRITE)
            .u64(9)
            .u64(2)
            .u32(0)
            .u32(0)
            .u32(1)
            .u32(0);
        msg.u64(5).u64(4096).u32(3).u32(0).u64(0).u32(0).u32(0);
        let mut msg = msg.into_bytes();
        msg.extend_from_slice(b"abc");
        let (h, body) = InHeader::parse(&msg).unwrap();
        assert_eq!((h.opcode, h.unique, h.nodeid), (FUSE_WRITE, 9, 2));
        let w = WriteIn::parse(body).unwrap();
        assert_eq!((w.fh, w.offset, w.data), (5, 4096, &b"abc"[..]));
        assert!(matches!(
            InHeader::parse(&msg[..50]),
            Err(ProtocolError::LengthMismatch { .. })
        ));
        assert!(matches!(
            WriteIn::parse(&body[..41]),
            Err(ProtocolError::Short { .. })
        ));
        assert_eq!(lookup_name(b"disk.img\0"), b"disk.img");
    }
}
