//! Deterministic benchmark data: a mixed file tree and a raw disk image.
//!
//! The mix is meant to look like what desktops hold: many small text-like
//! files, larger compressible documents and sources, incompressible media
//! and archives, semi-structured binaries, and duplicated files (the same
//! application in two places). The image looks like a used virtual disk:
//! never-written holes, zeroed clusters, text and binary data, and clusters
//! repeated elsewhere on the disk.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A small, fast, deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi` (log-uniform when `log`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }

    fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        let f = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (a + (b - a) * f).exp() as u64
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill_random(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A vocabulary of pseudo-words for text-like data (compresses ~3:1 with
/// zstd, like prose or source code).
pub struct Text {
    words: Vec<Vec<u8>>,
}

impl Text {
    pub fn new(rng: &mut Rng) -> Self {
        let words = (0..4096)
            .map(|_| {
                let len = rng.range(2, 11) as usize;
                (0..len).map(|_| b'a' + (rng.next() % 26) as u8).collect()
            })
            .collect();
        Self { words }
    }

    pub fn fill(&self, rng: &mut Rng, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let r = rng.next();
            let w = &self.words[(r % self.words.len() as u64) as usize];
            let n = w.len().min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&w[..n]);
            i += n;
            if i < buf.len() {
                buf[i] = if (r >> 32).is_multiple_of(12) {
                    b'\n'
                } else {
                    b' '
                };
                i += 1;
            }
        }
    }
}

/// Semi-structured binary: fixed-size records with a few varying fields
/// (compresses ~1.5–2:1, like databases or executables).
fn fill_records(rng: &mut Rng, buf: &mut [u8]) {
    for (i, rec) in buf.chunks_mut(64).enumerate() {
        let mut r = [0u8; 64];
        r[..8].copy_from_slice(&(i as u64).to_le_bytes());
        r[8..16].copy_from_slice(&rng.next().to_le_bytes());
        r[16..20].copy_from_slice(&((rng.next() % 1000) as u32).to_le_bytes());
        r[32..40].copy_from_slice(b"RECORD\0\0");
        let n = rec.len();
        rec.copy_from_slice(&r[..n]);
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Random,
    Records,
}

fn fill(kind: Kind, rng: &mut Rng, text: &Text, buf: &mut [u8]) {
    match kind {
        Kind::Text => text.fill(rng, buf),
        Kind::Random => rng.fill_random(buf),
        Kind::Records => fill_records(rng, buf),
    }
}

fn write_file(
    path: &Path,
    kind: Kind,
    size: u64,
    rng: &mut Rng,
    text: &Text,
) -> anyhow::Result<()> {
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(kind, rng, text, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    Ok(())
}

/// Writes a mixed tree of about `size` bytes under `root`; returns the bytes
/// and file count written.
pub fn make_tree(root: &Path, size: u64, seed: u64) -> anyhow::Result<(u64, u64)> {
    let mut rng = Rng::new(seed);
    let text = Text::new(&mut rng);
    fs::create_dir_all(root)?;
    let dirs: Vec<PathBuf> = (0..40)
        .map(|i| {
            root.join(format!("app{:02}", i % 8))
                .join(format!("d{i:02}"))
                .join(["lib", "share", "doc", "bin"][i % 4])
        })
        .collect();
    for d in &dirs {
        fs::create_dir_all(d)?;
    }
    // (kind, share of size, min, max file size)
    let plan: [(Kind, f64, u64, u64); 4] = [
        (Kind::Text, 0.08, 256, 8 << 10),
        (Kind::Text, 0.37, 8 << 10, 4 << 20),
        (Kind::Random, 0.35, 256 << 10, 48 << 20),
        (Kind::Records, 0.10, 64 << 10, 8 << 20),
    ];
    let mut written = 0u64;
    let mut files = 0u64;
    let mut copyable = Vec::new();
    for (class, (kind, share, lo, hi)) in plan.into_iter().enumerate() {
        let budget = (size as f64 * share) as u64;
        let mut used = 0u64;
        while used < budget {
            let len = rng.log_range(lo, hi).min(budget - used).max(1);
            let dir = &dirs[(rng.next() % dirs.len() as u64) as usize];
            let path = dir.join(format!(
                "f{files:06}.{}",
                ["txt", "src", "bin", "db"][class]
            ));
            write_file(&path, kind, len, &mut rng, &text)?;
            if len > 64 << 10 {
                copyable.push((path, len));
            }
            used += len;
            files += 1;
        }
        written += used;
    }
    // Duplicates: whole files copied elsewhere (10 %).
    let budget = (size as f64 * 0.10) as u64;
    let mut used = 0u64;
    let mut attempts = 0;
    while used < budget && !copyable.is_empty() && attempts < 100_000 {
        attempts += 1;
        let (src, len) = copyable[(rng.next() % copyable.len() as u64) as usize].clone();
        if used + len > budget + (1 << 20) {
            continue;
        }
        let dir = &dirs[(rng.next() % dirs.len() as u64) as usize];
        fs::copy(&src, dir.join(format!("copy{files:06}")))?;
        used += len;
        files += 1;
    }
    written += used;
    Ok((written, files))
}

/// Writes a sparse raw image of `size` bytes (rounded to 64 KiB) at `path`.
pub fn make_image(path: &Path, size: u64, seed: u64) -> anyhow::Result<u64> {
    const CLUSTER: u64 = 64 << 10;
    let mut rng = Rng::new(seed);
    let text = Text::new(&mut rng);
    let clusters = size / CLUSTER;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.set_len(clusters * CLUSTER)?;
    let mut buf = vec![0u8; (64 * CLUSTER) as usize];
    let mut written_at: Vec<u64> = Vec::new();
    let mut c = 0u64;
    while c < clusters {
        let run = rng.range(1, 65).min(clusters - c);
        let bytes = (run * CLUSTER) as usize;
        let roll = rng.next() % 100;
        let data = &mut buf[..bytes];
        match roll {
            0..=29 => {
                c += run;
                continue;
            }
            30..=39 => data.fill(0),
            40..=64 => fill(Kind::Random, &mut rng, &text, data),
            65..=89 => fill(Kind::Text, &mut rng, &text, data),
            _ if !written_at.is_empty() => {
                // A run copied from earlier on the disk (homogeneous data).
                let from =
                    written_at[(rng.next() % written_at.len() as u64) as usize].min(clusters - run);
                f.read_exact_at(data, from * CLUSTER)?;
            }
            _ => fill(Kind::Records, &mut rng, &text, data),
        }
        f.write_all_at(data, c * CLUSTER)?;
        if roll >= 40 {
            written_at.extend(c..c + run.min(4));
        }
        c += run;
    }
    f.sync_all()?;
    Ok(clusters * CLUSTER)
}
