//! Load plans: requests read from an Azure LLM inference trace
//! (`TIMESTAMP,ContextTokens,GeneratedTokens`), or synthetic ones of one size.

use std::path::Path;

/// One request of the plan: a prefill call of `context_tokens` tokens at
/// `arrival_seconds`, then `decode_steps` calls of one token each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlannedRequest {
    /// Seconds after the start of the run.
    pub arrival_seconds: f64,
    /// Tokens of the prefill call, at least 1.
    pub context_tokens: usize,
    /// One-token decode calls after the prefill.
    pub decode_steps: usize,
}

/// Settings that turn a trace into a plan.
#[derive(Clone, Copy, Debug)]
pub struct TraceOptions {
    /// Keep requests whose arrival, in trace seconds from the first
    /// request, falls in `[start, end)`.
    pub window: (f64, f64),
    /// Arrival times are multiplied by this.
    pub time_scale: f64,
    /// Token counts are multiplied by this and rounded, at least 1 for context.
    pub token_scale: f64,
    /// Largest number of decode calls per request.
    pub max_decode_steps: usize,
    /// Largest number of requests.
    pub max_requests: usize,
}

/// A trace line that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("failed to read trace {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The header is not the expected one.
    #[error("trace {path}: header {found:?}, expected \"TIMESTAMP,ContextTokens,GeneratedTokens\"")]
    Header {
        /// The file.
        path: String,
        /// The first line.
        found: String,
    },
    /// A line does not parse.
    #[error("trace {path}, line {line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// Description of the problem.
        message: String,
    },
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian calendar).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Parses `YYYY-MM-DD HH:MM:SS[.fraction]` into seconds since the epoch.
fn parse_timestamp(text: &str) -> Option<f64> {
    let (date, time) = text.trim().split_once(' ')?;
    let mut date = date.split('-').map(|part| part.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let mut time = time.split(':');
    let hours: f64 = time.next()?.parse().ok()?;
    let minutes: f64 = time.next()?.parse().ok()?;
    let seconds: f64 = time.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) as f64 * 86_400.0 + hours * 3600.0 + minutes * 60.0 + seconds)
}

/// Reads a trace file into a plan, sorted by arrival.
pub fn read_trace(path: &Path, options: &TraceOptions) -> Result<Vec<PlannedRequest>, TraceError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: name.clone(),
        source,
    })?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default().trim();
    if header != "TIMESTAMP,ContextTokens,GeneratedTokens" {
        return Err(TraceError::Header {
            path: name,
            found: header.to_owned(),
        });
    }

    let mut rows = Vec::new();
    for (index, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| TraceError::Line {
            path: name.clone(),
            line: index + 2,
            message,
        };
        let fields: Vec<&str> = line.split(',').collect();
        let [timestamp, context, generated] = fields[..] else {
            return Err(bad(format!("{} fields, expected 3", fields.len())));
        };
        let time = parse_timestamp(timestamp).ok_or_else(|| {
            bad(format!(
                "timestamp {timestamp:?}, expected YYYY-MM-DD HH:MM:SS.fraction"
            ))
        })?;
        let context: usize = context
            .trim()
            .parse()
            .map_err(|_| bad(format!("ContextTokens {context:?}, expected a non-negative integer")))?;
        let generated: usize = generated.trim().parse().map_err(|_| {
            bad(format!(
                "GeneratedTokens {generated:?}, expected a non-negative integer"
            ))
        })?;
        rows.push((time, context, generated));
    }

    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let first = rows.first().map_or(0.0, |row| row.0);
    let (start, end) = options.window;
    let scale = |tokens: usize| (tokens as f64 * options.token_scale).round() as usize;
    Ok(rows
        .into_iter()
        .filter(|row| (start..end).contains(&(row.0 - first)))
        .take(options.max_requests)
        .map(|(time, context, generated)| PlannedRequest {
            arrival_seconds: (time - first - start) * options.time_scale,
            context_tokens: scale(context).max(1),
            decode_steps: scale(generated).min(options.max_decode_steps),
        })
        .collect())
}

/// Returns a plan of `requests` requests of `tokens` tokens and
/// `decode_steps` decode calls each, all due at the start.
pub fn synthetic(requests: usize, tokens: usize, decode_steps: usize) -> Vec<PlannedRequest> {
    vec![
        PlannedRequest {
            arrival_seconds: 0.0,
            context_tokens: tokens.max(1),
            decode_steps,
        };
        requests
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> TraceOptions {
        TraceOptions {
            window: (0.0, f64::INFINITY),
            time_scale: 1.0,
            token_scale: 1.0,
            max_decode_steps: usize::MAX,
            max_requests: usize::MAX,
        }
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn timestamps_are_relative_to_first_request() {
        let file = write(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:15:50.5,396,109\n\
             2023-11-16 18:15:46.5,374,44\n\
             2023-11-17 00:00:00.0,10,0\n",
        );
        let plan = read_trace(file.path(), &options()).unwrap();
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[0].arrival_seconds, 0.0);
        assert_eq!(plan[0].context_tokens, 374);
        assert!((plan[1].arrival_seconds - 4.0).abs() < 1e-6);
        // Past midnight: 5 h 44 min 13.5 s after the first request.
        assert!((plan[2].arrival_seconds - 20_653.5).abs() < 1e-6);
    }

    #[test]
    fn window_and_scales_apply() {
        let file = write(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:00:00.0,100,40\n\
             2023-11-16 18:00:10.0,200,3\n\
             2023-11-16 18:00:30.0,5,1\n",
        );
        let options = TraceOptions {
            window: (5.0, 20.0),
            time_scale: 0.5,
            token_scale: 0.25,
            max_decode_steps: 2,
            max_requests: 10,
        };
        let plan = read_trace(file.path(), &options).unwrap();
        assert_eq!(
            plan,
            [PlannedRequest {
                arrival_seconds: 2.5,
                context_tokens: 50,
                decode_steps: 1
            }]
        );
    }

    #[test]
    fn bad_lines_name_the_line() {
        let header = write("time,a,b\n");
        assert!(
            read_trace(header.path(), &options())
                .unwrap_err()
                .to_string()
                .contains("header")
        );
        let line = write("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.0,x,1\n");
        let error = read_trace(line.path(), &options()).unwrap_err().to_string();
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("ContextTokens"), "{error}");
    }

    #[test]
    fn azure_trace_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/azure-llm-inference-2023/conv.csv");
        let plan = read_trace(&path, &options()).unwrap();
        assert!(plan.len() > 19_000);
        assert!(
            plan.windows(2)
                .all(|pair| pair[0].arrival_seconds <= pair[1].arrival_seconds)
        );
    }
}
