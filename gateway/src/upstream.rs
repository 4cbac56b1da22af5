//! Connections to the router, every expert group and the shared expert,
//! with replica failover, ejection of failing replicas and a background
//! health probe.
//!
//! Every upstream call is a pure function of its request (routing or
//! expert compute, no state changes on the replica), so a call that failed
//! on one replica can be sent to another without risk of applying it twice.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use moge_shared::proto::moge::v1::host_client::HostClient;
use moge_shared::proto::moge::v1::{DescribeRequest, Role};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::upstream_tls::UpstreamTls;

/// One replica of an upstream service.
pub struct Replica {
    /// Address as configured, for logs and errors.
    pub url: String,
    /// Lazily connected channel.
    pub channel: Channel,
    ready: AtomicBool,
    /// Calls in flight on this replica, the load that selection compares.
    inflight: AtomicUsize,
    /// Whether the replica hosts what the pool expects: [`UNVERIFIED`],
    /// [`VERIFIED`] or [`MISMATCHED`].
    identity: AtomicU8,
    /// Name the replica reports (`--replica`), or the URL until it was described.
    name: Mutex<Arc<str>>,
    /// Consecutive failed calls and the ejection they caused.
    ejection: Mutex<Ejection>,
    /// Error of the last failed health check, so that a repeated failure
    /// is logged once rather than every probe interval.
    probe_error: Mutex<Option<String>>,
    /// Ejections since start, for metrics.
    ejections: AtomicU64,
}

/// First ejection of a replica after a failed call; each further
/// consecutive failure doubles it, up to [`MAX_EJECTION`].
pub const BASE_EJECTION: Duration = Duration::from_millis(250);
/// Maximum ejection of a replica.
pub const MAX_EJECTION: Duration = Duration::from_secs(8);
/// Timeout of one health check or identity check of a replica.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Failure state of one replica.
#[derive(Debug, Default)]
struct Ejection {
    /// Failed calls since the last successful one.
    failures: u32,
    /// End of the current ejection; the replica gets no call and no probe before it.
    until: Option<Instant>,
}

/// Returns how long a replica is ejected after `failures` consecutive failures.
fn ejection_time(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BASE_EJECTION.saturating_mul(1 << doublings).min(MAX_EJECTION)
}

const UNVERIFIED: u8 = 0;
const VERIFIED: u8 = 1;
const MISMATCHED: u8 = 2;

/// Role and group every replica of a pool must host, checked with
/// `moge.v1.Host/Describe` before the replica gets any call. A group's
/// requests carry group-local expert indices, so a replica of another group
/// would compute the wrong experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Expected role.
    pub role: Role,
    /// Expected group, for expert groups.
    pub group: Option<u32>,
}

impl Identity {
    /// Returns the gateway flag that lists the addresses of this role.
    pub fn flag(&self) -> &'static str {
        match self.role {
            Role::Router => "--router",
            Role::SharedExpert => "--shared-expert",
            _ => "--group",
        }
    }
}

/// The replicas of one upstream service, tried in turn.
pub struct Pool {
    /// Name for logs and errors: `router`, `group 3` or `shared expert`.
    pub name: String,
    /// gRPC service name whose health decides readiness.
    pub service: &'static str,
    /// The replicas.
    pub replicas: Vec<Replica>,
    /// Role and group every replica must host.
    pub identity: Identity,
    next: AtomicUsize,
    /// Calls moved to another replica after a retryable failure, for metrics.
    retries: AtomicU64,
}

/// Returns `address` with a scheme: `HOST:PORT` gets `https://` when
/// upstream TLS is on and `http://` otherwise; a URL is kept as it is.
fn with_scheme(address: &str, tls: bool) -> String {
    if address.contains("://") {
        address.to_owned()
    } else if tls {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    }
}

/// A configured address that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// The address is not a valid URI.
    #[error("{flag} ({name}): invalid upstream address {url:?}: {source}")]
    Invalid {
        /// The flag that lists the address.
        flag: &'static str,
        /// Pool name.
        name: String,
        /// The address.
        url: String,
        /// Underlying error.
        source: tonic::transport::Error,
    },
    /// The address has a scheme other than `http` or `https`.
    #[error(
        "{flag} ({name}): upstream address {url:?} has an unsupported scheme, expected HOST:PORT, http://HOST:PORT or \
         https://HOST:PORT"
    )]
    Scheme {
        /// The flag that lists the address.
        flag: &'static str,
        /// Pool name.
        name: String,
        /// The address.
        url: String,
    },
    /// The address's scheme does not match the upstream TLS settings.
    #[error(transparent)]
    Tls(#[from] crate::upstream_tls::UpstreamTlsError),
}

impl Pool {
    /// Builds a pool from `http://host:port` addresses, or `https://` ones
    /// when `tls` is on; connects lazily.
    pub fn new(
        name: String,
        service: &'static str,
        identity: Identity,
        urls: &[String],
        tls: &UpstreamTls,
    ) -> Result<Self, AddressError> {
        let replicas = urls
            .iter()
            .map(|url| with_scheme(url, tls.enabled()))
            .map(|url| {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(AddressError::Scheme {
                        flag: identity.flag(),
                        name: name.clone(),
                        url,
                    });
                }
                let endpoint = Endpoint::from_shared(url.clone()).map_err(|source| AddressError::Invalid {
                    flag: identity.flag(),
                    name: name.clone(),
                    url: url.clone(),
                    source,
                })?;
                let endpoint = tls.configure(&name, &url, endpoint)?;
                let endpoint = endpoint
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .initial_stream_window_size(moge_shared::service::HTTP2_STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(moge_shared::service::HTTP2_CONNECTION_WINDOW_BYTES);
                Ok(Replica {
                    url: url.clone(),
                    channel: endpoint.connect_lazy(),
                    ready: AtomicBool::new(false),
                    inflight: AtomicUsize::new(0),
                    identity: AtomicU8::new(UNVERIFIED),
                    name: Mutex::new(Arc::from(url.as_str())),
                    ejection: Mutex::new(Ejection::default()),
                    probe_error: Mutex::new(None),
                    ejections: AtomicU64::new(0),
                })
            })
            .collect::<Result<Vec<_>, AddressError>>()?;
        Ok(Pool {
            name,
            service,
            identity,
            replicas,
            next: AtomicUsize::new(0),
            retries: AtomicU64::new(0),
        })
    }

    /// Replicas in the order to try them for one call. The first is chosen
    /// by power of two choices among the ready replicas: of two picked in
    /// rotation, the one with fewer calls in flight. The other ready ones
    /// follow, then the ones not ready, as fallbacks. Replicas whose identity
    /// is not verified, and ejected replicas, never get a call.
    pub fn order(&self) -> Vec<&Replica> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.replicas.len();
        let now = Instant::now();
        let rotated = (0..count)
            .map(|offset| &self.replicas[(start + offset) % count])
            .filter(|replica| replica.identity.load(Ordering::Relaxed) == VERIFIED)
            .filter(|replica| !replica.is_ejected(now));
        let (mut ready, not_ready): (Vec<&Replica>, Vec<&Replica>) = rotated.partition(|replica| replica.is_ready());
        if ready.len() >= 2 {
            // The second candidate sits half the ring away, so that two
            // consecutive calls do not compare the same pair.
            let other = ready.len() / 2;
            if ready[other].inflight.load(Ordering::Relaxed) < ready[0].inflight.load(Ordering::Relaxed) {
                ready.swap(0, other);
            }
        }
        ready.into_iter().chain(not_ready).collect()
    }

    /// Returns whether at least one replica passed its last health check.
    pub fn is_ready(&self) -> bool {
        self.replicas.iter().any(Replica::is_ready)
    }

    /// Describes why no replica was tried: the first replica's last failed
    /// health check, which names the real cause (a TLS mismatch, a closed
    /// port), or else that every replica is unverified or ejected.
    fn probe_failure(&self) -> String {
        self.replicas
            .iter()
            .find_map(|replica| {
                let error = replica
                    .probe_error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                error
                    .as_ref()
                    .map(|error| format!("{}: health check failed: {error}", replica.url))
            })
            .unwrap_or_else(|| "no replica has passed a health check, or every replica is ejected".to_owned())
    }

    /// Returns how many calls moved to another replica since start.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Returns how many replicas passed their last health check.
    pub fn ready_replicas(&self) -> usize {
        self.replicas.iter().filter(|replica| replica.is_ready()).count()
    }

    /// Checks the health of every replica that is not ejected.
    pub async fn probe(&self) {
        for replica in &self.replicas {
            if replica.is_ejected(Instant::now()) {
                replica.ready.store(false, Ordering::Relaxed);
                continue;
            }
            let mut client = HealthClient::new(replica.channel.clone());
            let request = HealthCheckRequest {
                service: self.service.to_owned(),
            };
            let checked = tokio::time::timeout(PROBE_TIMEOUT, client.check(request)).await;
            let error = match &checked {
                Ok(Ok(_)) => None,
                // A TLS or certificate problem shows up here, as UNAVAILABLE
                // with the transport error in the message.
                Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
                Err(_) => Some(format!("timed out after {PROBE_TIMEOUT:?}")),
            };
            replica.note_probe_error(&self.name, error);
            let serving = matches!(
                checked,
                Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32
            );
            let serving = serving && self.verify(replica).await;
            let was = replica.ready.swap(serving, Ordering::Relaxed);
            if was != serving {
                tracing::info!(upstream = %self.name, replica = %replica.url, ready = serving, "replica readiness changed");
            }
        }
    }

    /// Checks, once per replica and again after it was not ready, that it
    /// hosts what the pool expects; logs an error on a mismatch.
    async fn verify(&self, replica: &Replica) -> bool {
        if replica.is_ready() && replica.identity.load(Ordering::Relaxed) == VERIFIED {
            return true;
        }
        let mut client = HostClient::new(replica.channel.clone());
        let described = tokio::time::timeout(PROBE_TIMEOUT, client.describe(DescribeRequest {})).await;
        let Ok(Ok(description)) = described else {
            return false;
        };
        let description = description.into_inner();
        let found = Identity {
            role: Role::try_from(description.role).unwrap_or(Role::Unspecified),
            group: description.group,
        };
        if found == self.identity {
            if !description.replica.is_empty() {
                *replica.name.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::from(description.replica);
            }
            replica.identity.store(VERIFIED, Ordering::Relaxed);
            return true;
        }
        if replica.identity.swap(MISMATCHED, Ordering::Relaxed) != MISMATCHED {
            tracing::error!(
                upstream = %self.name,
                replica = %replica.url,
                expected = ?self.identity,
                found = ?found,
                "replica hosts something else than configured; it gets no calls until fixed"
            );
        }
        false
    }

    /// Ejects a replica after a failed call: it gets no call and no probe
    /// for [`ejection_time`] of its consecutive failures, then the probe
    /// decides when it is ready again. Calls that fail while the replica is
    /// already ejected (they were in flight) do not extend the ejection.
    pub fn eject(&self, replica: &Replica, error: &tonic::Status) {
        replica.ready.store(false, Ordering::Relaxed);
        let now = Instant::now();
        let mut ejection = replica.ejection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if ejection.until.is_some_and(|until| until > now) {
            return;
        }
        ejection.failures = ejection.failures.saturating_add(1);
        replica.ejections.fetch_add(1, Ordering::Relaxed);
        let time = ejection_time(ejection.failures);
        ejection.until = Some(now + time);
        tracing::warn!(
            upstream = %self.name,
            replica = %replica.url,
            code = ?error.code(),
            message = error.message(),
            consecutive_failures = ejection.failures,
            ejected_ms = time.as_millis() as u64,
            "replica failed; ejected, calls go to other replicas"
        );
    }
}

impl Replica {
    /// Logs a failed health check when its error differs from the last
    /// one, so a replica that keeps failing the same way is logged once.
    fn note_probe_error(&self, pool: &str, error: Option<String>) {
        let mut last = self.probe_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(message) = &error
            && last.as_ref() != Some(message)
        {
            tracing::warn!(upstream = %pool, replica = %self.url, error = %message, "health check failed; will retry every probe interval");
        }
        *last = error;
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn is_ejected(&self, now: Instant) -> bool {
        let ejection = self.ejection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        ejection.until.is_some_and(|until| until > now)
    }

    /// Ends the replica's run of failures after a successful call.
    fn record_success(&self) {
        let mut ejection = self.ejection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if ejection.failures > 0 {
            tracing::info!(
                replica = %self.url,
                consecutive_failures = ejection.failures,
                "replica answered again after failures"
            );
        }
        *ejection = Ejection::default();
    }

    /// Returns how many times the replica was ejected since start.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Name the replica reports, for metrics and the balance report.
    pub fn name(&self) -> Arc<str> {
        Arc::clone(&self.name.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

/// Every upstream of the gateway.
pub struct Upstreams {
    /// The router.
    pub router: Pool,
    /// Expert groups, by group index.
    pub groups: Vec<Pool>,
    /// The shared expert.
    pub shared_expert: Pool,
}

impl Upstreams {
    /// Lists all pools, router first.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        std::iter::once(&self.router)
            .chain(self.groups.iter())
            .chain(std::iter::once(&self.shared_expert))
    }

    /// Returns whether the router, every group and the shared expert have a
    /// ready replica.
    pub fn is_ready(&self) -> bool {
        self.pools().all(Pool::is_ready)
    }

    /// Probes every replica every `interval` until the returned task is
    /// aborted, and publishes [`Upstreams::is_ready`] after each round on
    /// `ready`.
    pub fn spawn_probe(
        self: &Arc<Self>,
        interval: Duration,
        ready: tokio::sync::watch::Sender<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let upstreams = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                for pool in upstreams.pools() {
                    pool.probe().await;
                }
                let now_ready = upstreams.is_ready();
                ready.send_if_modified(|state| std::mem::replace(state, now_ready) != now_ready);
                tokio::time::sleep(interval).await;
            }
        })
    }
}

/// Returns whether a failed call may succeed on another replica.
fn is_retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// A call that failed on every replica, or failed for a reason another
/// replica would share.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No replica could be reached.
    #[error("{upstream}: no replica reachable (last error: {last})")]
    Unavailable {
        /// Pool name.
        upstream: String,
        /// Last error seen.
        last: String,
    },
    /// The upstream rejected the call.
    #[error("{upstream}: {}", status.message())]
    Rejected {
        /// Pool name.
        upstream: String,
        /// The upstream's status.
        status: tonic::Status,
    },
    /// The deadline of the call passed before a replica responded.
    #[error("{upstream}: the request deadline passed after {attempts} attempt(s)")]
    DeadlineExceeded {
        /// Pool name.
        upstream: String,
        /// Replicas called before the deadline passed.
        attempts: usize,
    },
}

/// One try of a call on one replica.
pub struct Attempt {
    /// Channel to the replica.
    pub channel: Channel,
    /// Time left until the call's deadline, to send as `grpc-timeout`;
    /// None without a deadline.
    pub timeout: Option<Duration>,
    /// Address of the replica; tests tell replicas apart by it.
    #[cfg(test)]
    pub url: String,
}

impl Attempt {
    /// Sets the attempt's timeout on `request`, sent as `grpc-timeout`.
    pub fn request<T>(&self, mut request: tonic::Request<T>) -> tonic::Request<T> {
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        request
    }
}

/// Keeps a replica's in-flight count right when a call is dropped midway.
struct InflightGuard<'a>(&'a AtomicUsize);

impl<'a> InflightGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InflightGuard(counter)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// Calls `call` on one replica after another until one succeeds, fails
    /// with an error another replica would share, or `deadline` passes.
    /// Each replica gets at most one try, and a replica whose try failed
    /// with a retryable error is ejected. Returns the result and the
    /// replica that produced it.
    pub async fn call<T, F, Fut>(&self, deadline: Option<Instant>, call: F) -> Result<(T, &Replica), CallError>
    where
        F: Fn(Attempt) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = None;
        let mut attempts = 0;
        let deadline_error = |attempts| CallError::DeadlineExceeded {
            upstream: self.name.clone(),
            attempts,
        };
        for replica in self.order() {
            let timeout = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(deadline_error(attempts));
                    }
                    Some(left)
                }
                None => None,
            };
            if attempts > 0 {
                self.retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(upstream = %self.name, replica = %replica.url, attempts, "retrying the call on another replica");
            }
            attempts += 1;
            let attempt = Attempt {
                channel: replica.channel.clone(),
                timeout,
                #[cfg(test)]
                url: replica.url.clone(),
            };
            let result = {
                let _inflight = InflightGuard::new(&replica.inflight);
                match deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline, call(attempt)).await {
                        Ok(result) => result,
                        Err(_) => return Err(deadline_error(attempts)),
                    },
                    None => call(attempt).await,
                }
            };
            match result {
                Ok(value) => {
                    replica.record_success();
                    return Ok((value, replica));
                }
                // The replica is not at fault when the call ran out of time.
                Err(_) if deadline.is_some_and(|deadline| deadline <= Instant::now()) => {
                    return Err(deadline_error(attempts));
                }
                Err(status) if is_retryable(status.code()) => {
                    self.eject(replica, &status);
                    last = Some(format!("{}: {}", replica.url, status.message()));
                }
                Err(status) => {
                    return Err(CallError::Rejected {
                        upstream: self.name.clone(),
                        status,
                    });
                }
            }
        }
        Err(CallError::Unavailable {
            upstream: self.name.clone(),
            last: last.unwrap_or_else(|| self.probe_failure()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(replicas: usize) -> Pool {
        let urls: Vec<String> = (0..replicas)
            .map(|i| format!("http://127.0.0.1:{}", 1000 + i))
            .collect();
        let identity = Identity {
            role: Role::ExpertGroup,
            group: Some(0),
        };
        let pool = Pool::new(
            "group 0".to_owned(),
            "moge.v1.ExpertGroup",
            identity,
            &urls,
            &UpstreamTls::default(),
        )
        .unwrap();
        for replica in &pool.replicas {
            replica.identity.store(VERIFIED, Ordering::Relaxed);
        }
        pool
    }

    fn pool_at(url: &str) -> Result<Pool, AddressError> {
        let identity = Identity {
            role: Role::Router,
            group: None,
        };
        Pool::new(
            "router".to_owned(),
            "moge.v1.Router",
            identity,
            &[url.to_owned()],
            &UpstreamTls::default(),
        )
    }

    #[tokio::test]
    async fn address_without_scheme_gets_http() {
        let pool = pool_at("127.0.0.1:9001").unwrap();
        assert_eq!(pool.replicas[0].url, "http://127.0.0.1:9001");
        let pool = pool_at("http://[::1]:9001").unwrap();
        assert_eq!(pool.replicas[0].url, "http://[::1]:9001");
    }

    #[tokio::test]
    async fn address_with_other_scheme_is_rejected() {
        let Err(error) = pool_at("grpc://127.0.0.1:9001") else {
            panic!("grpc:// was accepted");
        };
        let message = error.to_string();
        assert!(message.contains("\"grpc://127.0.0.1:9001\""), "{message}");
        assert!(message.contains("expected HOST:PORT"), "{message}");
        assert!(message.starts_with("--router (router)"), "{message}");
    }

    #[tokio::test]
    async fn order_prefers_less_loaded_ready_replica() {
        let pool = pool(2);
        for replica in &pool.replicas {
            replica.ready.store(true, Ordering::Relaxed);
        }
        pool.replicas[0].inflight.store(5, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(pool.order()[0].url, pool.replicas[1].url);
        }
    }

    #[tokio::test]
    async fn order_puts_unready_replicas_last() {
        let pool = pool(3);
        pool.replicas[2].ready.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            let order = pool.order();
            assert_eq!(order.len(), 3);
            assert_eq!(order[0].url, pool.replicas[2].url);
        }
    }

    #[tokio::test]
    async fn mismatched_replica_gets_no_call() {
        let pool = pool(2);
        pool.replicas[0].identity.store(MISMATCHED, Ordering::Relaxed);
        for _ in 0..3 {
            let order = pool.order();
            assert_eq!(order.len(), 1);
            assert_eq!(order[0].url, pool.replicas[1].url);
        }
    }

    fn ready_pool(replicas: usize) -> Pool {
        let pool = pool(replicas);
        for replica in &pool.replicas {
            replica.ready.store(true, Ordering::Relaxed);
        }
        pool
    }

    #[tokio::test]
    async fn failing_replica_is_ejected_and_call_retried() {
        let pool = ready_pool(2);
        let bad = pool.replicas[0].url.clone();
        for _ in 0..4 {
            let bad = bad.clone();
            let (url, replica) = pool
                .call(None, |attempt| {
                    let bad = bad.clone();
                    async move {
                        if attempt.url == bad {
                            Err(tonic::Status::unavailable("connection refused"))
                        } else {
                            Ok(attempt.url)
                        }
                    }
                })
                .await
                .unwrap();
            assert_eq!(url, pool.replicas[1].url);
            assert_eq!(replica.url, pool.replicas[1].url);
        }
        assert!(!pool.replicas[0].is_ready());
        let order = pool.order();
        assert_eq!(order.len(), 1, "the ejected replica must not be tried");
        assert_eq!(order[0].url, pool.replicas[1].url);
    }

    #[test]
    fn ejection_doubles_up_to_the_maximum() {
        assert_eq!(ejection_time(1), BASE_EJECTION);
        assert_eq!(ejection_time(2), BASE_EJECTION * 2);
        assert_eq!(ejection_time(3), BASE_EJECTION * 4);
        assert_eq!(ejection_time(40), MAX_EJECTION);
        assert_eq!(ejection_time(u32::MAX), MAX_EJECTION);
    }

    #[tokio::test]
    async fn every_replica_ejected_is_unavailable_at_once() {
        let pool = ready_pool(2);
        let failed = pool
            .call(None, |_| async { Err::<(), _>(tonic::Status::unavailable("down")) })
            .await
            .err()
            .expect("the call fails");
        assert!(matches!(failed, CallError::Unavailable { .. }), "{failed}");
        let calls = AtomicUsize::new(0);
        let again = pool
            .call(None, |_| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            })
            .await
            .err()
            .expect("the call fails");
        assert!(matches!(again, CallError::Unavailable { .. }), "{again}");
        assert_eq!(calls.load(Ordering::Relaxed), 0, "ejected replicas got a call");
    }

    #[tokio::test]
    async fn call_stops_at_deadline_without_ejecting() {
        let pool = ready_pool(2);
        let deadline = Instant::now() + Duration::from_millis(50);
        let failed = pool
            .call(Some(deadline), |attempt| async move {
                assert!(
                    attempt
                        .timeout
                        .is_some_and(|timeout| timeout <= Duration::from_millis(50))
                );
                std::future::pending::<Result<(), tonic::Status>>().await
            })
            .await
            .err()
            .expect("the call fails");
        assert!(
            matches!(failed, CallError::DeadlineExceeded { attempts: 1, .. }),
            "{failed}"
        );
        assert!(pool.replicas.iter().all(Replica::is_ready), "a timeout must not eject");
        assert!(
            pool.replicas
                .iter()
                .all(|replica| replica.inflight.load(Ordering::Relaxed) == 0)
        );
    }

    #[tokio::test]
    async fn rejected_call_is_not_retried() {
        let pool = ready_pool(2);
        let calls = AtomicUsize::new(0);
        let failed = pool
            .call(None, |_| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(tonic::Status::invalid_argument("bad shape")) }
            })
            .await
            .err()
            .expect("the call fails");
        assert!(matches!(failed, CallError::Rejected { .. }), "{failed}");
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn equal_load_spreads_over_replicas() {
        let pool = pool(2);
        for replica in &pool.replicas {
            replica.ready.store(true, Ordering::Relaxed);
        }
        let firsts: std::collections::BTreeSet<String> = (0..4).map(|_| pool.order()[0].url.clone()).collect();
        assert_eq!(firsts.len(), 2);
    }
}
