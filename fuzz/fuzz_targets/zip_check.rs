//! Fuzzes the deploy archive checks and extraction (`control::archive::extract_zip`).
//!
//! The first byte picks the mode: raw bytes as the archive, or a recipe of entries (names and
//! symlink targets made of the path pieces that matter: "..", ".", "/", "\", NUL, drive
//! letters, names other entries use) written by the zip crate and then optionally corrupted.
//! Whatever is accepted must stay inside the destination (checked by resolving every path as
//! the kernel would); whatever is refused must leave nothing on disk.
#![no_main]

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use hearth::control::archive::{extract_zip, ArchiveLimits};
use libfuzzer_sys::fuzz_target;
use zip::write::SimpleFileOptions;

#[path = "../../tests/fuzz_support/tree.rs"]
mod tree;

/// Path pieces a recipe byte maps to.
const PIECES: [&str; 16] = [
    "a",
    "b",
    "l",
    "m",
    "/",
    "/",
    "/",
    "..",
    ".",
    "",
    "\\",
    "\0",
    "C:",
    "é",
    "node_modules",
    "/..",
];

/// Bytes taken from the input, one at a time; zeros once it runs out.
struct Recipe<'a>(&'a [u8]);

impl Recipe<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn path(&mut self) -> String {
        let len = self.byte() % 8 + 1;
        (0..len)
            .map(|_| PIECES[usize::from(self.byte()) % PIECES.len()])
            .collect()
    }
}

fn build(recipe: &mut Recipe<'_>) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let entries = recipe.byte() % 8 + 1;
    for _ in 0..entries {
        let kind = recipe.byte();
        let options = SimpleFileOptions::default().compression_method(if kind & 0x10 == 0 {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        });
        let name = recipe.path();
        // The writer refuses some entries (duplicate names): those are left out.
        let _ = match kind % 3 {
            0 => {
                let len = usize::from(recipe.byte());
                let data: Vec<u8> = (0..len).map(|_| recipe.byte()).collect();
                let mode = [0o644, 0o755, 0o4755, 0o10644][usize::from(kind >> 5) % 4];
                writer
                    .start_file(name.as_str(), options.unix_permissions(mode))
                    .and_then(|()| writer.write_all(&data).map_err(Into::into))
            }
            1 => writer.add_directory(name.as_str(), options),
            _ => {
                let target = recipe.path();
                writer.add_symlink(name.as_str(), target.as_str(), options)
            }
        };
    }
    let mut zip = writer.finish().expect("in-memory zip").into_inner();
    // What is left of the input overwrites bytes: (offset, value) pairs.
    while recipe.0.len() >= 2 {
        let at = usize::from(recipe.byte()) * 7 % zip.len();
        zip[at] = recipe.byte();
    }
    zip
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let zip = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        build(&mut Recipe(rest))
    };
    let limits = if mode & 2 == 0 {
        ArchiveLimits::default()
    } else {
        ArchiveLimits {
            compressed_bytes_max: 4096,
            unpacked_bytes_max: 1024,
            entries_max: 4,
            ratio_max: 4,
        }
    };

    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let scratch = tree::scratch_root().join(format!(
        "hearth-fuzz-zip-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&scratch).unwrap();
    let dest = scratch.join("code");
    let result = extract_zip(&zip, &dest, &limits);
    let beside: Vec<PathBuf> = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    match &result {
        Ok(extracted) => {
            assert_eq!(beside, vec![dest.clone()], "only the destination appears");
            let summary = tree::check_tree(&dest).unwrap_or_else(|e| panic!("{e}"));
            assert!(summary.file_bytes <= extracted.unpacked_bytes);
            assert!(extracted.unpacked_bytes <= limits.unpacked_bytes_max);
            let created = extracted.files + extracted.dirs + extracted.symlinks;
            assert_eq!(summary.paths, created, "paths under the destination");
        }
        Err(err) => {
            assert!(beside.is_empty(), "a refused archive left {beside:?}");
            assert!(matches!(err.status, 400 | 413), "{err}");
        }
    }
    std::fs::remove_dir_all(&scratch).unwrap();
});
