//! Arguments of the broker's commands: `host-agent`, `host`, `pool`,
//! `session`, `audit`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `lamina desktop ...`
#[derive(Debug, Subcommand)]
pub enum DesktopCommand {
    /// Register a desktop of another VDI product (any VNC server) as a member of a pool
    Add {
        /// Desktop name (unique among the pools' VMs)
        name: String,
        /// Its VNC server
        #[arg(long, value_name = "HOST:PORT")]
        vnc: String,
        /// File holding its VNC password (the broker answers the challenge; browsers never see it)
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Pool it joins
        #[arg(long, value_name = "POOL")]
        pool: String,
    },
    /// List external desktops
    Ls,
    /// Remove an external desktop (refused while in a session)
    Rm {
        /// Desktop name
        name: String,
    },
}

/// TLS of `lamina server` and `lamina host-agent`.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// TLS certificate chain (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Plain HTTP instead of TLS (loopback addresses only, for development)
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure: bool,
}

/// `lamina host-agent`
#[derive(Debug, Args)]
pub struct HostAgentArgs {
    /// Address to listen on
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8444")]
    pub listen: String,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Memory this host may give VMs in all, MiB [default: all of the host's]
    #[arg(long, value_name = "MiB")]
    pub memory: Option<u64>,
}

/// `lamina host ...`
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Register a host agent with this (the broker's) store
    Add {
        /// Host name
        name: String,
        /// The agent's URL (https://HOST:PORT)
        url: String,
        /// File holding a token of an admin of the host's store
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
        /// CA certificate (PEM) that signed the agent's certificate
        #[arg(long, value_name = "CERT")]
        ca: Option<PathBuf>,
    },
    /// List hosts (with their load and VMs when asked through a running server)
    Ls {
        /// Ask the server behind this remote for the hosts' live status
        #[arg(long)]
        remote: Option<String>,
    },
    /// Remove a host (refused while pool VMs are on it)
    Rm {
        /// Host name
        name: String,
    },
}

/// `lamina pool create`
#[derive(Debug, Args)]
pub struct PoolCreateArgs {
    /// Pool name
    pub name: String,
    /// VM template (defined on every host)
    #[arg(long)]
    pub template: String,
    /// Disk layer (or LAYER@VERSION) each VM's disk starts from (on every host)
    #[arg(long)]
    pub base: String,
    /// Started, unassigned VMs to keep ready
    #[arg(long, default_value_t = 1)]
    pub min_idle: u32,
    /// VMs the pool may have in all
    #[arg(long)]
    pub max: u32,
    /// Desktops one user may hold at once
    #[arg(long, default_value_t = 1)]
    pub per_user: u32,
    /// Reset a VM's disk when its session ends (else the VM stays the user's)
    #[arg(long)]
    pub stateless: bool,
    /// Reclaim sessions unused for this long (e.g. 30m)
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
}

/// `lamina pool ...`
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool
    Create(PoolCreateArgs),
    /// List pools with their VMs' counts
    Ls,
    /// Show a pool, its rules and its VMs
    Show {
        /// Pool name
        name: String,
    },
    /// Print a pool's rules as TOML, or replace them from a file
    Rules {
        /// Pool name
        name: String,
        /// TOML file with the new rules (see `lamina pool rules --help`)
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Let a user or @group ask the pool for desktops
    Subscribe {
        /// Pool name
        pool: String,
        /// USER or @GROUP
        who: String,
    },
    /// Withdraw a subscription
    Unsubscribe {
        /// Pool name
        pool: String,
        /// USER or @GROUP
        who: String,
    },
    /// Remove a pool without VMs
    Rm {
        /// Pool name
        name: String,
    },
}

/// `lamina session ...`
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Ask a pool of the server behind REMOTE for a desktop
    Open {
        /// Remote name
        remote: String,
        /// Pool name
        pool: String,
        /// One more desktop beside those already held (up to the pool's per-user)
        #[arg(long)]
        another: bool,
    },
    /// End a session (yours; any for an admin)
    End {
        /// Remote name
        remote: String,
        /// Session id
        id: String,
    },
    /// List sessions: on this store, or yours (all for an admin) on a remote
    Ls {
        /// Ask the server behind this remote
        #[arg(long)]
        remote: Option<String>,
    },
}

/// `lamina audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The audit log, oldest first
    Ls {
        /// Only entries of the last DURATION (1h, 2d) or since a time (RFC 3339)
        #[arg(long)]
        since: Option<String>,
    },
}
