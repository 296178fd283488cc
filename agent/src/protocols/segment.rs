//! What the kernel hands every protocol parser: one [`Segment`] per send/recv syscall, with its
//! [`Direction`], and the [`Role`] the traced process plays on the connection. Shared by all
//! parsers so that none of them imports another.

/// Direction of a segment, seen from the traced process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The traced process received these bytes.
    Ingress,
    /// The traced process sent these bytes.
    Egress,
}

impl Direction {
    /// Position in per-direction arrays: ingress 0, egress 1.
    pub const fn index(self) -> usize {
        match self {
            Self::Ingress => 0,
            Self::Egress => 1,
        }
    }
}

/// Which side of the conversation the traced process is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The process receives requests (accepted connection).
    Server,
    /// The process sends requests (connected socket).
    Client,
}

/// The bytes one send/recv syscall moved on a connection.
#[derive(Clone, Copy, Debug)]
pub struct Segment<'a> {
    pub direction: Direction,
    /// Kernel timestamp of the syscall (for a write: as its last bytes were queued).
    pub ts_ns: u64,
    /// When its bytes began to move (a large write's first chunk; else `ts_ns`): the start of
    /// a message that begins here.
    pub first_ts_ns: u64,
    /// Exact number of bytes the syscall moved.
    pub len: u64,
    /// Captured prefix of those bytes (`data.len() <= len`).
    pub data: &'a [u8],
    /// Thread that made the syscall.
    pub tid: u32,
}
