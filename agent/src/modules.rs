//! Loading kernel modules from the initramfs with finit_module(2).
//!
//! `<modules dir>/order` lists one module file per line, relative to that
//! directory, in load order (dependencies first: `virtio_ring.ko` before
//! `virtio.ko`, as `modules.dep` does not say so). Blank lines and `#`
//! comments are skipped; text after the file name is passed as module
//! parameters. `.ko.xz`/`.ko.zst`/`.ko.gz` files are handed to the kernel to
//! decompress (needs CONFIG_MODULE_DECOMPRESS).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// finit_module flag: the file is compressed; the kernel decompresses it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// One line of the order file.
#[derive(Debug, PartialEq, Eq)]
pub struct ModuleEntry {
    /// File name relative to the modules directory.
    pub file: String,
    /// Module parameters, space separated (often empty).
    pub params: String,
}

/// Parses the order file's text.
pub fn parse_order(text: &str) -> Vec<ModuleEntry> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((file, params)) => ModuleEntry {
                file: file.to_string(),
                params: params.trim().to_string(),
            },
            None => ModuleEntry {
                file: l.to_string(),
                params: String::new(),
            },
        })
        .collect()
}

/// How loading went, for one summary line on the console.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: usize,
    pub already_loaded: usize,
    pub failed: usize,
}

/// Loads every module listed in `<dir>/order`, in order. Failures are
/// reported on stderr and do not stop the rest; a missing order file means
/// the kernel has its drivers built in.
pub fn load_all(dir: &Path) -> LoadReport {
    let mut report = LoadReport::default();
    let order = dir.join("order");
    let text = match std::fs::read_to_string(&order) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            diag!("no {}; loading no kernel modules", order.display());
            return report;
        }
        Err(e) => {
            diag!(
                "cannot read {}: {e}; loading no kernel modules",
                order.display()
            );
            return report;
        }
    };
    for entry in parse_order(&text) {
        match load(&dir.join(&entry.file), &entry.params) {
            Ok(()) => report.loaded += 1,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => report.already_loaded += 1,
            Err(e) => {
                report.failed += 1;
                diag!("module {}: {e}", entry.file);
            }
        }
    }
    report
}

fn load(path: &Path, params: &str) -> io::Result<()> {
    let file = File::open(path)?;
    let params = std::ffi::CString::new(params)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in module parameters"))?;
    let name = path.to_string_lossy();
    let flags = if [".xz", ".zst", ".gz"].iter().any(|ext| name.ends_with(ext)) {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    // SAFETY: finit_module reads the fd and the NUL-terminated parameter string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_file_keeps_order_and_skips_comments() {
        let text = "# virtio stack\nvirtio_ring.ko\n  virtio.ko  \n\nvirtio_pci.ko force_legacy=1 # pci\nvirtio_blk.ko.xz\n";
        let got = parse_order(text);
        let files: Vec<&str> = got.iter().map(|e| e.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "virtio_ring.ko",
                "virtio.ko",
                "virtio_pci.ko",
                "virtio_blk.ko.xz"
            ]
        );
        assert_eq!(got[2].params, "force_legacy=1");
        assert_eq!(got[0].params, "");
    }

    #[test]
    fn missing_order_file_loads_nothing() {
        assert_eq!(
            load_all(Path::new("/nonexistent-hearth-modules")),
            LoadReport::default()
        );
    }
}
