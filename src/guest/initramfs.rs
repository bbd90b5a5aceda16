//! A writer for cpio "newc" archives, the format the kernel unpacks as an
//! initramfs. Written by hearth itself, so device nodes and root ownership
//! need no privileges: they are just numbers in a header.
//!
//! Each entry: a 110-byte ASCII header (`070701` and 13 fields of 8 hex
//! digits), the NUL-terminated name, padding to 4 bytes, the data, padding
//! to 4 bytes. The archive ends with an entry named `TRAILER!!!`.

use std::io::{self, Write};

/// Magic of the "newc" format (no checksums).
const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Longest entry name accepted (PATH_MAX).
pub const NAME_BYTES_MAX: usize = 4096;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFLNK: u32 = 0o120_000;

/// Appends entries to a newc archive. All entries are owned by root and
/// dated 0, so equal inputs give byte-identical archives.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
    finished: bool,
}

struct Header {
    mode: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    /// A writer appending to `out`.
    pub fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
            finished: false,
        }
    }

    /// A directory, e.g. `dir("dev", 0o755)`. Parents must come first.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(
            name,
            Header {
                mode: S_IFDIR | (perm & 0o7777),
                nlink: 2,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        )
    }

    /// A regular file with `data`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {} bytes is too large for cpio newc", data.len()),
            )
        })?;
        self.entry(
            name,
            Header {
                mode: S_IFREG | (perm & 0o7777),
                nlink: 1,
                size,
                rdev: (0, 0),
            },
            data,
        )
    }

    /// A character device node, e.g. `/dev/console` is (5, 1).
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(
            name,
            Header {
                mode: S_IFCHR | (perm & 0o7777),
                nlink: 1,
                size: 0,
                rdev: (major, minor),
            },
            &[],
        )
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(
            name,
            Header {
                mode: S_IFLNK | 0o777,
                nlink: 1,
                size: target.len() as u32,
                rdev: (0, 0),
            },
            target.as_bytes(),
        )
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.finished = true;
        self.raw_entry(
            "TRAILER!!!",
            0,
            Header {
                mode: 0,
                nlink: 1,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        )?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, h: Header, data: &[u8]) -> io::Result<()> {
        assert!(!self.finished, "entry after the trailer");
        let name = name.trim_start_matches('/');
        if name.is_empty()
            || name.len() > NAME_BYTES_MAX
            || name.contains('\0')
            || name.split('/').any(|c| c.is_empty() || c == "..")
            || name == "TRAILER!!!"
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {name:?}"),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw_entry(name, ino, h, data)
    }

    fn raw_entry(&mut self, name: &str, ino: u32, h: Header, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(h.size as usize, data.len());
        let namesize = name.len() as u32 + 1;
        let mut head = Vec::with_capacity(110 + name.len() + 4);
        head.extend_from_slice(NEWC_MAGIC);
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        for field in [
            ino, h.mode, 0, 0, h.nlink, 0, h.size, 0, 0, h.rdev.0, h.rdev.1, namesize, 0,
        ] {
            write!(head, "{field:08x}")?;
        }
        head.extend_from_slice(name.as_bytes());
        head.push(0);
        pad4(&mut head, self.written);
        self.out.write_all(&head)?;
        self.written += head.len() as u64;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        let fill = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..fill])?;
        self.written += fill as u64;
        Ok(())
    }
}

/// Pads `buf` (which starts at archive offset `base`) to a 4-byte boundary.
fn pad4(buf: &mut Vec<u8>, base: u64) {
    while !(base + buf.len() as u64).is_multiple_of(4) {
        buf.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.dir("modules", 0o755).unwrap();
        w.file("modules/order", 0o644, b"virtio_ring.ko\n").unwrap();
        w.symlink("sbin", "/").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn entries_are_aligned_and_the_archive_is_reproducible() {
        let a = archive();
        assert_eq!(a, archive());
        assert_eq!(a.len() % 4, 0);
        assert_eq!(&a[..6], b"070701");
        // Parse it back the way the kernel does.
        let mut at = 0;
        let mut names = Vec::new();
        loop {
            assert_eq!(at % 4, 0);
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&a[at + 6 + i * 8..at + 14 + i * 8]).unwrap(),
                    16,
                )
                .unwrap() as usize
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&a[at + 110..at + 110 + namesize - 1])
                .unwrap()
                .to_string();
            let data_at = (at + 110 + namesize + 3) & !3;
            if name == "init" {
                assert_eq!(&a[data_at..data_at + size], b"#!/bin/sh\necho hi\n");
                assert_eq!(mode, 0o100755);
            }
            if name == "dev/console" {
                assert_eq!((field(9), field(10)), (5, 1));
            }
            at = (data_at + size + 3) & !3;
            if name == "TRAILER!!!" {
                break;
            }
            names.push(name);
        }
        assert_eq!(at, a.len());
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "modules",
                "modules/order",
                "sbin"
            ]
        );
    }

    #[test]
    fn the_cpio_tool_reads_it() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: no cpio tool");
            return;
        }
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&archive()).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("crw-------") && text.contains("dev/console"),
            "{text}"
        );
        assert!(
            text.contains("-rwxr-xr-x") && text.contains("init"),
            "{text}"
        );
        assert!(text.contains("sbin -> /"), "{text}");
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "a/../b", "a//b", "TRAILER!!!", "x\0y"] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?}");
        }
    }
}
