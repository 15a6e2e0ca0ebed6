//! Attaching a terminal to a VM's serial console.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};
use crate::rundir::RunDir;

/// The byte that detaches: Ctrl-] (as telnet and `virsh console`).
pub const DETACH: u8 = 0x1d;

/// Copies `input` to the serial console and the console to `output` until
/// `input` sends [`DETACH`] or ends, or QEMU closes the console. Bytes
/// before a detach in the same read are still sent.
pub fn attach(
    dir: &RunDir,
    mut input: impl Read + Send + 'static,
    mut output: impl Write + Send + 'static,
) -> Result<()> {
    let path = dir.console_sock();
    let sock = UnixStream::connect(&path).map_err(|e| {
        Error::Invalid(format!(
            "console {}: {e} (is the VM running?)",
            path.display()
        ))
    })?;
    let mut from_vm = sock.try_clone().at(&path)?;
    let to_vm = sock;
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0
                || output
                    .write_all(&buf[..n])
                    .and_then(|()| output.flush())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut to = to_vm.try_clone().at(&path)?;
    let mut buf = [0u8; 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let (send, detach) = match chunk.iter().position(|b| *b == DETACH) {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        if to.write_all(send).is_err() || detach {
            break;
        }
        if reader.is_finished() {
            break;
        }
    }
    // Give the guest's answer to the last input a moment to arrive.
    std::thread::sleep(Duration::from_millis(300));
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    Ok(())
}
