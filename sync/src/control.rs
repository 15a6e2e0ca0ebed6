//! One-line JSON requests over a Unix socket: how a command reaches the
//! long-running process that holds something it needs (a mount daemon
//! holding a composition's uppers, a server holding a disk's overlay).
//!
//! One request per connection: the client writes one JSON line, the
//! listener answers one line, `{"ok":ANSWER}` or `{"error":"MESSAGE"}`.
//! The socket lives in the store directory, so only whoever can reach the
//! store can reach it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer<T> {
    Ok(T),
    Error(String),
}

/// Listens on `path` (replacing a socket a dead process left) and answers
/// each request with `handle` on a thread of its own, until the process
/// ends.
///
/// # Errors
/// The socket cannot be made or the thread started.
pub fn serve<Q, A, F>(path: &Path, thread: &str, handle: F) -> Result<()>
where
    Q: DeserializeOwned,
    A: Serialize,
    F: Fn(Q) -> std::result::Result<A, String> + Send + 'static,
{
    // A socket left by a process that died: nobody listens on it.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).ctx(path, "listen on the control socket")?;
    let shown = path.to_owned();
    std::thread::Builder::new()
        .name(thread.to_owned())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(&conn, &handle) {
                    tracing::warn!(socket = %shown.display(), error = %e, "control request failed");
                }
            }
        })
        .map_err(|e| Error::io(path, "start the control thread", e))?;
    Ok(())
}

fn answer<Q, A>(
    conn: &UnixStream,
    handle: &dyn Fn(Q) -> std::result::Result<A, String>,
) -> std::io::Result<()>
where
    Q: DeserializeOwned,
    A: Serialize,
{
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let answer = match serde_json::from_str::<Q>(&line) {
        Ok(req) => match handle(req) {
            Ok(a) => Answer::Ok(a),
            Err(e) => Answer::Error(e),
        },
        Err(e) => Answer::Error(format!("malformed request: {e}")),
    };
    let mut out = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    out.push(b'\n');
    let mut w = conn;
    w.write_all(&out)
}

/// Sends `req` to the listener on `path` and waits up to `timeout` for its
/// answer. `Ok(None)` when nobody listens there.
///
/// # Errors
/// [`Error::InvalidInput`] carrying the listener's error message; I/O
/// failures talking to it.
pub fn request<Q, A>(
    path: &Path,
    req: &Q,
    timeout: Duration,
) -> Result<Option<std::result::Result<A, String>>>
where
    Q: Serialize,
    A: DeserializeOwned,
{
    let conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(Error::io(
                path,
                "reach the process on the control socket",
                e,
            ))
        }
    };
    conn.set_read_timeout(Some(timeout))
        .ctx(path, "set a timeout")?;
    let mut bytes = serde_json::to_vec(req).map_err(|e| Error::InvalidInput(e.to_string()))?;
    bytes.push(b'\n');
    (&conn)
        .write_all(&bytes)
        .ctx(path, "send on the control socket")?;
    let mut line = String::new();
    BufReader::new(&conn)
        .read_line(&mut line)
        .ctx(path, "read the answer on the control socket")?;
    match serde_json::from_str::<Answer<A>>(&line) {
        Ok(Answer::Ok(a)) => Ok(Some(Ok(a))),
        Ok(Answer::Error(e)) => Ok(Some(Err(e))),
        Err(e) => Ok(Some(Err(format!("unreadable answer {line:?}: {e}")))),
    }
}
