//! `moge-ctl`: operator commands for a running moge-serve deployment.
//! `moge-ctl balance` prints the gateway's balance report as a table.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moge_telemetry::balance::BalanceReport;

#[derive(Parser)]
#[command(version, about = "Operator commands for a running moge-serve deployment")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the per-device load, imbalance score and straggler gap of the
    /// last minute, from the gateway's `GET /v1/balance`.
    Balance {
        /// The gateway's HTTP address.
        #[arg(long, env = "MOGE_GATEWAY_HTTP", default_value = "http://127.0.0.1:8000")]
        gateway: String,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the report again every this many seconds, until interrupted.
        #[arg(long)]
        watch: Option<f64>,
    },
}

fn fetch(gateway: &str) -> anyhow::Result<BalanceReport> {
    let url = format!("{}/v1/balance", gateway.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .call()
        .with_context(|| format!("failed to fetch {url}; is the gateway's HTTP port right (--gateway)?"))?;
    response
        .body_mut()
        .read_json::<BalanceReport>()
        .with_context(|| format!("{url} did not return a balance report"))
}

/// Formats seconds as milliseconds with three decimals.
fn millis(seconds: f64) -> String {
    format!("{:.3} ms", seconds * 1e3)
}

/// Renders the report for a person.
fn table(report: &BalanceReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "default routing mode: {}    window: {:.1} s",
        report.routing_mode, report.window_seconds
    );
    let _ = writeln!(
        out,
        "\n{:<14} {:>8} {:>10} {:>9} {:>9} {:>14} {:>14}",
        "mode", "batches", "all-time", "IS mean", "IS max", "gap mean", "gap max"
    );
    for mode in &report.modes {
        let _ = writeln!(
            out,
            "{:<14} {:>8} {:>10} {:>9.4} {:>9.4} {:>14} {:>14}",
            mode.mode,
            mode.batches,
            mode.batches_total,
            mode.imbalance_score,
            mode.imbalance_score_max,
            millis(mode.straggler_gap_seconds),
            millis(mode.straggler_gap_seconds_max)
        );
    }

    let routed: f64 = report
        .groups
        .iter()
        .filter(|group| group.group != moge_telemetry::balance::SHARED_GROUP)
        .map(|group| group.assignments_per_second)
        .sum();
    let _ = writeln!(
        out,
        "\n{:<7} {:<28} {:>16} {:>14} {:>8}",
        "group", "replica", "assignments/s", "total", "share"
    );
    for device in &report.devices {
        let share = if device.group == moge_telemetry::balance::SHARED_GROUP || routed == 0.0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", 100.0 * device.assignments_per_second / routed)
        };
        let _ = writeln!(
            out,
            "{:<7} {:<28} {:>16.1} {:>14} {:>8}",
            device.group, device.replica, device.assignments_per_second, device.assignments_total, share
        );
    }
    let rates: Vec<f64> = report
        .groups
        .iter()
        .filter(|group| group.group != moge_telemetry::balance::SHARED_GROUP)
        .map(|group| group.assignments_per_second)
        .collect();
    let max = rates.iter().copied().fold(0.0, f64::max);
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    if max > 0.0 {
        let _ = writeln!(out, "\nbusiest group over idlest group, last minute: {:.3}", max / min);
    } else {
        let _ = writeln!(out, "\nno assignments in the last minute");
    }
    out
}

fn main() -> anyhow::Result<()> {
    let Command::Balance { gateway, json, watch } = Cli::parse().command;
    loop {
        let report = fetch(&gateway)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", table(&report));
        }
        let Some(seconds) = watch else {
            return Ok(());
        };
        std::thread::sleep(Duration::from_secs_f64(seconds.max(0.1)));
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moge_telemetry::balance::{BalanceTracker, DeviceShare};

    #[test]
    fn table_shows_every_device_and_ratio() {
        let tracker = BalanceTracker::new(2, "top-k".to_owned());
        let share = |group: &str, assignments| DeviceShare {
            group: group.to_owned(),
            replica: format!("replica-{group}"),
            assignments,
        };
        tracker.record_batch(
            "top-k",
            0.25,
            0.002,
            &[share("0", 30), share("1", 10), share("shared", 20)],
        );

        let text = table(&tracker.report());

        assert!(text.contains("default routing mode: top-k"), "{text}");
        assert!(text.contains("replica-0"), "{text}");
        assert!(
            text.contains("75.0%"),
            "group 0 computed 30 of 40 routed assignments:\n{text}"
        );
        assert!(
            text.contains("busiest group over idlest group, last minute: 3.000"),
            "{text}"
        );
        assert!(text.contains("0.2500"), "{text}");
    }
}
