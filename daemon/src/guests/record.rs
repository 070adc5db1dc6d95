//! What the daemon keeps about a guest: the persistent record (in the state database)
//! and the status the API reports.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::fleet;

/// Who created a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A fleet file (`hostd apply`, `--fleet`): reconcile owns it.
    Fleet,
    /// By hand (`hostd up`, `POST /guests`): reconcile leaves it alone unless a fleet
    /// names it.
    Manual,
}

/// What the guest should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Running (restarted per its policy).
    Running,
    /// Stopped.
    Stopped,
}

/// The persistent record of one guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// The guest's name.
    pub name: String,
    /// The declaration (paths absolute).
    pub decl: fleet::Guest,
    /// sha256 of the image it boots (in the image store).
    pub image_digest: String,
    /// sha256 of the canonical JSON of `decl` and the image digest.
    pub config_digest: String,
    /// Seconds its image gives it to shut down.
    pub stop_timeout_secs: u32,
    /// Who created it.
    pub origin: Origin,
    /// What it should be doing.
    pub desired: Desired,
    /// The pid of its `hostd run` process while one runs.
    pub pid: Option<u32>,
    /// That process's start time (field 22 of /proc/PID/stat), to tell it from a
    /// later process with the same pid.
    pub start_ticks: Option<u64>,
    /// When the process started (ms since the Unix epoch).
    pub started_at_ms: Option<u64>,
    /// Restarts made by the restart policy.
    pub restarts: u32,
    /// How the last process ended, for people.
    pub last_exit: Option<String>,
    /// Its exit code, when known.
    pub exit_code: Option<i32>,
}

/// Where a guest is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum GuestState {
    /// Its VM process runs.
    Running,
    /// Asked to stop, waiting for it to exit.
    Stopping,
    /// Not running, and not to be restarted.
    Stopped,
    /// Exited; waiting out the backoff before the restart policy starts it again.
    BackingOff,
    /// Exited, and its policy does not restart it.
    Exited,
}

/// A guest as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GuestStatus {
    /// Name.
    pub name: String,
    /// Where it is in its life.
    pub state: GuestState,
    /// What it should be doing.
    pub desired: Desired,
    /// Who created it.
    pub origin: Origin,
    /// The pid of its VM process (`hostd run`), while it runs.
    pub pid: Option<u32>,
    /// Seconds since its VM process started, while it runs.
    pub uptime_secs: Option<u64>,
    /// Whether the running process was re-adopted after a daemon restart.
    pub adopted: bool,
    /// Restarts made by the restart policy.
    pub restarts: u32,
    /// The delay before the next restart (ms), while backing off.
    pub backoff_ms: Option<u64>,
    /// How the last process ended.
    pub last_exit: Option<String>,
    /// Its exit code, when known.
    pub exit_code: Option<i32>,
    /// sha256 of its image.
    pub image_digest: String,
    /// sha256 of its configuration (declaration + image digest).
    pub config_digest: String,
    /// Boot timings of the process this daemon last started (none when re-adopted).
    #[serde(default)]
    pub boot: Option<super::console::BootTimings>,
    /// The declaration.
    pub spec: fleet::Guest,
}
