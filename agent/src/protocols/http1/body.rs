//! Message bodies: how a body ends (RFC 9112 §6: `Content-Length`, chunked transfer coding, the
//! connection's close, or no body at all), and the stream's steps through body bytes. Bodies are
//! never copied: they are counted by length, and only chunk framing is read byte by byte.

use super::{
    HttpExchange, Kind, MAX_BODY_LEN,
    stream::{Http1Stream, ReadState, Step},
};
use crate::protocols::segment::Segment;

/// Longest chunk-size line (with extensions) and trailer section we accept.
const MAX_CHUNK_LINE: u16 = 4096;
const MAX_TRAILER_BYTES: u32 = 64 * 1024;

/// A body being read: bytes left, the chunked decoder's state, or until the connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Body {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

/// Chunked transfer coding decoder state (RFC 9112 §7.1). Bare LF is accepted for CRLF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    /// Reading hex digits of a chunk size.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the digits: whitespace and extensions until the end of the line.
    SizeTail {
        value: u64,
        ext: bool,
        len: u16,
    },
    /// Saw CR at the end of the size line.
    SizeLf {
        value: u64,
    },
    /// Chunk data still to come.
    Data(u64),
    /// CRLF after chunk data.
    DataCr,
    DataLf,
    /// Start of a trailer line (or of the final empty line); `u32` counts trailer bytes.
    TrailerStart(u32),
    TrailerLine(u32),
    /// Saw CR of the final empty line.
    TrailerLf,
}

enum ChunkStep {
    Next(Chunk),
    Done,
    Bad,
}

enum ChunkRun {
    /// The segment ended inside the body.
    More(Chunk),
    /// The body ended at this offset.
    Done(u64),
    /// Framing bytes were not captured or did not parse.
    Lost,
}

/// How a message's body ends, as its head says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
    /// Unusable framing (bad or oversized length, unknown request transfer coding).
    Invalid,
}

impl Http1Stream {
    /// Sets up the reading of a body whose head said `framing`.
    pub(super) fn start_body(
        &mut self,
        d: usize,
        kind: Kind,
        msg: Option<u64>,
        framing: Framing,
        ts: u64,
        out: &mut Vec<HttpExchange>,
    ) {
        let body = match framing {
            Framing::None | Framing::Length(0) => {
                self.message_done(d, kind, msg, ts, out);
                return;
            }
            Framing::Length(n) => Body::Length(n),
            Framing::Chunked => Body::Chunked(Chunk::Size {
                value: 0,
                digits: 0,
            }),
            Framing::UntilClose => Body::UntilClose,
            Framing::Invalid => {
                self.lose(d);
                return;
            }
        };
        self.readers[d].state = ReadState::Body { msg, body };
    }

    fn add_body(&mut self, kind: Kind, msg: Option<u64>, n: u64, ts: u64) {
        let Some(p) = msg.and_then(|id| self.pending_mut(id)) else {
            return;
        };
        match kind {
            Kind::Request => {
                p.request_body_size = p.request_body_size.saturating_add(n);
                p.request_end_ns = ts;
            }
            Kind::Response => {
                p.response_body_size = p.response_body_size.saturating_add(n);
                p.response_end_ns = Some(ts);
            }
        }
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "internal step function; the arguments are the segment walk's state"
    )]
    pub(super) fn in_body(
        &mut self,
        d: usize,
        kind: Kind,
        msg: Option<u64>,
        body: Body,
        seg: &Segment<'_>,
        pos: u64,
        total: u64,
        out: &mut Vec<HttpExchange>,
    ) -> Step {
        let ts = seg.ts_ns;
        match body {
            Body::Length(remaining) => {
                let take = remaining.min(total.saturating_sub(pos));
                self.add_body(kind, msg, take, ts);
                let left = remaining - take;
                if left == 0 {
                    self.message_done(d, kind, msg, ts, out);
                } else {
                    self.readers[d].state = ReadState::Body {
                        msg,
                        body: Body::Length(left),
                    };
                }
                Step::At(pos.saturating_add(take))
            }
            Body::UntilClose => {
                self.add_body(kind, msg, total.saturating_sub(pos), ts);
                Step::At(total)
            }
            Body::Chunked(chunk) => {
                let (run, size) = run_chunked(chunk, seg.data, pos, total);
                self.add_body(kind, msg, size, ts);
                match run {
                    ChunkRun::More(chunk) => {
                        self.readers[d].state = ReadState::Body {
                            msg,
                            body: Body::Chunked(chunk),
                        };
                        Step::At(total)
                    }
                    ChunkRun::Done(end) => {
                        self.message_done(d, kind, msg, ts, out);
                        Step::At(end)
                    }
                    ChunkRun::Lost => {
                        self.lose(d);
                        Step::Stop
                    }
                }
            }
        }
    }
}

/// Runs the chunked decoder over `data[pos..total]` (bytes past `data.len()` are uncaptured).
/// Returns what happened and how many chunk-data bytes went by.
fn run_chunked(mut chunk: Chunk, data: &[u8], mut pos: u64, total: u64) -> (ChunkRun, u64) {
    let mut size = 0u64;
    loop {
        if let Chunk::Data(remaining) = chunk {
            // Chunk data is skipped by length, captured or not.
            let take = remaining.min(total.saturating_sub(pos));
            pos = pos.saturating_add(take);
            size = size.saturating_add(take);
            chunk = if take == remaining {
                Chunk::DataCr
            } else {
                Chunk::Data(remaining - take)
            };
        }
        if pos >= total {
            return (ChunkRun::More(chunk), size);
        }
        // Framing bytes must be captured to be read, except the CRLF closing a chunk's data:
        // a sender writing one large chunk per syscall (Node, nginx) puts it past the capture,
        // and it is always those two bytes.
        let Some(&b) = usize::try_from(pos).ok().and_then(|p| data.get(p)) else {
            match chunk {
                Chunk::DataCr if total - pos >= 2 => {
                    pos += 2;
                    chunk = Chunk::Size {
                        value: 0,
                        digits: 0,
                    };
                    continue;
                }
                Chunk::DataCr => {
                    pos += 1;
                    chunk = Chunk::DataLf;
                    continue;
                }
                Chunk::DataLf => {
                    pos += 1;
                    chunk = Chunk::Size {
                        value: 0,
                        digits: 0,
                    };
                    continue;
                }
                _ => return (ChunkRun::Lost, size),
            }
        };
        pos += 1;
        match chunk_step(chunk, b) {
            ChunkStep::Next(next) => chunk = next,
            ChunkStep::Done => return (ChunkRun::Done(pos), size),
            ChunkStep::Bad => return (ChunkRun::Lost, size),
        }
    }
}

fn chunk_step(chunk: Chunk, b: u8) -> ChunkStep {
    match chunk {
        Chunk::Size { value, digits } => match hex_value(b) {
            // 16 hex digits fill a u64: a 17th would overflow.
            Some(_) if digits >= 16 => ChunkStep::Bad,
            Some(h) => ChunkStep::Next(Chunk::Size {
                value: (value << 4) | u64::from(h),
                digits: digits + 1,
            }),
            None if digits == 0 => ChunkStep::Bad,
            None => chunk_step(
                Chunk::SizeTail {
                    value,
                    ext: false,
                    len: 0,
                },
                b,
            ),
        },
        Chunk::SizeTail { value, ext, len } => {
            if len >= MAX_CHUNK_LINE {
                return ChunkStep::Bad;
            }
            let len = len + 1;
            match b {
                b'\r' => ChunkStep::Next(Chunk::SizeLf { value }),
                b'\n' => size_line_done(value),
                b' ' | b'\t' => ChunkStep::Next(Chunk::SizeTail { value, ext, len }),
                b';' => ChunkStep::Next(Chunk::SizeTail {
                    value,
                    ext: true,
                    len,
                }),
                // Extension names, values, quoted strings: any visible byte.
                0x21..=0x7e | 0x80..=0xff if ext => {
                    ChunkStep::Next(Chunk::SizeTail { value, ext, len })
                }
                _ => ChunkStep::Bad,
            }
        }
        Chunk::SizeLf { value } => {
            if b == b'\n' {
                size_line_done(value)
            } else {
                ChunkStep::Bad
            }
        }
        // The driver skips data by length; it never steps through it.
        Chunk::Data(_) => ChunkStep::Bad,
        Chunk::DataCr => match b {
            b'\r' => ChunkStep::Next(Chunk::DataLf),
            b'\n' => ChunkStep::Next(Chunk::Size {
                value: 0,
                digits: 0,
            }),
            _ => ChunkStep::Bad,
        },
        Chunk::DataLf => {
            if b == b'\n' {
                ChunkStep::Next(Chunk::Size {
                    value: 0,
                    digits: 0,
                })
            } else {
                ChunkStep::Bad
            }
        }
        Chunk::TrailerStart(n) => match b {
            b'\r' => ChunkStep::Next(Chunk::TrailerLf),
            b'\n' => ChunkStep::Done,
            _ => ChunkStep::Next(Chunk::TrailerLine(n.saturating_add(1))),
        },
        Chunk::TrailerLine(n) => {
            if n >= MAX_TRAILER_BYTES {
                ChunkStep::Bad
            } else if b == b'\n' {
                ChunkStep::Next(Chunk::TrailerStart(n.saturating_add(1)))
            } else {
                ChunkStep::Next(Chunk::TrailerLine(n.saturating_add(1)))
            }
        }
        Chunk::TrailerLf => {
            if b == b'\n' {
                ChunkStep::Done
            } else {
                ChunkStep::Bad
            }
        }
    }
}

fn size_line_done(value: u64) -> ChunkStep {
    if value == 0 {
        ChunkStep::Next(Chunk::TrailerStart(0))
    } else if value > MAX_BODY_LEN {
        ChunkStep::Bad
    } else {
        ChunkStep::Next(Chunk::Data(value))
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
