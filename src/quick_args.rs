//! `hostd run`'s command line without clap, for the command lines a VM is usually
//! started with: each word a known option (`--name VALUE`, `--name=VALUE`, a flag) or
//! the image. Anything else (`--help`, `--version`, an unknown or repeated option, a
//! missing or unparsable value, two images, `--kernel` with an image, …) is left to
//! clap, which parses the same words and gives its help or its error; so what a user
//! sees is clap's, and a command line this parser takes gives the same [`RunArgs`] as
//! clap would (tests below compare the two, and check that every argument clap knows
//! is known here).
//!
//! Why: `hostd run` is the start of every VM, and clap builds its whole command (every
//! argument, its help, its checks) before it looks at a word: in the nested test host,
//! where every piece of code run for the first time is translated by QEMU,
//! that was 40-60 ms of hostd's start (docs/startup.md); this parser is a loop over
//! the words.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::ValueEnum;

use crate::image_cmd::{AccelArg, RunArgs, TemplateArg, VmmKind};

/// Options that take a value, by long name.
const VALUED: &[&str] = &[
    "kernel",
    "initrd",
    "vmm",
    "accel",
    "cpu-template",
    "vcpus",
    "mem",
    "cmdline",
    "timeout",
    "net",
    "state-dir",
    "secret",
    "secret-dir",
    "snapshot-cache",
    "trust",
];

/// Options without a value.
const FLAGS: &[&str] = &["timings", "no-sandbox"];

/// `hostd run`'s arguments from `words` (the words after `run`), or `None` where clap
/// must parse them (see the module's documentation).
pub fn run_args(words: &[OsString]) -> Option<RunArgs> {
    let mut a = RunArgs {
        image: None,
        kernel: None,
        initrd: None,
        // clap's defaults (`default_value`), the tests check; named, not parsed: clap's
        // parser of a value runs only for a value given.
        vmm: VmmKind::Kvm,
        accel: AccelArg::Auto,
        cpu_template: TemplateArg::Auto,
        vcpus: None,
        mem: None,
        cmdline: None,
        timings: false,
        timeout: None,
        net: None,
        state_dir: None,
        no_sandbox: false,
        secrets: Vec::new(),
        secret_dir: None,
        snapshot_cache: None,
        trust: Vec::new(),
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let word = word.to_str()?;
        let Some(option) = word.strip_prefix("--") else {
            // The image: one, and not something that looks like an option.
            if word.starts_with('-') || word.is_empty() || a.image.is_some() {
                return None;
            }
            a.image = Some(PathBuf::from(word));
            continue;
        };
        let (name, inline) = match option.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (option, None),
        };
        if let Some(flag) = FLAGS.iter().find(|f| **f == name) {
            if inline.is_some() || seen.contains(flag) {
                return None;
            }
            seen.push(flag);
            match name {
                "timings" => a.timings = true,
                _ => a.no_sandbox = true,
            }
            continue;
        }
        let name = *VALUED.iter().find(|v| **v == name)?;
        let value = match inline {
            Some(v) => v,
            // A separate value that looks like an option is clap's to judge.
            None => words.next()?.to_str().filter(|v| !v.starts_with('-'))?,
        };
        if value.is_empty() {
            return None;
        }
        let repeatable = matches!(name, "secret" | "trust");
        if !repeatable && seen.contains(&name) {
            return None;
        }
        seen.push(name);
        match name {
            "kernel" => a.kernel = Some(value.into()),
            "initrd" => a.initrd = Some(value.into()),
            "vmm" => a.vmm = ValueEnum::from_str(value, false).ok()?,
            "accel" => a.accel = ValueEnum::from_str(value, false).ok()?,
            "cpu-template" => a.cpu_template = ValueEnum::from_str(value, false).ok()?,
            "vcpus" => a.vcpus = Some(value.parse().ok()?),
            "mem" => a.mem = Some(value.to_string()),
            "cmdline" => a.cmdline = Some(value.to_string()),
            "timeout" => a.timeout = Some(value.parse().ok()?),
            "net" => a.net = Some(hostd_vmm::plan::NetConfig::parse(value).ok()?),
            "state-dir" => a.state_dir = Some(value.into()),
            "secret" => a
                .secrets
                .push(hostd_vmm::plan::parse_secret_arg(value).ok()?),
            "secret-dir" => a.secret_dir = Some(value.into()),
            "snapshot-cache" => a.snapshot_cache = Some(value.into()),
            _ => a.trust.push(value.into()),
        }
    }
    // clap's checks: an image or a kernel, not both; --initrd only with --kernel,
    // --trust only with an image.
    let ok = a.image.is_some() != a.kernel.is_some()
        && (a.initrd.is_none() || a.kernel.is_some())
        && (a.trust.is_empty() || a.image.is_some());
    ok.then_some(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    fn words(line: &[&str]) -> Vec<OsString> {
        line.iter().map(OsString::from).collect()
    }

    fn clap(line: &[&str]) -> Result<RunArgs, clap::Error> {
        Run::try_parse_from(std::iter::once("run").chain(line.iter().copied())).map(|r| r.args)
    }

    /// Every argument clap knows for `hostd run` is known here (a new one must be
    /// added to this parser, or it would send every command line with it to clap).
    #[test]
    fn knows_every_argument_clap_knows() {
        let cmd = Run::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "image" {
                continue;
            }
            let long = arg
                .get_long()
                .unwrap_or_else(|| panic!("{id}: no long name"));
            assert!(
                VALUED.contains(&long) || FLAGS.contains(&long),
                "--{long} is not known to quick_args"
            );
            assert_eq!(
                FLAGS.contains(&long),
                !arg.get_action().takes_values(),
                "--{long}: flag or value differs from clap's"
            );
        }
        assert_eq!(
            VALUED.len() + FLAGS.len(),
            cmd.get_arguments()
                .filter(|a| !matches!(a.get_id().as_str(), "help" | "image"))
                .count()
        );
    }

    /// Command lines this parser takes give what clap gives.
    #[test]
    fn same_as_clap() {
        let lines: &[&[&str]] = &[
            &["app.img"],
            &["app.img", "--timings"],
            &["--timings", "app.img", "--no-sandbox"],
            &[
                "--timings",
                "--cmdline",
                "console=ttyS0 probe.exit=0",
                "--kernel",
                "./probe",
            ],
            &[
                "--kernel=./vmlinux",
                "--initrd=./initrd",
                "--cmdline=a=b c=d",
            ],
            &["--kernel", "k", "--vmm", "qemu", "--accel", "tcg"],
            &[
                "app.img",
                "--cpu-template",
                "host",
                "--vcpus",
                "2",
                "--mem",
                "1G",
            ],
            &["app.img", "--vcpus=+3", "--timeout", "30"],
            &["app.img", "--net", "tap=tap0,ip=10.0.0.2/24,gw=10.0.0.1"],
            &["app.img", "--secret", "db=@/run/db", "--secret=api=@./api"],
            &["app.img", "--secret-dir", "/s", "--state-dir", "/st"],
            &[
                "app.img",
                "--snapshot-cache",
                "/snap",
                "--trust",
                "a.pub",
                "--trust=b.pub",
            ],
            &["app.img", "--vmm=kvm", "--cpu-template=pvm", "--accel=kvm"],
        ];
        for line in lines {
            let quick = run_args(&words(line)).unwrap_or_else(|| panic!("not taken: {line:?}"));
            let clap = clap(line).unwrap_or_else(|e| panic!("clap refused {line:?}: {e}"));
            assert_eq!(format!("{quick:?}"), format!("{clap:?}"), "{line:?}");
        }
    }

    /// What this parser leaves to clap: mistakes (clap then gives its message), help,
    /// version, and forms it does not take.
    #[test]
    fn leaves_the_rest_to_clap() {
        let mistakes: &[&[&str]] = &[
            &[],
            &["app.img", "--bogus"],
            &["app.img", "other.img"],
            &["app.img", "--kernel", "k"],
            &["app.img", "--vcpus"],
            &["app.img", "--vcpus", "two"],
            &["app.img", "--vcpus=-1"],
            &["app.img", "--vmm", "xen"],
            &["app.img", "--timings", "--timings"],
            &["app.img", "--timings=yes"],
            &["app.img", "--mem", "1G", "--mem", "2G"],
            &["app.img", "--cmdline", "-x"],
            &["app.img", "--net", "ip=10.0.0.2/24"],
            &["app.img", "--secret", "nope"],
            &["--help"],
            &["-h"],
            &["--version"],
            &["-V"],
        ];
        for line in mistakes {
            assert!(run_args(&words(line)).is_none(), "taken: {line:?}");
            assert!(clap(line).is_err(), "clap took {line:?}");
        }
        // Also left to clap, which takes them: `hostd run` then refuses the first two
        // (image_cmd.rs, tests/bad_input.rs).
        for line in [
            &["--initrd", "i", "app.img"][..],
            &["--kernel", "k", "--trust", "a.pub"],
            &["app.img", "--mem="],
            &["--", "app.img"],
            &["-"],
        ] {
            assert!(run_args(&words(line)).is_none(), "taken: {line:?}");
        }
    }
}
