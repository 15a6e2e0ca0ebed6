//! Command-line grammar: `lamina [GLOBAL] <noun> <verb> ...`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod bench;
mod broker;
mod client;
mod peripheral;
pub use bench::{BenchCommand, BenchImportArgs};
pub use broker::{
    AuditCommand, DesktopCommand, HostAgentArgs, HostCommand, PoolCommand, PoolCreateArgs,
    SessionCommand, TlsArgs,
};
pub use client::{
    BundleCommand, BundleCreateArgs, BundleRun, CollectArgs, DisseminateArgs, HotelCommand,
};
pub use peripheral::{PeripheralAddArgs, PeripheralCommand};

/// Lamina: layered, versioned, synchronised VM disks and file trees.
#[derive(Debug, Parser)]
#[command(name = "lamina", version, about, propagate_version = true)]
pub struct Cli {
    /// Store directory [default: ~/.local/share/lamina]
    #[arg(long, global = true, env = "LAMINA_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// Print one JSON document on stdout instead of text
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress bars or summaries on stderr
    #[arg(long, short, global = true)]
    pub quiet: bool,

    /// Fail at once instead of waiting when another process holds the store
    #[arg(long, global = true)]
    pub no_wait: bool,

    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an empty store (embedded, or on a Ceph pool)
    Init(InitArgs),
    /// Create, import, list and export layers
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Writable VM disks: a disk layer version under a qcow2 overlay
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Serve disks and disk layer versions (or one image file) over NBD
    Serve(ServeArgs),
    /// Define compositions: stacks of tree layers with redirection rules
    #[command(subcommand)]
    Compose(ComposeCommand),
    /// Mount a composition (a daemon serves it until `lamina umount`)
    Mount(MountArgs),
    /// Unmount a composition mounted with `lamina mount`
    Umount {
        /// Mount point
        dir: PathBuf,
    },
    /// A composition's pending changes, per layer
    Status {
        /// Composition name
        name: String,
    },
    /// Turn a composition's pending changes into new layer versions
    Commit(CommitArgs),
    /// Verify every version, manifest, chunk and pack; name each bad object
    Fsck,
    /// Remove chunks no kept version needs
    Gc(GcArgs),
    /// Run QEMU virtual machines on image files or NBD exports
    #[command(subcommand)]
    Vm(VmCommand),
    /// Serve this store to laptops and other stores: the sync API over HTTPS (HTTP/2)
    Server(ServerArgs),
    /// Users who may reach this store through `lamina server`
    #[command(subcommand)]
    User(UserCommand),
    /// Groups of users (grants can name a group as @GROUP)
    #[command(subcommand)]
    Group(GroupCommand),
    /// Bearer tokens of users
    #[command(subcommand)]
    Token(TokenCommand),
    /// Servers this store syncs with
    #[command(subcommand)]
    Remote(RemoteCommand),
    /// Signing keys of os and group layers (server side)
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check layers out of a remote (creating them here), or bring them up to date
    Pull(TransferArgs),
    /// Check layers in to a remote (refused if the server moved: use sync)
    Push(TransferArgs),
    /// Pull, merge both sides' changes through the mediator, push
    Sync(SyncArgs),
    /// Conflicts the mediator met; those of `manual` layers wait here for an admin
    #[command(subcommand)]
    Conflicts(ConflictsCommand),
    /// Run this host's VMs for a broker: the VM runner behind an HTTPS API
    HostAgent(HostAgentArgs),
    /// Hosts whose agents run the pools' VMs
    #[command(subcommand)]
    Host(HostCommand),
    /// Pools of VMs kept within their rules and handed to subscribed users
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Users' desktops: ask a pool for one, end it, list them
    #[command(subcommand)]
    Session(SessionCommand),
    /// Desktops of other VDI products (VNC servers) in the broker's pools
    #[command(subcommand)]
    Desktop(DesktopCommand),
    /// The audit log: logins, allocations, admin and rule-engine actions
    #[command(subcommand)]
    Audit(AuditCommand),
    /// OS layers cached on this client, and switching a desktop between them
    #[command(subcommand)]
    Hotel(HotelCommand),
    /// Portable bundles: a user's desktop on removable storage, run offline elsewhere
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Place files into the data layer of every member of a group (a new version each)
    Disseminate(DisseminateArgs),
    /// Gather each member's current version of a path from their data layers
    Collect(CollectArgs),
    /// The store itself: its backend's totals, moving it onto Ceph
    #[command(subcommand)]
    Store(StoreCommand),
    /// Second, complete copies of this store in a directory or a Ceph pool
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Measure Lamina against the tools a user would use instead
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// Where a store keeps its chunks and catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Pack files and RocksDB in the store directory
    Local,
    /// A Ceph pool (librados); several servers may share it
    Rados,
}

/// Where a store on Ceph is.
#[derive(Debug, Clone, Args)]
pub struct CephArgs {
    /// RADOS pool (created if missing)
    #[arg(long, value_name = "POOL")]
    pub pool: Option<String>,
    /// ceph.conf of the cluster [default: librados' search, $CEPH_CONF]
    #[arg(long, value_name = "FILE", env = "CEPH_CONF")]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph user, without `client.`
    #[arg(long, value_name = "USER", default_value = "admin")]
    pub ceph_user: String,
    /// Seconds after which cluster operations give up
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub ceph_timeout: u32,
}

/// `lamina store ...`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Backend, chunks and bytes (plain, stored, occupied)
    Stats,
    /// Copy this embedded store onto a Ceph pool (resumable: run it again
    /// after an interruption)
    Migrate(MigrateArgs),
}

/// `lamina mirror ...`
#[derive(Debug, Subcommand)]
pub enum MirrorCommand {
    /// Add a mirror and copy the store into it (`lamina server` keeps it up to date)
    Add {
        /// Mirror name
        name: String,
        /// `dir:PATH` (a mounted NFS share or any directory) or `rados:POOL`
        target: String,
        #[command(flatten)]
        ceph: CephArgs,
        /// Only register it; the first pass runs later
        #[arg(long)]
        no_sync: bool,
    },
    /// List mirrors
    Ls,
    /// A mirror's lag (versions, refs, chunks, bytes) and its last pass
    Status {
        /// Mirror name
        name: String,
    },
    /// Run one pass now (resumes an interrupted one)
    Sync {
        /// Mirror name
        name: String,
    },
    /// Check the mirror holds everything the store holds, and fsck it
    Verify {
        /// Mirror name
        name: String,
    },
    /// Stop mirroring (the copy is left as it is)
    Rm {
        /// Mirror name
        name: String,
    },
}

/// `lamina store migrate`
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Destination backend
    #[arg(long, value_enum)]
    pub to: BackendKind,
    #[command(flatten)]
    pub ceph: CephArgs,
    /// Directory of the new store on the pool [default: STORE.rados beside this store]
    #[arg(long, value_name = "DIR")]
    pub into: Option<PathBuf>,
}

/// `lamina init`
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where chunks and the catalog live
    #[arg(long, value_enum, default_value = "local")]
    pub backend: BackendKind,
    #[command(flatten)]
    pub ceph: CephArgs,
}

/// `lamina layer ...`
#[derive(Debug, Subcommand)]
pub enum LayerCommand {
    /// Create an empty layer
    Create(CreateArgs),
    /// Import a directory (tree layer) or raw image (disk layer) as a new version
    Import(ImportArgs),
    /// List layers
    Ls,
    /// Show a layer's versions, newest first
    Log {
        /// Layer name
        name: String,
    },
    /// List what changed between two versions
    Diff {
        /// NAME@VERSION (VERSION: id prefix, head, head~N)
        from: String,
        /// NAME@VERSION
        to: String,
    },
    /// Write a version out: a directory (tree) or a raw image file (disk)
    Export(ExportArgs),
    /// Remove a layer (its versions stay restorable until gc expires the reflog)
    Rm {
        /// Layer name
        name: String,
    },
    /// Let a user or @group read or write a layer through the server
    Grant {
        /// Layer name
        layer: String,
        /// USER or @GROUP
        principal: String,
        /// read or write
        permission: String,
        /// The subscription ends then: a date (2027-06-30), a time
        /// (2027-06-30T18:00:00Z) or a duration from now (90d)
        #[arg(long)]
        until: Option<String>,
        /// How long past its end a client that cannot sync keeps using the
        /// layer (e.g. 3d) [default: 0]
        #[arg(long, requires = "until")]
        grace: Option<String>,
    },
    /// Take a user's or group's grant on a layer away
    Revoke {
        /// Layer name
        layer: String,
        /// USER or @GROUP
        principal: String,
    },
    /// List grants (of one layer, or all)
    Grants {
        /// Layer name
        layer: Option<String>,
    },
    /// Hold this store on a version of a layer: mounts and new disks use it
    /// instead of the head (sync still fetches newer ones)
    Pin {
        /// Layer name
        layer: String,
        /// Version (id or prefix, head, head~N)
        #[arg(value_name = "VERSION")]
        at: String,
    },
    /// Release a pin: mounts and new disks follow the head again
    Unpin {
        /// Layer name
        layer: String,
    },
    /// List pins
    Pins,
    /// Change a layer's settings
    Set {
        /// Layer name
        name: String,
        /// What sync does with a real conflict: server-wins, client-wins, keep-both or manual
        #[arg(long, value_name = "POLICY", required_unless_present_any = ["net", "no_net"])]
        conflict: Option<String>,
        /// Network policy of VMs over this layer, sent to clients with it: none, user or allow:HOST:PORT,...
        #[arg(long, value_name = "POLICY")]
        net: Option<String>,
        /// Remove the layer's network policy
        #[arg(long, conflicts_with = "net")]
        no_net: bool,
    },
}

/// `lamina server`
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8443")]
    pub listen: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// How often the broker's rule engine checks the pools
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub rules_interval: String,
    /// noVNC's files, served to the web console (Debian's `novnc` package)
    #[arg(long, value_name = "DIR", default_value = lamina_broker::console::NOVNC_DIR)]
    pub novnc_dir: PathBuf,
    /// How often the store's mirrors are brought up to date
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub mirror_interval: String,
}

/// `lamina user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user
    Add {
        /// User name
        name: String,
        /// May do everything (manage every layer)
        #[arg(long)]
        admin: bool,
        /// Member of this group (repeat)
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// List users
    Ls,
    /// Remove a user, its tokens and grants
    Rm {
        /// User name
        name: String,
    },
    /// Set a user's web-console password (argon2id; at least 8 characters)
    Passwd {
        /// User name
        name: String,
        /// File holding the password (first line; `-`: standard input)
        #[arg(long, value_name = "FILE", required_unless_present = "clear")]
        password_file: Option<PathBuf>,
        /// Remove the password instead (no console login)
        #[arg(long, conflicts_with = "password_file")]
        clear: bool,
    },
}

/// `lamina group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Add a group
    Add {
        /// Group name
        name: String,
    },
    /// List groups and their members
    Ls,
    /// Remove a group (its members stay users)
    Rm {
        /// Group name
        name: String,
    },
}

/// `lamina token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for a user; it is printed once and stored only as a hash
    Create {
        /// User name
        user: String,
        /// Lifetime, e.g. 90d or 12h [default: no expiry]
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (ids, users, expiry; never secrets)
    Ls,
    /// Revoke a token by id
    Revoke {
        /// Token id (as listed) or the token itself
        id: String,
    },
}

/// `lamina remote ...`
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Add (or replace) a remote; checks that it answers with this token unless --no-check
    Add {
        /// Remote name
        name: String,
        /// https://HOST:PORT of a `lamina server`
        url: String,
        /// File holding the token (from `lamina token create`)
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
        /// CA certificate (PEM) to trust for this remote instead of the system's
        #[arg(long, value_name = "CERT")]
        ca: Option<PathBuf>,
        /// Allow an http:// URL (a server started with --insecure on loopback)
        #[arg(long)]
        insecure: bool,
        /// Do not contact the remote now
        #[arg(long)]
        no_check: bool,
    },
    /// List remotes and the layers tracked from each
    Ls,
    /// Remove a remote (local layers stay)
    Rm {
        /// Remote name
        name: String,
    },
    /// Trust the remote's current signing keys (replacing those trusted)
    Trust {
        /// Remote name
        name: String,
    },
}

/// `lamina key ...` (on the server's store)
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Make a signing key (endorsed by the active one); it signs from now on
    Generate,
    /// List signing keys
    Ls,
    /// Revoke a signing key: clients refuse what only it signed
    Revoke {
        /// Key id (or a prefix of it)
        id: String,
    },
}

/// `lamina pull` / `lamina push`
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Remote name
    pub remote: String,
    /// Layers
    #[arg(required = true)]
    pub layers: Vec<String>,
    #[command(flatten)]
    pub who: SyncWho,
}

/// Who syncs, as conflict records and merges say.
#[derive(Debug, Args)]
pub struct SyncWho {
    /// This machine's name in conflict copies and records [default: the host name]
    #[arg(long, env = "LAMINA_HOST", value_name = "NAME")]
    pub host: Option<String>,
    /// Version author of merges [default: $LAMINA_AUTHOR, else user@host]
    #[arg(long, env = "LAMINA_AUTHOR")]
    pub author: Option<String>,
    /// Retries of a request whose connection failed (one-shot commands)
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
}

/// `lamina sync`
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Remote name (with --status: only this one)
    pub remote: Option<String>,
    /// Layers [default: every layer tracked from the remote]
    pub layers: Vec<String>,
    /// Keep running: sync every --interval and soon after a local head moves, working offline while the server is unreachable
    #[arg(long, conflicts_with = "status")]
    pub watch: bool,
    /// Time between rounds of --watch
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub interval: String,
    /// Show the watch daemon's last round, queued versions and pending conflicts
    #[arg(long)]
    pub status: bool,
    #[command(flatten)]
    pub who: SyncWho,
}

/// `lamina conflicts ...`
#[derive(Debug, Subcommand)]
pub enum ConflictsCommand {
    /// List pending conflicts (with --all also those settled by policy)
    Ls {
        /// Also settled and resolved ones
        #[arg(long)]
        all: bool,
        /// Ask this remote instead (a user sees the conflicts of their check-ins; an admin all)
        #[arg(long, value_name = "REMOTE")]
        remote: Option<String>,
    },
    /// Show a conflict; text files come pre-merged with diff3 markers
    Show {
        /// Conflict id (a unique prefix will do)
        id: String,
    },
    /// Resolve a pending conflict: merge it into the layer's head
    Resolve {
        /// Conflict id
        id: String,
        /// server, client, or a FILE whose content the conflicting path takes
        #[arg(long, value_name = "server|client|FILE")]
        take: String,
        /// The conflicting path a FILE is for (when several conflict; the others take the server's side)
        #[arg(long, value_name = "PATH")]
        path: Option<String>,
        /// Version author [default: $LAMINA_AUTHOR, else user@host]
        #[arg(long, env = "LAMINA_AUTHOR")]
        author: Option<String>,
    },
}

/// `lamina disk ...`
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create a disk over a disk layer version (or a blank one with --size)
    Create {
        /// Disk name (also its NBD export name)
        name: String,
        /// LAYER or LAYER@VERSION to start from (with --stream:
        /// REMOTE:LAYER[@VERSION])
        #[arg(long)]
        base: Option<String>,
        /// Size in bytes (suffixes K, M, G, T); default: the base's size
        #[arg(long)]
        size: Option<String>,
        /// Stream the base from the remote instead of pulling it: fetch its
        /// manifests now, its data as it is read (and in the background
        /// while served)
        #[arg(long, requires = "base")]
        stream: bool,
    },
    /// List disks
    Ls,
    /// Show a disk
    Show {
        /// Disk name
        name: String,
    },
    /// Remove a disk and its uncommitted changes
    Rm {
        /// Disk name
        name: String,
    },
    /// Changed clusters since the last commit
    Status {
        /// Disk name
        name: String,
    },
    /// Turn the disk's changes into a new version of its base's layer
    Commit {
        /// Disk name
        name: String,
        /// Version message
        #[arg(short, long)]
        message: Option<String>,
        /// Layer receiving the version (default: the base's)
        #[arg(long)]
        to: Option<String>,
        /// Version author [default: $LAMINA_AUTHOR, else user@host]
        #[arg(long, env = "LAMINA_AUTHOR")]
        author: Option<String>,
    },
    /// Drop the disk's changes since its last commit
    Reset {
        /// Disk name
        name: String,
    },
}

/// `lamina compose ...`
#[derive(Debug, Subcommand)]
pub enum ComposeCommand {
    /// Create a composition
    Create(ComposeCreateArgs),
    /// List compositions
    Ls,
    /// Show a composition: layers, rules, mode, mount
    Show {
        /// Composition name
        name: String,
    },
    /// Remove a composition and its pending changes (layers stay)
    Rm {
        /// Composition name
        name: String,
    },
    /// Drop a composition's pending changes
    Reset {
        /// Composition name
        name: String,
    },
}

/// `lamina compose create`
#[derive(Debug, Args)]
pub struct ComposeCreateArgs {
    /// Composition name
    pub name: String,
    /// KIND=LAYER[@VERSION]; a version pins the layer read-only (repeat)
    #[arg(long = "layer", value_name = "KIND=LAYER[@V]", required = true)]
    pub layers: Vec<String>,
    /// TOML file of redirection rules [default: every write to the top writable layer]
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// persistent (keep writes until commit) or revert (drop them at unmount)
    #[arg(long, default_value = "persistent")]
    pub mode: String,
    /// Layers given as KIND=REMOTE:LAYER[@V] stream from the remote: their manifests now, file data as it is read
    #[arg(long)]
    pub stream: bool,
}

/// `lamina mount`
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Composition name
    pub name: String,
    /// Mount point: an existing empty directory
    pub dir: PathBuf,
    /// Serve in this process instead of a background daemon
    #[arg(long)]
    pub foreground: bool,
    /// (internal) report readiness on stdout as one JSON line, then detach
    #[arg(long, hide = true)]
    pub daemon_child: bool,
}

/// `lamina commit`
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Composition name
    pub name: String,
    /// Version message [default: commit of composition NAME]
    #[arg(short, long)]
    pub message: Option<String>,
    /// Version author [default: $LAMINA_AUTHOR, else user@host]
    #[arg(long, env = "LAMINA_AUTHOR")]
    pub author: Option<String>,
}

/// `lamina serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TCP address to listen on [default: 127.0.0.1:10809 unless --socket]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Unix socket to listen on
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// TLS certificate chain (PEM); TLS is then required
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Refuse writes to every export
    #[arg(long)]
    pub read_only: bool,
    /// Serve this image file (qcow2 or raw) instead of the store
    #[arg(long, value_name = "IMAGE")]
    pub file: Option<PathBuf>,
    /// Export name of --file [default: "" (the default export)]
    #[arg(long, requires = "file", default_value = "")]
    pub export: String,
    /// Disks over streamed bases fetch only what is read: no background
    /// prefetch
    #[arg(long)]
    pub no_prefetch: bool,
}

/// `lamina layer create`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Layer name, e.g. os/debian12 or user/alice/data
    pub name: String,
    /// os, group, personal, system or data
    #[arg(long)]
    pub kind: String,
    /// tree or disk
    #[arg(long)]
    pub format: String,
}

/// `lamina layer import`
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Layer name
    pub name: String,
    /// Directory (tree layer) or raw image file (disk layer)
    pub path: PathBuf,
    /// Version message [default: import PATH]
    #[arg(short, long)]
    pub message: Option<String>,
    /// Version author [default: $LAMINA_AUTHOR, else user@host]
    #[arg(long, env = "LAMINA_AUTHOR")]
    pub author: Option<String>,
}

/// `lamina layer export`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// NAME or NAME@VERSION (default: head)
    pub layer: String,
    /// Destination: a new or empty directory (tree), a new file (disk)
    pub dest: PathBuf,
    /// Replace an existing image file (disk layers)
    #[arg(long)]
    pub force: bool,
}

/// `lamina gc`
#[derive(Debug, Args)]
pub struct GcArgs {
    /// First drop reflog entries older than this many days (default: keep all)
    #[arg(long, value_name = "DAYS")]
    pub expire_reflog: Option<f64>,
    /// Report what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// `lamina vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// VM templates: profile, CPUs, memory, kernel, network policy
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Define a VM: a template and a disk (an image file, nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH)
    Create {
        /// VM name
        name: String,
        /// Template name
        #[arg(long)]
        template: String,
        /// Image file path or NBD URI
        #[arg(long)]
        disk: String,
    },
    /// Start a VM (returns when QEMU answers QMP)
    Start {
        /// VM name
        name: String,
    },
    /// Ask the guest to power off (ACPI); kill QEMU after the timeout
    Stop {
        /// VM name
        name: String,
        /// Seconds to wait for the guest before killing QEMU
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Kill a VM's QEMU at once
    Kill {
        /// VM name
        name: String,
    },
    /// Remove a VM definition and its runtime files (its disk stays)
    Destroy {
        /// VM name
        name: String,
        /// Kill it first if it runs
        #[arg(long)]
        force: bool,
    },
    /// List VMs: name, state, pid, uuid, mac, profile, cpu %, RSS
    Ls,
    /// The accelerator VMs with `--accel auto` get here: KVM if the host's probe passed, else TCG
    Accel {
        /// Probe again instead of using this boot's cached answer
        #[arg(long)]
        reprobe: bool,
    },
    /// Show a VM: definition, state, runtime paths, last exit
    Show {
        /// VM name
        name: String,
    },
    /// Figures of a VM (cpu %, RSS, disk and network counters) and of the host
    Stats {
        /// VM name
        name: String,
        /// Milliseconds over which cpu % is measured
        #[arg(long, default_value_t = 500)]
        interval: u64,
    },
    /// Network peripherals mapped into VMs as local devices
    #[command(subcommand)]
    Peripheral(PeripheralCommand),
    /// Attach to a VM's serial console; detach with Ctrl-]
    Console {
        /// VM name
        name: String,
    },
    /// Save a VM's screen as a PNG
    Screenshot {
        /// VM name
        name: String,
        /// Output file
        file: PathBuf,
    },
    /// Watch a VM's QEMU (started by `vm start`; internal)
    #[command(hide = true)]
    Monitor {
        /// VM name
        name: String,
        /// Runtime directory
        #[arg(long)]
        dir: PathBuf,
        /// Re-attach to a running QEMU instead of starting one
        #[arg(long)]
        attach: bool,
    },
    /// Relay one guest connection of `allow:` networking (run by QEMU; internal)
    #[command(hide = true)]
    Relay {
        /// File that byte counts are appended to
        counters: PathBuf,
        /// Destination host
        host: String,
        /// Destination port
        port: u16,
    },
}

/// `lamina vm template ...`
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Define a template
    Create(TemplateCreateArgs),
    /// List templates
    Ls,
    /// Show a template
    Show {
        /// Template name
        name: String,
    },
    /// Remove a template no VM uses
    Rm {
        /// Template name
        name: String,
    },
}

/// `lamina vm template create`
#[derive(Debug, Args)]
pub struct TemplateCreateArgs {
    /// Template name
    pub name: String,
    /// pc (1280x800) or phone (720x1280, portrait)
    #[arg(long)]
    pub profile: String,
    /// x86_64 or aarch64
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    /// Virtual CPUs
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Memory in MiB
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// Kernel to boot directly (else the disk's boot loader)
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (needs --kernel)
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (needs --kernel)
    #[arg(long)]
    pub append: Option<String>,
    /// none, user, or allow:HOST:PORT,... (only those TCP destinations)
    #[arg(long, default_value = "none")]
    pub net: String,
    /// auto (KVM if it works here, else TCG), kvm or tcg
    #[arg(long, default_value = "auto")]
    pub accel: String,
}

#[cfg(test)]
mod tests {
    /// Clap checks the whole grammar (names used twice, bad defaults) only
    /// when a command is built: do it for every command here, not at a
    /// user's first run of one.
    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
