//! The uncompressed ELF kernel Firecracker boots, cut out of a bzImage.
//!
//! Firecracker v1.16 on x86_64 loads only an ELF `vmlinux`; Debian ships a
//! bzImage. The bzImage's boot header says where its compressed payload is
//! (`setup_sects` at 0x1f1, `payload_offset`/`payload_length` at
//! 0x248/0x24c, relative to the protected-mode code that follows the setup
//! sectors); the payload is the ELF kernel in one of the kernel's
//! compression formats, followed by its uncompressed size (4 bytes, little
//! endian). Debian's cloud kernel uses LZ4 in the legacy frame format, which
//! is decoded here; other formats are named in the error, and
//! `HEARTH_VMLINUX=<ELF>` supplies a kernel directly.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Magic of the LZ4 legacy frame format (`lz4 -l`), little endian.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// Largest block of the legacy format, uncompressed.
const LZ4_LEGACY_BLOCK_BYTES_MAX: usize = 8 << 20;
/// Largest kernel accepted, uncompressed (a guard against a corrupt size).
pub const VMLINUX_BYTES_MAX: usize = 512 << 20;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Why no vmlinux could be had.
#[derive(Debug, PartialEq, Eq)]
pub enum VmlinuxError {
    /// The file is not a bzImage (no `HdrS` header) nor an ELF kernel.
    NotBzImage,
    /// The boot header points outside the file.
    BadHeader(String),
    /// The payload is compressed in a format not decoded here.
    Unsupported(&'static str),
    /// The LZ4 stream is corrupt; where and why.
    Corrupt(String),
    /// Decompressed, but the result is no ELF file.
    NotElf,
}

impl fmt::Display for VmlinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = "set HEARTH_VMLINUX=<uncompressed ELF vmlinux>";
        match self {
            VmlinuxError::NotBzImage => write!(f, "not a bzImage (no HdrS boot header); {hint}"),
            VmlinuxError::BadHeader(m) => write!(f, "bzImage header: {m}"),
            VmlinuxError::Unsupported(fmt_name) => write!(
                f,
                "the bzImage payload is {fmt_name}-compressed; only LZ4 is decoded here; {hint}"
            ),
            VmlinuxError::Corrupt(m) => write!(f, "corrupt LZ4 payload: {m}"),
            VmlinuxError::NotElf => write!(f, "the decompressed payload is not an ELF file"),
        }
    }
}

impl std::error::Error for VmlinuxError {}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The compressed payload of a bzImage (without the trailing size) and the
/// uncompressed size it declares.
pub fn payload(image: &[u8]) -> Result<(&[u8], usize), VmlinuxError> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(VmlinuxError::NotBzImage);
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let bad = |m: &str| VmlinuxError::BadHeader(m.to_string());
    let offset = le32(image, 0x248).ok_or_else(|| bad("no payload_offset"))? as usize;
    let length = le32(image, 0x24c).ok_or_else(|| bad("no payload_length"))? as usize;
    let start = (setup_sects + 1) * 512 + offset;
    let end = start
        .checked_add(length)
        .filter(|&e| e <= image.len() && length >= 4)
        .ok_or_else(|| {
            bad(&format!(
                "payload {start}+{length} outside the {}-byte file",
                image.len()
            ))
        })?;
    let size = le32(image, end - 4).expect("in bounds") as usize;
    Ok((&image[start..end - 4], size))
}

/// The ELF kernel inside a bzImage.
pub fn extract(image: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    if image.starts_with(ELF_MAGIC) {
        return Ok(image.to_vec());
    }
    let (data, size) = payload(image)?;
    let format = match data {
        [0x02, 0x21, 0x4c, 0x18, ..] => None,
        [0x1f, 0x8b, ..] | [0x1f, 0x9e, ..] => Some("gzip"),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Some("xz"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Some("zstd"),
        [b'B', b'Z', b'h', ..] => Some("bzip2"),
        [0x89, b'L', b'Z', b'O', ..] => Some("lzo"),
        [0x5d, 0, 0, ..] => Some("lzma"),
        _ => Some("an unknown format"),
    };
    if let Some(name) = format {
        return Err(VmlinuxError::Unsupported(name));
    }
    if size > VMLINUX_BYTES_MAX {
        return Err(VmlinuxError::Corrupt(format!(
            "declared size {size} exceeds {VMLINUX_BYTES_MAX}"
        )));
    }
    let out = lz4_legacy(data, size)?;
    if out.len() != size {
        return Err(VmlinuxError::Corrupt(format!(
            "{} bytes decoded, header says {size}",
            out.len()
        )));
    }
    if !out.starts_with(ELF_MAGIC) {
        return Err(VmlinuxError::NotElf);
    }
    Ok(out)
}

/// Decodes an LZ4 legacy frame (magic, then blocks each preceded by its
/// compressed length) into at most `limit` bytes.
pub fn lz4_legacy(data: &[u8], limit: usize) -> Result<Vec<u8>, VmlinuxError> {
    if le32(data, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(VmlinuxError::Corrupt("no LZ4 legacy magic".into()));
    }
    let mut out = Vec::with_capacity(limit.min(VMLINUX_BYTES_MAX));
    let mut at = 4;
    while let Some(len) = le32(data, at) {
        // Concatenated streams repeat the magic; skip it.
        if len == LZ4_LEGACY_MAGIC {
            at += 4;
            continue;
        }
        let len = len as usize;
        let block = data.get(at + 4..at + 4 + len).ok_or_else(|| {
            VmlinuxError::Corrupt(format!("block at {at} of {len} bytes runs past the end"))
        })?;
        let cap = limit
            .saturating_sub(out.len())
            .min(LZ4_LEGACY_BLOCK_BYTES_MAX);
        lz4_block(block, &mut out, cap)
            .map_err(|m| VmlinuxError::Corrupt(format!("block at {at}: {m}")))?;
        at += 4 + len;
    }
    Ok(out)
}

/// Appends the decoding of one LZ4 block to `out`, writing at most `cap`
/// bytes. Matches may reach back into earlier output (blocks of the legacy
/// format are independent, but nothing is lost by allowing it).
fn lz4_block(src: &[u8], out: &mut Vec<u8>, cap: usize) -> Result<(), &'static str> {
    let start = out.len();
    let mut i = 0;
    let ext_len = |i: &mut usize, mut n: usize| -> Result<usize, &'static str> {
        loop {
            let b = *src.get(*i).ok_or("length runs past the end")?;
            *i += 1;
            n = n.checked_add(b as usize).ok_or("length overflows")?;
            if b != 255 {
                return Ok(n);
            }
        }
    };
    while i < src.len() {
        let token = src[i];
        i += 1;
        let mut lit = (token >> 4) as usize;
        if lit == 15 {
            lit = ext_len(&mut i, lit)?;
        }
        let lits = src.get(i..i + lit).ok_or("literals run past the end")?;
        if out.len() - start + lit > cap {
            return Err("block decodes to more than allowed");
        }
        out.extend_from_slice(lits);
        i += lit;
        if i == src.len() {
            return Ok(());
        }
        let off = u16::from_le_bytes(
            src.get(i..i + 2)
                .ok_or("offset runs past the end")?
                .try_into()
                .expect("two bytes"),
        ) as usize;
        i += 2;
        let mut mlen = (token & 15) as usize;
        if mlen == 15 {
            mlen = ext_len(&mut i, mlen)?;
        }
        mlen += 4;
        if off == 0 || off > out.len() {
            return Err("match offset outside the output");
        }
        if out.len() - start + mlen > cap {
            return Err("block decodes to more than allowed");
        }
        let from = out.len() - off;
        if off >= mlen {
            out.extend_from_within(from..from + mlen);
        } else {
            // Overlapping copy: each byte may be one just written.
            for k in 0..mlen {
                let b = out[from + k];
                out.push(b);
            }
        }
    }
    Ok(())
}

/// `HEARTH_VMLINUX`, or the vmlinux of `bzimage` cached in `cache` as
/// `vmlinux-<digest of the bzImage>` (written whole, then renamed; older
/// ones are removed).
pub fn ensure(bzimage: &Path, cache: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("HEARTH_VMLINUX") {
        return Ok(PathBuf::from(p));
    }
    let image = fs::read(bzimage).map_err(|e| format!("{}: {e}", bzimage.display()))?;
    let mut h = Sha256::new();
    h.update(&image);
    let name = format!("vmlinux-{}", crate::guest::short_hex(h));
    let out = cache.join(&name);
    if out.is_file() {
        return Ok(out);
    }
    let elf = extract(&image).map_err(|e| format!("{}: {e}", bzimage.display()))?;
    fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let tmp = cache.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&elf)?;
        f.sync_all()?;
        fs::rename(&tmp, &out)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("{}: {e}", out.display())
    })?;
    if let Ok(entries) = fs::read_dir(cache) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("vmlinux-") && n != name {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One block: literals "abcd", then a match of 8 bytes at offset 4
    /// (overlapping: it repeats "abcd"), then the final literals "!".
    fn tiny_block() -> Vec<u8> {
        let mut b = vec![(4 << 4) | 4];
        b.extend_from_slice(b"abcd");
        b.extend_from_slice(&4u16.to_le_bytes());
        b.push(1 << 4);
        b.push(b'!');
        b
    }

    fn legacy(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut f = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for b in blocks {
            f.extend_from_slice(&(b.len() as u32).to_le_bytes());
            f.extend_from_slice(b);
        }
        f
    }

    #[test]
    fn lz4_blocks_decode_with_overlapping_matches() {
        let out = lz4_legacy(&legacy(&[tiny_block(), tiny_block()]), 100).unwrap();
        assert_eq!(out, b"abcdabcdabcd!abcdabcdabcd!");
    }

    #[test]
    fn lz4_corruption_and_overruns_are_errors_not_panics() {
        let frame = legacy(&[tiny_block()]);
        // Every truncation fails cleanly or decodes a prefix; none panics.
        for cut in 0..frame.len() {
            let _ = lz4_legacy(&frame[..cut], 100);
        }
        assert!(matches!(
            lz4_legacy(&frame, 5),
            Err(VmlinuxError::Corrupt(_))
        ));
        let mut bad_offset = tiny_block();
        bad_offset[5] = 9;
        assert!(matches!(
            lz4_legacy(&legacy(&[bad_offset]), 100),
            Err(VmlinuxError::Corrupt(m)) if m.contains("offset")
        ));
        assert!(matches!(
            lz4_legacy(b"nope", 100),
            Err(VmlinuxError::Corrupt(_))
        ));
    }

    fn fake_bzimage(payload: &[u8], declared: u32) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        img.extend_from_slice(&[0; 16]);
        img.extend_from_slice(payload);
        img.extend_from_slice(&declared.to_le_bytes());
        img
    }

    #[test]
    fn a_bzimage_payload_is_found_from_its_header() {
        let elf_block = {
            let mut b = vec![8 << 4];
            b.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
            b.extend_from_slice(&8u16.to_le_bytes());
            b.push(0);
            b
        };
        // "\x7fELF...." then a 4-byte match of it: 12 bytes.
        let img = fake_bzimage(&legacy(&[elf_block]), 12);
        let out = extract(&img).unwrap();
        assert_eq!(&out[..4], ELF_MAGIC);
        assert_eq!(out.len(), 12);
        // A wrong declared size, a foreign format, a non-ELF result.
        let img = fake_bzimage(&legacy(&[tiny_block()]), 99);
        assert!(matches!(extract(&img), Err(VmlinuxError::Corrupt(_))));
        let img = fake_bzimage(&legacy(&[tiny_block()]), 13);
        assert_eq!(extract(&img), Err(VmlinuxError::NotElf));
        let img = fake_bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2], 6);
        assert_eq!(extract(&img), Err(VmlinuxError::Unsupported("zstd")));
        assert_eq!(extract(&[0u8; 1024]), Err(VmlinuxError::NotBzImage));
        let mut short = fake_bzimage(&legacy(&[tiny_block()]), 13);
        short.truncate(5 * 512 + 20);
        assert!(matches!(extract(&short), Err(VmlinuxError::BadHeader(_))));
    }

    /// The real Debian kernel, when fetched: the result is byte for byte what
    /// `tools/fetch-kernel.sh` got from the `lz4` tool.
    #[test]
    fn debian_kernel_extracts_to_what_lz4_gives() {
        let Ok(k) = crate::guest::kernel::locate(Path::new("/nonexistent-hearth-state")) else {
            eprintln!("skipped: no guest kernel fetched (tools/fetch-kernel.sh)");
            return;
        };
        let boot = k.image.parent().unwrap();
        let reference = boot.join(format!("vmlinux-{}", k.release));
        let Ok(want) = fs::read(&reference) else {
            eprintln!("skipped: no {} to compare with", reference.display());
            return;
        };
        let got = extract(&fs::read(&k.image).unwrap()).unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "vmlinux differs from {}", reference.display());
    }
}
