//! Log output of the VM path (`hostd run`, the device backends): one line per event on
//! stderr, `LEVEL message key=value …`, as `tracing_subscriber::fmt` prints them without
//! time and target, filtered by `HOSTD_LOG` (else `RUST_LOG`, else `info`) with the same
//! directive syntax (`warn,hostd_vmm=error`).
//!
//! Not `fmt()` itself: its span registry allocates and fills a table per possible thread
//! (sharded-slab, about 40,000 instructions and eight fresh pages) in every process that
//! starts it, and `hostd run` starts three kinds (itself, the VM's, each backend), where
//! nothing on this path opens a span. Spans are accepted and not printed.
//!
//! Nor `EnvFilter` for the usual filters (a level, `target=level` pairs): building one
//! runs ~2,200 distinct instructions of its parser and directive sets, and installing it
//! ~800 more, about a fifth of all the code `hostd run` runs before its VM's process
//! starts. Code run for the first time is what a process start costs where it is
//! emulated (the nested test host, docs/startup.md: ~2.3 µs per distinct instruction
//! there), so those filters are read and applied here ([`Simple`]), with `EnvFilter`'s
//! meaning; anything else (spans, fields, numeric levels, a malformed value) still goes
//! to `EnvFilter`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
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
    let lines = |filter| Lines {
        ansi: std::io::stderr().is_terminal(),
        next_span: AtomicU64::new(1),
        filter,
    };
    match Simple::from_env() {
        Some(simple) => {
            let max = simple.max;
            // As `try_init` does: the global subscriber, then `log`'s records up to the
            // same level through it.
            if tracing::subscriber::set_global_default(lines(Some(simple))).is_ok() {
                let _ = tracing_log::LogTracer::builder()
                    .with_max_level(tracing_log::AsLog::as_log(&max))
                    .init();
            }
        }
        None => {
            let _ = lines(None).with(env_filter()).try_init();
        }
    }
}

/// A filter of levels by target: what `EnvFilter` makes of directives that are each
/// `LEVEL`, `TARGET` or `TARGET=LEVEL` (levels by name; a target of ASCII letters,
/// digits, `_`, `:` and `-`). An event is enabled by the directive with the longest
/// target its own target starts with (a bare level matches every target; a later
/// directive for the same target replaces an earlier one) when its level is at most
/// that directive's; by none, it is not.
#[derive(Debug, PartialEq)]
struct Simple {
    /// Longest target first, the bare level (if any) last.
    directives: Vec<(Option<String>, LevelFilter)>,
    /// The most verbose level of any directive.
    max: LevelFilter,
}

impl Simple {
    /// `HOSTD_LOG`, else `RUST_LOG`, else `info`, as [`env_filter`] chooses, when the
    /// chosen value is of the simple kind; None when [`env_filter`] must decide (an
    /// unset or malformed `HOSTD_LOG` is passed over for `RUST_LOG` there).
    fn from_env() -> Option<Simple> {
        match std::env::var("HOSTD_LOG") {
            Ok(v) => Simple::parse(&v),
            Err(std::env::VarError::NotUnicode(_)) => None,
            Err(std::env::VarError::NotPresent) => match std::env::var("RUST_LOG") {
                Ok(v) => Simple::parse(&v),
                Err(std::env::VarError::NotUnicode(_)) => None,
                Err(std::env::VarError::NotPresent) => Simple::parse("info"),
            },
        }
    }

    /// None unless every directive of `spec` is of the simple kind.
    fn parse(spec: &str) -> Option<Simple> {
        // A level by name (tracing's own parser, which also takes numbers and "").
        let level = |s: &str| {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic()))
                .then(|| s.parse::<LevelFilter>().ok())
                .flatten()
        };
        let target_ok = |t: &str| {
            t.bytes().any(|b| !b.is_ascii_digit())
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-'))
        };
        let mut directives: Vec<(Option<String>, LevelFilter)> = Vec::new();
        for d in spec.split(',').filter(|d| !d.is_empty()) {
            let (target, level) = match d.split_once('=') {
                Some((t, l)) => (Some(t), level(l)?),
                None => match level(d) {
                    Some(l) => (None, l),
                    None => (Some(d), LevelFilter::TRACE),
                },
            };
            if target.is_some_and(|t| !target_ok(t)) {
                return None;
            }
            let target = target.map(str::to_owned);
            directives.retain(|(t, _)| *t != target);
            directives.push((target, level));
        }
        if directives.is_empty() {
            return None;
        }
        directives.sort_by_key(|(t, _)| std::cmp::Reverse(t.as_ref().map(String::len)));
        let max = directives
            .iter()
            .map(|(_, l)| *l)
            .max()
            .unwrap_or(LevelFilter::OFF);
        Some(Simple { directives, max })
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.directives
            .iter()
            .find(|(t, _)| t.as_deref().is_none_or(|t| meta.target().starts_with(t)))
            .is_some_and(|(_, level)| level >= meta.level())
    }
}

struct Lines {
    /// Colour the level, as `fmt` does on a terminal.
    ansi: bool,
    next_span: AtomicU64,
    /// The filter, when it is not an `EnvFilter` layer above.
    filter: Option<Simple>,
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
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        // Without a filter of its own, the EnvFilter layer above decides.
        self.filter.as_ref().is_none_or(|f| f.enabled(meta))
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.filter.as_ref().map(|f| f.max)
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

    /// Captures each event: what `line` makes of it, or with `target_level` its target
    /// and level only; filtered by `filter`, if any.
    struct Capture {
        seen: Arc<Mutex<Vec<String>>>,
        target_level: bool,
        filter: Option<Simple>,
    }

    impl Subscriber for Capture {
        fn enabled(&self, meta: &Metadata<'_>) -> bool {
            self.filter.as_ref().is_none_or(|f| f.enabled(meta))
        }
        fn max_level_hint(&self) -> Option<LevelFilter> {
            self.filter.as_ref().map(|f| f.max)
        }
        fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
            span::Id::from_u64(1)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, event: &Event<'_>) {
            let m = event.metadata();
            let text = if self.target_level {
                format!("{}:{}", m.target(), m.level())
            } else {
                line(m.level(), false, event)
            };
            if let Ok(mut v) = self.seen.lock() {
                v.push(text);
            }
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    #[test]
    fn lines_look_like_fmt_without_time_and_target() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let capture = Capture {
            seen: seen.clone(),
            target_level: false,
            filter: None,
        };
        tracing::subscriber::with_default(capture, || {
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

    /// Which of a grid of events (six targets, five levels) pass `filter`, or, without
    /// it, an `EnvFilter` of `spec`.
    fn passed(spec: &str, filter: Option<Simple>) -> Vec<String> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Capture {
            seen: seen.clone(),
            target_level: true,
            filter,
        };
        let dispatch = if record.filter.is_some() {
            tracing::Dispatch::new(record)
        } else {
            tracing::Dispatch::new(record.with(EnvFilter::new(spec)))
        };
        macro_rules! grid {
            ($($t:literal),*) => {$(
                tracing::event!(target: $t, Level::ERROR, "e");
                tracing::event!(target: $t, Level::WARN, "w");
                tracing::event!(target: $t, Level::INFO, "i");
                tracing::event!(target: $t, Level::DEBUG, "d");
                tracing::event!(target: $t, Level::TRACE, "t");
            )*};
        }
        tracing::dispatcher::with_default(&dispatch, || {
            grid!(
                "hostd",
                "hostd_vmm",
                "hostd_vmm::kvm",
                "hostd_devices",
                "vhost",
                "x-y"
            );
        });
        let v = seen.lock().map(|v| v.clone()).unwrap_or_default();
        v
    }

    #[test]
    fn simple_filters_pass_what_env_filter_passes() {
        for spec in [
            "info",
            "warn",
            "off",
            "TRACE",
            "Debug",
            "hostd_vmm",
            "hostd_vmm=debug",
            "warn,hostd_vmm=error",
            "error,hostd_vmm=trace,hostd_vmm::kvm=warn",
            "hostd=debug",
            "hostd=info,hostd_vmm=off,debug",
            "info,warn",
            "hostd_vmm=trace,hostd_vmm=error",
            "x-y=trace,,error",
            "vhost=warn,hostd_devices",
        ] {
            let simple = Simple::parse(spec).unwrap_or_else(|| panic!("{spec} is simple"));
            assert_eq!(passed(spec, Some(simple)), passed(spec, None), "{spec}");
        }
        // Not vacuous: what one of them passes, spelled out.
        assert_eq!(
            passed(
                "",
                Simple::parse("debug,hostd_vmm=warn,hostd_vmm::kvm=off,vhost=error")
            ),
            [
                "hostd:ERROR",
                "hostd:WARN",
                "hostd:INFO",
                "hostd:DEBUG",
                "hostd_vmm:ERROR",
                "hostd_vmm:WARN",
                "hostd_devices:ERROR",
                "hostd_devices:WARN",
                "hostd_devices:INFO",
                "hostd_devices:DEBUG",
                "vhost:ERROR",
                "x-y:ERROR",
                "x-y:WARN",
                "x-y:INFO",
                "x-y:DEBUG",
            ]
        );
    }

    #[test]
    fn other_filters_are_left_to_env_filter() {
        for spec in [
            "",
            ",",
            "3",
            "hostd=3",
            "hostd=",
            "=warn",
            "a=b=c",
            "hostd=verbose",
            " warn",
            "hostd[run]=debug",
            "[{device=rng}]=trace",
            "hostd{x}=info",
            "héllo=info",
        ] {
            assert_eq!(Simple::parse(spec), None, "{spec:?}");
        }
    }
}
