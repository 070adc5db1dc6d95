//! The shim: containerd's task API (create, start, kill, wait, state, pids, stats,
//! delete, connect, shutdown) onto one `hostd` child process per task: `hostd run`
//! for a microVM, `hostd fn serve` for functions. The child keeps `hostd run`'s jail
//! exactly; the shim adds the task's cgroup, its stdio FIFOs and its exit events.
//!
//! Logs go through the `log` facade: the containerd-shim crate's logger forwards them to
//! containerd's own log, which is where users look for a failed create.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use containerd_shim::monitor::Topic;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{EnumOrUnknown, MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, context, get_status, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::synchronous::monitor::{monitor_subscribe, wait_pid};
use containerd_shim::{api, DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult};
use log::{error, info, warn};

use crate::cgroup::{self, Cgroup};
use crate::mount::{self, Mount};
use crate::rootfs_image;
use crate::workload::{Bundle, Workload};

/// The runtime's name in containerd (`--runtime io.containerd.hostd.v1`).
pub const RUNTIME_ID: &str = "io.containerd.hostd.v1";

/// The shim process: starts the task service, and cleans up after a dead one.
#[derive(Clone)]
pub struct Shim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for Shim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Shim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: containerd_shim::StartOpts) -> containerd_shim::Result<String> {
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        // In the bundle: the server removes its socket at exit by this file.
        containerd_shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    /// After the shim died: what it would have removed at delete (run in the bundle).
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        if let Ok(dir) = std::env::current_dir() {
            let bundle = Bundle::read(&dir).unwrap_or_default();
            let rel =
                cgroup::relative_path(bundle.cgroups_path.as_deref(), &self.namespace, &self.id);
            if let Ok(cg) = Cgroup::create(&rel) {
                if let Err(e) = cg.destroy(Duration::from_secs(10)) {
                    warn!("{}", chain(&e));
                }
            }
            mount::unmount_all(&dir.join("rootfs"));
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: self.namespace.clone(),
                exit: self.exit.clone(),
                publisher: Mutex::new(publisher),
                task: Mutex::new(None),
                changed: Condvar::new(),
            }),
        }
    }
}

/// The task service (one task per shim: containerd starts a shim per container).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    exit: Arc<ExitSignal>,
    publisher: Mutex<RemotePublisher>,
    task: Mutex<Option<Task>>,
    changed: Condvar,
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

struct Task {
    id: String,
    bundle: Bundle,
    stdin: String,
    stdout: String,
    stderr: String,
    /// The program and arguments of the child (`hostd run …`).
    command: Vec<String>,
    cgroup: Cgroup,
    /// Scratch files (a root file system's image) removed at delete.
    scratch: Option<tempfile::TempDir>,
    phase: Phase,
    pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn status(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(get_status(code, msg))
}

/// The `hostd` binary: $HOSTD_BIN, else `hostd` next to the shim, else on PATH.
fn hostd_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("HOSTD_BIN") {
        return PathBuf::from(b);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("hostd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("hostd"))
}

/// `hostd run` arguments: `--vmm $HOSTD_SHIM_VMM` (kvm when unset) and the words of
/// `$HOSTD_SHIM_RUN_ARGS` (e.g. `--accel tcg`), then the image.
fn run_command(image: &Path) -> Vec<String> {
    let mut c = vec![
        "run".to_string(),
        "--vmm".into(),
        std::env::var("HOSTD_SHIM_VMM").unwrap_or_else(|_| "kvm".into()),
    ];
    if let Ok(extra) = std::env::var("HOSTD_SHIM_RUN_ARGS") {
        c.extend(extra.split_whitespace().map(str::to_string));
    }
    c.push(image.to_string_lossy().to_string());
    c
}

/// Runs `cmd` to its end; returns its exit code and what it printed on stderr. The
/// shim's reaper collects every child, so the exit comes from its monitor.
pub fn run_to_end(cmd: &mut Command, log: &Path) -> std::io::Result<(i32, String)> {
    let out = File::create(log)?;
    let sub = monitor_subscribe(Topic::Pid).map_err(std::io::Error::other)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let code = wait_pid(child.id() as i32, sub);
    Ok((code, std::fs::read_to_string(log).unwrap_or_default()))
}

/// Refuses at create what would only fail at start: a `.img` that is not a valid hostd
/// image (checked by `hostd inspect`: header and every section's digest), a `.wasm` that
/// is not WebAssembly.
fn check_content(workload: &Workload, bundle: &Path) -> Result<(), String> {
    match workload {
        Workload::Image(img) => {
            let mut cmd = Command::new(hostd_bin());
            cmd.arg("inspect").arg(img);
            let (code, out) = run_to_end(&mut cmd, &bundle.join("inspect.log"))
                .map_err(|e| format!("cannot run {} inspect: {e}", hostd_bin().display()))?;
            if code != 0 {
                return Err(format!(
                    "{} is not a valid hostd image: {}",
                    img.display(),
                    out.lines()
                        .find(|l| l.contains("error"))
                        .unwrap_or(out.trim())
                ));
            }
            Ok(())
        }
        Workload::Function(f) if f.extension().is_some_and(|e| e == "wasm") => {
            let mut magic = [0u8; 4];
            let ok = File::open(f)
                .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut magic))
                .is_ok();
            if !ok || &magic != b"\0asm" {
                return Err(format!("{} is not a WebAssembly component", f.display()));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Opens a FIFO (or file) containerd gave for the task's stdout/stderr. Read-write, so
/// the open never blocks; the child holds the only copy once started.
fn open_stdio(path: &str) -> std::io::Result<Stdio> {
    if path.is_empty() {
        return Ok(Stdio::null());
    }
    // `ctr run --log-uri file:///PATH` gives a file that may not exist yet.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(path.starts_with("file://"))
        .truncate(false)
        .open(
            path.trim_start_matches("fifo://")
                .trim_start_matches("file://"),
        )?;
    Ok(Stdio::from(f))
}

impl Service {
    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let publisher = self
            .inner
            .publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Err(e) = publisher.publish(
            context::with_timeout(0),
            topic,
            &self.inner.namespace,
            event,
        ) {
            warn!("cannot publish {topic}: {e}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Task>> {
        self.inner.task.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The task `id` (containerd names the container; exec ids are not supported).
    fn check(task: &Option<Task>, id: &str, exec_id: &str) -> TtrpcResult<()> {
        if !exec_id.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "hostd tasks have no exec processes",
            ));
        }
        match task {
            Some(t) if t.id == id => Ok(()),
            _ => Err(status(Code::NOT_FOUND, format!("task {id} not found"))),
        }
    }

    fn do_create(&self, req: &api::CreateTaskRequest) -> Result<Task, String> {
        if req.terminal {
            return Err(
                "a terminal (ctr run -t) is not supported: the console goes to stdout".into(),
            );
        }
        if !req.checkpoint.is_empty() {
            return Err("checkpoints are not supported".into());
        }
        let dir = PathBuf::from(&req.bundle);
        let bundle = Bundle::read(&dir).map_err(|e| chain(&e))?;
        let rootfs = bundle.rootfs();
        let mounts: Vec<Mount> = req
            .rootfs
            .iter()
            .map(|m| Mount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        if !mounts.is_empty() {
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
            mount::mount_all(&mounts, &rootfs).map_err(|e| chain(&e))?;
        }
        let undo = |msg: String| {
            mount::unmount_all(&rootfs);
            msg
        };
        let workload = bundle.workload().map_err(|e| undo(chain(&e)))?;
        let rel = cgroup::relative_path(
            bundle.cgroups_path.as_deref(),
            &self.inner.namespace,
            &req.id,
        );
        let cg = Cgroup::create(&rel).map_err(|e| undo(chain(&e)))?;
        let mut scratch = None;
        if let Err(e) = check_content(&workload, &dir) {
            let _ = cg.destroy(Duration::from_secs(1));
            return Err(undo(e));
        }
        let command = match &workload {
            Workload::Image(img) => run_command(img),
            Workload::Function(target) => {
                let listen = bundle
                    .process
                    .env_var("HOSTD_FN_LISTEN")
                    .unwrap_or("127.0.0.1:8080")
                    .to_string();
                vec![
                    "fn".into(),
                    "serve".into(),
                    target.to_string_lossy().to_string(),
                    "--listen".into(),
                    listen,
                    "--no-cache".into(),
                    "--state-dir".into(),
                    dir.join("fn-state").to_string_lossy().to_string(),
                ]
            }
            Workload::RootFs(root) => {
                let built = rootfs_image::build(&hostd_bin(), root, &bundle.process, &req.id)
                    .map_err(|e| {
                        let _ = cg.destroy(Duration::from_secs(1));
                        undo(chain(&e))
                    })?;
                let c = run_command(&built.image);
                scratch = Some(built.dir);
                c
            }
        };
        info!(
            "task {}: {:?} runs as hostd {}",
            req.id,
            workload,
            command.join(" ")
        );
        Ok(Task {
            id: req.id.clone(),
            bundle,
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            command,
            cgroup: cg,
            scratch,
            phase: Phase::Created,
            pid: 0,
            exit_status: 0,
            exited_at: None,
        })
    }

    /// Spawns the task's child in its cgroup and a thread that waits for its exit.
    fn do_start(&self, task: &mut Task) -> Result<u32, String> {
        let stdout =
            open_stdio(&task.stdout).map_err(|e| format!("stdout {}: {e}", task.stdout))?;
        let stderr =
            open_stdio(&task.stderr).map_err(|e| format!("stderr {}: {e}", task.stderr))?;
        let procs = task.cgroup.procs_files().map_err(|e| chain(&e))?;
        let mut cmd = Command::new(hostd_bin());
        cmd.args(&task.command)
            .current_dir(&task.bundle.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group: a signal for the task never reaches the shim.
            .process_group(0);
        // SAFETY: the closure only calls write(2) on fds opened before the fork
        // (async-signal-safe) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || cgroup::join_self(&procs));
        }
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| e.to_string())?;
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", hostd_bin().display()))?;
        let pid = child.id();
        // The shim's reaper collects it; the Child handle is not waited on.
        drop(child);
        let service = self.clone();
        std::thread::spawn(move || {
            let code = wait_pid(pid as i32, sub);
            service.exited(pid, code);
        });
        Ok(pid)
    }

    /// The child exited: record it, wake waiters, tell containerd.
    fn exited(&self, pid: u32, code: i32) {
        let at = now();
        let id = {
            let mut guard = self.lock();
            let Some(t) = guard.as_mut() else { return };
            t.phase = Phase::Stopped;
            t.exit_status = code as u32;
            t.exited_at = Some(at.clone());
            t.id.clone()
        };
        self.inner.changed.notify_all();
        info!("task {id}: pid {pid} exited with {code}");
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.clone(),
                id,
                pid,
                exit_status: code as u32,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        );
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.lock().is_some() {
            return Err(status(Code::ALREADY_EXISTS, "this shim already has a task"));
        }
        let task = self.do_create(&req).map_err(|e| {
            error!("create {}: {e}", req.id);
            status(Code::FAILED_PRECONDITION, e)
        })?;
        *self.lock() = Some(task);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse::default())
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let mut guard = self.lock();
        Self::check(&guard, &req.id, &req.exec_id)?;
        let Some(task) = guard.as_mut() else {
            return Err(status(Code::NOT_FOUND, "no task"));
        };
        if task.phase != Phase::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {} was already started", req.id),
            ));
        }
        let pid = self.do_start(task).map_err(|e| {
            error!("start {}: {e}", req.id);
            status(Code::INTERNAL, e)
        })?;
        // Unless it already exited in between (the exit thread waits for this lock).
        if task.phase == Phase::Created {
            task.phase = Phase::Running;
        }
        task.pid = pid;
        drop(guard);
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let guard = self.lock();
        Self::check(&guard, &req.id, &req.exec_id)?;
        let Some(t) = guard.as_ref() else {
            return Err(status(Code::NOT_FOUND, "no task"));
        };
        Ok(api::StateResponse {
            id: t.id.clone(),
            bundle: t.bundle.dir.to_string_lossy().to_string(),
            pid: t.pid,
            status: EnumOrUnknown::new(match t.phase {
                Phase::Created => Status::CREATED,
                Phase::Running => Status::RUNNING,
                Phase::Stopped => Status::STOPPED,
            }),
            stdin: t.stdin.clone(),
            stdout: t.stdout.clone(),
            stderr: t.stderr.clone(),
            terminal: false,
            exit_status: t.exit_status,
            exited_at: t.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let guard = self.lock();
        Self::check(&guard, &req.id, &req.exec_id)?;
        let Some(t) = guard.as_ref() else {
            return Err(status(Code::NOT_FOUND, "no task"));
        };
        let signal = req.signal as i32;
        match t.phase {
            Phase::Created => {
                drop(guard);
                // Never started: it ends as if killed by the signal.
                self.exited(0, 128 + signal);
            }
            Phase::Stopped => {
                return Err(status(
                    Code::NOT_FOUND,
                    format!("task {} has already exited", req.id),
                ))
            }
            Phase::Running => {
                info!("task {}: signal {signal} (all: {})", req.id, req.all);
                if req.all || signal == libc::SIGKILL {
                    // SIGKILL leaves no one to stop the VMM and backends: kill them all.
                    t.cgroup.signal_all(signal);
                } else {
                    // SAFETY: kill has no memory effects; the pid is our unreaped child
                    // (reaped only after the exit thread marks the task stopped).
                    unsafe { libc::kill(t.pid as libc::pid_t, signal) };
                }
            }
        }
        Ok(api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let mut guard = self.lock();
        Self::check(&guard, &req.id, &req.exec_id)?;
        loop {
            match guard.as_ref() {
                Some(t) if t.phase == Phase::Stopped => {
                    return Ok(api::WaitResponse {
                        exit_status: t.exit_status,
                        exited_at: t.exited_at.clone().into(),
                        ..Default::default()
                    })
                }
                Some(_) => {}
                None => {
                    return Err(status(
                        Code::NOT_FOUND,
                        format!("task {} was deleted", req.id),
                    ))
                }
            }
            guard = self
                .inner
                .changed
                .wait(guard)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let guard = self.lock();
        Self::check(&guard, &req.id, "")?;
        let Some(t) = guard.as_ref() else {
            return Err(status(Code::NOT_FOUND, "no task"));
        };
        Ok(api::PidsResponse {
            processes: t
                .cgroup
                .pids()
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let guard = self.lock();
        Self::check(&guard, &req.id, "")?;
        let Some(t) = guard.as_ref() else {
            return Err(status(Code::NOT_FOUND, "no task"));
        };
        let any =
            crate::stats::metrics(&t.cgroup.usage()).map_err(|e| status(Code::INTERNAL, e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut guard = self.lock();
        Self::check(&guard, &req.id, &req.exec_id)?;
        if guard.as_ref().is_some_and(|t| t.phase == Phase::Running) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("task {} is running: kill it first", req.id),
            ));
        }
        let Some(t) = guard.take() else {
            return Err(status(Code::NOT_FOUND, "no task"));
        };
        drop(guard);
        self.inner.changed.notify_all();
        if let Err(e) = t.cgroup.destroy(Duration::from_secs(10)) {
            warn!("delete {}: {}", t.id, chain(&e));
        }
        mount::unmount_all(&t.bundle.rootfs());
        drop(t.scratch);
        let exited_at = t.exited_at.clone().unwrap_or_else(now);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: t.id.clone(),
                id: t.id.clone(),
                pid: t.pid,
                exit_status: t.exit_status,
                exited_at: MessageField::some(exited_at.clone()),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: t.pid,
            exit_status: t.exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let guard = self.lock();
        let task_pid = guard
            .as_ref()
            .filter(|t| t.id == req.id)
            .map_or(0, |t| t.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.lock().is_some() {
            // containerd asks again after delete.
            return Ok(api::Empty::default());
        }
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }
}
