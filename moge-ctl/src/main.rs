//! `moge-ctl`: operator commands for a running moge-serve deployment.
//! `moge-ctl balance` prints the gateway's balance report as a table.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moge_ctl::client::{BalanceClient, ClientArgs, ClientSecurity, parse_address};
use moge_telemetry::balance::BalanceReport;

/// Shortest `--watch` interval, in seconds.
const MIN_WATCH_SECONDS: f64 = 0.1;
/// Longest `--watch` interval, in seconds: one day.
const MAX_WATCH_SECONDS: f64 = 86_400.0;
/// Time each balance request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
        /// The gateway's HTTP address: HOST:PORT, http://HOST:PORT or
        /// https://HOST:PORT. HOST:PORT uses https:// when --tls-ca-file is
        /// set and http:// otherwise.
        #[arg(long, env = "MOGE_GATEWAY_HTTP", default_value = "127.0.0.1:8000", value_parser = parse_address)]
        gateway: String,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Print the report again every this many seconds (0.1 to 86400),
        /// until interrupted or until stdout is closed.
        #[arg(long, value_name = "SECONDS", value_parser = parse_watch, allow_negative_numbers = true)]
        watch: Option<Duration>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Parses the `--watch` interval. clap adds the flag's name to the error.
fn parse_watch(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds from {MIN_WATCH_SECONDS} to {MAX_WATCH_SECONDS}"))?;
    // NaN fails the range check too.
    if !(MIN_WATCH_SECONDS..=MAX_WATCH_SECONDS).contains(&seconds) {
        return Err(format!(
            "{text} is out of range, expected a number of seconds from {MIN_WATCH_SECONDS} to {MAX_WATCH_SECONDS} (one day)"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
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

/// Writes `text` to stdout. Returns `Ok(false)` when stdout is closed,
/// for example by `head`, which ends the command without an error.
fn print(text: &str) -> anyhow::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match write!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(error).context("failed to write to stdout"),
    }
}

fn main() -> std::process::ExitCode {
    moge_telemetry::exit::exit_status(run())
}

fn run() -> anyhow::Result<()> {
    let Command::Balance {
        gateway,
        json,
        watch,
        client,
    } = Cli::parse().command;
    let security = ClientSecurity::load(&client)?;
    let balance = BalanceClient::new(&security, "--gateway", &gateway, REQUEST_TIMEOUT)?;
    loop {
        let report = balance.fetch()?;
        let text = if json {
            let mut text = serde_json::to_string_pretty(&report)?;
            text.push('\n');
            text
        } else {
            table(&report)
        };
        if !print(&text)? {
            return Ok(());
        }
        let Some(interval) = watch else {
            return Ok(());
        };
        std::thread::sleep(interval);
        if !print("\n")? {
            return Ok(());
        }
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

    #[test]
    fn watch_accepts_range() {
        assert_eq!(parse_watch("0.1"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_watch("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_watch("86400"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn watch_rejects_out_of_range() {
        for text in ["NaN", "inf", "-inf", "1e30", "0", "0.05", "-1", "86401"] {
            let error = parse_watch(text).unwrap_err();
            assert!(error.contains("out of range"), "{text}: {error}");
            assert!(error.contains("from 0.1 to 86400"), "{text}: {error}");
        }
        let error = parse_watch("soon").unwrap_err();
        assert!(error.contains("expected a number of seconds"), "{error}");
    }

    #[test]
    fn watch_error_names_flag() {
        let error = Cli::try_parse_from(["moge-ctl", "balance", "--watch", "NaN"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("--watch"), "{error}");
    }
}
