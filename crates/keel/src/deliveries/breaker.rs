//! A circuit breaker per webhook endpoint (organisation and URL), in this keel process.
//!
//! After `notifications.breaker_failures` consecutive retryable failures the endpoint's circuit
//! opens for `notifications.breaker_cooldown`: its deliveries are given back to the queue, due
//! when it may close, without spending an attempt. When the cooldown ends, one delivery goes
//! through as a probe (the others keep waiting): its success closes the circuit, its failure
//! opens it again for another cooldown. A success at any time closes it.
//!
//! Only failing endpoints are remembered (a closed circuit with no failure is forgotten), so
//! memory follows the endpoints that fail now.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use keel_store::OrgId;
use parking_lot::Mutex;
use serde::Serialize;

/// The longest a circuit stays open when its cooldown does not fit the clock.
const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// The shortest wait of a delivery while a probe is in flight.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// What the breaker says about sending to an endpoint now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send (as the probe of a circuit that was open, when `probe`).
    Send {
        /// This send decides whether the circuit closes.
        probe: bool,
    },
    /// Do not send before this long: give the delivery back, its attempt unspent.
    Wait(Duration),
}

#[derive(Debug, Default)]
struct Circuit {
    failures: u32,
    open_until: Option<Instant>,
    /// A probe is in flight; its send ends by then at the latest.
    probe_until: Option<Instant>,
}

impl Circuit {
    fn probing(&self, now: Instant) -> bool {
        self.probe_until.is_some_and(|until| now < until)
    }
}

/// A circuit as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CircuitView {
    /// The webhook URL.
    pub endpoint: String,
    /// `closed` (failing, under the threshold), `open` or `half_open` (a probe is out).
    pub state: &'static str,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Seconds until an open circuit lets a probe through.
    pub opens_in_seconds: Option<u64>,
}

/// Every endpoint's circuit.
#[derive(Debug)]
pub struct Breakers {
    circuits: Mutex<HashMap<(OrgId, String), Circuit>>,
    threshold: u32,
    cooldown: Duration,
}

impl Breakers {
    /// Circuits that open after `threshold` failures in a row, for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            circuits: Mutex::new(HashMap::new()),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Whether a delivery to `endpoint` may be sent now. A send let through as the probe ends
    /// within `send_deadline`: until then (or its outcome) the others wait, and should it never
    /// report, the next delivery after that is the probe.
    pub fn admit(&self, org: OrgId, endpoint: &str, send_deadline: Duration) -> Admission {
        let now = Instant::now();
        let mut circuits = self.circuits.lock();
        let Some(circuit) = circuits.get_mut(&(org, endpoint.to_owned())) else {
            return Admission::Send { probe: false };
        };
        match circuit.open_until {
            None => Admission::Send { probe: false },
            Some(until) if now < until => Admission::Wait(until - now),
            Some(_) => match circuit.probe_until {
                Some(probe_until) if now < probe_until => {
                    Admission::Wait((probe_until - now).max(PROBE_WAIT))
                }
                _ => {
                    circuit.probe_until = Some(now.checked_add(send_deadline).unwrap_or(now));
                    Admission::Send { probe: true }
                }
            },
        }
    }

    /// Records how a send to `endpoint` went: `failed` is a failure that says the endpoint is
    /// not serving (a retryable one).
    pub fn record(&self, org: OrgId, endpoint: &str, failed: bool) {
        let mut circuits = self.circuits.lock();
        let key = (org, endpoint.to_owned());
        if !failed {
            if circuits
                .remove(&key)
                .is_some_and(|c| c.open_until.is_some())
            {
                tracing::info!(%org, endpoint, "circuit closed: the endpoint answered");
            }
        } else {
            let circuit = circuits.entry(key).or_default();
            circuit.failures = circuit.failures.saturating_add(1);
            if circuit.probe_until.is_some() || circuit.failures >= self.threshold {
                if circuit.open_until.is_none() {
                    tracing::warn!(%org, endpoint, failures = circuit.failures, "circuit open: the endpoint keeps failing");
                }
                // A cooldown too long for the clock keeps the circuit open as long as it can.
                let now = Instant::now();
                circuit.open_until = Some(
                    now.checked_add(self.cooldown)
                        .or_else(|| now.checked_add(YEAR))
                        .unwrap_or(now),
                );
                circuit.probe_until = None;
            }
        }
        let open = circuits.values().filter(|c| c.open_until.is_some()).count();
        metrics::gauge!("keel_delivery_circuits_open").set(open as f64);
    }

    /// The organisation's circuits that are failing or open, by endpoint.
    pub fn circuits(&self, org: OrgId) -> Vec<CircuitView> {
        let now = Instant::now();
        let circuits = self.circuits.lock();
        let mut views: Vec<CircuitView> = circuits
            .iter()
            .filter(|((of, _), _)| *of == org)
            .map(|((_, endpoint), c)| CircuitView {
                endpoint: endpoint.clone(),
                state: match (c.open_until, c.probing(now)) {
                    (None, _) => "closed",
                    (Some(_), true) => "half_open",
                    (Some(_), false) => "open",
                },
                consecutive_failures: c.failures,
                opens_in_seconds: c
                    .open_until
                    .map(|until| until.saturating_duration_since(now).as_secs()),
            })
            .collect();
        views.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe's send deadline in these tests.
    const SEND: Duration = Duration::from_secs(10);

    #[test]
    fn opens_after_the_threshold_probes_after_the_cooldown_and_closes_on_success() {
        let breakers = Breakers::new(3, Duration::from_millis(50));
        let org = OrgId::new();
        let url = "http://example.com/hook";
        for _ in 0..2 {
            assert_eq!(
                breakers.admit(org, url, SEND),
                Admission::Send { probe: false }
            );
            breakers.record(org, url, true);
        }
        assert_eq!(breakers.circuits(org)[0].state, "closed");
        breakers.record(org, url, true);
        assert!(matches!(breakers.admit(org, url, SEND), Admission::Wait(_)));
        assert_eq!(breakers.circuits(org)[0].state, "open");
        // Another organisation's endpoint of the same URL is its own circuit.
        assert_eq!(
            breakers.admit(OrgId::new(), url, SEND),
            Admission::Send { probe: false }
        );

        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            breakers.admit(org, url, SEND),
            Admission::Send { probe: true }
        );
        // While the probe is out, the others wait for its deadline, not a second at a time.
        assert!(
            matches!(breakers.admit(org, url, SEND), Admission::Wait(w) if w > Duration::from_secs(9))
        );
        assert_eq!(breakers.circuits(org)[0].state, "half_open");
        // The probe fails: open again.
        breakers.record(org, url, true);
        assert!(matches!(breakers.admit(org, url, SEND), Admission::Wait(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            breakers.admit(org, url, SEND),
            Admission::Send { probe: true }
        );
        breakers.record(org, url, false);
        assert_eq!(
            breakers.admit(org, url, SEND),
            Admission::Send { probe: false }
        );
        assert!(breakers.circuits(org).is_empty());
    }

    #[test]
    fn a_probe_that_never_reports_is_followed_by_another_after_its_deadline() {
        let breakers = Breakers::new(1, Duration::from_millis(10));
        let org = OrgId::new();
        let url = "http://example.com/hook";
        breakers.record(org, url, true);
        std::thread::sleep(Duration::from_millis(20));
        let short = Duration::from_millis(30);
        assert_eq!(
            breakers.admit(org, url, short),
            Admission::Send { probe: true }
        );
        assert_eq!(breakers.admit(org, url, short), Admission::Wait(PROBE_WAIT));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(
            breakers.admit(org, url, short),
            Admission::Send { probe: true }
        );
    }
}
