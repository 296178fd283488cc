//! Decoding ring buffer records into typed events (never `transmute`: kinds via `TryFrom`,
//! structs read unaligned after a length check).

use agent_common::{
    ConnEvent, ContextEvent, DataEvent, EventKind, ParkEvent, ProcessEvent, SyscallKind,
};
use thiserror::Error;

#[derive(Debug)]
pub enum Event<'a> {
    Data {
        header: DataEvent,
        payload: &'a [u8],
    },
    Accept(ConnEvent),
    Connect(ConnEvent),
    Close(ConnEvent),
    Exec(ProcessEvent),
    Fork(ProcessEvent),
    ProcessExit(ProcessEvent),
    Context(ContextEvent),
    Parked(ParkEvent),
    /// A selected process's loader changed its libraries.
    Libraries(ProcessEvent),
}

/// When a data event's bytes began to move (never after its own stamp).
pub fn first_ts(h: &DataEvent) -> u64 {
    h.first_ts_ns.min(h.ts_ns)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is too short")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("unknown syscall kind {0}")]
    UnknownSyscall(u32),
    #[error("data event claims {claimed} payload bytes but carries {present}")]
    PayloadLength { claimed: u32, present: usize },
}

fn read<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked above; T is a plain-old-data repr(C) struct from agent-common
    // for which every bit pattern is valid; read_unaligned tolerates any alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    let kind: u32 = read(bytes)?;
    let kind = EventKind::try_from(kind).map_err(DecodeError::UnknownKind)?;
    Ok(match kind {
        EventKind::Data => {
            let header: DataEvent = read(bytes)?;
            SyscallKind::try_from(header.syscall).map_err(DecodeError::UnknownSyscall)?;
            let rest = &bytes[size_of::<DataEvent>()..];
            let payload =
                rest.get(..header.captured as usize)
                    .ok_or(DecodeError::PayloadLength {
                        claimed: header.captured,
                        present: rest.len(),
                    })?;
            Event::Data { header, payload }
        }
        EventKind::Accept => Event::Accept(read(bytes)?),
        EventKind::Connect => Event::Connect(read(bytes)?),
        EventKind::Close => Event::Close(read(bytes)?),
        EventKind::Exec => Event::Exec(read(bytes)?),
        EventKind::Fork => Event::Fork(read(bytes)?),
        EventKind::ProcessExit => Event::ProcessExit(read(bytes)?),
        EventKind::Context => Event::Context(read(bytes)?),
        EventKind::Parked => Event::Parked(read(bytes)?),
        EventKind::Libraries => Event::Libraries(read(bytes)?),
    })
}

/// A NUL-padded kernel `comm` as text.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_record(captured: u32, payload: &[u8]) -> Vec<u8> {
        let header = DataEvent {
            kind: EventKind::Data as u32,
            direction: agent_common::DIR_INGRESS,
            pid: 7,
            tid: 8,
            fd: 3,
            syscall: SyscallKind::Read as u32,
            ts_ns: 1,
            first_ts_ns: 1,
            sock_cookie: 99,
            bytes: 10,
            captured,
            family: 2,
            local_addr: [0; 16],
            remote_addr: [0; 16],
            local_port: 80,
            remote_port: 5555,
            flags: 0,
        };
        // SAFETY: DataEvent is repr(C) POD without padding (asserted in agent-common).
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&header as *const DataEvent).cast::<u8>(),
                size_of::<DataEvent>(),
            )
        };
        let mut v = raw.to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_data_with_payload() {
        let rec = data_record(4, b"GET ");
        match decode(&rec) {
            Ok(Event::Data { header, payload }) => {
                assert_eq!(header.sock_cookie, 99);
                assert_eq!(payload, b"GET ");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_short_unknown_and_lying_records() {
        assert_eq!(decode(&[1, 0]).unwrap_err(), DecodeError::Short(2));
        assert_eq!(
            decode(&[42, 0, 0, 0]).unwrap_err(),
            DecodeError::UnknownKind(42)
        );
        let rec = data_record(100, b"GET ");
        assert!(matches!(
            decode(&rec),
            Err(DecodeError::PayloadLength { claimed: 100, .. })
        ));
        let rec = data_record(4, b"GET ");
        for n in 0..rec.len() {
            let _ = decode(&rec[..n]);
        }
    }
}
