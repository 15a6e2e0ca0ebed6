//! The grammar of `lamina vm peripheral ...`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

/// `lamina vm peripheral ...`
#[derive(Debug, Subcommand)]
pub enum PeripheralCommand {
    /// Map a network peripheral into a VM as a local device (a serial port, a parallel port, a USB device); one peripheral serves one VM
    Add(PeripheralAddArgs),
    /// List peripherals (of one VM, or of all): guest device, link, state, bytes each way
    Ls {
        /// Only this VM's
        vm: Option<String>,
    },
    /// Take a peripheral out of a VM (its link is cut at once)
    Rm {
        /// VM name
        vm: String,
        /// Peripheral name
        name: String,
    },
}

/// `lamina vm peripheral add`
#[derive(Debug, Args)]
pub struct PeripheralAddArgs {
    /// VM name
    pub vm: String,
    /// Peripheral name (unique over all VMs)
    pub name: String,
    /// serial (ttyS1.. on x86), printer (lp0.. on x86: raw jobs to a port-9100 style server) or usb (usb-redir to a usbredir server)
    #[arg(long)]
    pub kind: String,
    /// Connect to the peripheral's server: tcp:HOST:PORT
    #[arg(
        long,
        value_name = "tcp:HOST:PORT",
        conflicts_with = "listen",
        required_unless_present = "listen"
    )]
    pub connect: Option<String>,
    /// Listen for the peripheral's station: tcp:ADDR:PORT (one connection at a time)
    #[arg(long, value_name = "tcp:ADDR:PORT")]
    pub listen: Option<String>,
    /// TLS: CA certificate(s) the peer's certificate must chain to (listening: clients must show one)
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// TLS: this side's certificate (a client certificate when connecting)
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: its private key
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}
