//! Socket options set on TCP connections.

use std::os::fd::RawFd;

/// Sets socket option `name` at `level` to `value`; best effort (the result is ignored).
fn set<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes from a value we own.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
}

/// Sets TCP_NODELAY on `fd`: answers are written whole, Nagle would only
/// delay them. Best effort (a failure leaves Nagle on, nothing breaks).
pub fn set_nodelay(fd: RawFd) {
    set(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        &(1 as libc::c_int),
    );
}

/// SO_LINGER on with a zero timeout: `close` resets the connection instead
/// of a graceful end. Best effort.
pub fn set_linger_zero(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set(fd, libc::SOL_SOCKET, libc::SO_LINGER, &l);
}

/// Bytes written to the socket that the peer has not acknowledged yet (the
/// kernel's send queue, `SIOCOUTQ`); 0 when it cannot be read.
pub fn unacked_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int to the pointer given.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    match rc {
        0 => usize::try_from(n).unwrap_or(0),
        _ => 0,
    }
}
