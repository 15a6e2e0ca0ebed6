//! Streamed bases: the boot profile and the background prefetcher.
//!
//! * **Boot profile** (`STORE/stream/<version>.profile`): the clusters a
//!   guest read, in the order it first read them, recorded during the
//!   first session served from that version (a little-endian u64 each).
//!   Later prefetches fetch those first (the seed's priority by access).
//! * **Prefetcher**: one thread per streamed base, fetching the clusters
//!   not cached yet in batches, profile first, then in disk order. It
//!   stands back while a guest's read waits on the remote, and paces itself
//!   by the seed's rule: over a window of recent requests, when the share
//!   whose latency exceeds [`SLOW`] × the lowest latency seen passes
//!   [`SLOW_SHARE`], the rate halves; otherwise it steps up by [`STEP`].
//!   A failed request (the server away) backs off, up to 30 s, and tries
//!   again: the disk fills once the server is back.
//! * **State** (`STORE/stream/<version>.state.json`), rewritten every
//!   second by the prefetcher, read by `lamina disk show`.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use lamina_sync::{ChunkId, VersionId};
use serde::{Deserialize, Serialize};

use crate::base::LayerImage;

/// A request slower than this many times the fastest counts as slow.
pub const SLOW: f64 = 2.0;
/// Share of slow requests in the window that halves the rate.
pub const SLOW_SHARE: f64 = 0.5;
/// Requests in the window.
const WINDOW: usize = 8;
/// What the rate steps up by, bytes/s.
pub const STEP: f64 = 4.0 * 1024.0 * 1024.0;
/// The rate never goes below this, bytes/s.
const MIN_RATE: f64 = 1024.0 * 1024.0;
/// Rate at start, bytes/s.
const START_RATE: f64 = 16.0 * 1024.0 * 1024.0;
/// Clusters per prefetch request (4 MiB of 64 KiB clusters).
const BATCH: usize = 64;
/// Most clusters a profile records.
const PROFILE_MAX: u64 = 1 << 22;

fn profile_path(store_root: &Path, v: VersionId) -> PathBuf {
    lamina_sync::remote::stream_dir(store_root).join(format!("{}.profile", v.to_hex()))
}

fn state_path(store_root: &Path, v: VersionId) -> PathBuf {
    lamina_sync::remote::stream_dir(store_root).join(format!("{}.state.json", v.to_hex()))
}

/// The recording of a boot profile.
pub(crate) struct Recorder {
    file: File,
    seen: Mutex<(Vec<u64>, u64)>,
}

impl Recorder {
    /// Starts recording the profile of `v` unless one exists.
    pub(crate) fn start(store_root: &Path, v: VersionId, clusters: u64) -> Option<Recorder> {
        let p = profile_path(store_root, v);
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&p)
            .ok()?;
        Some(Recorder {
            file,
            seen: Mutex::new((vec![0; clusters.div_ceil(64) as usize], 0)),
        })
    }

    /// Notes that clusters `first..=last` were read.
    pub(crate) fn touch(&self, first: u64, last: u64) {
        let mut new = Vec::new();
        {
            let mut s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for c in first..=last {
                if s.1 >= PROFILE_MAX {
                    break;
                }
                if let Some(w) = s.0.get_mut((c / 64) as usize) {
                    if *w & (1 << (c % 64)) == 0 {
                        *w |= 1 << (c % 64);
                        s.1 += 1;
                        new.extend_from_slice(&c.to_le_bytes());
                    }
                }
            }
        }
        if !new.is_empty() {
            // A profile is a hint: a failed write only makes it shorter.
            let _ = (&self.file).write_all(&new);
        }
    }
}

/// The recorded profile of `v` (empty when none).
pub fn load_profile(store_root: &Path, v: VersionId) -> Vec<u64> {
    std::fs::read(profile_path(store_root, v))
        .unwrap_or_default()
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect()
}

/// What the prefetcher of a streamed base last reported.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrefetchState {
    /// Clusters holding data.
    pub total_clusters: u64,
    /// Of those, cached.
    pub local_clusters: u64,
    /// What the prefetcher fetched over the last few seconds, bytes/s.
    pub rate_bytes_s: f64,
    /// The rate it allows itself now, bytes/s.
    pub target_rate_bytes_s: f64,
    /// Bytes fetched by the serving process (demand and prefetch).
    pub fetched_bytes: u64,
    /// Requests that failed.
    pub failures: u64,
    /// The last failure, if the latest request failed.
    pub last_error: Option<String>,
    /// Whether everything is cached.
    pub done: bool,
    /// When written, ns since the epoch.
    pub at_ns: i64,
}

/// The last state a prefetcher of `v` wrote, if any.
pub fn read_state(store_root: &Path, v: VersionId) -> Option<PrefetchState> {
    let b = std::fs::read(state_path(store_root, v)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// The state of a streamed base as `lamina disk show` reports it: the
/// cache's clusters counted now, the rest from the serving process's
/// last report (zeros when none is serving).
pub fn status(store: &lamina_sync::Store, v: VersionId) -> PrefetchState {
    let mut s = read_state(store.root(), v).unwrap_or_default();
    // A report older than a few seconds: nobody is prefetching now.
    if lamina_sync::now_ns().saturating_sub(s.at_ns) > 5_000_000_000 {
        s.rate_bytes_s = 0.0;
    }
    if let Ok(Some(meta)) = lamina_sync::remote::streamed_meta(store.root(), v) {
        s.total_clusters = meta.chunks;
    }
    let present = crate::disk::cache_dir(store).join(format!("{}.present", v.to_hex()));
    s.local_clusters = std::fs::read(present)
        .unwrap_or_default()
        .iter()
        .map(|b| u64::from(b.count_ones()))
        .sum();
    s.done = s.total_clusters > 0 && s.local_clusters >= s.total_clusters;
    s
}

/// The rate rule, on its own.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    fastest: f64,
    recent: VecDeque<f64>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            rate: START_RATE,
            fastest: f64::INFINITY,
            recent: VecDeque::new(),
        }
    }
}

impl Pacer {
    /// The rate allowed now, bytes/s.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Records a request that took `secs` and returns how long to wait
    /// before the next one to keep to the rate after moving `bytes`.
    pub fn record(&mut self, bytes: u64, secs: f64) -> Duration {
        self.fastest = self.fastest.min(secs);
        self.recent.push_back(secs);
        if self.recent.len() > WINDOW {
            self.recent.pop_front();
        }
        let slow = self
            .recent
            .iter()
            .filter(|t| **t > SLOW * self.fastest)
            .count();
        if self.recent.len() == WINDOW && slow as f64 / WINDOW as f64 > SLOW_SHARE {
            self.rate = (self.rate / 2.0).max(MIN_RATE);
            // A fresh window for the new rate.
            self.recent.clear();
        } else {
            self.rate += STEP;
        }
        let due = bytes as f64 / self.rate;
        Duration::from_secs_f64((due - secs).max(0.0))
    }
}

/// Starts the prefetcher of a streamed base; it ends when everything is
/// cached or `image` is dropped.
pub fn start(image: Weak<LayerImage>, store_root: PathBuf) {
    let name = "lamina-prefetch".to_owned();
    let spawned = std::thread::Builder::new()
        .name(name)
        .spawn(move || run(&image, &store_root));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the prefetcher; clusters arrive on demand only");
    }
}

fn run(image: &Weak<LayerImage>, store_root: &Path) {
    let Some(img) = image.upgrade() else { return };
    let version = img.version();
    let clusters = img.root().clusters();
    let profile = load_profile(store_root, version);
    let mut order: Vec<u64> = Vec::with_capacity(profile.len());
    let mut listed = vec![0u64; clusters.div_ceil(64) as usize];
    for c in profile.into_iter().filter(|c| *c < clusters) {
        let w = &mut listed[(c / 64) as usize];
        if *w & (1 << (c % 64)) == 0 {
            *w |= 1 << (c % 64);
            order.push(c);
        }
    }
    let total = (0..clusters)
        .filter(|c| img.chunk_of(*c).ok().flatten().is_some())
        .count() as u64;
    drop(img);
    let mut pacer = Pacer::default();
    let mut failures = 0u32;
    let mut last_error: Option<String>;
    let mut cursor = 0u64;
    let mut profiled = 0usize;
    let mut window: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut last_write = Instant::now() - Duration::from_secs(2);
    loop {
        let Some(img) = image.upgrade() else { return };
        while img.demand_waiting() > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut want: Vec<(u64, ChunkId)> = Vec::with_capacity(BATCH);
        let next = |want: &mut Vec<(u64, ChunkId)>, c: u64| {
            if !img.is_cached(c) {
                if let Ok(Some(id)) = img.chunk_of(c) {
                    want.push((c, id));
                }
            }
        };
        while want.len() < BATCH && profiled < order.len() {
            next(&mut want, order[profiled]);
            profiled += 1;
        }
        while want.len() < BATCH && cursor < clusters {
            next(&mut want, cursor);
            cursor += 1;
        }
        let done = want.is_empty();
        let t = Instant::now();
        let outcome = if done {
            Ok(0)
        } else {
            img.fetch(&want, false)
                .map(|got| got.iter().map(|(_, d)| d.len() as u64).sum::<u64>())
        };
        let secs = t.elapsed().as_secs_f64();
        let mut pause = Duration::ZERO;
        match outcome {
            Ok(_) if img.cache_full() => {
                // Nothing was kept: try again later, from the same place
                // (space may be freed meanwhile).
                last_error = Some("the cluster cache's file system is full".into());
                cursor = cursor.min(want.first().map_or(cursor, |(c, _)| *c));
                profiled = 0;
                img.clear_cache_full();
                pause = Duration::from_secs(30);
            }
            Ok(bytes) => {
                failures = 0;
                last_error = None;
                if bytes > 0 {
                    window.push_back((Instant::now(), bytes));
                    pause = pacer.record(bytes, secs);
                }
            }
            Err(e) => {
                failures += 1;
                last_error = Some(e.to_string());
                // Those clusters again, after a while.
                cursor = cursor.min(want.first().map_or(cursor, |(c, _)| *c));
                pause = Duration::from_secs(1u64 << failures.min(5)).min(Duration::from_secs(30));
            }
        }
        while window
            .front()
            .is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(5))
        {
            window.pop_front();
        }
        if done || last_write.elapsed() >= Duration::from_secs(1) {
            let span = window
                .front()
                .map_or(1.0, |(at, _)| at.elapsed().as_secs_f64().max(1.0));
            let counters = img.fetch_counters().unwrap_or_default();
            let state = PrefetchState {
                total_clusters: total,
                local_clusters: img.cached_clusters(),
                rate_bytes_s: window.iter().map(|(_, b)| *b as f64).sum::<f64>() / span,
                target_rate_bytes_s: pacer.rate(),
                fetched_bytes: counters.bytes,
                failures: counters.failures,
                last_error: last_error.clone(),
                done,
                at_ns: lamina_sync::now_ns(),
            };
            write_state(store_root, version, &state);
            last_write = Instant::now();
        }
        drop(img);
        if done {
            tracing::info!(version = %version.short(), "streamed base fully cached");
            return;
        }
        std::thread::sleep(pause);
    }
}

fn write_state(store_root: &Path, v: VersionId, state: &PrefetchState) {
    let p = state_path(store_root, v);
    let tmp = p.with_extension("tmp");
    let Ok(json) = serde_json::to_vec(state) else {
        return;
    };
    // A report only: a failed write leaves the previous one.
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, &p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_halves_when_most_recent_requests_are_slow_and_steps_up_otherwise() {
        let mut p = Pacer::default();
        let start = p.rate();
        for _ in 0..WINDOW {
            p.record(1 << 20, 0.01);
        }
        assert!(p.rate() > start, "fast requests step the rate up");
        let before = p.rate();
        // Mostly slow (3× the fastest): the window fills, then it halves.
        for _ in 0..WINDOW {
            p.record(1 << 20, 0.03);
        }
        assert!(p.rate() < before, "{} !< {before}", p.rate());
        assert!(p.rate() >= MIN_RATE);
        // The wait keeps to the rate.
        let mut slow = Pacer::default();
        let wait = slow.record(64 << 20, 0.0);
        assert!(wait > Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn a_profile_records_each_cluster_once_in_first_read_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(lamina_sync::remote::stream_dir(dir.path())).unwrap();
        let v = VersionId([7; 32]);
        let r = Recorder::start(dir.path(), v, 1000).unwrap();
        r.touch(5, 7);
        r.touch(6, 9);
        r.touch(2, 2);
        drop(r);
        assert_eq!(load_profile(dir.path(), v), vec![5, 6, 7, 8, 9, 2]);
        assert!(
            Recorder::start(dir.path(), v, 1000).is_none(),
            "a profile is recorded once"
        );
    }
}
