//! The guest shared by the microVM backends (QEMU now, Firecracker later):
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

use crate::util::hex;

/// The first 16 bytes of a digest as 32 hex digits (names of cached files).
pub(crate) fn short_hex(h: Sha256) -> String {
    hex::encode(&h.finalize()[..16])
}
