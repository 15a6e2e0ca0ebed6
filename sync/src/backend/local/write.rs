//! Write path of the local backend: the open pack, appending records, and
//! flushing (pack bytes synced before their index entries are written).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;

use rocksdb::{WriteBatch, WriteOptions};

use super::{db_err, fsync_dir, LocalBackend, WriteState};
use crate::backend::pack::{
    append_record, pack_header, pack_path, FRAME_ENTRY_LEN, FRAME_HEADER_LEN, PACK_HEADER_LEN,
    PACK_TARGET_BYTES, RECORD_HEADER_LEN,
};
use crate::chunk::Sealed;
use crate::error::{Error, IoContext, Result};
use crate::id::{ChunkId, PackId};
use crate::store::cf;
use crate::store::keys::{CF_CHUNKS, CF_PACKS};

/// Buffered bytes of the open pack before they are written to the file.
const WRITE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// The pack this process appends to.
pub(super) struct OpenPack {
    id: PackId,
    file: File,
    path: PathBuf,
    len: u64,
    buf: Vec<u8>,
    dir_synced: bool,
}

/// Bytes a sealed chunk or frame occupies in a pack.
pub(super) fn record_len(sealed: &Sealed) -> u64 {
    match sealed {
        Sealed::Chunk(c) => RECORD_HEADER_LEN as u64 + c.data.len() as u64,
        Sealed::Frame(f) => {
            (FRAME_HEADER_LEN + f.members.len() * FRAME_ENTRY_LEN + f.data.len()) as u64
        }
    }
}

impl LocalBackend {
    fn create_pack(&self) -> Result<OpenPack> {
        loop {
            let id = PackId::random();
            let path = pack_path(&self.packs_dir, id);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).ctx(parent, "create pack directory")?;
            }
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    let secs = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    return Ok(OpenPack {
                        id,
                        file,
                        path,
                        len: PACK_HEADER_LEN,
                        buf: pack_header(id, secs).to_vec(),
                        dir_synced: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(path, "create pack", e)),
            }
        }
    }

    /// Appends a record to the open pack (creating one if needed) and notes
    /// index entries for the members in `index` as pending. Returns how many
    /// were noted.
    pub(super) fn append(
        &self,
        st: &mut WriteState,
        sealed: &Sealed,
        index: &dyn Fn(&ChunkId) -> bool,
    ) -> Result<u32> {
        if st.open.is_none() {
            st.open = Some(self.create_pack()?);
        }
        let Some(pack) = st.open.as_mut() else {
            return Ok(0);
        };
        let offset = pack.len;
        let mut noted = 0;
        let (len, entries) = append_record(&mut pack.buf, pack.id, offset, sealed);
        pack.len += len;
        for (id, entry) in entries {
            if index(&id) && !st.pending.contains_key(&id) {
                st.pending.insert(id, entry);
                noted += 1;
            }
        }
        if pack.buf.len() >= WRITE_BUFFER_BYTES {
            pack.file
                .write_all(&pack.buf)
                .ctx(&pack.path, "write pack")?;
            pack.buf.clear();
        }
        if pack.len >= PACK_TARGET_BYTES {
            self.flush_locked(st, true, false)?;
        }
        Ok(noted)
    }

    /// Writes and syncs the open pack, then records pending index entries
    /// (synced to disk when `sync_index`). `seal` closes the pack.
    pub(super) fn flush_locked(
        &self,
        st: &mut WriteState,
        seal: bool,
        sync_index: bool,
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        if let Some(pack) = st.open.as_mut() {
            if !pack.buf.is_empty() {
                pack.file
                    .write_all(&pack.buf)
                    .ctx(&pack.path, "write pack")?;
                pack.buf.clear();
            }
            pack.file.sync_data().ctx(&pack.path, "sync pack")?;
            if !pack.dir_synced {
                if let Some(dir) = pack.path.parent() {
                    fsync_dir(dir)?;
                }
                fsync_dir(&self.packs_dir)?;
                pack.dir_synced = true;
            }
            batch.put_cf(
                cf(&self.db, CF_PACKS)?,
                pack.id.0.to_be_bytes(),
                pack.len.to_be_bytes(),
            );
        }
        let chunks = cf(&self.db, CF_CHUNKS)?;
        for (id, entry) in &st.pending {
            batch.put_cf(chunks, id.as_bytes(), entry.encode());
        }
        if !batch.is_empty() {
            let mut wo = WriteOptions::default();
            wo.set_sync(sync_index);
            self.db
                .write_opt(batch, &wo)
                .map_err(db_err(&self.db_path, "write chunk index"))?;
        }
        st.pending.clear();
        if seal {
            st.open = None;
        }
        Ok(())
    }
}
