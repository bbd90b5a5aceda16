//! The guest shared by the microVM backends (QEMU and Firecracker):
//! kernel, initramfs and drive images, built by hearth itself without root.
//!
//! - [`kernel`]: finds or fetches the guest kernel (Debian `linux-image-cloud-amd64`,
//!   or a user's via `HEARTH_KERNEL`) and the virtio modules it needs, in load order.
//! - [`initramfs`]: a cpio "newc" writer; the archive holds the agent as `/init` and the modules.
//! - [`ext4`]: read-only ext4 images from a directory tree (`mkfs.ext4 -d`).
//! - [`images`]: the runtime image, initramfs and code image, each cached under a name
//!   derived from its inputs so it is rebuilt only when they change.

pub mod ext4;
pub mod images;
pub mod initramfs;
pub mod kernel;

use sha2::{Digest, Sha256};

use crate::runtime::RuntimeKind;
use crate::util::hex;

/// The kernel command-line argument that makes the guest agent serve the
/// Lambda Runtime API to a function of `runtime` (`hearth.api=<runtime>`);
/// `None` for Node.js, which the agent runs through hearth's shim. Both VM
/// backends append it to their command lines.
pub fn runtime_api_arg(runtime: RuntimeKind) -> Option<String> {
    (!runtime.is_nodejs()).then(|| format!("hearth.api={}", runtime.name()))
}

/// The first 16 bytes of a digest as 32 hex digits (names of cached files).
pub(crate) fn short_hex(h: Sha256) -> String {
    hex::encode(&h.finalize()[..16])
}
