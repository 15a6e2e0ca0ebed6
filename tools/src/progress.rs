//! Progress bars on stderr (only on a terminal, never with --json/--quiet).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lamina_sync::Progress;

/// An indicatif bar implementing the library's [`Progress`].
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    /// A bar when `enabled`, else a silent sink.
    pub fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
                b.set_style(style);
            }
            b.set_message("starting");
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        });
        Self { bar }
    }
}

impl Progress for Bar {
    fn phase(&self, name: &str, total: Option<u64>) {
        let Some(b) = &self.bar else { return };
        b.set_position(0);
        b.set_length(total.unwrap_or(0));
        let template = if total.is_some() {
            "{msg:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{spinner} {msg} {bytes}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            b.set_style(style.progress_chars("=> "));
        }
        b.set_message(name.to_owned());
    }

    fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
