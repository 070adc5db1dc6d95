//! A guest's console: the file its VM process appends to (it outlives the daemon), a
//! bounded ring of its last lines for `GET /guests/NAME/logs`, and a broadcast of new
//! lines for `?follow=1`. One task per guest tails the file, so a re-adopted process's
//! output is followed exactly as a fresh one's. The task sleeps until the guest's
//! directory changes (inotify, [`DirWatch`]): an idle guest wakes the daemon never. Where
//! no watch can be had it looks every 100 ms.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostd_images::abi;
use tokio::sync::{broadcast, Notify};

use super::dirwatch::{DirWatch, Watched};

/// Lines kept in the ring.
pub const RING_LINES: usize = 1000;
/// Bytes of the file read back into the ring when the daemon starts.
const PREFILL_BYTES: u64 = 64 << 10;
/// Longest line kept (longer ones are cut).
const MAX_LINE: usize = 4096;
/// How often the file is checked for new output when it cannot be watched.
const POLL: Duration = Duration::from_millis(100);
/// After a change, how long the tail waits for more before it reads: a guest printing
/// a burst is read once per period, not once per write.
const GATHER: Duration = Duration::from_millis(5);

/// When a guest's boot reached each point, in ms since the daemon started its VM
/// process, as seen in its console: `hostd run` logging that it boots the VM (`booting
/// with …`), guest init's first line, and its first `service … started`. Lines reach
/// the daemon through the console file, a few ms late (100 ms where the file cannot be
/// watched); `hostd run --timings` measures from inside the runner.
#[derive(
    Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct BootTimings {
    /// `hostd run` starts the VM.
    pub vm_started_ms: Option<u64>,
    /// Guest init runs.
    pub init_started_ms: Option<u64>,
    /// The first service was started.
    pub first_service_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct BootMarks {
    launched: Option<std::time::Instant>,
    timings: BootTimings,
}

impl BootMarks {
    fn scan(&mut self, line: &str) {
        let Some(t0) = self.launched else { return };
        let now = || Some(t0.elapsed().as_millis() as u64);
        let t = &mut self.timings;
        if let Some(rest) = line.strip_prefix(abi::CONSOLE_PREFIX) {
            if rest == abi::LINE_STARTED && t.init_started_ms.is_none() {
                t.init_started_ms = now();
            } else if rest.starts_with(abi::LINE_SERVICE_STARTED)
                && rest.contains(" started (pid ")
                && t.first_service_ms.is_none()
            {
                t.first_service_ms = now();
            }
        } else if t.vm_started_ms.is_none()
            && line.contains("booting with ")
            && line.contains(" vCPU(s)")
        {
            t.vm_started_ms = now();
        }
    }
}

/// One guest's console.
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    boot: Mutex<BootMarks>,
    ring: Mutex<VecDeque<String>>,
    tx: broadcast::Sender<String>,
    closed: AtomicBool,
    /// How many times the file was looked at (for tests: an idle watched console is
    /// not looked at).
    looks: std::sync::atomic::AtomicU64,
    /// Wakes the tail task when the console is closed.
    stop: Notify,
    tail: Mutex<TailState>,
}

impl Console {
    /// Starts tailing `path` (created if missing) on the current tokio runtime, woken by
    /// `watch` on changes in the file's directory (polled without one, or if the
    /// directory cannot be watched).
    pub fn start(path: PathBuf, watch: Option<&Arc<DirWatch>>) -> Arc<Console> {
        let watched = watch.and_then(|w| {
            let dir = path.parent()?;
            w.watch(dir)
                .map_err(|e| {
                    tracing::warn!("cannot watch {} ({e}); polling it", dir.display());
                })
                .ok()
        });
        let (tx, _) = broadcast::channel(1024);
        let c = Arc::new(Console {
            path,
            boot: Mutex::new(BootMarks::default()),
            ring: Mutex::new(VecDeque::new()),
            tx,
            closed: AtomicBool::new(false),
            looks: Default::default(),
            stop: Notify::new(),
            tail: Mutex::new(TailState::default()),
        });
        let me = Arc::clone(&c);
        tokio::spawn(async move { me.tail(watched).await });
        c
    }

    /// Stops the tail task (which drops its watch) and ends every follower.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.stop.notify_one();
    }

    /// A new VM process was started now: boot timings count from here.
    pub fn mark_launch(&self) {
        let mut b = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        *b = BootMarks {
            launched: Some(std::time::Instant::now()),
            timings: BootTimings::default(),
        };
    }

    /// The boot timings of the process last started by this daemon (none for a
    /// re-adopted one: its start was not seen).
    pub fn boot_timings(&self) -> Option<BootTimings> {
        let b = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        b.launched.map(|_| b.timings.clone())
    }

    /// The ring's lines, oldest first, at most the last `n`.
    pub fn lines(&self, n: usize) -> Vec<String> {
        self.catch_up();
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The last `n` lines and a receiver of every line after them (no gap, no repeat).
    pub fn follow(&self, n: usize) -> (Vec<String>, broadcast::Receiver<String>) {
        self.catch_up();
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let lines = ring
            .iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect();
        (lines, rx)
    }

    fn push(&self, line: String) {
        self.boot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .scan(&line);
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == RING_LINES {
            ring.pop_front();
        }
        ring.push_back(line.clone());
        // Sent under the ring's lock, so `follow` sees each line exactly once.
        let _ = self.tx.send(line);
    }

    /// The tail loop: a catch-up with the file, then a sleep until the directory changes
    /// (or for the poll period without a working watch) or the console is closed.
    async fn tail(&self, watched: Option<Watched>) {
        while !self.closed.load(Ordering::Relaxed) {
            self.catch_up();
            match &watched {
                Some(w) if w.live() => {
                    tokio::select! {
                        _ = w.changed.notified() => {}
                        _ = self.stop.notified() => continue,
                    }
                    tokio::time::sleep(GATHER).await;
                }
                _ => {
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => {}
                        _ = self.stop.notified() => {}
                    }
                }
            }
        }
    }

    /// Reads what the file gained since the last look into the ring (short reads of a
    /// local file). Called by the tail loop and before every read of the ring, so a
    /// reader sees every line written before it asked (a stopped guest's last lines
    /// included), not only those of the last poll.
    fn catch_up(&self) {
        self.looks.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return;
        };
        if t.open.as_ref().map(|(_, ino)| *ino) != Some(meta.ino()) {
            match std::fs::File::open(&self.path) {
                Ok(f) => {
                    if t.open.is_some() {
                        // Replaced: start over with the new file.
                        t.pos = 0;
                        t.partial.clear();
                    }
                    t.open = Some((f, meta.ino()));
                }
                Err(_) => return,
            }
        }
        let Some((f, _)) = t.open.as_mut() else {
            return;
        };
        let len = meta.len();
        if len < t.pos {
            // Replaced or truncated: start over.
            t.pos = 0;
            t.partial.clear();
        }
        let mut buf = vec![0u8; 64 << 10];
        if t.first {
            t.pos = len.saturating_sub(PREFILL_BYTES);
            t.first = false;
            if t.pos > 0 {
                // Skip to the first whole line.
                t.partial.clear();
                let _ = f.seek(SeekFrom::Start(t.pos));
                let n = f.read(&mut buf).unwrap_or(0);
                match buf[..n].iter().position(|b| *b == b'\n') {
                    Some(i) => t.pos += i as u64 + 1,
                    None => t.pos += n as u64,
                }
            }
        }
        if len > t.pos && f.seek(SeekFrom::Start(t.pos)).is_ok() {
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t.pos += n as u64;
                for &b in &buf[..n] {
                    if b == b'\n' {
                        let line = String::from_utf8_lossy(&t.partial)
                            .trim_end_matches('\r')
                            .to_owned();
                        t.partial.clear();
                        self.push(line);
                    } else if t.partial.len() < MAX_LINE {
                        t.partial.push(b);
                    }
                }
            }
        }
    }
}

/// Where the tail is in the console file.
#[derive(Debug)]
struct TailState {
    pos: u64,
    /// The current line so far.
    partial: Vec<u8>,
    /// Not looked at yet: start near the end (PREFILL_BYTES).
    first: bool,
    /// The open file and its inode: reopened only when the path names another file.
    open: Option<(std::fs::File, u64)>,
}

impl Default for TailState {
    fn default() -> Self {
        TailState {
            pos: 0,
            partial: Vec::new(),
            first: true,
            open: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn boot_marks_come_from_runner_and_init_lines_once() {
        let mut b = BootMarks::default();
        b.scan("hostd-init: started");
        assert_eq!(b.timings, BootTimings::default(), "nothing before a launch");
        b.launched = Some(std::time::Instant::now());
        b.scan(" INFO booting with 1 vCPU(s), 256 MiB (Qemu)");
        b.scan("[    0.000000] Linux version 6.1");
        b.scan("hostd-init: started");
        b.scan("hostd-init: service main started (pid 7)");
        b.scan("hostd-init: service other started (pid 8)");
        let t = b.timings.clone();
        assert!(t.vm_started_ms.is_some() && t.init_started_ms.is_some());
        assert!(t.first_service_ms >= t.init_started_ms && t.init_started_ms >= t.vm_started_ms);
        b.scan("hostd-init: started");
        assert_eq!(b.timings, t, "each point is recorded once");
    }

    async fn wait_lines(c: &Console, n: usize) -> Vec<String> {
        for _ in 0..100 {
            let l = c.lines(RING_LINES);
            if l.len() >= n {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.lines(RING_LINES)
    }

    async fn ring_and_followers_across_a_replaced_file(watch: Option<&Arc<DirWatch>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        std::fs::write(&path, "before 1\nbefore 2\n").expect("write");
        let c = Console::start(path.clone(), watch);
        assert_eq!(wait_lines(&c, 2).await, ["before 1", "before 2"]);
        let (old, mut rx) = c.follow(1);
        assert_eq!(old, ["before 2"]);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(b"new line\npart").expect("write");
        assert_eq!(rx.recv().await.expect("line"), "new line");
        f.write_all(b"ial\n").expect("write");
        assert_eq!(rx.recv().await.expect("line"), "partial");
        // A new file at the path (a guest deleted and made again) is read from its start.
        std::fs::remove_file(&path).expect("rm");
        std::fs::write(&path, "fresh\n").expect("write");
        assert_eq!(rx.recv().await.expect("line"), "fresh");
        c.close();
    }

    #[tokio::test]
    async fn the_ring_and_followers_get_each_line_once_across_a_replaced_file() {
        let watch = DirWatch::start().expect("inotify");
        ring_and_followers_across_a_replaced_file(Some(&watch)).await;
    }

    #[tokio::test]
    async fn without_a_watch_the_file_is_polled() {
        ring_and_followers_across_a_replaced_file(None).await;
    }

    #[tokio::test]
    async fn a_quiet_watched_console_is_not_looked_at_until_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        std::fs::write(&path, "booted\n").expect("write");
        let watch = DirWatch::start().expect("inotify");
        let c = Console::start(path.clone(), Some(&watch));
        let (_, mut rx) = c.follow(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let looks = c.looks.load(Ordering::Relaxed);
        // Several poll periods of the unwatched console.
        tokio::time::sleep(POLL * 5).await;
        assert_eq!(
            c.looks.load(Ordering::Relaxed),
            looks,
            "no look while quiet"
        );
        // A line written now reaches a follower without anyone reading the ring.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(b"service up\n").expect("write");
        let line = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("woken by the write")
            .expect("line");
        assert_eq!(line, "service up");
        // Closing ends the tail task, which drops its watch.
        c.close();
        for _ in 0..100 {
            if watch.watched_dirs() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            watch.watched_dirs(),
            0,
            "the closed console's watch is removed"
        );
    }
}
