//! The librados C API, loaded at run time.
//!
//! This is the one module of Lamina with `unsafe` code. librados is loaded
//! with `dlopen` when a RADOS store is first opened, so the lamina binary
//! runs (and every embedded-store command works) on machines without Ceph's
//! libraries; only `--backend rados` needs `librados.so.2`.
//!
//! Everything here is a thin, typed veneer over the C functions: handles
//! are owned by the safe types in [`super`] and every call below is made
//! with arguments that the C API documents as valid. No other module calls
//! these functions.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use libloading::Library;

/// `rados_t`, `rados_ioctx_t`, … : opaque pointers owned by librados.
pub(super) type Handle = *mut c_void;

/// `LIBRADOS_CMPXATTR_OP_EQ`.
pub(super) const CMP_EQ: u8 = 1;
/// `LIBRADOS_LOCK_FLAG_RENEW` (0x1; called `MAY_RENEW` in later releases).
pub(super) const LOCK_FLAG_RENEW: u8 = 1;

/// `struct timeval`.
#[repr(C)]
pub(super) struct Timeval {
    pub tv_sec: libc::time_t,
    pub tv_usec: libc::suseconds_t,
}

macro_rules! api {
    ($( $name:ident : fn($($arg:ty),*) $(-> $ret:ty)? ;)*) => {
        /// Entry points of librados used by Lamina.
        #[allow(non_snake_case, missing_docs)]
        pub(super) struct Api {
            _lib: Library,
            $( pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
        }

        impl Api {
            fn load() -> Result<Api, String> {
                // SAFETY: loading librados runs its initialisers, which only
                // set up the library's own state.
                let lib = unsafe { Library::new("librados.so.2") }
                    .map_err(|e| format!("cannot load librados.so.2 ({e}); install Debian's librados2"))?;
                $(
                    // SAFETY: the symbol is librados' function of that name,
                    // whose C prototype is the one declared here (librados.h
                    // of Ceph 16 and later).
                    let $name = unsafe {
                        *lib.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                        .map_err(|e| format!("librados lacks {}: {e}", stringify!($name)))?
                    };
                )*
                Ok(Api { _lib: lib, $($name,)* })
            }
        }
    };
}

api! {
    rados_create: fn(*mut Handle, *const c_char) -> c_int;
    rados_conf_read_file: fn(Handle, *const c_char) -> c_int;
    rados_conf_set: fn(Handle, *const c_char, *const c_char) -> c_int;
    rados_connect: fn(Handle) -> c_int;
    rados_shutdown: fn(Handle);
    rados_pool_lookup: fn(Handle, *const c_char) -> i64;
    rados_pool_create: fn(Handle, *const c_char) -> c_int;
    rados_ioctx_create: fn(Handle, *const c_char, *mut Handle) -> c_int;
    rados_ioctx_destroy: fn(Handle);
    rados_write_full: fn(Handle, *const c_char, *const c_char, usize) -> c_int;
    rados_stat: fn(Handle, *const c_char, *mut u64, *mut libc::time_t) -> c_int;
    rados_remove: fn(Handle, *const c_char) -> c_int;
    rados_nobjects_list_open: fn(Handle, *mut Handle) -> c_int;
    rados_nobjects_list_next: fn(Handle, *mut *const c_char, *mut *const c_char, *mut *const c_char) -> c_int;
    rados_nobjects_list_close: fn(Handle);
    rados_aio_create_completion2: fn(*mut c_void, Option<unsafe extern "C" fn(Handle, *mut c_void)>, *mut Handle) -> c_int;
    rados_aio_wait_for_complete: fn(Handle) -> c_int;
    rados_aio_get_return_value: fn(Handle) -> c_int;
    rados_aio_release: fn(Handle);
    rados_aio_read: fn(Handle, *const c_char, Handle, *mut c_char, usize, u64) -> c_int;
    rados_create_write_op: fn() -> Handle;
    rados_release_write_op: fn(Handle);
    rados_write_op_create: fn(Handle, c_int, *const c_char);
    rados_write_op_omap_cmp: fn(Handle, *const c_char, u8, *const c_char, usize, *mut c_int);
    rados_write_op_omap_set: fn(Handle, *const *const c_char, *const *const c_char, *const usize, usize);
    rados_write_op_omap_rm_keys: fn(Handle, *const *const c_char, usize);
    rados_aio_write_op_operate: fn(Handle, Handle, Handle, *const c_char, *mut libc::time_t, c_int) -> c_int;
    rados_create_read_op: fn() -> Handle;
    rados_release_read_op: fn(Handle);
    rados_read_op_omap_get_vals2: fn(Handle, *const c_char, *const c_char, u64, *mut Handle, *mut u8, *mut c_int);
    rados_read_op_omap_get_vals_by_keys: fn(Handle, *const *const c_char, usize, *mut Handle, *mut c_int);
    rados_read_op_operate: fn(Handle, Handle, *const c_char, c_int) -> c_int;
    rados_aio_read_op_operate: fn(Handle, Handle, Handle, *const c_char, c_int) -> c_int;
    rados_omap_get_next: fn(Handle, *mut *mut c_char, *mut *mut c_char, *mut usize) -> c_int;
    rados_omap_get_end: fn(Handle);
    rados_lock_exclusive: fn(Handle, *const c_char, *const c_char, *const c_char, *const c_char, *mut Timeval, u8) -> c_int;
    rados_lock_shared: fn(Handle, *const c_char, *const c_char, *const c_char, *const c_char, *const c_char, *mut Timeval, u8) -> c_int;
    rados_unlock: fn(Handle, *const c_char, *const c_char, *const c_char) -> c_int;
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// The loaded library.
pub(super) fn api() -> Result<&'static Api, String> {
    API.get_or_init(Api::load).as_ref().map_err(Clone::clone)
}

/// Copies a NUL-terminated string returned by librados.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for the call.
pub(super) unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: guaranteed by the caller.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// A librados call that failed: which call, on which object, and errno.
#[derive(Debug, Clone)]
pub struct RadosError {
    /// The librados call.
    pub call: &'static str,
    /// Object or pool it concerned.
    pub object: String,
    /// Positive errno.
    pub errno: i32,
}

impl RadosError {
    fn new(call: &'static str, object: impl Into<String>, ret: i64) -> RadosError {
        RadosError {
            call,
            object: object.into(),
            errno: i32::try_from(-ret).unwrap_or(libc::EIO),
        }
    }
}

impl std::fmt::Display for RadosError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = std::io::Error::from_raw_os_error(self.errno);
        let hint = match self.errno {
            libc::ETIMEDOUT => " (is the cluster running and reachable?)",
            libc::ENOSPC | libc::EDQUOT => " (the cluster is full)",
            _ => "",
        };
        write!(f, "{} on {}: {what}{hint}", self.call, self.object)
    }
}

impl std::error::Error for RadosError {}

type R<T> = std::result::Result<T, RadosError>;

fn check(call: &'static str, object: &str, ret: c_int) -> R<c_int> {
    if ret < 0 {
        Err(RadosError::new(call, object, i64::from(ret)))
    } else {
        Ok(ret)
    }
}

fn name(object: &str) -> R<CString> {
    CString::new(object).map_err(|_| RadosError {
        call: "name",
        object: object.escape_debug().to_string(),
        errno: libc::EINVAL,
    })
}

fn names(keys: &[String]) -> R<Vec<CString>> {
    keys.iter().map(|k| name(k)).collect()
}

/// A connection to a cluster (`rados_t`).
pub struct Cluster {
    h: Handle,
    api: &'static Api,
}

// SAFETY: librados handles are safe to use from several threads at once
// (librados.h: "the rados_t and rados_ioctx_t may be shared").
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: `h` came from rados_create and every Pool holding an
        // ioctx of it holds an Arc of this Cluster, so none is left.
        unsafe { (self.api.rados_shutdown)(self.h) }
    }
}

impl Cluster {
    /// Connects as `user` (e.g. `admin`) with the configuration file `conf`
    /// (librados' default search when `None`), giving up on monitors and
    /// OSDs after `timeout_secs`.
    ///
    /// # Errors
    /// The library missing, a bad configuration, the cluster unreachable.
    pub fn connect(conf: Option<&str>, user: &str, timeout_secs: u32) -> R<Cluster> {
        let api = api().map_err(|reason| {
            tracing::warn!(%reason, "librados");
            RadosError {
                call: "dlopen librados.so.2",
                object: reason,
                errno: libc::ENOENT,
            }
        })?;
        let id = name(user)?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer and `id` a C string.
        check("rados_create", user, unsafe {
            (api.rados_create)(&mut h, id.as_ptr())
        })?;
        let cluster = Cluster { h, api };
        let path = conf.map(name).transpose()?;
        // SAFETY: a valid handle; a null path means the default search.
        let r = unsafe {
            (api.rados_conf_read_file)(h, path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()))
        };
        check(
            "rados_conf_read_file",
            conf.unwrap_or("the default ceph.conf"),
            r,
        )?;
        let t = timeout_secs.to_string();
        for opt in [
            "client_mount_timeout",
            "rados_mon_op_timeout",
            "rados_osd_op_timeout",
        ] {
            let (o, v) = (name(opt)?, name(&t)?);
            // SAFETY: a valid handle and C strings.
            check("rados_conf_set", opt, unsafe {
                (api.rados_conf_set)(h, o.as_ptr(), v.as_ptr())
            })?;
        }
        // SAFETY: a configured handle, not yet connected.
        check("rados_connect", "the cluster", unsafe {
            (api.rados_connect)(h)
        })?;
        Ok(cluster)
    }

    /// Whether pool `pool` exists.
    ///
    /// # Errors
    /// Cluster failures.
    pub fn pool_exists(&self, pool: &str) -> R<bool> {
        let n = name(pool)?;
        // SAFETY: a connected handle and a C string.
        let r = unsafe { (self.api.rados_pool_lookup)(self.h, n.as_ptr()) };
        match r {
            r if r >= 0 => Ok(true),
            r if r == -i64::from(libc::ENOENT) => Ok(false),
            r => Err(RadosError::new("rados_pool_lookup", pool, r)),
        }
    }

    /// Creates pool `pool` with the cluster's defaults.
    ///
    /// # Errors
    /// Cluster failures.
    pub fn pool_create(&self, pool: &str) -> R<()> {
        let n = name(pool)?;
        // SAFETY: a connected handle and a C string.
        check("rados_pool_create", pool, unsafe {
            (self.api.rados_pool_create)(self.h, n.as_ptr())
        })
        .map(drop)
    }

    /// An I/O context on pool `pool`.
    ///
    /// # Errors
    /// A missing pool, cluster failures.
    pub fn pool(self: &std::sync::Arc<Self>, pool: &str) -> R<Pool> {
        let n = name(pool)?;
        let mut io: Handle = std::ptr::null_mut();
        // SAFETY: a connected handle, a C string, a valid out-pointer.
        let r = unsafe { (self.api.rados_ioctx_create)(self.h, n.as_ptr(), &mut io) };
        check("rados_ioctx_create", pool, r)?;
        Ok(Pool {
            io,
            api: self.api,
            name: pool.to_owned(),
            _cluster: self.clone(),
        })
    }
}

/// An I/O context on one pool (`rados_ioctx_t`).
pub struct Pool {
    io: Handle,
    api: &'static Api,
    name: String,
    _cluster: std::sync::Arc<Cluster>,
}

// SAFETY: see Cluster: ioctx handles may be shared between threads.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: `io` came from rados_ioctx_create; every Pending op
        // borrows the Pool, so none is in flight.
        unsafe { (self.api.rados_ioctx_destroy)(self.io) }
    }
}

/// A compound write to one object, applied atomically by the OSD: every
/// comparison must hold or nothing is written.
#[derive(Debug, Default, Clone)]
pub struct WriteOp {
    /// Create the object; fail with EEXIST if it exists.
    pub create_exclusive: bool,
    /// omap key → value it must have (an empty value: the key is absent).
    pub compare: Vec<(String, Vec<u8>)>,
    /// omap keys to set.
    pub set: Vec<(String, Vec<u8>)>,
    /// omap keys to remove.
    pub remove: Vec<String>,
}

impl WriteOp {
    /// Whether the op does nothing.
    pub fn is_empty(&self) -> bool {
        !self.create_exclusive && self.set.is_empty() && self.remove.is_empty()
    }
}

/// Why a [`WriteOp`] was refused.
#[derive(Debug)]
pub enum OpError {
    /// Comparison number `i` of the op did not hold; nothing was written.
    Compare(usize),
    /// Another failure.
    Rados(RadosError),
}

impl From<RadosError> for OpError {
    fn from(e: RadosError) -> OpError {
        OpError::Rados(e)
    }
}

/// The C form of a [`WriteOp`], with everything it points at kept alive.
struct BuiltWrite {
    op: Handle,
    api: &'static Api,
    _keep: Vec<CString>,
    _vals: Vec<Vec<u8>>,
    prvals: Box<[c_int]>,
}

impl Drop for BuiltWrite {
    fn drop(&mut self) {
        // SAFETY: `op` came from rados_create_write_op and is no longer
        // in flight (Pending waits before dropping it).
        unsafe { (self.api.rados_release_write_op)(self.op) }
    }
}

fn build_write(api: &'static Api, w: &WriteOp) -> R<BuiltWrite> {
    let cmp_keys = names(&w.compare.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())?;
    let set_keys = names(&w.set.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())?;
    let rm_keys = names(&w.remove)?;
    let vals: Vec<Vec<u8>> = w.set.iter().map(|(_, v)| v.clone()).collect();
    let cmp_vals: Vec<Vec<u8>> = w.compare.iter().map(|(_, v)| v.clone()).collect();
    let mut prvals = vec![0 as c_int; w.compare.len()].into_boxed_slice();
    // SAFETY: creating an empty op has no preconditions.
    let op = unsafe { (api.rados_create_write_op)() };
    if op.is_null() {
        return Err(RadosError::new(
            "rados_create_write_op",
            "",
            -i64::from(libc::ENOMEM),
        ));
    }
    // SAFETY: `op` is a valid write op; every pointer passed below points
    // into `cmp_keys`, `cmp_vals`, `set_keys`, `vals`, `rm_keys` or
    // `prvals`, which BuiltWrite keeps alive until the op is released.
    unsafe {
        if w.create_exclusive {
            (api.rados_write_op_create)(op, 1, std::ptr::null());
        }
        for (i, (k, v)) in cmp_keys.iter().zip(&cmp_vals).enumerate() {
            (api.rados_write_op_omap_cmp)(
                op,
                k.as_ptr(),
                CMP_EQ,
                v.as_ptr().cast(),
                v.len(),
                prvals.as_mut_ptr().add(i),
            );
        }
        if !set_keys.is_empty() {
            let kp: Vec<*const c_char> = set_keys.iter().map(|k| k.as_ptr()).collect();
            let vp: Vec<*const c_char> = vals.iter().map(|v| v.as_ptr().cast()).collect();
            let lens: Vec<usize> = vals.iter().map(Vec::len).collect();
            // librados copies keys and values into the op here.
            (api.rados_write_op_omap_set)(op, kp.as_ptr(), vp.as_ptr(), lens.as_ptr(), kp.len());
        }
        if !rm_keys.is_empty() {
            let kp: Vec<*const c_char> = rm_keys.iter().map(|k| k.as_ptr()).collect();
            (api.rados_write_op_omap_rm_keys)(op, kp.as_ptr(), kp.len());
        }
    }
    let mut keep = cmp_keys;
    keep.extend(set_keys);
    keep.extend(rm_keys);
    Ok(BuiltWrite {
        op,
        api,
        _keep: keep,
        _vals: cmp_vals,
        prvals,
    })
}

fn write_result(object: &str, built: &BuiltWrite, ret: c_int) -> Result<(), OpError> {
    if ret == -libc::ECANCELED {
        let i = built.prvals.iter().position(|&p| p != 0).unwrap_or(0);
        return Err(OpError::Compare(i));
    }
    check("rados_write_op_operate", object, ret)
        .map(drop)
        .map_err(OpError::Rados)
}

/// Reads the pairs of an omap iterator and frees it.
///
/// # Safety
/// `iter` was filled by a completed read op and not yet ended.
unsafe fn drain_omap(api: &'static Api, iter: Handle) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if iter.is_null() {
        return out;
    }
    loop {
        let mut k: *mut c_char = std::ptr::null_mut();
        let mut v: *mut c_char = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: a valid iterator and out-pointers (caller's guarantee).
        let r = unsafe { (api.rados_omap_get_next)(iter, &mut k, &mut v, &mut len) };
        if r < 0 || k.is_null() {
            break;
        }
        // SAFETY: librados returns a NUL-terminated key and `len` bytes of
        // value, valid until the iterator advances.
        let key = unsafe { owned(k) };
        let val = if v.is_null() || len == 0 {
            Vec::new()
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(v.cast::<u8>(), len) }.to_vec()
        };
        out.push((key, val));
    }
    // SAFETY: the iterator is valid and ended once.
    unsafe { (api.rados_omap_get_end)(iter) };
    out
}

/// An asynchronous operation in flight; [`Pending::wait`] (or dropping it)
/// waits for it. Owns every buffer the operation reads or fills.
pub struct Pending<'p> {
    pool: &'p Pool,
    completion: Handle,
    object: String,
    kind: PendingKind,
    done: bool,
}

enum PendingKind {
    Op {
        _name: CString,
        built: BuiltWrite,
    },
    Read {
        _name: CString,
        buf: Vec<u8>,
    },
    OmapGet {
        _name: CString,
        _keys: Vec<CString>,
        op: Handle,
        iter: Box<Handle>,
        prval: Box<c_int>,
    },
}

/// What a finished [`Pending`] produced.
pub enum Done {
    /// A write or write op finished.
    Written,
    /// Bytes read.
    Read(Vec<u8>),
    /// omap pairs found.
    Omap(Vec<(String, Vec<u8>)>),
}

impl Pending<'_> {
    fn finish(&mut self) -> Result<Done, OpError> {
        self.done = true;
        let api = self.pool.api;
        // SAFETY: a completion created by rados_aio_create_completion2 and
        // handed to exactly one aio call.
        let ret = unsafe {
            (api.rados_aio_wait_for_complete)(self.completion);
            (api.rados_aio_get_return_value)(self.completion)
        };
        match &mut self.kind {
            PendingKind::Op { built, .. } => {
                write_result(&self.object, built, ret).map(|()| Done::Written)
            }
            PendingKind::Read { buf, .. } => {
                let n = check("rados_aio_read", &self.object, ret)? as usize;
                buf.truncate(n);
                Ok(Done::Read(std::mem::take(buf)))
            }
            PendingKind::OmapGet { iter, prval, .. } => {
                check("rados_aio_read_op_operate", &self.object, ret)?;
                check("omap_get_vals_by_keys", &self.object, **prval)?;
                // SAFETY: the op completed, so the iterator is filled.
                let pairs = unsafe { drain_omap(api, **iter) };
                **iter = std::ptr::null_mut();
                Ok(Done::Omap(pairs))
            }
        }
    }

    /// Waits for the operation.
    ///
    /// # Errors
    /// The operation's failure.
    pub fn wait(mut self) -> Result<Done, OpError> {
        self.finish()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let api = self.pool.api;
        if !self.done {
            // Buffers must outlive the operation: wait even when abandoned.
            let _ = self.finish();
        }
        if let PendingKind::OmapGet { op, iter, .. } = &mut self.kind {
            // SAFETY: the op completed; an iterator not drained is ended
            // once, then the op is released once.
            unsafe {
                if !iter.is_null() {
                    (api.rados_omap_get_end)(**iter);
                }
                (api.rados_release_read_op)(*op);
            }
        }
        // SAFETY: the operation has completed; the completion is released once.
        unsafe { (api.rados_aio_release)(self.completion) }
    }
}

/// One page of an omap listing.
pub struct OmapPage {
    /// Pairs in key order.
    pub pairs: Vec<(String, Vec<u8>)>,
    /// Whether more keys follow.
    pub more: bool,
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn object(&self, oid: &str) -> String {
        format!("{}/{oid}", self.name)
    }

    fn completion(&self) -> R<Handle> {
        let mut c: Handle = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; no callback.
        let r =
            unsafe { (self.api.rados_aio_create_completion2)(std::ptr::null_mut(), None, &mut c) };
        check("rados_aio_create_completion2", "", r)?;
        Ok(c)
    }

    /// Replaces object `oid` with `data`.
    ///
    /// # Errors
    /// Cluster failures.
    pub fn write_full(&self, oid: &str, data: &[u8]) -> R<()> {
        let n = name(oid)?;
        // SAFETY: a valid ioctx, C string and buffer of `data.len()` bytes.
        let r = unsafe {
            (self.api.rados_write_full)(self.io, n.as_ptr(), data.as_ptr().cast(), data.len())
        };
        check("rados_write_full", &self.object(oid), r).map(drop)
    }

    /// Starts reading `len` bytes of `oid` at `offset` (fewer at the end).
    ///
    /// # Errors
    /// Failures to submit.
    pub fn aio_read(&self, oid: &str, offset: u64, len: usize) -> R<Pending<'_>> {
        let n = name(oid)?;
        let c = self.completion()?;
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` (len bytes) and `n` move into the Pending, whose
        // heap allocations stay put until the operation completes.
        let r = unsafe {
            (self.api.rados_aio_read)(self.io, n.as_ptr(), c, buf.as_mut_ptr().cast(), len, offset)
        };
        let mut p = Pending {
            pool: self,
            completion: c,
            object: self.object(oid),
            kind: PendingKind::Read { _name: n, buf },
            done: false,
        };
        if r < 0 {
            p.done = true;
            return Err(RadosError::new(
                "rados_aio_read",
                self.object(oid),
                i64::from(r),
            ));
        }
        Ok(p)
    }

    /// Reads `len` bytes of `oid` at `offset`; `None` if the object is absent.
    ///
    /// # Errors
    /// Cluster failures.
    pub fn read(&self, oid: &str, offset: u64, len: usize) -> R<Option<Vec<u8>>> {
        match self.aio_read(oid, offset, len)?.wait() {
            Ok(Done::Read(b)) => Ok(Some(b)),
            Ok(_) => Ok(Some(Vec::new())),
            Err(OpError::Rados(e)) if e.errno == libc::ENOENT => Ok(None),
            Err(OpError::Rados(e)) => Err(e),
            Err(OpError::Compare(_)) => Ok(None),
        }
    }

    /// Size and mtime (seconds) of `oid`; `None` if absent.
    ///
    /// # Errors
    /// Cluster failures.
    pub fn stat(&self, oid: &str) -> R<Option<(u64, i64)>> {
        let n = name(oid)?;
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        // SAFETY: valid ioctx, C string and out-pointers.
        let r = unsafe { (self.api.rados_stat)(self.io, n.as_ptr(), &mut size, &mut mtime) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check("rados_stat", &self.object(oid), r)?;
        Ok(Some((size, mtime)))
    }

    /// Removes `oid`; false if it was absent.
    ///
    /// # Errors
    /// Cluster failures.
    pub fn remove(&self, oid: &str) -> R<bool> {
        let n = name(oid)?;
        // SAFETY: valid ioctx and C string.
        let r = unsafe { (self.api.rados_remove)(self.io, n.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(false);
        }
        check("rados_remove", &self.object(oid), r).map(|_| true)
    }

    /// The names of the pool's objects starting with `prefix`.
    ///
    /// # Errors
    /// Cluster failures.
    pub fn list(&self, prefix: &str) -> R<Vec<String>> {
        let mut ctx: Handle = std::ptr::null_mut();
        // SAFETY: valid ioctx and out-pointer.
        check("rados_nobjects_list_open", &self.name, unsafe {
            (self.api.rados_nobjects_list_open)(self.io, &mut ctx)
        })?;
        let mut out = Vec::new();
        let result = loop {
            let mut entry: *const c_char = std::ptr::null();
            // SAFETY: a valid listing context; key and namespace not wanted.
            let r = unsafe {
                (self.api.rados_nobjects_list_next)(
                    ctx,
                    &mut entry,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if r == -libc::ENOENT {
                break Ok(out);
            }
            if let Err(e) = check("rados_nobjects_list_next", &self.name, r) {
                break Err(e);
            }
            // SAFETY: the entry is a C string valid until the next call.
            let oid = unsafe { owned(entry) };
            if oid.starts_with(prefix) {
                out.push(oid);
            }
        };
        // SAFETY: the context is closed once.
        unsafe { (self.api.rados_nobjects_list_close)(ctx) };
        result
    }

    /// Applies `op` to `oid` atomically.
    ///
    /// # Errors
    /// [`OpError::Compare`] if a comparison failed, cluster failures.
    pub fn operate(&self, oid: &str, op: &WriteOp) -> Result<(), OpError> {
        self.aio_operate(oid, op)?.wait().map(drop)
    }

    /// Starts applying `op` to `oid`.
    ///
    /// # Errors
    /// Failures to submit.
    pub fn aio_operate(&self, oid: &str, op: &WriteOp) -> R<Pending<'_>> {
        let n = name(oid)?;
        let built = build_write(self.api, op)?;
        let c = self.completion()?;
        // SAFETY: `built` and `n` move into the Pending, which keeps them
        // until the operation completes.
        let r = unsafe {
            (self.api.rados_aio_write_op_operate)(
                built.op,
                self.io,
                c,
                n.as_ptr(),
                std::ptr::null_mut(),
                0,
            )
        };
        let mut p = Pending {
            pool: self,
            completion: c,
            object: self.object(oid),
            kind: PendingKind::Op { _name: n, built },
            done: false,
        };
        if r < 0 {
            p.done = true;
            return Err(RadosError::new(
                "rados_aio_write_op_operate",
                self.object(oid),
                i64::from(r),
            ));
        }
        Ok(p)
    }

    /// Starts reading the values of `keys` from the omap of `oid`.
    ///
    /// # Errors
    /// Failures to submit.
    pub fn aio_omap_get(&self, oid: &str, keys: &[String]) -> R<Pending<'_>> {
        let n = name(oid)?;
        let ks = names(keys)?;
        let c = self.completion()?;
        // SAFETY: creating an empty op has no preconditions.
        let op = unsafe { (self.api.rados_create_read_op)() };
        let mut iter = Box::new(std::ptr::null_mut());
        let mut prval = Box::new(0 as c_int);
        let kp: Vec<*const c_char> = ks.iter().map(|k| k.as_ptr()).collect();
        // SAFETY: a valid op; keys are copied into the op; `iter` and
        // `prval` are boxed into the Pending, which outlives the op.
        let r = unsafe {
            (self.api.rados_read_op_omap_get_vals_by_keys)(
                op,
                kp.as_ptr(),
                kp.len(),
                &mut *iter,
                &mut *prval,
            );
            (self.api.rados_aio_read_op_operate)(op, self.io, c, n.as_ptr(), 0)
        };
        let mut p = Pending {
            pool: self,
            completion: c,
            object: self.object(oid),
            kind: PendingKind::OmapGet {
                _name: n,
                _keys: ks,
                op,
                iter,
                prval,
            },
            done: false,
        };
        if r < 0 {
            p.done = true;
            return Err(RadosError::new(
                "rados_aio_read_op_operate",
                self.object(oid),
                i64::from(r),
            ));
        }
        Ok(p)
    }

    /// The values of `keys` in the omap of `oid` (absent keys are left out).
    ///
    /// # Errors
    /// Cluster failures (an absent object: ENOENT).
    pub fn omap_get(&self, oid: &str, keys: &[String]) -> R<Vec<(String, Vec<u8>)>> {
        match self.aio_omap_get(oid, keys)?.wait() {
            Ok(Done::Omap(p)) => Ok(p),
            Ok(_) => Ok(Vec::new()),
            Err(OpError::Rados(e)) => Err(e),
            Err(OpError::Compare(_)) => Ok(Vec::new()),
        }
    }

    /// Up to `max` omap pairs of `oid` after `start_after` whose keys start
    /// with `prefix`.
    ///
    /// # Errors
    /// Cluster failures.
    pub fn omap_page(&self, oid: &str, start_after: &str, prefix: &str, max: u64) -> R<OmapPage> {
        let (n, s, f) = (name(oid)?, name(start_after)?, name(prefix)?);
        // SAFETY: creating an empty op has no preconditions.
        let op = unsafe { (self.api.rados_create_read_op)() };
        let mut iter: Handle = std::ptr::null_mut();
        let (mut more, mut prval) = (0u8, 0 as c_int);
        // SAFETY: a valid op and C strings (copied into the op); the out
        // pointers live on this frame until the synchronous operate returns.
        let r = unsafe {
            (self.api.rados_read_op_omap_get_vals2)(
                op,
                s.as_ptr(),
                f.as_ptr(),
                max,
                &mut iter,
                &mut more,
                &mut prval,
            );
            (self.api.rados_read_op_operate)(op, self.io, n.as_ptr(), 0)
        };
        let result = check("rados_read_op_operate", &self.object(oid), r)
            .and_then(|_| check("omap_get_vals", &self.object(oid), prval));
        // SAFETY: the op has completed; the iterator is drained (or ended)
        // once, then the op released once.
        let pairs = unsafe {
            let pairs = if result.is_ok() {
                drain_omap(self.api, iter)
            } else {
                if !iter.is_null() {
                    (self.api.rados_omap_get_end)(iter);
                }
                Vec::new()
            };
            (self.api.rados_release_read_op)(op);
            pairs
        };
        result?;
        Ok(OmapPage {
            pairs,
            more: more != 0,
        })
    }

    /// Takes (or renews, with `renew`) advisory lock `lock` on `oid` for
    /// `secs` seconds, exclusive or shared. Returns false if another
    /// client holds it incompatibly (EBUSY or EEXIST).
    ///
    /// # Errors
    /// Cluster failures.
    pub fn lock(
        &self,
        oid: &str,
        lock: &str,
        cookie: &str,
        exclusive: bool,
        secs: u32,
        renew: bool,
    ) -> R<bool> {
        let (n, l, c, d, t) = (
            name(oid)?,
            name(lock)?,
            name(cookie)?,
            name("lamina")?,
            name("lamina")?,
        );
        let mut tv = Timeval {
            tv_sec: libc::time_t::from(secs),
            tv_usec: 0,
        };
        let flags = if renew { LOCK_FLAG_RENEW } else { 0 };
        // SAFETY: valid ioctx, C strings and timeval.
        let r = unsafe {
            if exclusive {
                (self.api.rados_lock_exclusive)(
                    self.io,
                    n.as_ptr(),
                    l.as_ptr(),
                    c.as_ptr(),
                    d.as_ptr(),
                    &mut tv,
                    flags,
                )
            } else {
                (self.api.rados_lock_shared)(
                    self.io,
                    n.as_ptr(),
                    l.as_ptr(),
                    c.as_ptr(),
                    t.as_ptr(),
                    d.as_ptr(),
                    &mut tv,
                    flags,
                )
            }
        };
        if r == -libc::EBUSY || (r == -libc::EEXIST && !renew) {
            return Ok(false);
        }
        check("rados_lock", &self.object(oid), r).map(|_| true)
    }

    /// Releases advisory lock `lock` on `oid`.
    ///
    /// # Errors
    /// Cluster failures (ENOENT: not held).
    pub fn unlock(&self, oid: &str, lock: &str, cookie: &str) -> R<()> {
        let (n, l, c) = (name(oid)?, name(lock)?, name(cookie)?);
        // SAFETY: valid ioctx and C strings.
        let r = unsafe { (self.api.rados_unlock)(self.io, n.as_ptr(), l.as_ptr(), c.as_ptr()) };
        check("rados_unlock", &self.object(oid), r).map(drop)
    }
}
