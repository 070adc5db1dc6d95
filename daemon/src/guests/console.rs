//! A guest's console: the file its VM process appends to (it outlives the daemon), a
//! bounded ring of its last lines for `GET /guests/NAME/logs`, and a broadcast of new
//! lines for `?follow=1`. One task per guest tails the file, so a re-adopted process's
//! output is followed exactly as a fresh one's.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

/// Lines kept in the ring.
pub const RING_LINES: usize = 1000;
/// Bytes of the file read back into the ring when the daemon starts.
const PREFILL_BYTES: u64 = 64 << 10;
/// Longest line kept (longer ones are cut).
const MAX_LINE: usize = 4096;
/// How often the file is checked for new output.
const POLL: Duration = Duration::from_millis(100);

/// One guest's console.
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    ring: Mutex<VecDeque<String>>,
    tx: broadcast::Sender<String>,
    closed: AtomicBool,
}

impl Console {
    /// Starts tailing `path` (created if missing) on the current tokio runtime.
    pub fn start(path: PathBuf) -> Arc<Console> {
        let (tx, _) = broadcast::channel(1024);
        let c = Arc::new(Console {
            path,
            ring: Mutex::new(VecDeque::new()),
            tx,
            closed: AtomicBool::new(false),
        });
        let me = Arc::clone(&c);
        tokio::spawn(async move { me.tail().await });
        c
    }

    /// Stops the tail task and ends every follower.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    /// The ring's lines, oldest first, at most the last `n`.
    pub fn lines(&self, n: usize) -> Vec<String> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The last `n` lines and a receiver of every line after them (no gap, no repeat).
    pub fn follow(&self, n: usize) -> (Vec<String>, broadcast::Receiver<String>) {
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
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == RING_LINES {
            ring.pop_front();
        }
        ring.push_back(line.clone());
        // Sent under the ring's lock, so `follow` sees each line exactly once.
        let _ = self.tx.send(line);
    }

    /// The tail loop: short reads of a local file, then a sleep.
    async fn tail(&self) {
        let mut pos = 0u64;
        let mut partial: Vec<u8> = Vec::new();
        let mut first = true;
        let mut buf = vec![0u8; 64 << 10];
        while !self.closed.load(Ordering::Relaxed) {
            let Ok(mut f) = std::fs::File::open(&self.path) else {
                tokio::time::sleep(POLL).await;
                continue;
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len < pos {
                // Replaced or truncated: start over.
                pos = 0;
                partial.clear();
            }
            if first {
                pos = len.saturating_sub(PREFILL_BYTES);
                first = false;
                if pos > 0 {
                    // Skip to the first whole line.
                    partial.clear();
                    let _ = f.seek(SeekFrom::Start(pos));
                    let n = f.read(&mut buf).unwrap_or(0);
                    match buf[..n].iter().position(|b| *b == b'\n') {
                        Some(i) => pos += i as u64 + 1,
                        None => pos += n as u64,
                    }
                }
            }
            if len > pos && f.seek(SeekFrom::Start(pos)).is_ok() {
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    pos += n as u64;
                    for &b in &buf[..n] {
                        if b == b'\n' {
                            let line = String::from_utf8_lossy(&partial)
                                .trim_end_matches('\r')
                                .to_owned();
                            partial.clear();
                            self.push(line);
                        } else if partial.len() < MAX_LINE {
                            partial.push(b);
                        }
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
