//! Mounting and unmounting a composition.
//!
//! The daemon holds an exclusive `flock` on the composition's `lock` file
//! for as long as it runs, and writes `mount.json` (directory, pid) beside
//! it; whoever finds the lock taken knows the composition is mounted and
//! where. Commit, reset and removal take the same lock, so none of them
//! runs under a live mount. The lock dies with the daemon, so a daemon
//! killed with `kill -9` leaves nothing locked: the next mount (after the
//! dead mount point is unmounted) finds the uppers as they were.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use lamina_sync::manifest::{Meta, Root};
use lamina_sync::{Store, VersionId};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};

use crate::cache::FileCache;
use crate::compose::{self, write_atomic, Composition, Mode};
use crate::error::{Error, IoContext, Result};
use crate::fuse::LaminaFs;
use crate::lower::Lower;
use crate::marker::{Marker, SlotMark};
use crate::view::{SlotView, View};

/// Where a composition is mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    /// Mount point.
    pub dir: PathBuf,
    /// Daemon process.
    pub pid: u32,
    /// When it was mounted, ns since the epoch.
    pub started_ns: i64,
}

fn lock_path(store_root: &Path, comp: &Composition) -> PathBuf {
    comp.dir(store_root).join("lock")
}

fn info_path(store_root: &Path, comp: &Composition) -> PathBuf {
    comp.dir(store_root).join("mount.json")
}

fn open_lock(store_root: &Path, comp: &Composition) -> Result<File> {
    let p = lock_path(store_root, comp);
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .ctx(&p, "open composition lock")
}

/// Where `comp` is mounted, if a daemon holds it.
pub fn mounted(store_root: &Path, comp: &Composition) -> Option<MountInfo> {
    let f = open_lock(store_root, comp).ok()?;
    match f.try_lock_shared() {
        Ok(()) => None,
        Err(_) => recorded(store_root, comp),
    }
}

/// Where `comp` was last mounted by a daemon that has not cleaned up (it
/// may have died).
fn recorded(store_root: &Path, comp: &Composition) -> Option<MountInfo> {
    let text = fs::read_to_string(info_path(store_root, comp)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Takes the composition's lock, failing with [`Error::Mounted`] (and
/// `hint`) if a daemon holds it. Held until the returned file is dropped.
pub(crate) fn lock_unmounted(
    store_root: &Path,
    comp: &Composition,
    hint: &'static str,
) -> Result<File> {
    let f = open_lock(store_root, comp)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(TryLockError::WouldBlock) => {
            let info = mounted(store_root, comp).unwrap_or(MountInfo {
                dir: PathBuf::from("?"),
                pid: 0,
                started_ns: 0,
            });
            Err(Error::Mounted {
                name: comp.name.clone(),
                dir: info.dir,
                pid: info.pid,
                hint,
            })
        }
        Err(TryLockError::Error(e)) => Err(Error::io(lock_path(store_root, comp), "lock", e)),
    }
}

/// Empties every upper (and the work directory): the session's pending
/// changes are dropped. Each upper is swapped for an empty one first, so an
/// interrupted reset leaves either all of a slot's changes or none.
pub(crate) fn clear_uppers(store_root: &Path, comp: &Composition) -> Result<()> {
    let work = comp.work_dir(store_root);
    fs::create_dir_all(&work).ctx(&work, "create work directory")?;
    for (i, s) in comp.slots.iter().enumerate() {
        if !s.writable() {
            continue;
        }
        let upper = comp.upper_dir(store_root, i);
        let trash = work.join(format!(
            "trash-{i}-{}",
            hex::encode(rand::random::<[u8; 4]>())
        ));
        match fs::rename(&upper, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&upper, "move pending changes aside", e)),
        }
        fs::create_dir_all(&upper).ctx(&upper, "create upper directory")?;
    }
    Marker::remove(&comp.dir(store_root))?;
    clean_work(&work)
}

/// At mount: drops from each upper what a live commit already put in the
/// head (the head descends from that commit), and records the versions
/// this mount shows under the uppers.
fn settle_marker(store: &Store, comp: &Composition, heads: &[Option<VersionId>]) -> Result<()> {
    let root = store.root();
    let cdir = comp.dir(root);
    let old = Marker::load(&cdir)?;
    let mut new = Marker::default();
    for (i, s) in comp.slots.iter().enumerate() {
        if !s.writable() {
            continue;
        }
        let head = heads.get(i).copied().flatten();
        let mut mark = SlotMark {
            view_base: head,
            ..SlotMark::default()
        };
        if let Some(m) = old.slots.get(&i) {
            let settled = match (m.last, head) {
                (Some(last), Some(h)) => store.is_ancestor(last, h).unwrap_or(false),
                _ => false,
            };
            if settled {
                prune(&comp.upper_dir(root, i), b"", m)?;
            } else {
                mark.last = m.last;
            }
        }
        new.slots.insert(i, mark);
    }
    new.save(&cdir)
}

/// Removes every non-directory entry under `dir` that `mark` saw committed.
fn prune(dir: &Path, rel: &[u8], mark: &SlotMark) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, "list upper directory", e)),
    };
    for e in entries {
        let e = e.ctx(dir, "list upper directory")?;
        let p = e.path();
        let m = fs::symlink_metadata(&p).ctx(&p, "stat")?;
        let crel = crate::view::join(rel, e.file_name().as_encoded_bytes());
        if m.is_dir() {
            prune(&p, &crel, mark)?;
        } else if mark.unchanged(&crel, &m) {
            fs::remove_file(&p).ctx(&p, "remove a committed upper entry")?;
        }
    }
    Ok(())
}

/// Removes everything in the work directory (scratch of earlier runs).
fn clean_work(work: &Path) -> Result<()> {
    for e in fs::read_dir(work).ctx(work, "list work directory")? {
        let e = e.ctx(work, "list work directory")?;
        crate::upper::remove_all(&e.path()).ctx(e.path(), "remove scratch")?;
    }
    Ok(())
}

/// Drops a composition's pending changes (`lamina compose reset`).
///
/// # Errors
/// [`Error::NotFound`], [`Error::Mounted`], I/O failures.
pub fn reset(store: &Store, name: &str) -> Result<()> {
    let comp = compose::get(store, name)?;
    let _lock = lock_unmounted(store.root(), &comp, "unmount it first")?;
    clear_uppers(store.root(), &comp)
}

/// Checks that `dir` can be a mount point; returns its absolute path.
fn check_mount_point(dir: &Path) -> Result<PathBuf> {
    let bad = |reason: String| Error::MountPoint {
        path: dir.to_owned(),
        reason,
    };
    let m = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad("does not exist".into()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(bad(format!(
                "is a disconnected FUSE mount (its daemon died); run `lamina umount {}` first",
                dir.display()
            )))
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    if !m.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    let mut rd = fs::read_dir(dir).map_err(|e| bad(e.to_string()))?;
    if rd.next().is_some() {
        return Err(bad("is not empty".into()));
    }
    fs::canonicalize(dir).map_err(|e| bad(e.to_string()))
}

/// A mounted composition whose daemon loop has not started yet.
pub struct Mounted {
    session: Session<LaminaFs>,
    cache: Arc<FileCache>,
    comp: Composition,
    store_root: PathBuf,
    dir: PathBuf,
    signals: SigSet,
    view: Arc<View>,
    _lock: File,
}

/// Mounts composition `name` on `dir`. The kernel mount is ready when this
/// returns; call [`Mounted::run`] to serve it. Blocks SIGINT, SIGTERM and
/// SIGHUP in the calling thread (and the threads it starts): `run` turns
/// them into a clean unmount.
///
/// # Errors
/// [`Error::NotFound`], [`Error::MountPoint`], [`Error::Mounted`], a
/// layer that no longer exists, store and mount failures.
pub fn mount(store: Arc<Store>, name: &str, dir: &Path) -> Result<Mounted> {
    let signals = {
        let mut s = SigSet::empty();
        s.add(Signal::SIGINT);
        s.add(Signal::SIGTERM);
        s.add(Signal::SIGHUP);
        s
    };
    signals
        .thread_block()
        .map_err(|e| Error::io(dir, "block signals", e.into()))?;
    let comp = compose::get(&store, name)?;
    let dir = check_mount_point(dir)?;
    let root = store.root().to_owned();
    let lock = lock_unmounted(&root, &comp, "unmount it first")?;
    if comp.mode == Mode::Revert {
        // Whatever a killed session left behind goes too.
        clear_uppers(&root, &comp)?;
    } else {
        let work = comp.work_dir(&root);
        fs::create_dir_all(&work).ctx(&work, "create work directory")?;
        clean_work(&work)?;
    }
    let mut heads = Vec::with_capacity(comp.slots.len());
    for s in &comp.slots {
        heads.push(match store.layer(&s.layer) {
            Ok(l) => store.head(&l)?,
            Err(_) => None,
        });
    }
    if comp.mode == Mode::Persistent {
        settle_marker(&store, &comp, &heads)?;
    }
    let mut slots = Vec::with_capacity(comp.slots.len());
    let mut remotes = Vec::new();
    for (i, s) in comp.slots.iter().enumerate() {
        // A version streamed from a remote: its nodes are here, its data
        // is fetched as it is read (and kept in the file cache).
        if let Some((sv, meta, dir)) = compose::streamed_slot(&store, s)? {
            remotes.push(lamina_sync::remote::RemoteChunks::new(
                &store, &sv.remote, &sv.layer,
            )?);
            slots.push(SlotView {
                root: Some((Arc::new(meta), dir)),
                upper: None,
            });
            continue;
        }
        let layer = store.layer(&s.layer).map_err(|e| match e {
            lamina_sync::Error::LayerNotFound { .. } => Error::Invalid(format!(
                "layer {} of composition {} no longer exists",
                s.layer, comp.name
            )),
            other => other.into(),
        })?;
        let version = match s.pin {
            Some(v) => Some(v),
            // `lamina layer pin` holds this store on a version.
            None => store.layer_pin(&s.layer)?.or(heads[i]),
        };
        if let Some(v) = version {
            // A golden layer from a signing remote must carry its signature.
            store.check_usable(&layer, v)?;
        }
        let root_node = match version {
            Some(v) => match store.root_of(v)? {
                Root::Tree { meta, dir } => Some((Arc::new(meta), dir)),
                Root::Disk(_) => {
                    return Err(Error::Invalid(format!("layer {} is a disk layer", s.layer)))
                }
            },
            None => None,
        };
        let upper = s.writable().then(|| comp.upper_dir(&root, i));
        if let Some(u) = &upper {
            fs::create_dir_all(u).ctx(u, "create upper directory")?;
        }
        slots.push(SlotView {
            root: root_node,
            upper,
        });
    }
    let remotes: crate::lower::Remotes = Arc::new(remotes);
    let rules = comp.compiled_rules()?;
    let cache = Arc::new(
        FileCache::open(
            root.join("cache").join("files"),
            store.clone(),
            remotes.clone(),
        )
        .map_err(|e| Error::io(root.join("cache/files"), "open the file cache", e))?,
    );
    let default_meta = Meta {
        mode: 0o755,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        mtime_sec: comp.created_ns.div_euclid(1_000_000_000),
        mtime_nsec: comp.created_ns.rem_euclid(1_000_000_000) as u32,
        xattrs: Vec::new(),
    };
    let view = Arc::new(View::new(
        Lower::new(store.clone(), remotes),
        slots,
        rules,
        comp.work_dir(&root),
        default_meta,
    ));
    // New entries get exactly the mode asked for.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let fs = LaminaFs::new(view.clone(), cache.clone(), comp.dir(&root));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("lamina:{}", comp.name)),
        MountOption::Subtype("lamina".into()),
        MountOption::DefaultPermissions,
        // A composed OS tree holds device nodes and setuid programs; only
        // root can mount, as for any root file system.
        MountOption::Dev,
        MountOption::Suid,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8),
    );
    config.clone_fd = true;
    let session = Session::new(fs, &dir, &config).map_err(|e| Error::MountPoint {
        path: dir.clone(),
        reason: format!("mount failed: {e}"),
    })?;
    let info = MountInfo {
        dir: dir.clone(),
        pid: std::process::id(),
        started_ns: lamina_sync::now_ns(),
    };
    // Serialising plain data cannot fail.
    #[allow(clippy::expect_used)]
    let json = serde_json::to_vec(&info).expect("mount info serialises");
    write_atomic(&info_path(&root, &comp), &json)?;
    Ok(Mounted {
        session,
        cache,
        comp,
        store_root: root,
        dir,
        signals,
        view,
        _lock: lock,
    })
}

impl Mounted {
    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Serves the mount until it is unmounted (or a signal asks for it),
    /// then drops a revert-mode composition's changes.
    ///
    /// # Errors
    /// FUSE session failures, cleanup failures.
    pub fn run(mut self) -> Result<()> {
        let mut unmounter = self.session.unmount_callable();
        let signals = self.signals;
        let dir = self.dir.clone();
        std::thread::Builder::new()
            .name("lamina-signals".into())
            .spawn(move || {
                if let Ok(sig) = signals.wait() {
                    tracing::info!(?sig, dir = %dir.display(), "unmounting on signal");
                    if let Err(e) = unmounter.unmount() {
                        tracing::error!(error = %e, "unmount on signal failed");
                    }
                }
            })
            .map_err(|e| Error::io(&self.dir, "start signal thread", e))?;
        if self.comp.mode == Mode::Persistent {
            crate::control::serve(
                self.store_root.clone(),
                self.comp.clone(),
                self.view.clone(),
            )?;
        }
        let served = self.session.run();
        self.cache.stop();
        let _ = fs::remove_file(info_path(&self.store_root, &self.comp));
        // Nobody answers on it any more; a leftover is replaced at the next mount.
        let _ = fs::remove_file(crate::control::socket_path(&self.store_root, &self.comp));
        if self.comp.mode == Mode::Revert {
            clear_uppers(&self.store_root, &self.comp)?;
        }
        served.map_err(|e| Error::io(&self.dir, "serve FUSE requests", e))
    }
}

/// Unmounts the Lamina mount at `dir` and waits for its daemon to finish
/// (a revert-mode composition's changes are gone when this returns).
/// Returns the composition's name when known.
///
/// # Errors
/// [`Error::NotMounted`], [`Error::MountPoint`] (busy), store failures.
pub fn umount(store: &Store, dir: &Path) -> Result<Option<String>> {
    let abs = absolute(dir);
    let mut owner: Option<Composition> = None;
    for comp in compose::list(store)? {
        if recorded(store.root(), &comp).is_some_and(|m| m.dir == abs) {
            owner = Some(comp);
            break;
        }
    }
    if owner.is_none() && !is_lamina_mount(&abs) {
        return Err(Error::NotMounted { path: abs });
    }
    // The kernel answers a close before the daemon has seen its RELEASE,
    // and the mount stays busy until then: a file closed just before is
    // given a moment.
    let mut unmounted = nix::mount::umount2(&abs, nix::mount::MntFlags::empty());
    let start = Instant::now();
    while unmounted == Err(nix::errno::Errno::EBUSY) && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
        unmounted = nix::mount::umount2(&abs, nix::mount::MntFlags::empty());
    }
    match unmounted {
        Ok(()) => {}
        Err(nix::errno::Errno::EBUSY) => {
            return Err(Error::MountPoint {
                path: abs,
                reason: "is busy (files or directories in it are in use)".into(),
            })
        }
        Err(nix::errno::Errno::EINVAL) => return Err(Error::NotMounted { path: abs }),
        Err(e) => return Err(Error::io(&abs, "unmount", e.into())),
    }
    if let Some(comp) = &owner {
        let daemon = recorded(store.root(), comp).map(|m| m.pid);
        let f = open_lock(store.root(), comp)?;
        let start = Instant::now();
        loop {
            match f.try_lock_shared() {
                Ok(()) => {
                    // A daemon that died left its record behind.
                    let _ = fs::remove_file(info_path(store.root(), comp));
                    break;
                }
                Err(_) if start.elapsed() < Duration::from_secs(300) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(_) => {
                    tracing::warn!("the daemon has not exited 5 minutes after unmount");
                    break;
                }
            }
        }
        // The lock goes with the daemon's last steps; wait for the process
        // itself to end too (a zombie has ended: reaping it is its
        // parent's business, here the machine's init).
        if let Some(pid) = daemon {
            let start = Instant::now();
            while running(pid) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    Ok(owner.map(|c| c.name))
}

/// Whether process `pid` exists and has not ended (not a zombie).
fn running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// `dir` made absolute without touching it (it may be a dead mount).
fn absolute(dir: &Path) -> PathBuf {
    if let Ok(c) = fs::canonicalize(dir) {
        return c;
    }
    let abs = if dir.is_absolute() {
        dir.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(dir)
    };
    match (
        abs.parent().and_then(|p| fs::canonicalize(p).ok()),
        abs.file_name(),
    ) {
        (Some(p), Some(n)) => p.join(n),
        _ => abs,
    }
}

/// Whether the kernel lists a Lamina FUSE mount at `dir`.
fn is_lamina_mount(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    text.lines().any(|l| {
        let mut f = l.split(' ');
        let point = f.nth(4);
        // After the separator: file system type, then source.
        let mut rest = l.split(" - ").nth(1).unwrap_or("").split(' ');
        let (fstype, source) = (rest.next().unwrap_or(""), rest.next().unwrap_or(""));
        point == Some(&*want) && fstype.starts_with("fuse") && source.starts_with("lamina:")
    })
}
