//! `GET /metrics`: Prometheus text. API requests are counted as they are answered;
//! guest figures are read from the guests at each scrape.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::guests::record::{GuestState, GuestStatus};

type Labels = Vec<(String, String)>;

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    guests: Family<Labels, Gauge>,
    restarts: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hostd");
        let requests = Family::<Labels, Counter>::default();
        let guests = Family::<Labels, Gauge>::default();
        let restarts = Family::<Labels, Gauge>::default();
        registry.register(
            "api_requests",
            "API requests answered, by route and status",
            requests.clone(),
        );
        registry.register("guests", "Guests by state", guests.clone());
        registry.register(
            "guest_restarts",
            "Restarts made by each guest's restart policy",
            restarts.clone(),
        );
        Metrics {
            registry,
            requests,
            guests,
            restarts,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, method: &str, route: &str, status: u16) {
        // Methods a client makes up are one label, so they cannot add series without end.
        const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
        let method = if KNOWN.contains(&method) {
            method
        } else {
            "other"
        };
        self.requests
            .get_or_create(&vec![
                ("method".into(), method.into()),
                ("route".into(), route.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
    }

    /// The text exposition, with the guest figures of `guests`.
    pub fn render(&self, guests: &[GuestStatus]) -> String {
        self.guests.clear();
        self.restarts.clear();
        for state in [
            GuestState::Running,
            GuestState::Stopping,
            GuestState::Stopped,
            GuestState::BackingOff,
            GuestState::Exited,
        ] {
            let n = guests.iter().filter(|g| g.state == state).count();
            let label = serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            self.guests
                .get_or_create(&vec![("state".into(), label)])
                .set(n as i64);
        }
        for g in guests {
            self.restarts
                .get_or_create(&vec![("guest".into(), g.name.clone())])
                .set(i64::from(g.restarts));
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }
}
