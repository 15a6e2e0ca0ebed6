//! `lamina bench …`: the benchmarks' grammar.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `lamina bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Import a generated tree and disk image, fresh and unchanged, beside `restic backup`
    Import(BenchImportArgs),
    /// Serve a qcow2 file and a store disk beside qemu-nbd; fio and nbdcopy on both
    Nbd(BenchNbdArgs),
    /// Mount a composition beside fuse-overlayfs and kernel overlayfs on the same lower data (root)
    Fs(BenchFsArgs),
    /// Start the fixture guest with `lamina vm start` and by hand: time to the serial marker, RSS
    Vm(BenchVmArgs),
    /// Check-in and two-way sync beside rsync and unison, over a tbf-limited and an unlimited loopback (root)
    Sync(BenchSyncArgs),
    /// Many distinct users asking a pool for desktops at once (a stand-in host agent)
    Broker(BenchBrokerArgs),
    /// Boot the fixture guest from a streamed disk beside pull-then-boot, over a tbf-limited link (root)
    Stream(BenchStreamArgs),
    /// Imports into a store on Ceph and a mirror's catch-up, beside the local store and `rados bench`
    Ceph(BenchCephArgs),
}

/// `lamina bench ceph`
#[derive(Debug, Args)]
pub struct BenchCephArgs {
    /// ceph.conf of the cluster (`scripts/ceph.sh up` prints it)
    #[arg(long, env = "CEPH_CONF", default_value = "/tmp/lamina-ceph/ceph.conf")]
    pub ceph_conf: PathBuf,
    /// Size of the tree and of the image (suffixes K, M, G, T)
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Work directory [default: a new temporary directory]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the work directory
    #[arg(long)]
    pub keep: bool,
}

/// `lamina bench sync`
#[derive(Debug, Args)]
pub struct BenchSyncArgs {
    /// Work directory [default: a new temporary directory]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the disk image (suffixes K, M, G, T)
    #[arg(long, default_value = "10G")]
    pub size: String,
    /// Files in the tree
    #[arg(long, default_value_t = 100_000)]
    pub files: u64,
    /// Rate of the limited link (tbf), e.g. 100mbit
    #[arg(long, default_value = "100mbit")]
    pub rate: String,
    /// Keep the work directory
    #[arg(long)]
    pub keep: bool,
    /// (internal) the run inside the network namespace
    #[arg(long, hide = true)]
    pub inner: Option<String>,
}

/// `lamina bench vm`
#[derive(Debug, Args)]
pub struct BenchVmArgs {
    /// Directory of the built fixture guest (vmlinuz, initrd.img, disk.raw) [default: fixtures/guest/out, or fixtures/guest/out/aarch64 for --arch aarch64]
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Work directory [default: a new temporary directory]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// VMs started at once in the second round
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=32))]
    pub vms: u64,
    /// Guest architecture: x86_64 (the pc profile) or aarch64 (the phone profile, virt, TCG)
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    /// Keep the work directory
    #[arg(long)]
    pub keep: bool,
}

/// `lamina bench fs`
#[derive(Debug, Args)]
pub struct BenchFsArgs {
    /// Work directory (lower data, store, uppers, mount points) [default: a new temporary directory]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Bytes of the lower file read and of the file written
    #[arg(long, default_value_t = 1 << 30)]
    pub size: u64,
    /// Empty files created, stat'ed and unlinked
    #[arg(long, default_value_t = 10_000)]
    pub files: u64,
    /// Rounds of every workload (file systems in a rotating order); the median is reported
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub runs: u64,
    /// Keep the work directory
    #[arg(long)]
    pub keep: bool,
}

/// `lamina bench nbd`
#[derive(Debug, Args)]
pub struct BenchNbdArgs {
    /// Work directory [default: a new temporary directory]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Image size in bytes
    #[arg(long, default_value_t = 1 << 30)]
    pub size: u64,
    /// Seconds per fio run
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Keep the work directory
    #[arg(long)]
    pub keep: bool,
}

/// `lamina bench import`
#[derive(Debug, Args)]
pub struct BenchImportArgs {
    /// Work directory (data, stores, repositories) [default: a new temporary directory]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Bytes of each data set (tree and image)
    #[arg(long, default_value_t = 1 << 30)]
    pub size: u64,
    /// Path of the restic binary
    #[arg(long, default_value = "restic")]
    pub restic: PathBuf,
    /// Keep the work directory
    #[arg(long)]
    pub keep: bool,
}

/// `lamina bench broker`
#[derive(Debug, Args)]
pub struct BenchBrokerArgs {
    /// Distinct users, each with its own token, asking at once
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Work directory [default: a new temporary directory]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the work directory
    #[arg(long)]
    pub keep: bool,
}

/// `lamina bench stream`
#[derive(Debug, Args)]
pub struct BenchStreamArgs {
    /// Directory of the built fixture guest (vmlinuz, initrd.img, disk.raw) [default: fixtures/guest/out, or fixtures/guest/out/aarch64 for --arch aarch64]
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Work directory [default: a new temporary directory]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Size of the golden disk: the guest's file system, then data its boot does not read
    #[arg(long, default_value = "2G")]
    pub size: String,
    /// Rate of the link (tbf), e.g. 100mbit
    #[arg(long, default_value = "100mbit")]
    pub rate: String,
    /// Keep the work directory
    #[arg(long)]
    pub keep: bool,
    /// (internal) the run inside the network namespace
    #[arg(long, hide = true)]
    pub inner: Option<String>,
}
