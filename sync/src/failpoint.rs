//! Named crash points for tests.
//!
//! With `LAMINA_FAILPOINT=<name>` in the environment, the process aborts at
//! the point of that name, without unwinding or running destructors, as if
//! killed there. Tests use this to land a crash exactly between two steps
//! whose order matters; random `kill -9` rarely hits such a window.
//! Points: `pack-forgotten` (gc: a pack's entry removed, file not yet),
//! `pack-rewritten` (gc: live chunks copied and indexed, old pack still
//! there), `import-flushed` (import: chunks durable, version not committed).

use std::sync::OnceLock;

static POINT: OnceLock<Option<String>> = OnceLock::new();

/// Aborts the process if `name` is the configured failpoint.
pub(crate) fn hit(name: &str) {
    let armed = POINT.get_or_init(|| std::env::var("LAMINA_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        eprintln!("lamina: failpoint {name}: aborting");
        std::process::abort();
    }
}
