//! Report of the error that ends a program, and its exit status.

use std::error::Error;
use std::process::ExitCode;

/// Formats `error` and its causes for a person: the message on the first
/// line, then each cause of [`distinct_causes`] on a line of its own.
pub fn error_report(error: &dyn Error) -> String {
    let mut report = format!("error: {error}");
    for cause in distinct_causes(&error.to_string(), error.source()) {
        report.push_str("\n  caused by: ");
        report.push_str(&cause);
    }
    report
}

/// Returns the texts of `cause` and its own causes, in order, leaving out
/// each text that the one before (starting with `message`) already
/// contains, because many errors embed their source in their message.
pub fn distinct_causes(message: &str, mut cause: Option<&dyn Error>) -> Vec<String> {
    let mut texts = Vec::new();
    let mut previous = message.to_owned();
    while let Some(current) = cause {
        let text = current.to_string();
        if !previous.contains(&text) {
            texts.push(text.clone());
        }
        previous = text;
        cause = current.source();
    }
    texts
}

/// Turns the result of a program's main work into its exit status: 0 on
/// success; on an error, prints [`error_report`] to stderr and returns 1.
pub fn exit_status<E: AsRef<dyn Error>>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", error_report(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to open checkpoint /x: {source}")]
    struct Embeds {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("failed to start the service")]
    struct Wraps {
        #[source]
        source: Embeds,
    }

    fn not_found() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory")
    }

    #[test]
    fn embedded_cause_is_printed_once() {
        let error = Wraps {
            source: Embeds { source: not_found() },
        };
        let report = error_report(&error);
        assert_eq!(
            report,
            "error: failed to start the service\n  caused by: failed to open checkpoint /x: No such file or directory"
        );
        assert_eq!(report.matches("No such file").count(), 1);
    }

    #[test]
    fn distinct_causes_are_all_printed() {
        let error = Wraps {
            source: Embeds {
                source: std::io::Error::other("disk on fire"),
            },
        };
        let lines: Vec<String> = error_report(&error).lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].ends_with("disk on fire"), "{lines:?}");
    }

    #[test]
    fn error_gives_failure_status() {
        let failed: Result<(), Box<dyn Error>> = Err(Box::new(not_found()));
        assert_eq!(exit_status(failed), ExitCode::FAILURE);
        assert_eq!(exit_status::<Box<dyn Error>>(Ok(())), ExitCode::SUCCESS);
    }
}
