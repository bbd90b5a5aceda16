//! The guest shared by the microVM backends (QEMU now, Firecracker later):
//! kernel, initramfs and drive images, built by hearth itself without root.
//!
//! - [`kernel`]: finds or fetches the guest kernel (Debian `linux-image-cloud-amd64`,
//!   or a user's via `HEARTH_KERNEL`) and the virtio modules it needs, in load order.
//! - [`lz4`]: decodes the kernel's LZ4 payload into the ELF `vmlinux` Firecracker boots.
//! - [`initramfs`]: a cpio "newc" writer; the archive holds the agent as `/init` and the modules.
//! - [`ext4`]: read-only ext4 images from a directory tree (`mkfs.ext4 -d`).
//! - [`images`]: the runtime image, initramfs and code image, each cached under a name
//!   derived from its inputs so it is rebuilt only when they change.

pub mod ext4;
pub mod images;
pub mod initramfs;
pub mod kernel;
pub mod lz4;

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::util::hex;

/// Feeds a file's length and whole contents into `h`.
pub(crate) fn hash_file(h: &mut Sha256, path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
    h.update(len.to_le_bytes());
    Ok(())
}

/// The first 16 bytes of a digest as 32 hex digits (names of cached files).
pub(crate) fn short_hex(h: Sha256) -> String {
    hex::encode(&h.finalize()[..16])
}
