//! Progress bar (step, loss, tokens/s, ETA) and log lines for long work.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    label: String,
    started: Instant,
    /// No bar and no log lines (ranks other than 0 of a data-parallel run).
    quiet: bool,
}

impl Progress {
    /// A bar over `total` steps, starting at `start` (a resumed run), drawn on stderr when it
    /// is a terminal; log lines are printed either way.
    pub fn new(label: &str, total: u64, start: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:28.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar.set_position(start);
        bar.reset_eta();
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress {
            bar,
            label: label.to_string(),
            started: Instant::now(),
            quiet: false,
        }
    }

    /// [`new`](Self::new) on rank 0 of a run; silent on the other ranks.
    pub fn for_rank(label: &str, total: u64, start: u64, is_main: bool) -> Self {
        if is_main {
            return Self::new(label, total, start);
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        Progress {
            bar,
            label: label.to_string(),
            started: Instant::now(),
            quiet: true,
        }
    }

    pub fn set(&self, step: u64, msg: String) {
        self.bar.set_position(step);
        self.bar.set_message(msg);
    }

    /// Print a line above the bar (or plainly when there is no terminal).
    pub fn log(&self, line: &str) {
        if self.quiet {
            return;
        }
        let label = &self.label;
        self.bar.suspend(|| eprintln!("[{label}] {line}"));
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// `12.3k`-style rendering for tokens/s.
pub fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
