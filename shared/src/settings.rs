//! Layered service configuration: built-in defaults, then a TOML file, then
//! `MOGE_` environment variables, then command-line flags, each overriding
//! the one before.
//!
//! Every binary declares its settings once, as clap arguments with `long`
//! and `env`. A TOML key is the flag's name with `_` or `-`, so `grpc_port`
//! or `grpc-port` sets `--grpc-port`. The file fills only settings that
//! neither a flag nor the environment set. Every value goes through the
//! same clap parser, so a bad value in any layer is reported with the flag's
//! name and the accepted values.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};

/// Argument id of the flag that names the TOML file (`--config`).
pub const CONFIG_ARG: &str = "config";

/// The checkpoint and layers a service hosts; flatten into a binary's
/// arguments with `#[command(flatten)]`.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Checkpoint directory (Hugging Face layout); only the tensors this
    /// process hosts are read.
    #[arg(long, env = "MOGE_CHECKPOINT")]
    pub checkpoint: std::path::PathBuf,
    /// Layers to host, comma-separated; default: every layer in the checkpoint.
    #[arg(long, env = "MOGE_LAYERS", value_delimiter = ',')]
    pub layers: Vec<usize>,
}

/// A checkpoint that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The checkpoint could not be opened.
    #[error("--checkpoint {dir}: failed to open the checkpoint: {source}")]
    Open {
        /// The directory.
        dir: String,
        /// Underlying error.
        source: crate::checkpoint::CheckpointError,
    },
    /// A layer named by `--layers` is not in the checkpoint.
    #[error("--layers: layer {layer} is not in checkpoint {dir}, which has layers {available:?}")]
    MissingLayer {
        /// The layer asked for.
        layer: usize,
        /// The directory.
        dir: String,
        /// Layers the checkpoint has.
        available: Vec<usize>,
    },
    /// No layer would be hosted.
    #[error("checkpoint {dir} contains no layer tensors, expected at least one layer to host")]
    NoLayers {
        /// The directory.
        dir: String,
    },
}

impl ModelArgs {
    /// Opens the checkpoint and returns it with the layers to host.
    pub fn open(&self) -> Result<(crate::checkpoint::Checkpoint, Vec<usize>), ModelError> {
        let dir = self.checkpoint.display().to_string();
        let checkpoint = crate::checkpoint::Checkpoint::open(&self.checkpoint).map_err(|source| ModelError::Open {
            dir: dir.clone(),
            source,
        })?;
        let available = checkpoint.layers();
        if let Some(&layer) = self.layers.iter().find(|layer| !available.contains(layer)) {
            return Err(ModelError::MissingLayer { layer, dir, available });
        }
        let layers = if self.layers.is_empty() {
            available
        } else {
            self.layers.clone()
        };
        if layers.is_empty() {
            return Err(ModelError::NoLayers { dir });
        }
        Ok((checkpoint, layers))
    }
}

/// Settings every internal gRPC service shares; flatten into a binary's
/// arguments with `#[command(flatten)]`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "MOGE_HOST", default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// gRPC port; 0 picks a free port, which the "listening" log line reports.
    #[arg(long, env = "MOGE_GRPC_PORT", default_value_t = 8001)]
    pub grpc_port: u16,
    /// Largest gRPC message accepted or sent, in bytes; at least 65536.
    #[arg(long, env = "MOGE_MAX_MESSAGE_BYTES", default_value_t = 256 << 20, value_parser = at_least(65536_usize))]
    pub max_message_bytes: usize,
    /// Replica name reported by `moge.v1.Host/Describe`, for example the pod name.
    #[arg(long, env = "MOGE_REPLICA", default_value = "")]
    pub replica: String,
    /// Seconds that in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "MOGE_DRAIN_TIMEOUT_SECONDS", default_value_t = 30)]
    pub drain_timeout_seconds: u64,
    /// TLS and mTLS of the gRPC port.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

impl ServerArgs {
    /// Binds the gRPC port. Services bind before they load weights, so that
    /// a port in use fails at once and the replica name can use the port.
    pub async fn bind(&self) -> Result<tokio::net::TcpListener, crate::service::ServeError> {
        crate::service::bind(std::net::SocketAddr::new(self.host, self.grpc_port), "--grpc-port").await
    }

    /// Reads the TLS files, logs which are used and returns the gRPC
    /// port's TLS configuration, or `None` when TLS is off.
    pub fn grpc_tls(
        &self,
        service: &str,
    ) -> Result<Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>, crate::tls::TlsError> {
        let config = self.tls.server_config(crate::tls::ALPN_GRPC)?;
        self.tls.log_summary(service);
        Ok(config)
    }

    /// Time in-flight requests get after SIGTERM.
    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.drain_timeout_seconds)
    }

    /// Resource attributes of the process for telemetry: the replica name,
    /// or else the configured `HOST:PORT`.
    pub fn instance(&self) -> Vec<opentelemetry::KeyValue> {
        let name = if self.replica.is_empty() {
            std::net::SocketAddr::new(self.host, self.grpc_port).to_string()
        } else {
            self.replica.clone()
        };
        vec![opentelemetry::KeyValue::new("service.instance.id", name)]
    }

    /// Returns `--replica`, or else `HOST:PORT` of the bound `address`, which
    /// names the replica in metrics and in `moge.v1.Host/Describe`.
    pub fn replica_name(&self, address: std::net::SocketAddr) -> String {
        if self.replica.is_empty() {
            address.to_string()
        } else {
            self.replica.clone()
        }
    }
}

/// A configuration file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file is missing or not valid TOML.
    #[error("--config {path}: failed to read the configuration file: {source}")]
    Read {
        /// The file.
        path: String,
        /// Underlying error.
        source: config::ConfigError,
    },
    /// The file has keys that no flag matches.
    #[error("configuration file {path}: unknown keys {keys:?}, expected any of {known:?}")]
    UnknownKeys {
        /// The file.
        path: String,
        /// Every unknown key.
        keys: Vec<String>,
        /// The keys the binary accepts.
        known: Vec<String>,
    },
    /// A key has a value of a type no flag takes, such as a table.
    #[error(
        "configuration file {path}: key `{key}` has an unsupported value, expected a string, number, boolean or array"
    )]
    Value {
        /// The file.
        path: String,
        /// The key.
        key: String,
    },
}

/// Returns a parser of a whole-number flag value of at least `minimum`.
/// clap prefixes its error with the flag's name and the rejected value.
pub fn at_least<T>(minimum: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy + Send + Sync + 'static,
{
    move |text: &str| match text.parse::<T>() {
        Ok(value) if value >= minimum => Ok(value),
        _ => Err(format!("expected a whole number of at least {minimum}")),
    }
}

/// Parses the process's arguments into `T`, filling from the TOML file named
/// by `--config` the settings that flags and environment left at defaults.
/// Exits with clap's message on a bad flag or value, and with a message
/// naming every bad key on a bad file.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    match parse_from::<T>(std::env::args_os().collect()) {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(error)) => error.exit(),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(2);
        }
    }
}

/// [`parse`] on explicit arguments; the outer error is the file's, the inner
/// one clap's.
pub fn parse_from<T: CommandFactory + FromArgMatches>(
    args: Vec<OsString>,
) -> Result<Result<T, clap::Error>, SettingsError> {
    let command = T::command();
    let finish = |all: Vec<OsString>, file: Option<(&Path, &BTreeMap<String, config::Value>)>| {
        command
            .clone()
            .try_get_matches_from(all)
            .and_then(|matches| T::from_arg_matches(&matches))
            .map_err(|error| with_value_source(error, &command, &args, file))
    };
    // A first pass only finds the file and what the command line and the
    // environment set; required flags may still come from the file.
    let Ok(matches) = command.clone().ignore_errors(true).try_get_matches_from(&args) else {
        return Ok(finish(args.clone(), None));
    };
    let Some(path) = matches
        .try_get_one::<std::path::PathBuf>(CONFIG_ARG)
        .ok()
        .flatten()
        .cloned()
    else {
        return Ok(finish(args.clone(), None));
    };
    let path = path.as_path();
    let file = read(path)?;

    let mut unknown = Vec::new();
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &file {
        let flag = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(flag.as_str()))
        else {
            unknown.push(key.clone());
            continue;
        };
        if !matches!(
            matches.value_source(arg.get_id().as_str()),
            None | Some(ValueSource::DefaultValue)
        ) {
            continue;
        }
        let long = format!("--{}", arg.get_long().unwrap_or_default());
        let bad_value = || SettingsError::Value {
            path: path.display().to_string(),
            key: key.clone(),
        };
        // A repeatable flag without a delimiter takes one array item per use.
        let items = match &value.kind {
            config::ValueKind::Array(items) if arg.get_value_delimiter().is_none() => items.clone(),
            _ => vec![value.clone()],
        };
        for item in &items {
            let text = flag_value(item).ok_or_else(bad_value)?;
            if matches!(arg.get_action(), ArgAction::SetTrue) {
                if text == "true" {
                    extra.push(long.clone().into());
                }
            } else {
                extra.push(format!("{long}={text}").into());
            }
        }
    }
    if !unknown.is_empty() {
        let known = command
            .get_arguments()
            .filter_map(|arg| arg.get_long().map(|long| long.replace('-', "_")))
            .filter(|key| key != CONFIG_ARG && key != "help" && key != "version")
            .collect();
        return Err(SettingsError::UnknownKeys {
            path: path.display().to_string(),
            keys: unknown,
            known,
        });
    }
    let mut all = args.clone();
    all.extend(extra);
    Ok(finish(all, Some((path, &file))))
}

/// Adds to clap's error about a bad value a tip saying where the value came
/// from when it was not the command line: a key of the configuration file
/// or an environment variable. clap names only the flag.
fn with_value_source(
    mut error: clap::Error,
    command: &clap::Command,
    args: &[OsString],
    file: Option<(&Path, &BTreeMap<String, config::Value>)>,
) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};

    if !matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        return error;
    }
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let Some(long) = invalid
        .split_whitespace()
        .next()
        .and_then(|flag| flag.strip_prefix("--"))
    else {
        return error;
    };
    let Some(arg) = command.get_arguments().find(|arg| arg.get_long() == Some(long)) else {
        return error;
    };
    let flag = format!("--{long}");
    let on_command_line = args.iter().skip(1).any(|given| {
        let given = given.to_string_lossy();
        given == flag || given.starts_with(&format!("{flag}="))
    });
    if on_command_line {
        return error;
    }
    let key = long.replace('-', "_");
    let from_file = file.and_then(|(path, keys)| {
        [key.clone(), long.to_owned()]
            .into_iter()
            .find(|name| keys.contains_key(name))
            .map(|name| {
                format!(
                    "the value comes from key `{name}` of the configuration file {}",
                    path.display()
                )
            })
    });
    let from_env = arg
        .get_env()
        .filter(|name| std::env::var_os(name).is_some())
        .map(|name| {
            format!(
                "the value comes from the environment variable {}",
                name.to_string_lossy()
            )
        });
    if let Some(tip) = from_env.or(from_file) {
        error.insert(ContextKind::Suggested, ContextValue::StyledStrs(vec![tip.into()]));
    }
    error
}

fn read(path: &Path) -> Result<BTreeMap<String, config::Value>, SettingsError> {
    let error = |source| SettingsError::Read {
        path: path.display().to_string(),
        source,
    };
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .map_err(error)?
        .try_deserialize::<BTreeMap<String, config::Value>>()
        .map_err(error)
}

/// Renders a TOML value as the flag's text; arrays join with commas.
fn flag_value(value: &config::Value) -> Option<String> {
    use config::ValueKind;
    match &value.kind {
        ValueKind::String(text) => Some(text.clone()),
        ValueKind::Boolean(flag) => Some(flag.to_string()),
        ValueKind::I64(number) => Some(number.to_string()),
        ValueKind::I128(number) => Some(number.to_string()),
        ValueKind::U64(number) => Some(number.to_string()),
        ValueKind::U128(number) => Some(number.to_string()),
        ValueKind::Float(number) => Some(number.to_string()),
        ValueKind::Array(items) => items
            .iter()
            .map(flag_value)
            .collect::<Option<Vec<_>>>()
            .map(|items| items.join(",")),
        ValueKind::Nil | ValueKind::Table(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Args {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 8001)]
        grpc_port: u16,
        #[arg(long, value_delimiter = ',')]
        layers: Vec<usize>,
        #[arg(long, default_value = "moge")]
        routing: String,
        #[arg(long)]
        shared_expert: bool,
        #[arg(long = "group")]
        groups: Vec<String>,
    }

    fn parse_with(file: &str, flags: &[&str]) -> Result<Result<Args, clap::Error>, SettingsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("moge.toml");
        std::fs::write(&path, file).unwrap();
        let mut args: Vec<OsString> = vec!["test".into(), "--config".into(), path.into()];
        args.extend(flags.iter().map(OsString::from));
        parse_from::<Args>(args)
    }

    #[test]
    fn file_fills_defaults() {
        let args = parse_with("grpc_port = 9001\nlayers = [0, 3]\nshared-expert = true\n", &[])
            .unwrap()
            .unwrap();
        assert_eq!(args.grpc_port, 9001);
        assert_eq!(args.layers, [0, 3]);
        assert!(args.shared_expert);
        assert_eq!(args.routing, "moge");
    }

    #[test]
    fn repeatable_flag_takes_each_item() {
        let args = parse_with("group = [\"a,b\", \"c\"]\n", &[]).unwrap().unwrap();
        assert_eq!(args.groups, ["a,b", "c"]);
    }

    #[test]
    fn flags_override_file() {
        let args = parse_with("grpc_port = 9001\nrouting = \"top-k\"\n", &["--grpc-port", "7000"])
            .unwrap()
            .unwrap();
        assert_eq!(args.grpc_port, 7000);
        assert_eq!(args.routing, "top-k");
    }

    #[test]
    fn unknown_keys_are_all_named() {
        let error = parse_with("grpc_prot = 1\nrouter_mode = 2\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("unknown keys [\"grpc_prot\", \"router_mode\"]"),
            "{error}"
        );
        assert!(error.contains("grpc_port"), "{error}");
    }

    #[test]
    fn bad_value_names_the_flag() {
        let error = parse_with("grpc_port = \"high\"\n", &[])
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(error.contains("--grpc-port"), "{error}");
    }

    #[test]
    fn bad_file_value_names_the_key_and_file() {
        let error = parse_with("grpc_port = \"high\"\n", &[])
            .unwrap()
            .unwrap_err()
            .render()
            .to_string();
        assert!(error.contains("key `grpc_port` of the configuration file"), "{error}");
        assert!(error.contains("moge.toml"), "{error}");
    }

    #[test]
    fn bad_flag_value_has_no_source_tip() {
        let error = parse_with("", &["--grpc-port", "high"])
            .unwrap()
            .unwrap_err()
            .render()
            .to_string();
        assert!(error.contains("--grpc-port"), "{error}");
        assert!(!error.contains("the value comes from"), "{error}");
    }

    #[test]
    fn missing_file_is_reported() {
        let args = vec!["test".into(), "--config".into(), "/nonexistent/moge.toml".into()];
        let error = parse_from::<Args>(args).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/moge.toml"), "{error}");
    }
}
