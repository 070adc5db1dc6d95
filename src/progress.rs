//! Progress of `hostd build`'s long steps (downloads, unpacking): a bar on a terminal,
//! plain lines on stderr otherwise (logs, CI).

use hostd_images::progress::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;

/// The CLI's progress display.
pub struct CliProgress {
    bar: Mutex<Option<ProgressBar>>,
    step: Mutex<(String, u64, u64)>,
    terminal: bool,
}

impl CliProgress {
    /// A bar when stderr is a terminal, lines otherwise.
    pub fn new() -> Self {
        CliProgress {
            bar: Mutex::new(None),
            step: Mutex::new((String::new(), 0, 0)),
            terminal: std::io::stderr().is_terminal(),
        }
    }
}

fn amount(n: u64, bytes: bool) -> String {
    if bytes {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else {
        n.to_string()
    }
}

impl Progress for CliProgress {
    fn begin(&self, what: &str, total: u64, bytes: bool) {
        if self.terminal {
            let template = if bytes {
                "hostd: {msg} [{bar:30}] {bytes}/{total_bytes} {eta}"
            } else {
                "hostd: {msg} [{bar:30}] {pos}/{len}"
            };
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            if let Ok(mut b) = self.bar.lock() {
                *b = Some(bar);
            }
        } else {
            if bytes {
                eprintln!("hostd: {what} ({})", amount(total, bytes));
            } else {
                eprintln!("hostd: {what}");
            }
            if let Ok(mut s) = self.step.lock() {
                *s = (what.to_string(), 0, if bytes { total } else { 0 });
            }
        }
    }

    fn advance(&self, n: u64, item: &str) {
        if self.terminal {
            if let Ok(b) = self.bar.lock() {
                if let Some(b) = b.as_ref() {
                    b.inc(n);
                }
            }
        } else if let Ok(mut s) = self.step.lock() {
            s.1 += n;
            // Byte-counted steps (downloads) get a line per batch; item-counted ones
            // (unpacking, fast) only their first line.
            if s.2 > 0 {
                eprintln!(
                    "hostd:   {} of {} ({item})",
                    amount(s.1, true),
                    amount(s.2, true)
                );
            }
        }
    }

    fn end(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        }
    }
}
