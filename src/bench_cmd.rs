//! `hostd bench`: the same workload as a native process, a container, a WebAssembly
//! function and a microVM (both monitors), measured side by side on this host
//! (docs/bench.md). The harness is benches/harness (shared with the cargo benches).
#![allow(clippy::print_stdout)] // the table and the comparison are the CLI's output

mod instance;
mod tiers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hostd_bench::report::{fmt_value, metric, Method, Report, Stat, TierResult, METRICS, SCHEMA};

/// The workload program, built static for musl by build.rs (benches/workload).
const WORKLOAD: &[u8] = include_bytes!(env!("HOSTD_BENCH_WORKLOAD_PATH"));
/// The hello wasi:http component (sandbox/examples/hello).
const HELLO_WASM: &[u8] = include_bytes!("../sandbox/examples/wasm/hello.wasm");
/// ms each loop of the workload runs for.
const LOOP_BUDGET_MS: u64 = 300;

/// Options of `hostd bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Fewer runs, shorter loads and fewer density instances (a few minutes in all).
    #[arg(long)]
    pub quick: bool,
    /// Only these tiers (comma-separated): native, container, wasm, wasmtime-serve,
    /// microvm-builtin, microvm-qemu, firecracker.
    #[arg(long, value_delimiter = ',', value_name = "TIER,...")]
    pub only: Vec<String>,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart here (a group per metric).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Compare with an earlier `--json` report: ratios, regressions flagged (exit code 3
    /// when any).
    #[arg(long, value_name = "OLD.json")]
    pub compare: Option<PathBuf>,
    /// Percent by which a figure may be worse than in the --compare report before it is
    /// flagged as a regression.
    #[arg(long, default_value_t = 10.0, value_name = "PCT", requires = "compare")]
    pub threshold: f64,
    /// The firecracker binary (the firecracker tier runs only with it).
    #[arg(long, value_name = "PATH")]
    pub firecracker: Option<PathBuf>,
}

/// Run counts and sizes for a full or a `--quick` run.
struct Plan {
    quick: bool,
    warmup: usize,
    runs: usize,
    /// microVMs boot slowly (seconds to tens of seconds here): fewer runs.
    vm_runs: usize,
    concurrency: usize,
    load: Duration,
    density: usize,
    vm_density: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                warmup: 1,
                runs: 3,
                vm_runs: 1,
                concurrency: 8,
                load: Duration::from_secs(1),
                density: 4,
                vm_density: 2,
            }
        } else {
            Plan {
                quick,
                warmup: 1,
                runs: 10,
                vm_runs: 3,
                concurrency: 8,
                load: Duration::from_secs(5),
                density: 8,
                vm_density: 4,
            }
        }
    }

    fn runs_of(&self, t: &tiers::Tier) -> usize {
        if t.is_microvm() {
            self.vm_runs
        } else {
            self.runs
        }
    }

    fn density_of(&self, t: &tiers::Tier) -> usize {
        // One boot of the built-in VMM takes tens of seconds on a nested PVM host.
        if self.quick && t.name == "microvm-builtin" {
            1
        } else if t.is_microvm() {
            self.vm_density
        } else {
            self.density
        }
    }
}

/// Figures collected for one tier.
#[derive(Default)]
struct Samples(BTreeMap<&'static str, Vec<f64>>);

impl Samples {
    fn push(&mut self, key: &'static str, v: f64) {
        self.0.entry(key).or_default().push(v);
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<i32> {
    let selected: Vec<&'static str> = if args.only.is_empty() {
        tiers::ALL.to_vec()
    } else {
        let mut v = Vec::new();
        for name in &args.only {
            let Some(t) = tiers::ALL.iter().find(|t| **t == name.as_str()) else {
                bail!(
                    "--only: unknown tier {name:?}; tiers are {}",
                    tiers::ALL.join(", ")
                );
            };
            v.push(*t);
        }
        v
    };
    let old = match &args.compare {
        Some(p) => Some(Report::load(p)?),
        None => None,
    };
    let plan = Plan::new(args.quick);
    let host = hostd_bench::host::HostInfo::detect();
    println!(
        "hostd bench: {} ({} CPUs, {} MiB), kernel {}, host kind {}",
        host.cpu_model, host.cpus, host.mem_total_mib, host.kernel, host.host_kind
    );
    let dir = tempfile_dir()?;
    let mut ctx = tiers::Ctx::new(dir.path(), WORKLOAD, HELLO_WASM, LOOP_BUDGET_MS)?;
    ctx.quick = args.quick;

    let mut image = None;
    let mut ready = Vec::new();
    let mut results: BTreeMap<&str, TierResult> = BTreeMap::new();
    for name in &selected {
        match tiers::prepare(name, &ctx, args.firecracker.as_deref(), &mut image) {
            Ok(t) => {
                println!("  {name}: {}", t.runtime);
                ready.push(t);
            }
            Err(why) => {
                println!("  {name}: skipped: {why}");
                results.insert(name, TierResult::skipped(name, why));
            }
        }
    }
    println!(
        "method: {} warm-up round, {} rounds ({} for microVMs) visiting the tiers in turn; \
         HTTP load {} connections for {:.0} s; loops {} ms each; density over {} instances ({} microVMs, 1 for the built-in VMM with --quick)",
        plan.warmup,
        plan.runs,
        plan.vm_runs,
        plan.concurrency,
        plan.load.as_secs_f64(),
        LOOP_BUDGET_MS,
        plan.density,
        plan.vm_density
    );

    let mut samples: Vec<Samples> = ready.iter().map(|_| Samples::default()).collect();
    let mut failures: Vec<Option<String>> = vec![None; ready.len()];
    let rounds = plan.warmup + ready.iter().map(|t| plan.runs_of(t)).max().unwrap_or(0);
    for round in 0..rounds {
        let warm = round < plan.warmup;
        for (i, t) in ready.iter().enumerate() {
            if failures[i].is_some() || (!warm && round - plan.warmup >= plan.runs_of(t)) {
                continue;
            }
            // microVMs skip the warm-up round: one boot costs what a measured run does.
            if warm && t.is_microvm() {
                continue;
            }
            let label = if warm {
                "warm-up".to_string()
            } else {
                format!("run {}", round - plan.warmup + 1)
            };
            eprintln!("hostd bench: {} {label}", t.name);
            match one_round(t, &ctx, &plan) {
                Ok(figs) if !warm => {
                    for (k, v) in figs {
                        samples[i].push(k, v);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("hostd bench: {} failed: {e:#}", t.name);
                    failures[i] = Some(format!("{e:#}"));
                }
            }
        }
    }
    for (i, t) in ready.iter().enumerate() {
        if failures[i].is_some() {
            continue;
        }
        eprintln!(
            "hostd bench: {} density ({} instances)",
            t.name,
            plan.density_of(t)
        );
        match density(t, &ctx, plan.density_of(t)) {
            Ok(mib) => samples[i].push("density_mib", mib),
            Err(e) => {
                eprintln!("hostd bench: {} density failed: {e:#}", t.name);
                failures[i] = Some(format!("density: {e:#}"));
            }
        }
    }

    // CPU loop relative to native's median.
    let native_cpu = ready
        .iter()
        .position(|t| t.name == "native")
        .and_then(|i| samples[i].0.get("cpu_ms"))
        .map(|v| hostd_bench::median(v.clone()));
    for (i, t) in ready.iter().enumerate() {
        let mut r = TierResult::skipped(t.name, "");
        r.reason = failures[i].take();
        r.status = if r.reason.is_some() {
            "failed".into()
        } else {
            "ran".into()
        };
        r.runtime = t.runtime.clone();
        r.notes = t.notes.clone();
        let s = &samples[i].0;
        for (k, v) in s {
            if metric(k).is_some() {
                r.metrics.insert((*k).to_string(), Stat::of(v.clone()));
            }
        }
        match (s.get("cpu_ms"), native_cpu) {
            (Some(v), Some(n)) if n > 0.0 => {
                r.metrics.insert(
                    "cpu_relative".into(),
                    Stat::of(v.iter().map(|x| x / n).collect()),
                );
            }
            (Some(_), _) => {
                r.notes.insert(
                    "cpu_relative".into(),
                    "the native tier did not run: nothing to compare with".into(),
                );
            }
            _ => {}
        }
        if let Some(rates) = s.get("guest_clock_rate") {
            let rate = hostd_bench::median(rates.clone());
            for m in ["syscall_ns", "pagefault_mib_s", "cpu_relative"] {
                let prev = r
                    .notes
                    .remove(m)
                    .map(|p| format!("{p}; "))
                    .unwrap_or_default();
                r.notes.insert(
                    m.into(),
                    format!("{prev}the guest's clock ran at {rate:.2}x the host's: corrected with the host-timed CPU loop"),
                );
            }
        }
        results.insert(t.name, r);
    }
    let report = Report {
        schema: SCHEMA.into(),
        host,
        method: Method {
            quick: args.quick,
            warmup_runs: plan.warmup,
            runs: plan.runs,
            concurrency: plan.concurrency,
            load_secs: plan.load.as_secs_f64(),
            loop_budget_ms: LOOP_BUDGET_MS,
            density_instances: plan.density,
            order: ready.iter().map(|t| t.name.to_string()).collect(),
        },
        tiers: selected.iter().filter_map(|n| results.remove(n)).collect(),
    };
    print_table(&report);
    if let Some(p) = &args.json {
        let body = serde_json::to_string_pretty(&report)?;
        std::fs::write(p, body + "\n").with_context(|| format!("writing {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.svg {
        std::fs::write(p, hostd_bench::svg::render(&report))
            .with_context(|| format!("writing {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    if let (Some(old), Some(path)) = (old, &args.compare) {
        return Ok(print_compare(&old, &report, path, args.threshold));
    }
    Ok(0)
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
    let base = std::env::temp_dir().join(format!("hostd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    Ok(TempDir(base))
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One measured round of one tier: cold start, HTTP load, PSS, loops.
fn one_round(
    t: &tiers::Tier,
    ctx: &tiers::Ctx,
    plan: &Plan,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let mut figs = Vec::new();
    let (mut s, cold) = t.cold_start(ctx)?;
    figs.push(("cold_start_ms", cold));
    if let Some(addr) = s.addr {
        let (c, d) = (plan.concurrency, plan.load);
        let l = tiers::in_netns(s.netns.as_deref(), move || {
            hostd_bench::http::load(addr, "/", c, d)
        })??;
        figs.push(("requests_per_s", l.requests_per_s));
        figs.push(("p50_ms", l.p50_ms));
        figs.push(("p99_ms", l.p99_ms));
    }
    let loops = if t.is_microvm() {
        let l = t.loops(ctx, Some(&mut s))?;
        if s.addr.is_none() {
            s.inst
                .wait_line("workload: done", Duration::from_secs(60))?;
        }
        l
    } else {
        None
    };
    if let Some(p) = s.inst.pss_mib() {
        figs.push(("pss_mib", p));
    }
    drop(s);
    let loops = match loops {
        Some(l) => Some(l),
        None if t.runs_loops() => t.loops(ctx, None)?,
        None => None,
    };
    if let Some(l) = loops {
        figs.push(("syscall_ns", l.syscall_ns));
        figs.push(("pagefault_mib_s", l.pagefault_mib_s));
        figs.push(("cpu_ms", l.cpu_ms));
        if let Some(r) = l.guest_clock_rate {
            figs.push(("guest_clock_rate", r));
        }
    }
    Ok(figs)
}

/// Host available memory before, minus after `n` ready instances, per instance (MiB).
fn density(t: &tiers::Tier, ctx: &tiers::Ctx, n: usize) -> anyhow::Result<f64> {
    let avail = || -> anyhow::Result<f64> {
        // The median of a few reads: other processes' memory moves too.
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(
                hostd_bench::mem::meminfo_kib("MemAvailable")
                    .context("no MemAvailable in /proc/meminfo")? as f64,
            );
            std::thread::sleep(Duration::from_millis(40));
        }
        Ok(hostd_bench::median(v) / 1024.0)
    };
    let before = avail()?;
    let mut running = Vec::new();
    for _ in 0..n {
        running.push(t.start(ctx)?);
    }
    for s in &mut running {
        match s.addr {
            Some(addr) => {
                tiers::in_netns(s.netns.as_deref(), move || {
                    hostd_bench::http::wait_for_200(addr, "/", Duration::from_secs(300))
                })??;
            }
            None => {
                s.inst
                    .wait_line("workload: done", Duration::from_secs(300))?;
            }
        }
    }
    let after = avail()?;
    drop(running);
    Ok((before - after) / n as f64)
}

fn print_table(r: &Report) {
    let ran: Vec<&TierResult> = r.tiers.iter().filter(|t| t.status == "ran").collect();
    let w0 = 30;
    let w = ran.iter().map(|t| t.name.len().max(9)).collect::<Vec<_>>();
    let mut head = format!("\n{:<w0$}", "metric (median; p99 in [])");
    for (t, w) in ran.iter().zip(&w) {
        head.push_str(&format!(" {:>w$}", t.name));
    }
    println!("{head}");
    let mut footnotes: Vec<String> = Vec::new();
    for m in METRICS {
        let mut line = format!("{:<w0$}", format!("{} ({})", m.label, m.unit));
        for (t, w) in ran.iter().zip(&w) {
            let cell = match t.metrics.get(m.key) {
                Some(s) => {
                    let mut c = fmt_value(s.median);
                    if t.notes.contains_key(m.key) {
                        footnotes.push(format!("{} / {}: {}", t.name, m.label, t.notes[m.key]));
                        c = format!("{c} [{}]", footnotes.len());
                    }
                    c
                }
                None => {
                    if let Some(n) = t.notes.get(m.key) {
                        footnotes.push(format!("{} / {}: not measured: {n}", t.name, m.label));
                        format!("- [{}]", footnotes.len())
                    } else {
                        "-".into()
                    }
                }
            };
            line.push_str(&format!(" {cell:>w$}"));
        }
        println!("{line}");
    }
    for (i, f) in footnotes.iter().enumerate() {
        println!("  [{}] {f}", i + 1);
    }
    for t in r.tiers.iter().filter(|t| t.status != "ran") {
        println!(
            "  {}: {}: {}",
            t.name,
            t.status,
            t.reason.as_deref().unwrap_or("")
        );
    }
}

/// Prints this report against `old`; returns 3 when a figure regressed beyond the
/// threshold, else 0.
fn print_compare(old: &Report, new: &Report, path: &Path, threshold: f64) -> i32 {
    let rows = hostd_bench::compare::compare(old, new, threshold);
    println!(
        "\ncompared with {} (new/old; regression: worse by more than {threshold}%)",
        path.display()
    );
    if old.host != new.host {
        println!(
            "  note: measured on a different host or kernel ({} / {})",
            old.host.cpu_model, old.host.kernel
        );
    }
    println!(
        "{:<16} {:<34} {:>10} {:>10} {:>7}",
        "tier", "metric", "old", "new", "ratio"
    );
    let mut regressions = 0;
    for r in &rows {
        let label = metric(r.metric).map_or(r.metric, |m| m.label);
        let flag = if r.regression {
            regressions += 1;
            format!("  REGRESSION ({:+.0}%)", r.worse_pct)
        } else {
            String::new()
        };
        println!(
            "{:<16} {:<34} {:>10} {:>10} {:>7.2}{flag}",
            r.tier,
            label,
            fmt_value(r.old),
            fmt_value(r.new),
            r.ratio
        );
    }
    if rows.is_empty() {
        println!("  (no tier and metric in common)");
    }
    println!("{regressions} regression(s) beyond {threshold}%");
    if regressions > 0 {
        3
    } else {
        0
    }
}
