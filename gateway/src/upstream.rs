//! Connections to the router, every expert group and the shared expert,
//! with replica failover and a background health probe.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

/// A configured address that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// The address is not a valid URI.
    #[error("{name}: invalid upstream address {url:?}: {source}")]
    Invalid {
        /// Pool name.
        name: String,
        /// The address.
        url: String,
        /// Underlying error.
        source: tonic::transport::Error,
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
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.clone()).map_err(|source| AddressError::Invalid {
                    name: name.clone(),
                    url: url.clone(),
                    source,
                })?;
                let endpoint = tls.configure(&name, url, endpoint)?;
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
                })
            })
            .collect::<Result<Vec<_>, AddressError>>()?;
        Ok(Pool {
            name,
            service,
            identity,
            replicas,
            next: AtomicUsize::new(0),
        })
    }

    /// Replicas in the order to try them for one call. The first is chosen
    /// by power of two choices among the ready replicas: of two picked in
    /// rotation, the one with fewer calls in flight. The other ready ones
    /// follow, then the ones not ready, as fallbacks. Replicas whose identity
    /// is not verified never get a call.
    pub fn order(&self) -> Vec<&Replica> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.replicas.len();
        let rotated = (0..count)
            .map(|offset| &self.replicas[(start + offset) % count])
            .filter(|replica| replica.identity.load(Ordering::Relaxed) == VERIFIED);
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

    /// Returns how many replicas passed their last health check.
    pub fn ready_replicas(&self) -> usize {
        self.replicas.iter().filter(|replica| replica.is_ready()).count()
    }

    /// Checks every replica's health once.
    pub async fn probe(&self) {
        for replica in &self.replicas {
            let mut client = HealthClient::new(replica.channel.clone());
            let request = HealthCheckRequest {
                service: self.service.to_owned(),
            };
            let checked = tokio::time::timeout(Duration::from_secs(1), client.check(request)).await;
            if let Ok(Err(status)) = &checked {
                // A TLS or certificate problem shows up here, as UNAVAILABLE
                // with the transport error in the message.
                tracing::debug!(upstream = %self.name, replica = %replica.url, code = ?status.code(), error = status.message(), "health check failed");
            }
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
        let described = tokio::time::timeout(Duration::from_secs(1), client.describe(DescribeRequest {})).await;
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

    /// Marks a replica not ready after a failed call, until the next probe.
    pub fn mark_failed(&self, replica: &Replica, error: &tonic::Status) {
        if replica.ready.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                upstream = %self.name,
                replica = %replica.url,
                code = ?error.code(),
                message = error.message(),
                "replica failed; will retry the call on another replica"
            );
        }
    }
}

impl Replica {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
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

    /// Probes every replica every `interval`, forever.
    pub fn spawn_probe(self: &Arc<Self>, interval: Duration) {
        let upstreams = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                for pool in upstreams.pools() {
                    pool.probe().await;
                }
                tokio::time::sleep(interval).await;
            }
        });
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
}

impl Pool {
    /// Calls `call` on one replica after another until one succeeds or
    /// fails with an error another replica would share. Returns the result
    /// and the replica that produced it.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<(T, &Replica), CallError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = "no replica configured".to_owned();
        for replica in self.order() {
            replica.inflight.fetch_add(1, Ordering::Relaxed);
            let result = call(replica.channel.clone()).await;
            replica.inflight.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(value) => return Ok((value, replica)),
                Err(status) if is_retryable(status.code()) => {
                    self.mark_failed(replica, &status);
                    last = format!("{}: {}", replica.url, status.message());
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
            last,
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
