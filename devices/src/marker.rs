//! The boot-marker and exit ports (see `hostd_images::abi`): guest init (or the probe)
//! writes a milestone byte to the marker port and its exit code to the exit port.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::bus::BusDevice;

/// What the guest reported, shared with the VMM.
#[derive(Debug, Default)]
pub struct GuestReports {
    /// Each marker byte with the time it arrived, in order.
    pub markers: Vec<(u8, Instant)>,
    /// The exit code, once written.
    pub exit_code: Option<u8>,
}

/// Shared handle to [`GuestReports`].
pub type Reports = Arc<Mutex<GuestReports>>;

/// The boot-marker port: records each byte with a timestamp.
pub struct BootMarker {
    reports: Reports,
    on_marker: Option<Box<dyn Fn() + Send>>,
}

impl std::fmt::Debug for BootMarker {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("BootMarker").finish_non_exhaustive()
    }
}

impl BootMarker {
    /// A marker port reporting into `reports`.
    pub fn new(reports: Reports) -> Self {
        BootMarker {
            reports,
            on_marker: None,
        }
    }

    /// Also calls `on_marker` after each marker is recorded (the VMM wakes its control
    /// thread, which acts on some of them).
    pub fn notifying(reports: Reports, on_marker: Box<dyn Fn() + Send>) -> Self {
        BootMarker {
            reports,
            on_marker: Some(on_marker),
        }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let now = Instant::now();
        if let Some(&value) = data.first() {
            let mut r = self.reports.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded: a guest hammering the port cannot grow this without limit.
            if r.markers.len() < 64 {
                r.markers.push((value, now));
                drop(r);
                if let Some(f) = &self.on_marker {
                    f();
                }
            }
        }
    }
}

/// The exit port: the first byte written is the VM's exit code; `on_exit` is then
/// called (the VMM stops its vCPUs).
pub struct ExitPort {
    reports: Reports,
    on_exit: Box<dyn Fn() + Send>,
}

impl std::fmt::Debug for ExitPort {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("ExitPort").finish_non_exhaustive()
    }
}

impl ExitPort {
    /// An exit port reporting into `reports` and calling `on_exit` after a write.
    pub fn new(reports: Reports, on_exit: Box<dyn Fn() + Send>) -> Self {
        ExitPort { reports, on_exit }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            self.reports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .exit_code
                .get_or_insert(code);
            (self.on_exit)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn first_exit_code_wins_and_markers_are_bounded() {
        let reports = Reports::default();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let mut exit = ExitPort::new(
            reports.clone(),
            Box::new(move || f.store(true, Ordering::SeqCst)),
        );
        exit.write(0, &[7]);
        exit.write(0, &[9]);
        exit.write(0, &[]);
        let notified = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = notified.clone();
        let mut marker = BootMarker::notifying(
            reports.clone(),
            Box::new(move || {
                n.fetch_add(1, Ordering::SeqCst);
            }),
        );
        for i in 0..100 {
            marker.write(0, &[i]);
        }
        let r = reports.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(r.exit_code, Some(7));
        assert_eq!(r.markers.len(), 64);
        assert!(fired.load(Ordering::SeqCst));
        // One notification per marker recorded, none for the ones dropped.
        assert_eq!(notified.load(Ordering::SeqCst), 64);
    }
}
