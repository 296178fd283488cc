//! Types shared by the kernel programs (`agent-ebpf`) and the userspace agent.
//!
//! Every event starts with a `u32` kind; userspace converts it with `TryFrom`, never `transmute`.
//! All structs are `#[repr(C)]` without implicit padding, and their sizes are asserted so that a
//! layout change on one side breaks the build instead of the data.
#![no_std]

use core::mem::size_of;

/// Largest payload prefix one data event can carry. Power of two: the kernel masks with it;
/// twice this plus the header must stay under the 32 KiB limit of a per-CPU map value.
pub const MAX_CAPTURE: usize = 8192;
/// Payload prefix captured per syscall unless the user configures another size.
pub const DEFAULT_CAPTURE: u32 = 4096;
/// Most iovecs walked to copy a readv/writev/recvmsg/sendmsg payload.
pub const MAX_IOVECS: u32 = 8;
/// Offset of `sk` in `struct socket` (after `state`, `type`, `flags`, `file`: unchanged since
/// Linux 2.6). The fexit programs read it with a typed load, which cannot take an offset
/// known only at load time; userspace checks it against the kernel's BTF before using them.
pub const SOCKET_SK_OFFSET: u32 = 24;

/// Event kinds. Discriminants are part of the wire contract with the kernel: never reuse one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes moved on a TCP socket: [`DataEvent`] followed by `captured` payload bytes.
    Data = 1,
    /// accept/accept4 returned a new socket fd: [`ConnEvent`].
    Accept = 2,
    /// connect returned (0 or EINPROGRESS): [`ConnEvent`].
    Connect = 3,
    /// A tracked TCP socket reached TCP_CLOSE: [`ConnEvent`] (fd unknown).
    Close = 4,
    /// A traced process exited: [`ProcessEvent`].
    ProcessExit = 5,
    /// Any process called execve: [`ProcessEvent`] (lets userspace select new processes).
    Exec = 6,
    /// A selected process forked a new process, which the kernel selected at once:
    /// [`ProcessEvent`] with the child's pid.
    Fork = 7,
    /// Trace context the kernel chose for a request: [`ContextEvent`].
    Context = 8,
    /// An enrolled client socket left the injector's map because its peer answered:
    /// [`ParkEvent`].
    Parked = 9,
    /// The dynamic loader of a selected process changed its libraries (`dlopen`, or the ones a
    /// new program needs): [`ProcessEvent`].
    Libraries = 10,
}

impl TryFrom<u32> for EventKind {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        Ok(match v {
            1 => Self::Data,
            2 => Self::Accept,
            3 => Self::Connect,
            4 => Self::Close,
            5 => Self::ProcessExit,
            6 => Self::Exec,
            7 => Self::Fork,
            8 => Self::Context,
            9 => Self::Parked,
            10 => Self::Libraries,
            other => return Err(other),
        })
    }
}

/// Which way bytes went, seen from the traced process.
pub const DIR_INGRESS: u32 = 0;
pub const DIR_EGRESS: u32 = 1;

/// The syscall that moved the bytes (from the syscall number in the task's registers).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallKind {
    /// A path whose buffers we do not know (sendfile, splice, io_uring, mmsg): byte count only.
    Other = 0,
    Read = 1,
    Write = 2,
    Readv = 3,
    Writev = 4,
    RecvFrom = 5,
    SendTo = 6,
    RecvMsg = 7,
    SendMsg = 8,
    SendFile = 9,
}

impl TryFrom<u32> for SyscallKind {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        Ok(match v {
            0 => Self::Other,
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Readv,
            4 => Self::Writev,
            5 => Self::RecvFrom,
            6 => Self::SendTo,
            7 => Self::RecvMsg,
            8 => Self::SendMsg,
            9 => Self::SendFile,
            other => return Err(other),
        })
    }
}

/// Header of a data event; `captured` payload bytes follow it in the ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataEvent {
    pub kind: u32,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`].
    pub direction: u32,
    /// Process id (tgid) and thread id.
    pub pid: u32,
    pub tid: u32,
    /// File descriptor, or `u32::MAX` when the syscall does not name one we can read.
    pub fd: u32,
    /// [`SyscallKind`].
    pub syscall: u32,
    /// Kernel monotonic time (`bpf_ktime_get_ns`): for a read, when the bytes had been moved;
    /// for a TCP write, when its last part began to be queued, so before the peer can have it
    /// (when the syscall returned if that stamp is missing or stale, or on kernels without
    /// `tcp_sendmsg_locked`).
    pub ts_ns: u64,
    /// When the bytes began to move: for a TCP write sent in several chunks (large writes),
    /// when its first chunk was queued; otherwise `ts_ns`. A message that starts in this
    /// segment started then.
    pub first_ts_ns: u64,
    /// Socket cookie: unique per socket for the life of the boot, so fd reuse never glues
    /// two connections together.
    pub sock_cookie: u64,
    /// Exact byte count the syscall moved.
    pub bytes: u64,
    /// How many payload bytes follow (a prefix of `bytes`).
    pub captured: u32,
    /// AF_INET or AF_INET6.
    pub family: u32,
    /// Addresses in network order; IPv4 in the first four bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Ports in host order.
    pub local_port: u16,
    pub remote_port: u16,
    /// Bit flags, see `DATA_FLAG_*`.
    pub flags: u32,
}
const _: () = assert!(size_of::<DataEvent>() == 104);

/// The user buffer could not be read (page not resident): `captured` is 0 though `bytes` is not.
pub const DATA_FLAG_COPY_FAILED: u32 = 1;
/// The event carries the socket's addresses and ports (sent once per socket: userspace keeps
/// them with the connection).
pub const DATA_FLAG_ADDRESSES: u32 = 2;
/// `captured` < `bytes` although the buffer was readable (the capture size cut it).
pub const DATA_FLAG_TRUNCATED: u32 = 4;
/// The bytes are the plaintext a TLS library (OpenSSL's `SSL_read`/`SSL_write`) handed to or
/// got for the socket `sock_cookie`, not what crossed the socket; `syscall` is
/// [`SyscallKind::Other`]; stamps are those of the library's own socket I/O in the call. A
/// `sock_cookie` of 0 names the socket by `fd` instead (the socket that fd moved bytes on
/// last); otherwise `fd` is unknown.
pub const DATA_FLAG_TLS_PLAINTEXT: u32 = 8;
/// Socket bytes moved inside a TLS library call (encrypted records whose plaintext comes as
/// [`DATA_FLAG_TLS_PLAINTEXT`] events): counted, not copied.
pub const DATA_FLAG_TLS_RECORDS: u32 = 16;
/// A write of an exchange head sampling left out, on a socket the injector follows: sent
/// without its bytes, only so userspace knows the socket (its fd, its writes) and can put it
/// back into the injector's map once parked; never parsed.
pub const DATA_FLAG_UNSAMPLED: u32 = 32;

/// Connection lifecycle: accept, connect, close.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// fd for accept/connect; `u32::MAX` for close.
    pub fd: u32,
    pub ts_ns: u64,
    /// Socket cookie for close; 0 where the kernel did not know it (accept/connect).
    pub sock_cookie: u64,
    /// Syscall return value (connect: 0 or -EINPROGRESS).
    pub ret: i64,
}
const _: () = assert!(size_of::<ConnEvent>() == 40);

pub const COMM_LEN: usize = 16;

/// Process exec, fork or exit (and a loader's library change).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessEvent {
    pub kind: u32,
    pub pid: u32,
    pub ts_ns: u64,
    pub comm: [u8; COMM_LEN],
    /// Fork: the process that forked `pid` (0 otherwise).
    pub parent: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ProcessEvent>() == 40);

/// The kernel's per-CPU counters: one struct per CPU so a program updates all it needs after a
/// single map lookup. Userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelStats {
    /// Data events written to the ring buffer.
    pub data_events: u64,
    /// Lifecycle and process events written.
    pub other_events: u64,
    /// Bytes moved on traced sockets (sum of `bytes` of the data events written).
    pub bytes: u64,
    /// Events lost because the ring buffer was full.
    pub ringbuf_full: u64,
    /// Data events whose payload was cut to the capture size (normal for bodies; reported).
    pub truncated: u64,
    /// User buffers that could not be read.
    pub copy_failed: u64,
    /// The tracked-socket map was full (closes of those sockets are not reported).
    pub socket_map_full: u64,
    /// Server requests given a trace context in the kernel.
    pub server_contexts: u64,
    /// Client sockets enrolled for header injection (connected by a selected process).
    pub sockets_enrolled: u64,
    /// Sockets that could not be enrolled (a map was full).
    pub enroll_failed: u64,
    /// `traceparent` headers inserted into outgoing requests.
    pub traceparent_injected: u64,
    /// Outgoing requests that carried a `traceparent`: its parent id was rewritten in place.
    pub traceparent_rewritten: u64,
    /// Outgoing requests left untouched: not HTTP, header block split over writes or larger
    /// than the window, several `traceparent` headers, or the socket's framing was lost earlier.
    pub inject_skipped: u64,
    /// Injection attempts the kernel refused (push/pull of message data failed).
    pub inject_failed: u64,
    /// Connections whose request framing the injector stopped following (chunked body, head
    /// not found): later requests on them are not injected.
    pub inject_framing_lost: u64,
    /// Client requests sent while the thread's serving request was ambiguous (several in
    /// flight) or too old: started a trace of their own.
    pub link_ambiguous: u64,
    /// Client requests linked in the kernel to the request their thread serves.
    pub link_kernel: u64,
    /// TCP writes of traced threads stamped when the syscall returned instead of when their
    /// last chunk was queued (the thread changed CPUs mid-write, several threads wrote on the
    /// socket at once, or no `tcp_sendmsg_locked`).
    pub writes_stamped_at_return: u64,
    /// Enrolled client sockets taken out of the injector's map when their peer answered, so
    /// the answer is read exactly as without the agent (see `SEND_FLAG_PARKED`).
    pub sockets_parked: u64,
    /// Requests written while their socket was out of the injector's map (sent right after an
    /// answer, before it rejoined): not injected; their head tells where the next one starts.
    pub requests_sent_parked: u64,
    /// Outgoing `traceparent` headers whose trace id or parent id was all zeros: rewritten in
    /// place with valid ids.
    pub traceparent_invalid_rewritten: u64,
    /// Outgoing `traceparent` headers not in the version-00 form (or not hex): left as they
    /// were, the request's span keeps ids of its own.
    pub traceparent_invalid_kept: u64,
    /// Client requests of a thread serving several requests at once, linked to the one
    /// in-flight request of the process whose trace id their `traceparent` forwards.
    pub link_forwarded_trace: u64,
    /// Client requests of a thread serving several requests at once, linked to the one
    /// in-flight request of the process with the same method and target (a proxy forwarding).
    pub link_request_line: u64,
    /// Client requests whose forwarded trace id or request line matched several in-flight
    /// requests of the process: not linked.
    pub link_match_ambiguous: u64,
    /// Client requests linked to the served request a runtime mechanism named when the
    /// runtime wrote them (nginx: the request an upstream request is written for).
    pub link_handoff: u64,
    /// Client requests a runtime mechanism named a served request for that was no longer in
    /// flight, unknown, too old or at its cap of children: not linked.
    pub handoff_not_in_flight: u64,
    /// Runtime probes that fired on memory they could not read or that was not what they
    /// expected (an nginx request without its signature): no hand-off.
    pub handoff_unreadable: u64,
    /// Go: handlers started (`serverHandler.ServeHTTP`) for a request the kernel read on the
    /// goroutine's connection.
    pub go_serves_known: u64,
    /// Go: handlers started for a request the kernel does not know (its start was not seen,
    /// or not on the goroutine's last read socket): their client requests go unlinked.
    pub go_serves_unknown: u64,
    /// Go: requests whose first byte the connection's background read took alone, opened
    /// (given their server context) when their handler started.
    pub go_split_starts: u64,
    /// Go: client requests started (`persistConn.roundTrip`) by a goroutine serving a request.
    pub go_calls_owned: u64,
    /// Go: client requests started by a goroutine that works for no request in flight (a
    /// background goroutine, one whose request was answered or not seen, or one created while
    /// its creator's was not in flight): written unlinked.
    pub go_calls_unowned: u64,
    /// Go: socket writes of a Go transport's write goroutine handed off to the served request
    /// its client request was started for.
    pub go_writes_handed_off: u64,
    /// Go: goroutines created by one working for a request in flight (`runtime.newproc1`):
    /// they work for it too.
    pub go_spawns_followed: u64,
    /// Go: client requests (of `kernel_go_calls_owned`) started by such a created goroutine.
    pub go_calls_spawned: u64,
    /// Socket I/O the kprobe fallback saw on a socket the kernel had no cookie for yet
    /// (opened before the agent, whose start-up could not list it): not traced.
    pub sockets_without_cookie: u64,
    /// Socket calls the kprobe fallback saw start but not end in a socket syscall (io_uring,
    /// recvmmsg/sendmmsg): their data was not captured.
    pub kprobe_calls_unfinished: u64,
    /// TLS library calls (OpenSSL `SSL_read`/`SSL_write`) whose plaintext was captured.
    pub tls_plaintext: u64,
    /// TLS library calls that moved plaintext for a connection whose socket the kernel could
    /// not tell (the library did no socket I/O in the call and none earlier: a memory BIO, as
    /// Node.js and Python's asyncio use): not traced.
    pub tls_unassociated: u64,
    /// Go `crypto/tls` calls on a connection whose socket the kernel could not tell (it does
    /// not run over a `*net.TCPConn`, or its fd could not be read): not traced.
    pub go_tls_unassociated: u64,
    /// Requests read by a traced server that head sampling left out (`--sample-ratio`, or an
    /// incoming `traceparent` not sampled): the kernel sent none of their bytes.
    pub requests_unsampled: u64,
    /// Client requests made for a request left out by sampling: not sampled either (their
    /// `traceparent` says so), none of their bytes sent.
    pub calls_unsampled: u64,
}
const _: () = assert!(size_of::<KernelStats>() == 344);

/// `RUNTIME_PIDS` flags: what a runtime mechanism's probes need of the kernel for a process.
/// Its probes name a served request by the fd it was read on (nginx: the client connection's;
/// Go: the serving goroutine's connection's), so the kernel indexes its requests by fd.
pub const RUNTIME_REQUESTS_BY_FD: u32 = 1;
/// Go (`net/http`): goroutine probes (marks the process; nothing more in the kernel yet).
pub const RUNTIME_GO: u32 = 2;

/// Go's `internal/poll.FD.Sysfd`, after `fdmu fdMutex { state uint64; rsema, wsema uint32 }`
/// (unchanged since Go 1.9; the agent's tests check it against the DWARF of Go 1.19 and 1.23).
pub const GO_FD_SYSFD_OFFSET: u64 = 16;
/// Go's `internal/poll.FD.isFile` (a file, not a socket; same check as above).
pub const GO_FD_IS_FILE_OFFSET: u64 = 50;
/// Go's `runtime.g.stack` (`stack { lo, hi uintptr }`), its first field in every Go version:
/// where the goroutine's stack is, which moves when it grows or shrinks.
pub const GO_G_STACK_OFFSET: u64 = 0;
/// Go's `net/http.transportRequest.Request` (the embedded `*Request`, its first field).
pub const GO_TRANSPORT_REQUEST_OFFSET: u64 = 0;
/// Go's `crypto/tls.Conn.conn`, the `net.Conn` it runs over (its first field).
pub const GO_TLS_CONN_NET_CONN_OFFSET: u64 = 0;
/// The type hash the Go linker gives `*net.TCPConn` (the first 4 bytes, little-endian, of the
/// bitwise NOT of the SHA-256 of its name; Go 1.19 and 1.23 alike), copied into every itab of
/// that type: an interface holding a `*net.TCPConn` is told by it.
pub const GO_TCPCONN_TYPE_HASH: u32 = 0xbc02_0cb9;

/// `TLS_ATTACHED` bits: which TLS probes are attached somewhere, so the socket programs look
/// for library calls (OpenSSL) and Node.js `TLSWrap` methods in progress.
pub const TLS_ATTACHED_OPENSSL: u32 = 1;
pub const TLS_ATTACHED_NODE: u32 = 2;

/// Role of a [`ContextEvent`].
pub const CONTEXT_SERVER: u32 = 1;
pub const CONTEXT_CLIENT: u32 = 2;
/// The context has a parent (`parent_id` is valid).
pub const CONTEXT_FLAG_PARENT: u32 = 1;
/// The parent is the server span the thread serves (linked in the kernel), not a remote one.
pub const CONTEXT_FLAG_LOCAL_PARENT: u32 = 2;
/// Client: the request already had a `traceparent`; its parent id was rewritten in place.
pub const CONTEXT_FLAG_REWRITTEN: u32 = 4;
/// Client: the request went out without these ids (its socket was out of the injector's
/// map); they name its span and its parent, not anything on the wire.
pub const CONTEXT_FLAG_NOT_INJECTED: u32 = 8;
/// Server: the request's first byte came alone in an earlier read (Go's server reads one byte
/// ahead); `ts_ns` is that read's, and the context comes after the request's data events,
/// from a runtime probe (before its answer).
pub const CONTEXT_FLAG_SPLIT_START: u32 = 16;

/// The ids the kernel chose for one request. A server context comes right before the data
/// event of the read holding the request's first byte (same `ts_ns`); client contexts come
/// from the injector, before the data event of the write that carried the request(s), in
/// request order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ContextEvent {
    pub kind: u32,
    /// [`CONTEXT_SERVER`] or [`CONTEXT_CLIENT`].
    pub role: u32,
    pub pid: u32,
    pub tid: u32,
    /// Server: the data event's timestamp. Client: when the injector ran.
    pub ts_ns: u64,
    /// Server: the socket cookie. Client: 0 (the injector cannot read it; ports identify).
    pub sock_cookie: u64,
    /// Ports in host order (client contexts; 0 for server contexts).
    pub local_port: u16,
    pub remote_port: u16,
    /// `CONTEXT_FLAG_*`.
    pub flags: u32,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: [u8; 8],
}
const _: () = assert!(size_of::<ContextEvent>() == 72);

/// The request a thread is serving, as the kernel saw it (key: thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadContext {
    /// Server socket the request came in on.
    pub sock_cookie: u64,
    /// When its first bytes were read.
    pub ts_ns: u64,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// `THREAD_FLAG_*`.
    pub flags: u32,
    /// Client requests linked to it so far (bounded by the trace adoption cap).
    pub children: u32,
}
const _: () = assert!(size_of::<ThreadContext>() == 48);

/// The thread wrote on the server socket after the request: answered.
pub const THREAD_FLAG_ANSWERED: u32 = 1;
/// Another request was in flight on this thread when this one came: do not guess.
pub const THREAD_FLAG_AMBIGUOUS: u32 = 2;
/// Head sampling left the request out: its client calls are left out too.
pub const THREAD_FLAG_UNSAMPLED: u32 = 4;

/// Where the injector is in an enrolled socket's outgoing byte stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SendState {
    /// `SEND_*`.
    pub mode: u32,
    /// `SEND_FLAG_*`.
    pub flags: u32,
    /// Body bytes still to come before the next request (mode [`SEND_BODY`]).
    pub remaining: u64,
    /// Bytes of the current write the injector saw (sizes before insertion); the write's
    /// return compares them with its length, and accounts for bytes the injector did not see.
    pub seen: u64,
    /// Writes on the socket that moved bytes, counted as they return (userspace compares
    /// them with the write events it received).
    pub writes: u64,
}
const _: () = assert!(size_of::<SendState>() == 32);

/// The socket is out of the injector's map: its peer answered (an ACK of our bytes, or data),
/// and a socket in a socket map reads differently on some kernels (FIONREAD counts only the
/// map's own queue, readiness wake-ups can be lost). Userspace puts it back once the answer
/// has been read and nothing is pending.
pub const SEND_FLAG_PARKED: u32 = 1;

/// An enrolled socket left the injector's map (see [`SEND_FLAG_PARKED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ParkEvent {
    pub kind: u32,
    /// The socket's [`SendState::mode`] when it was parked.
    pub mode: u32,
    /// Process that connected the socket (0: unknown).
    pub pid: u32,
    pub _pad: u32,
    pub sock_cookie: u64,
    /// The socket's address: the key of the injector's send states.
    pub sk: u64,
    /// [`SendState::writes`] when it was parked.
    pub writes: u64,
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<ParkEvent>() == 48);

/// The next byte starts a request.
pub const SEND_BOUNDARY: u32 = 0;
/// Inside a request body of known length.
pub const SEND_BODY: u32 = 1;
/// Framing unknown: nothing more is injected on this socket.
pub const SEND_LOST: u32 = 2;

/// Bytes the injector inserts: `traceparent: 00-<32 hex>-<16 hex>-01\r\n`.
pub const TRACEPARENT_LINE_LEN: u32 = 70;

/// Value of the kernel's tracked-socket map (key: socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackedSocket {
    /// Process that used the socket.
    pub pid: u32,
    /// Addresses and ports were sent with an event already: later events omit them.
    pub addresses_sent: u32,
    /// A write's queue-time stamp must be later than this, or it was left behind by an
    /// earlier write (of this socket, or of a closed one at the same address): when the
    /// socket's last write returned, else when it was connected or first seen reading.
    pub write_stamp_floor_ns: u64,
}
const _: () = assert!(size_of::<TrackedSocket>() == 16);

/// Offsets of kernel struct fields, read from /sys/kernel/btf/vmlinux at load time so the
/// programs do not depend on one kernel build's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `struct sock.sk_protocol` (u16).
    pub sk_protocol: u32,
    /// `struct task_struct.pid` and `.tgid` (i32): tell a new process from a new thread.
    pub task_pid: u32,
    pub task_tgid: u32,
    /// `struct tcp_sock.rcv_nxt` and `.copied_seq` (u32): their difference is the unread
    /// bytes of a TCP socket.
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    /// `struct sock_common.skc_cookie` (u64): the socket's cookie once one was made, read by
    /// the kprobe fallback, which cannot call the cookie helper.
    pub skc_cookie: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 56);

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::KernelStats {}
    unsafe impl aya::Pod for super::ThreadContext {}
    unsafe impl aya::Pod for super::SendState {}
    unsafe impl aya::Pod for super::TrackedSocket {}
}
