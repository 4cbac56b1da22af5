//! The run report: throughput, latency percentiles per call kind, errors by
//! status code and the gateway's balance report.

use std::collections::BTreeMap;

use moge_telemetry::balance::BalanceReport;
use serde::{Deserialize, Serialize};

/// Latency percentiles of one kind of call, in seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Successful calls measured.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest call.
    pub max: f64,
}

impl Percentiles {
    /// Summarizes `samples` (any order); nearest-rank percentiles.
    pub fn of(mut samples: Vec<f64>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(f64::total_cmp);
        let rank = |quantile: f64| {
            let index = (quantile * samples.len() as f64).ceil() as usize;
            samples[index.clamp(1, samples.len()) - 1]
        };
        Percentiles {
            count: samples.len(),
            mean: samples.iter().sum::<f64>() / samples.len() as f64,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

/// Rates over the whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Requests whose every call succeeded, per second.
    pub requests_per_second: f64,
    /// Tokens of successful calls per second; a call over several layers
    /// counts its tokens once.
    pub tokens_per_second: f64,
    /// Successful calls per second.
    pub calls_per_second: f64,
}

/// Latency of prefill and decode calls.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Calls of a request's context tokens.
    pub prefill: Percentiles,
    /// One-token calls.
    pub decode: Percentiles,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Gateway address.
    pub target: String,
    /// `open` (arrival times kept) or `closed` (fixed concurrency).
    pub loop_mode: String,
    /// Requests in flight at once in closed loop.
    pub concurrency: Option<usize>,
    /// Datatype of the hidden states.
    pub datatype: String,
    /// Layers each call runs through, in order.
    pub layers: Vec<u32>,
    /// Routing mode override, if any.
    pub routing: Option<String>,
    /// Wall time from the first call to the last response.
    pub duration_seconds: f64,
    /// Requests in the plan.
    pub requests: usize,
    /// Requests whose every call succeeded.
    pub requests_completed: usize,
    /// Successful calls.
    pub calls: usize,
    /// Tokens of successful calls.
    pub tokens: usize,
    /// Rates.
    pub throughput: Throughput,
    /// Latency percentiles per call kind.
    pub latency_seconds: Latency,
    /// Failed calls; 0 when none.
    pub errors: usize,
    /// Failed calls by gRPC status code name.
    pub errors_by_status: BTreeMap<String, usize>,
    /// The first error message of each status code in `errors_by_status`.
    #[serde(default)]
    pub error_examples: BTreeMap<String, String>,
    /// The gateway's balance report after the run, when its HTTP address was given.
    pub balance: Option<BalanceReport>,
}

impl Report {
    /// Renders the report for a person.
    pub fn summary(&self) -> String {
        let mut lines = vec![
            format!(
                "{} loop{} against {}, {} over layers {:?}{}",
                self.loop_mode,
                self.concurrency.map_or(String::new(), |n| format!(" with {n} clients")),
                self.target,
                self.datatype,
                self.layers,
                self.routing
                    .as_ref()
                    .map_or(String::new(), |mode| format!(", routing {mode}")),
            ),
            format!(
                "{:.2} s: {} of {} requests completed, {} calls, {} tokens",
                self.duration_seconds, self.requests_completed, self.requests, self.calls, self.tokens
            ),
            format!(
                "throughput: {:.1} requests/s, {:.1} tokens/s, {:.1} calls/s",
                self.throughput.requests_per_second,
                self.throughput.tokens_per_second,
                self.throughput.calls_per_second
            ),
        ];
        for (kind, latency) in [
            ("prefill", &self.latency_seconds.prefill),
            ("decode", &self.latency_seconds.decode),
        ] {
            if latency.count > 0 {
                lines.push(format!(
                    "{kind} latency ({} calls): p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                    latency.count,
                    latency.p50 * 1e3,
                    latency.p90 * 1e3,
                    latency.p99 * 1e3,
                    latency.max * 1e3
                ));
            }
        }
        if self.errors == 0 {
            lines.push("errors: 0".to_owned());
        } else {
            lines.push(format!("errors: {} failed calls", self.errors));
            for (status, count) in &self.errors_by_status {
                let example = self.error_examples.get(status).map_or("", String::as_str);
                lines.push(format!("  {status} ({count} calls), first error: {example}"));
            }
        }
        if let Some(balance) = &self.balance {
            let rates: Vec<String> = balance
                .groups
                .iter()
                .map(|group| format!("{}={:.0}", group.group, group.assignments_per_second))
                .collect();
            lines.push(format!(
                "balance (last minute): imbalance score {:.4} (max {:.4}), straggler gap {:.3} ms, assignments/s {}",
                balance.imbalance_score,
                balance.imbalance_score_max,
                balance.straggler_gap_seconds * 1e3,
                rates.join(" ")
            ));
        }
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let summary = Percentiles::of(samples);
        assert_eq!(summary.count, 100);
        assert_eq!(summary.p50, 50.0);
        assert_eq!(summary.p90, 90.0);
        assert_eq!(summary.p99, 99.0);
        assert_eq!(summary.max, 100.0);
        assert_eq!(summary.mean, 50.5);
    }

    #[test]
    fn percentiles_of_one_sample() {
        let summary = Percentiles::of(vec![0.25]);
        assert_eq!((summary.p50, summary.p99, summary.max), (0.25, 0.25, 0.25));
        assert_eq!(Percentiles::of(Vec::new()), Percentiles::default());
    }

    #[test]
    fn summary_reports_zero_errors() {
        let report = Report {
            loop_mode: "closed".to_owned(),
            concurrency: Some(4),
            ..Default::default()
        };
        assert!(report.summary().contains("errors: 0"));
        assert!(report.summary().contains("closed loop with 4 clients"));
    }

    #[test]
    fn summary_lists_first_error_per_status() {
        let report = Report {
            errors: 7,
            errors_by_status: BTreeMap::from([("INVALID_ARGUMENT".to_owned(), 5), ("UNAVAILABLE".to_owned(), 2)]),
            error_examples: BTreeMap::from([
                ("INVALID_ARGUMENT".to_owned(), "layer 7 is not hosted".to_owned()),
                ("UNAVAILABLE".to_owned(), "group 3 has no replica".to_owned()),
            ]),
            ..Default::default()
        };

        let summary = report.summary();

        assert!(summary.contains("errors: 7 failed calls"), "{summary}");
        assert!(
            summary.contains("  INVALID_ARGUMENT (5 calls), first error: layer 7 is not hosted"),
            "{summary}"
        );
        assert!(
            summary.contains("  UNAVAILABLE (2 calls), first error: group 3 has no replica"),
            "{summary}"
        );
    }
}
