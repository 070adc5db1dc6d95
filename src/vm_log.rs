//! Log output of the VM path (`hostd run`, the device backends): one line per event on
//! stderr, `LEVEL message key=value …`, as `tracing_subscriber::fmt` prints them without
//! time and target, filtered by `HOSTD_LOG` (else `RUST_LOG`, else `info`) with the same
//! directive syntax (`warn,hostd_vmm=error`).
//!
//! Not `fmt()` itself: its span registry allocates and fills a table per possible thread
//! (sharded-slab, about 40,000 instructions and eight fresh pages) in every process that
//! starts it, and `hostd run` starts three kinds (itself, the VM's, each backend), where
//! nothing on this path opens a span. Spans are accepted and not printed.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// hostd's log filter: `HOSTD_LOG`, else `RUST_LOG`, else `info` (every subcommand's).
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_env("HOSTD_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the subscriber (and the bridge from the `log` crate) for this process.
pub fn init() {
    let filter = env_filter();
    let lines = Lines {
        ansi: std::io::stderr().is_terminal(),
        next_span: AtomicU64::new(1),
    };
    let _ = lines.with(filter).try_init();
}

struct Lines {
    /// Colour the level, as `fmt` does on a terminal.
    ansi: bool,
    next_span: AtomicU64,
}

/// One event as a line.
fn line(level: &Level, ansi: bool, event: &Event<'_>) -> String {
    let (name, colour) = match *level {
        Level::ERROR => ("ERROR", "31"),
        Level::WARN => (" WARN", "33"),
        Level::INFO => (" INFO", "32"),
        Level::DEBUG => ("DEBUG", "34"),
        Level::TRACE => ("TRACE", "35"),
    };
    let mut out = String::with_capacity(128);
    if ansi {
        out.push_str(&format!("\x1b[{colour}m{name}\x1b[0m "));
    } else {
        out.push_str(name);
        out.push(' ');
    }
    let mut fields = Fields {
        out: &mut out,
        first: true,
    };
    event.record(&mut fields);
    out.push('\n');
    out
}

struct Fields<'a> {
    out: &'a mut String,
    first: bool,
}

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if !self.first {
            self.out.push(' ');
        }
        self.first = false;
        let _ = if field.name() == "message" {
            write!(self.out, "{value:?}")
        } else {
            write!(self.out, "{}={value:?}", field.name())
        };
    }
}

impl Subscriber for Lines {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true // the EnvFilter layer above decides
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let text = line(event.metadata().level(), self.ansi, event);
        // One write per line, so that lines of concurrent threads do not interleave.
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Captures what `line` makes of each event.
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, event: &Event<'_>) {
            if let Ok(mut v) = self.0.lock() {
                v.push(line(event.metadata().level(), false, event));
            }
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    #[test]
    fn lines_look_like_fmt_without_time_and_target() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Capture(seen.clone()), || {
            tracing::info!("booting with {} vCPU(s)", 1);
            tracing::warn!(device = "rng", code = 3, "backend ended");
            tracing::error!("failed: {}", "why");
        });
        let seen = seen.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(
            seen,
            [
                " INFO booting with 1 vCPU(s)\n",
                " WARN backend ended device=\"rng\" code=3\n",
                "ERROR failed: why\n",
            ]
        );
    }
}
