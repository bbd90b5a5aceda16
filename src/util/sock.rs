//! Socket options set on accepted TCP connections.

use std::os::fd::RawFd;

/// Sets TCP_NODELAY on `fd`: answers are written whole, Nagle would only
/// delay them. Best effort (a failure leaves Nagle on, nothing breaks).
pub fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from the value we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
