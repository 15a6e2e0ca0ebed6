//! The client side's grammar: hotelling, portable bundles, dissemination.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::SyncWho;

/// `lamina hotel ...`
#[derive(Debug, Subcommand)]
pub enum HotelCommand {
    /// Cached OS layers with their size, last use and users
    Ls,
    /// Check an OS layer out of a remote and keep it cached (evicting the least recently used past the limit)
    Add {
        /// REMOTE:LAYER
        spec: String,
        #[command(flatten)]
        who: SyncWho,
    },
    /// Drop a cached OS layer that nothing uses and free its space
    Rm {
        /// Layer name
        layer: String,
    },
    /// Move a composition or a disk onto another cached OS layer (nothing is downloaded)
    Switch {
        /// Composition or disk name
        target: String,
        /// A cached os layer
        layer: String,
        /// A disk's changes since its last commit are dropped (they do not carry over to another OS)
        #[arg(long)]
        discard_changes: bool,
    },
    /// Show or set the cache's size limit (suffixes K, M, G, T)
    Limit {
        /// New limit
        size: Option<String>,
        /// Remove the limit
        #[arg(long, conflicts_with = "size")]
        clear: bool,
    },
}

/// `lamina bundle ...`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Write a self-contained bundle (binary, store, launcher) to DIR for use offline on another computer
    Create(BundleCreateArgs),
    /// Verify a bundle: its manifest, its binary and every byte of its store
    Check {
        /// Bundle directory
        dir: PathBuf,
    },
    /// What `DIR/lamina-run` runs: check the bundle, then mount, boot or sync
    Run {
        /// Bundle directory
        dir: PathBuf,
        #[command(subcommand)]
        action: BundleRun,
    },
}

/// `lamina bundle create`
#[derive(Debug, Args)]
pub struct BundleCreateArgs {
    /// Directory to write (on the removable storage); must be empty or absent
    pub dir: PathBuf,
    /// Remote the user's layers come from
    #[arg(long)]
    pub remote: String,
    /// The user the bundle is for (asked for a token when it syncs)
    #[arg(long)]
    pub user: String,
    /// Layers to carry [default: every layer tracked from the remote]
    #[arg(long = "layer", value_name = "LAYER")]
    pub layers: Vec<String>,
    #[command(flatten)]
    pub who: SyncWho,
}

/// `lamina bundle run DIR ...`
#[derive(Debug, Subcommand)]
pub enum BundleRun {
    /// Mount the user's desktop tree (the bundle's composition) at DIR
    Mount {
        /// Mount point
        mountpoint: PathBuf,
    },
    /// Unmount it (pending changes stay in the bundle)
    Umount {
        /// Mount point
        mountpoint: PathBuf,
    },
    /// Boot the user's disk in QEMU (TCG where KVM is missing), console on this terminal
    Boot {
        /// Memory in MiB
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Stop after this long (e.g. 5m) [default: until the guest powers off]
        #[arg(long)]
        timeout: Option<String>,
        /// Boot this kernel directly (for disks without a boot loader)
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        /// Its initrd
        #[arg(long, value_name = "FILE", requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Its command line
        #[arg(long, requires = "kernel", default_value = "console=ttyS0")]
        append: String,
    },
    /// Commit offline work and check it in to the remote (asks for a token: $LAMINA_TOKEN, --token-file or the terminal)
    Sync {
        /// File holding the user's token
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Verify the bundle (as every other action does first)
    Check,
    /// What the bundle holds and what is pending
    Status,
}

/// `lamina disseminate`
#[derive(Debug, Args)]
pub struct DisseminateArgs {
    /// A tree layer (its head's files) or local files and directories
    #[arg(required = true, value_name = "LAYER-OR-PATHS")]
    pub sources: Vec<String>,
    /// Group whose members receive them: @GROUP
    #[arg(long, value_name = "@GROUP")]
    pub to: String,
    /// Directory inside each data layer to place them in
    #[arg(long, default_value = "/")]
    pub at: String,
    /// Each member's data layer [default: the one data layer granted to them, else user/{user}/data]
    #[arg(long, value_name = "TEMPLATE")]
    pub into: Option<String>,
    /// Version message
    #[arg(long, short)]
    pub message: Option<String>,
    /// Version author [default: $LAMINA_AUTHOR, else user@host]
    #[arg(long, env = "LAMINA_AUTHOR")]
    pub author: Option<String>,
}

/// `lamina collect`
#[derive(Debug, Args)]
pub struct CollectArgs {
    /// Path inside each member's data layer
    pub path: String,
    /// Group whose members' copies to gather: @GROUP
    #[arg(long, value_name = "@GROUP")]
    pub from: String,
    /// Directory to write DEST/USER/… into
    pub dest: PathBuf,
    /// Each member's data layer [default: the one data layer granted to them, else user/{user}/data]
    #[arg(long, value_name = "TEMPLATE")]
    pub into: Option<String>,
}
