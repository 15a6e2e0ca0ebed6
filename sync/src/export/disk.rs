//! Exporting a disk version to a raw image file. Holes and zero clusters are
//! left unwritten, so the image is sparse.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::ExportReport;
use crate::chunk::is_zero;
use crate::error::{Error, IoContext, Result};
use crate::manifest::DiskRoot;
use crate::progress::Progress;
use crate::store::Store;

/// Blocks of this size that are all zero are left as holes inside a
/// cluster, so the image is as sparse as a file system's 4 KiB blocks allow.
const SPARSE_BLOCK: usize = 4096;

/// Writes `data` at `offset`, skipping all-zero 4 KiB blocks.
fn write_sparse(file: &File, path: &Path, data: &[u8], offset: u64) -> Result<()> {
    let mut run: Option<usize> = None;
    let flush = |from: usize, to: usize| {
        file.write_all_at(&data[from..to], offset + from as u64)
            .ctx(path, "write image")
    };
    for (i, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let at = i * SPARSE_BLOCK;
        match (is_zero(block), run) {
            (false, None) => run = Some(at),
            (true, Some(start)) => {
                flush(start, at)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        flush(start, data.len())?;
    }
    Ok(())
}

pub(super) fn export_disk(
    store: &Store,
    root: &DiskRoot,
    staging: &Path,
    progress: &dyn Progress,
    report: &mut ExportReport,
) -> Result<()> {
    progress.phase("export", Some(root.size));
    let file = File::create(staging).ctx(staging, "create image")?;
    file.set_len(root.size).ctx(staging, "set image size")?;
    let cs = u64::from(root.cluster_size);
    let mut done = 0u64;
    root.for_each_cluster(store, |index, chunk| {
        let expected = root.cluster_len(index);
        if expected == 0 {
            return Err(Error::InvalidInput(format!(
                "disk manifest maps cluster {index} past the end of a {}-byte disk",
                root.size
            )));
        }
        let data = store.chunk(&chunk)?;
        if data.len() as u64 != expected {
            return Err(Error::ChunkCorrupt {
                id: chunk,
                reason: format!("{} bytes, cluster {index} needs {expected}", data.len()),
            });
        }
        write_sparse(&file, staging, &data, index * cs)?;
        progress.advance(index * cs + expected - done);
        done = index * cs + expected;
        Ok(())
    })?;
    progress.advance(root.size - done);
    file.sync_all().ctx(staging, "sync image")?;
    report.files = 1;
    report.bytes = root.size;
    Ok(())
}
