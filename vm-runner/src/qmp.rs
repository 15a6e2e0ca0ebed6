//! A minimal QMP client (QEMU Machine Protocol, JSON lines on a Unix socket).
//!
//! Every read has a deadline, so a QEMU that stops answering is an error,
//! never a hang.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A QMP connection in command mode.
pub struct Qmp {
    sock: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for answers.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to `sock`, reads the greeting and negotiates capabilities.
    /// Each read waits at most `timeout`.
    pub fn connect(sock: &Path, timeout: Duration) -> Result<Qmp> {
        let err = |reason: String| Error::Qmp {
            sock: sock.to_path_buf(),
            reason,
        };
        let s = UnixStream::connect(sock).map_err(|e| err(format!("connect: {e}")))?;
        s.set_read_timeout(Some(timeout))
            .and_then(|()| s.set_write_timeout(Some(timeout)))
            .map_err(|e| err(e.to_string()))?;
        let writer = s.try_clone().map_err(|e| err(e.to_string()))?;
        let mut q = Qmp {
            sock: sock.to_path_buf(),
            reader: BufReader::new(s),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("not a QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn err(&self, reason: String) -> Error {
        Error::Qmp {
            sock: self.sock.clone(),
            reason,
        }
    }

    /// Reads one message.
    pub fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.err("QEMU closed the connection".into())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| self.err(format!("bad message {line:?}: {e}"))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(self.err("no answer in time".into()))
            }
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    /// Runs `command` with `arguments`, returns its `return` value. Events
    /// that arrive first are kept (see [`Qmp::take_events`]).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| self.err(format!("{command}: {e}")))?;
        loop {
            let m = self.read()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("error");
                return Err(self.err(format!("{command}: {desc}")));
            }
            if m.get("event").is_some() {
                self.events.push(m);
            }
        }
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Changes the read timeout (`None`: wait for ever, for event loops).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .map_err(|e| self.err(e.to_string()))
    }
}
