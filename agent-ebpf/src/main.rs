//! Kernel programs of the agent.
//!
//! Socket data is captured at the `sock_recv_length` / `sock_send_length` BTF tracepoints: they
//! fire only for socket I/O (never for files or pipes), inside the syscall, with the `struct sock`
//! and the exact byte count. The syscall's own arguments (fd, user buffer, iovecs) are read from
//! the task's saved user registers, so no enter/exit stash is needed and every syscall path that
//! ends in `sock_sendmsg`/`sock_recvmsg` (read, write, readv, writev, recvfrom, sendto, recvmsg,
//! sendmsg, sendfile …) is covered by two programs.
#![no_std]
#![no_main]

mod arch;
mod context;
mod go;
mod go_tls;
mod http_head;
mod inject;
mod lifecycle;
mod maps;
mod nginx;
mod sockets;
mod tls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
