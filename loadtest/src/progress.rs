//! Progress output while a run goes on: a bar on a terminal, a line every two seconds otherwise.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;

use crate::plan::Progress;

/// Progress output: a bar on a terminal, a line every two seconds otherwise.
pub struct Display {
    bar: Option<ProgressBar>,
    plain: bool,
    start: Instant,
    last: Instant,
    pub phase: &'static str,
    /// The phase of the last line printed.
    printed: &'static str,
}

impl Display {
    pub fn new(print: bool, quiet: bool, total: u64) -> Display {
        use std::io::IsTerminal;
        let on = print && !quiet;
        let tty = on && std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} logins {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        let now = Instant::now();
        Display {
            bar,
            plain: on && !tty,
            start: now,
            last: now,
            phase: "connecting",
            printed: "",
        }
    }

    pub fn update(&mut self, p: &Progress, force: bool) {
        let msg = format!(
            "{} | ok {} failed {} closed {} | sent {} receipts {} received {}",
            self.phase, p.ok, p.failed, p.closed, p.sent, p.receipts, p.received
        );
        if let Some(bar) = &self.bar {
            bar.set_position(p.ok + p.failed);
            bar.set_message(msg);
        } else if self.plain
            && ((force && self.printed != self.phase)
                || self.last.elapsed() >= Duration::from_secs(2))
        {
            self.last = Instant::now();
            self.printed = self.phase;
            eprintln!(
                "[{:>6.1}s] logins {}/{} {}",
                self.start.elapsed().as_secs_f64(),
                p.ok + p.failed,
                p.users,
                msg
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
