//! The archive reader (spool-tools): the input is written to a temporary file, opened
//! (verified) with and without salvage, and every good message read back.
//!
//! Invariants: no panic; the reader never allocates more than it was given plus its fixed
//! caps (libFuzzer's `-rss_limit_mb` / `-malloc_limit_mb` catch that); a message it lists
//! as good reads back.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spool_tools::{ArchiveReader, ReadOptions};

/// One file per fuzzing process, rewritten for every input, removed at exit by nobody (it
/// lives in the temporary directory, named after the process).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("mxspool-fuzz-archive-{}.tar", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("write the scratch archive");
    for salvage in [false, true] {
        let Ok(reader) = ArchiveReader::open_with(
            path,
            ReadOptions {
                salvage,
                ..Default::default()
            },
        ) else {
            continue;
        };
        let _ = reader.compression();
        let _ = reader.meta();
        let _ = reader.is_verified();
        for p in reader.problems() {
            let _ = p.to_string();
        }
        let ids: Vec<String> = reader.ids().map(str::to_string).collect();
        assert_eq!(ids.len(), reader.len());
        let mut n = 0;
        reader
            .for_each_entry(|e| {
                n += 1;
                assert!(ids.contains(&e.envelope.id), "an entry not among the ids");
                Ok::<(), spool_tools::Error>(())
            })
            .expect("the good messages of an unchanged file read back");
        assert_eq!(n, ids.len());
        for id in &ids {
            reader.message(id).expect("a good message reads back");
        }
        let _ = reader.for_each_envelope(|_, _| Ok::<(), spool_tools::Error>(()));
    }
});
