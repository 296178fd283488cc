//! A bounded look at an HTTP/1.x request head held in a buffer we own (a map value): where
//! the request line ends, where the head ends, Content-Length, Transfer-Encoding and the
//! `traceparent` value.
//!
//! Shaped for the verifier, which walks every iteration of every loop on every path: the
//! parser's state lives in a per-CPU map value and is read and written with volatile accesses
//! (the verifier does not track map memory, so paths that differ only in what was found merge
//! instead of multiplying), and per-byte tests are arithmetic rather than branches. Line ends
//! are found eight bytes at a time (~25 steps for a 200-byte head). `bpf_loop` was tried
//! first: its callback verification did not converge.

use aya_ebpf::{macros::map, maps::PerCpuArray};

/// State of a head being scanned: slot 0 for the read path, 1 for the injector, 2 for the
/// send path (requests written while their socket was parked).
#[map]
pub static HEADS: PerCpuArray<Head> = PerCpuArray::with_max_entries(3, 0);

/// Most head bytes looked at; a larger head is left alone.
pub const HEAD_WINDOW: u32 = 4096;
/// Offsets are masked with this, so every load stays inside a buffer of `MASK + 1 + 32` bytes.
pub const MASK: u32 = 8191;

/// The request has a Transfer-Encoding (chunked body: framing the injector does not follow).
pub const HEAD_CHUNKED: u32 = 1;
/// Not an HTTP/1.x request line ending in CRLF, or a bad Content-Length.
pub const HEAD_BAD: u32 = 2;
/// More than one `traceparent` header.
pub const HEAD_MANY_TRACEPARENTS: u32 = 4;
/// A `traceparent` that is not the 55-character version-00 form.
pub const HEAD_BAD_TRACEPARENT: u32 = 8;
/// A Content-Length header was seen (a second one makes the head `HEAD_BAD`).
pub const HEAD_HAS_LENGTH: u32 = 16;

/// Header lines looked at (a head with more is left alone).
pub const MAX_LINES: u32 = 32;

/// What a scan found (a per-CPU map value: see the module comment).
#[repr(C)]
pub struct Head {
    /// Positions of the `\n` ending each line.
    newlines: [u32; MAX_LINES as usize],
    len: u32,
    /// Newlines found so far, and where the current line starts.
    lines: u32,
    line_start: u32,
    /// Offset just after the head's empty line (0: not within the window).
    pub head_end: u32,
    /// Offset just after the request line's `\n`.
    pub line_end: u32,
    /// Offset of the `traceparent` value (0: none).
    pub traceparent: u32,
    /// `HEAD_*`.
    pub flags: u32,
    /// Where the line-end search is.
    at: u32,
    pub content_length: u64,
}

/// Volatile access to the scan state: the compiler keeps no copy in a register, so the
/// verifier never learns the values (see the module comment).
#[inline(always)]
fn get<T: Copy>(field: &T) -> T {
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn set<T>(field: &mut T, value: T) {
    unsafe { core::ptr::write_volatile(field, value) }
}

#[inline(always)]
fn add_flags(head: &mut Head, bits: u32) {
    let flags = get(&head.flags) | bits;
    set(&mut head.flags, flags);
}

#[inline(always)]
fn byte(buf: *const u8, off: u32) -> u8 {
    unsafe { *buf.add((off & MASK) as usize) }
}

#[inline(always)]
fn word(buf: *const u8, off: u32) -> u64 {
    unsafe { core::ptr::read_unaligned(buf.add((off & MASK) as usize) as *const u64) }
}

/// Eight ASCII bytes as the little-endian word `word` loads.
const fn w8(s: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*s)
}

const LOWER: u64 = 0x2020_2020_2020_2020;
/// The first seven bytes of a word.
const SEVEN: u64 = 0x00ff_ffff_ffff_ffff;

/// The buffer starts with a request method we know and a space.
#[inline(always)]
pub fn starts_request(buf: *const u8, len: u32) -> bool {
    if len < 16 {
        return false;
    }
    let w = word(buf, 0);
    let four = w & 0xffff_ffff;
    four == u32::from_le_bytes(*b"GET ") as u64
        || four == u32::from_le_bytes(*b"PUT ") as u64
        || four == u32::from_le_bytes(*b"POST") as u64 && (w >> 32) & 0xff == b' ' as u64
        || four == u32::from_le_bytes(*b"HEAD") as u64 && (w >> 32) & 0xff == b' ' as u64
        || (w & 0x00ff_ffff_ffff_ffff) == w8(b"DELETE \0")
        || (w & 0x0000_ffff_ffff_ffff) == w8(b"PATCH \0\0")
        || w == w8(b"OPTIONS ")
}

/// Who scans: the read path and the injector each have their own state.
pub const SCAN_READ: u32 = 0;
pub const SCAN_INJECT: u32 = 1;
pub const SCAN_SEND: u32 = 2;

/// Scans `len` bytes (at most [`HEAD_WINDOW`]) of `buf`, which must point into a map value
/// of at least `MASK + 1 + 32` bytes. Two passes: line ends, then the lines.
#[inline(always)]
pub fn scan(buf: *const u8, len: u32, who: u32) -> Option<&'static mut Head> {
    let head = unsafe { &mut *HEADS.get_ptr_mut(who)? };
    let len = if len > HEAD_WINDOW { HEAD_WINDOW } else { len };
    set(&mut head.len, len);
    set(&mut head.lines, 0);
    set(&mut head.line_start, 0);
    set(&mut head.head_end, 0);
    set(&mut head.line_end, 0);
    set(&mut head.traceparent, 0);
    set(&mut head.flags, 0);
    set(&mut head.content_length, 0);
    // One step per word without a line end, one per line end: at most this many. The
    // position also lives in the map, so every step looks alike to the verifier.
    set(&mut head.at, 0);
    let mut step = 0u32;
    while step < HEAD_WINDOW / 8 + MAX_LINES + 1 {
        let at = get(&head.at);
        if at >= get(&head.len) {
            break;
        }
        let w = word(buf, at);
        // Bytes equal to '\n' get their top bit set (zero-byte test on w ^ "\n\n…"; only
        // bits above a true match can be false, and we take the lowest).
        let x = w ^ 0x0a0a_0a0a_0a0a_0a0a;
        let found = x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080;
        if found == 0 {
            set(&mut head.at, at + 8);
        } else {
            // Byte index of the lowest match, without a branch or a table: the isolated bit
            // 1 << 8k times 0x0001020304050607 has k in its top byte.
            let low = (found & found.wrapping_neg()) >> 7;
            let pos = at + (low.wrapping_mul(0x0001_0203_0405_0607) >> 56) as u32;
            if line_end_at(head, pos) {
                break;
            }
            set(&mut head.at, pos + 1);
        }
        step += 1;
    }
    // Lines are read even when the head continues past the data: a read may hold only the
    // first segment of a request (the request line is what the read path needs).
    if get(&head.lines) > 0 {
        read_lines(head, buf);
    }
    Some(head)
}

/// A `\n` at `pos`. Returns true to stop (head end, too many lines, past the data).
#[inline(always)]
fn line_end_at(head: &mut Head, pos: u32) -> bool {
    if pos >= get(&head.len) {
        return true;
    }
    let lines = get(&head.lines);
    if lines > 0 && pos - get(&head.line_start) <= 1 {
        set(&mut head.head_end, pos + 1);
        return true;
    }
    if lines >= MAX_LINES {
        add_flags(head, HEAD_BAD);
        return true;
    }
    head.newlines[(lines & (MAX_LINES - 1)) as usize] = pos;
    set(&mut head.lines, lines + 1);
    set(&mut head.line_start, pos + 1);
    false
}

/// Reads the request line, then each header line found by [`find_lines`].
#[inline(always)]
fn read_lines(head: &mut Head, buf: *const u8) {
    let first = get(&head.newlines)[0];
    // The request line must end in " HTTP/1.x\r\n".
    if first < 10
        || byte(buf, first - 1) != b'\r'
        || word(buf, first - 9) & SEVEN != w8(b"HTTP/1.\0")
        || byte(buf, first - 10) != b' '
    {
        add_flags(head, HEAD_BAD);
        return;
    }
    set(&mut head.line_end, first + 1);
    let mut i = 1u32;
    while i < MAX_LINES {
        if i >= get(&head.lines) {
            break;
        }
        let start = head.newlines[((i - 1) & (MAX_LINES - 1)) as usize].wrapping_add(1);
        let end = head.newlines[(i & (MAX_LINES - 1)) as usize];
        header_line(head, buf, start, end.saturating_sub(start));
        i += 1;
    }
}

/// One header line of `n` bytes (up to its `\n`) at `start`.
#[inline(always)]
fn header_line(head: &mut Head, buf: *const u8, start: u32, n: u32) {
    let first = word(buf, start) | LOWER;
    if first == w8(b"tracepar") && n >= 12 {
        let rest = word(buf, start + 8) | LOWER;
        if rest & 0xffff_ffff == u32::from_le_bytes(*b"ent:") as u64 {
            if get(&head.traceparent) != 0 {
                add_flags(head, HEAD_MANY_TRACEPARENTS);
                return;
            }
            // Optional whitespace (spaces or tabs) before the value, up to two.
            let v = start + 12;
            let v = v + is_ows(byte(buf, v)) as u32;
            let v = v + is_ows(byte(buf, v)) as u32;
            if v + 55 < start + n && traceparent_shape(buf, v) {
                set(&mut head.traceparent, v);
            } else {
                add_flags(head, HEAD_BAD_TRACEPARENT);
            }
        }
    } else if first == w8(b"content-") && n >= 15 {
        let rest = word(buf, start + 8) | LOWER;
        if rest & SEVEN == w8(b"length:\0") {
            // Two Content-Length headers: servers disagree on which one frames the body.
            if get(&head.flags) & HEAD_HAS_LENGTH != 0 {
                add_flags(head, HEAD_BAD);
            }
            add_flags(head, HEAD_HAS_LENGTH);
            content_length(head, buf, start + 15);
        }
    } else if first == w8(b"transfer") && n >= 18 {
        let rest = word(buf, start + 8) | LOWER;
        if rest == w8(b"-encodin") {
            add_flags(head, HEAD_CHUNKED);
        }
    }
}

/// 1 for a space or a tab (HTTP's optional whitespace), else 0, in arithmetic (see [`is`]).
#[inline(always)]
fn is_ows(c: u8) -> u64 {
    is(c, b' ') | is(c, b'\t')
}

/// A W3C `traceparent` value at `v`: a two-hex-digit version other than `ff`, 32 hex digits,
/// 16 hex digits and two hex digits of flags, dash-separated; a version-00 value ends there
/// (end of line or whitespace), a later version may go on after a dash. Lower-case hex only
/// (W3C allows no other); the ids' digits are checked where they are decoded.
#[inline(always)]
fn traceparent_shape(buf: *const u8, v: u32) -> bool {
    let version_bad = (nibble(byte(buf, v)) | nibble(byte(buf, v + 1))) & 0x10;
    let flags_bad = (nibble(byte(buf, v + 53)) | nibble(byte(buf, v + 54))) & 0x10;
    let ff = is(byte(buf, v), b'f') & is(byte(buf, v + 1), b'f');
    let dashes =
        is(byte(buf, v + 2), b'-') & is(byte(buf, v + 35), b'-') & is(byte(buf, v + 52), b'-');
    let after = byte(buf, v + 55);
    let ends = is(after, b'\r') | is_ows(after);
    let v00 = is(byte(buf, v), b'0') & is(byte(buf, v + 1), b'0');
    // Version 00 must end after its flags; a later version may continue with `-…`.
    let tail_ok = ends | ((1 - v00) & is(after, b'-'));
    version_bad == 0 && flags_bad == 0 && ff == 0 && dashes == 1 && tail_ok == 1
}

/// 1 if `c == k`, else 0, in arithmetic: BPF has no set-on-condition instruction, so a
/// comparison would be a branch, and branches per byte multiply the verifier's paths.
#[inline(always)]
fn is(c: u8, k: u8) -> u64 {
    (((c ^ k) as u64).wrapping_sub(1) >> 8) & 1
}

/// (value, 1) for an ASCII digit, (_, 0) otherwise, in arithmetic (see [`is`]).
#[inline(always)]
fn digit(c: u8) -> (u64, u64) {
    let x = c.wrapping_sub(b'0') as u64;
    let y = x + 0x76;
    (x & 0xf, 1 - (((y >> 7) | (y >> 8)) & 1))
}

/// Content-Length value at `v` (after up to three spaces), computed without branches.
#[inline(always)]
fn content_length(head: &mut Head, buf: *const u8, v: u32) {
    let s1 = is(byte(buf, v), b' ');
    let s2 = s1 & is(byte(buf, v + 1), b' ');
    let s3 = s2 & is(byte(buf, v + 2), b' ');
    let v = v + (s1 + s2 + s3) as u32;
    let mut value: u64 = 0;
    let mut going: u64 = 1;
    let mut digits: u64 = 0;
    let mut k = 0u32;
    while k < 18 {
        let (d, ok) = digit(byte(buf, v + k));
        going &= ok;
        // value*10 + d while digits continue, unchanged after.
        value += going * (value * 9 + d);
        digits += going;
        k += 1;
    }
    // No digit, 18 digits and more, or anything but the line end after the digits (a list,
    // junk): not a length every server reads the same.
    let after = byte(buf, v + digits as u32);
    let next = byte(buf, v + digits as u32 + 1);
    let line_end = |c| is(c, b'\r') | is(c, b'\n');
    // One space or tab may trail the value.
    let ends = line_end(after) | (is_ows(after) & line_end(next));
    let bad = ((digits.wrapping_sub(1) >> 63) & 1) | going | (1 - ends);
    add_flags(head, HEAD_BAD * bad as u32);
    set(&mut head.content_length, value);
}

/// A hash of a request's method and target: the request line up to `line_end` (just after its
/// `\n`) without its ` HTTP/1.x\r\n` tail, so a proxy speaking another HTTP version forwards
/// the same hash. At most [`LINE_HASH_WORDS`] words are hashed, and the length too.
#[inline(always)]
pub fn line_hash(buf: *const u8, line_end: u32) -> u64 {
    let n = line_end.saturating_sub(11) as u64;
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ n;
    let mut i = 0u64;
    while i < LINE_HASH_WORDS as u64 {
        // Bytes of this word inside the target (0..=8), and a mask keeping them: arithmetic,
        // no branch (see `is`), so every word looks alike to the verifier.
        let left = n.saturating_sub(i * 8);
        let over = (7u64.wrapping_sub(left) >> 63) & 1; // left >= 8
        let part = (1u64 << ((left & 7) * 8)).wrapping_sub(1);
        let mask = over.wrapping_neg() | part;
        let w = word(buf, (i * 8) as u32) & mask;
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        i += 1;
    }
    h
}

/// Words of a request line that [`line_hash`] reads (the first 128 bytes of method and
/// target; the length covers the rest).
pub const LINE_HASH_WORDS: u32 = 16;

/// Decodes `N` bytes of lower-case hex at `off` into `out` (W3C trace context allows no
/// other case); false if a character is not hex. (An out-parameter rather than an
/// `Option<[u8; N]>`: the compiler may read an uninitialised `None` payload, which the
/// verifier refuses.)
#[inline(always)]
pub fn decode_hex<const N: usize>(buf: *const u8, off: u32, out: &mut [u8; N]) -> bool {
    let mut bad = 0u8;
    let mut i = 0;
    while i < N {
        let hi = nibble(byte(buf, off + 2 * i as u32));
        let lo = nibble(byte(buf, off + 2 * i as u32 + 1));
        bad |= (hi | lo) & 0x10;
        out[i] = (hi << 4) | (lo & 0xf);
        i += 1;
    }
    bad == 0
}

/// A hex digit's value, or 0x10 when the byte is not a lower-case hex digit; arithmetic
/// only (see [`is`]).
#[inline(always)]
fn nibble(c: u8) -> u8 {
    let d = c.wrapping_sub(b'0') as u64;
    let a = c.wrapping_sub(b'a') as u64;
    // 1 when d < 10 / a < 6 (adding 118 / 122 reaches bit 7 or 8 otherwise).
    let is_d = 1 - ((((d + 0x76) >> 7) | ((d + 0x76) >> 8)) & 1);
    let is_a = 1 - ((((a + 0x7a) >> 7) | ((a + 0x7a) >> 8)) & 1);
    (is_d * d + is_a * (a + 10) + (1 - (is_d | is_a)) * 0x10) as u8
}

/// Lower-case hex digit of a nibble.
#[inline(always)]
pub fn hex_digit(n: u8) -> u8 {
    let n = n & 0xf;
    if n < 10 { b'0' + n } else { b'a' + n - 10 }
}
