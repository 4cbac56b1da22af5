//! Dynamic batching, as Triton's dynamic batcher does it: concurrent
//! requests for the same layer, routing mode and datatype are joined into
//! one batch, up to a token limit, and each request gets back its own rows.
//!
//! A request waits at most `max_queue_delay` for others to join. Batches run
//! concurrently up to `max_inflight`, so while one batch is in the experts
//! the next one gathers the requests that arrive meanwhile. Each output row
//! depends only on its own input row, so batching never changes a result.
//!
//! The queues are bounded in tokens: a request that would take the tokens
//! admitted but not yet in a running batch past `max_queued_tokens` is
//! rejected at once with RESOURCE_EXHAUSTED. A request whose deadline passes
//! or whose client leaves is dropped before its batch runs, and a running
//! batch whose every client left is stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use moge_shared::DType;
use opentelemetry::trace::TraceContextExt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Status;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::GatewayMetrics;
use crate::pipeline::{self, LayerBatch, LayerResult, Shape};
use crate::upstream::Upstreams;

/// Batching limits.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Largest batch in tokens.
    pub max_batch_tokens: usize,
    /// Longest time the first request of a batch waits for others.
    pub max_queue_delay: Duration,
    /// Batches running at once.
    pub max_inflight: usize,
    /// Most tokens admitted but not yet in a running batch, over all queues.
    pub max_queued_tokens: usize,
}

/// One request for the batcher.
pub struct BatchRequest {
    /// Layer index.
    pub layer: u32,
    /// `moge.v1.RoutingMode` value; 0 for the router's default.
    pub mode: i32,
    /// Element type of `hidden`.
    pub dtype: DType,
    /// Tokens T.
    pub tokens: usize,
    /// `[T, H]` little-endian bytes.
    pub hidden: Bytes,
    /// Time the client allows from now; None for no limit.
    pub timeout: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    layer: u32,
    mode: i32,
    dtype: DType,
}

struct Pending {
    tokens: usize,
    hidden: Bytes,
    reply: oneshot::Sender<Result<LayerResult, Status>>,
    /// The request's span, which the batch span continues or links to.
    span: tracing::Span,
    enqueued: Instant,
    deadline: Option<tokio::time::Instant>,
    /// The request's share of the queued tokens, given back when its batch
    /// starts or when the request is dropped.
    admission: Admission,
}

impl Pending {
    /// Returns whether the client still waits and its deadline has not passed.
    fn is_live(&self, now: tokio::time::Instant) -> bool {
        !self.reply.is_closed() && self.deadline.is_none_or(|deadline| deadline > now)
    }
}

/// Tokens counted against `max_queued_tokens`; subtracted again on drop.
struct Admission {
    queued: Arc<AtomicUsize>,
    tokens: usize,
}

impl Admission {
    fn release(&mut self) {
        self.queued
            .fetch_sub(std::mem::take(&mut self.tokens), Ordering::Relaxed);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.release();
    }
}

/// Lets one log line through per interval and counts the ones held back.
struct LogThrottle {
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl LogThrottle {
    const INTERVAL: Duration = Duration::from_secs(5);

    fn new() -> Self {
        LogThrottle {
            last: Mutex::new(None),
            held_back: AtomicU64::new(0),
        }
    }

    /// Returns the number of lines held back since the last one, when this
    /// line may be logged.
    fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if last.is_some_and(|last| now - last < Self::INTERVAL) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

/// Joins concurrent requests into batches and runs them on the deployment.
pub struct Batcher {
    queues: Mutex<HashMap<Key, mpsc::UnboundedSender<Pending>>>,
    upstreams: Arc<Upstreams>,
    shape: Shape,
    max_message_bytes: usize,
    limits: BatchLimits,
    inflight: Arc<Semaphore>,
    metrics: Arc<GatewayMetrics>,
    /// Tokens admitted but not yet in a running batch; the metrics gauge reads it.
    queued_tokens: Arc<AtomicUsize>,
    rejections: LogThrottle,
}

impl Batcher {
    /// Creates a batcher; a queue task starts per (layer, mode, datatype) on first use.
    pub fn new(
        upstreams: Arc<Upstreams>,
        shape: Shape,
        max_message_bytes: usize,
        limits: BatchLimits,
        metrics: Arc<GatewayMetrics>,
    ) -> Arc<Self> {
        Arc::new(Batcher {
            queued_tokens: Arc::clone(&metrics.queued_tokens),
            rejections: LogThrottle::new(),
            metrics,
            queues: Mutex::new(HashMap::new()),
            upstreams,
            shape,
            max_message_bytes,
            inflight: Arc::new(Semaphore::new(limits.max_inflight.max(1))),
            limits,
        })
    }

    /// Runs one request's rows through a batch and returns its own rows of
    /// the result. Fails at once with RESOURCE_EXHAUSTED when the queues
    /// hold too many tokens, and with DEADLINE_EXCEEDED when the request's
    /// timeout passes first.
    pub async fn submit(self: &Arc<Self>, request: BatchRequest) -> Result<LayerResult, Status> {
        let admission = self.admit(request.tokens)?;
        let key = Key {
            layer: request.layer,
            mode: request.mode,
            dtype: request.dtype,
        };
        let enqueued = Instant::now();
        let deadline = request
            .timeout
            .map(|timeout| tokio::time::Instant::from_std(enqueued) + timeout);
        let (reply, result) = oneshot::channel();
        let pending = Pending {
            tokens: request.tokens,
            hidden: request.hidden,
            reply,
            span: tracing::Span::current(),
            enqueued,
            deadline,
            admission,
        };
        let sender = {
            let mut queues = self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            queues
                .entry(key)
                .or_insert_with(|| {
                    let (sender, receiver) = mpsc::unbounded_channel();
                    tokio::spawn(Arc::clone(self).run_queue(key, receiver));
                    sender
                })
                .clone()
        };
        sender
            .send(pending)
            .map_err(|_| Status::unavailable("the batch queue is shutting down"))?;
        let finished = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, result).await,
            None => Ok(result.await),
        };
        match finished {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Status::internal("the batch ended without a result for this request")),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "request timeout of {} ms passed before the layer finished ({} ms spent in the gateway)",
                request.timeout.unwrap_or_default().as_millis(),
                enqueued.elapsed().as_millis()
            ))),
        }
    }

    /// Counts `tokens` against `max_queued_tokens`, or rejects the request.
    fn admit(&self, tokens: usize) -> Result<Admission, Status> {
        let limit = self.limits.max_queued_tokens;
        let admitted = self
            .queued_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                queued.checked_add(tokens).filter(|&total| total <= limit)
            });
        match admitted {
            Ok(_) => Ok(Admission {
                queued: Arc::clone(&self.queued_tokens),
                tokens,
            }),
            Err(queued) => {
                if let Some(held_back) = self.rejections.allow() {
                    tracing::warn!(
                        queued_tokens = queued,
                        tokens,
                        max_queued_tokens = limit,
                        rejections_not_logged = held_back,
                        "queue full; rejecting requests with RESOURCE_EXHAUSTED"
                    );
                }
                Err(Status::resource_exhausted(format!(
                    "the gateway queue is full: {queued} tokens queued, {tokens} more would exceed \
                     --max-queued-tokens {limit}; retry later or add gateway replicas"
                )))
            }
        }
    }

    async fn run_queue(self: Arc<Self>, key: Key, mut receiver: mpsc::UnboundedReceiver<Pending>) {
        let mut carried: Option<Pending> = None;
        loop {
            let first = match carried.take() {
                Some(pending) => pending,
                None => match receiver.recv().await {
                    Some(pending) => pending,
                    None => return,
                },
            };
            if !first.is_live(tokio::time::Instant::now()) {
                drop_request(first);
                continue;
            }
            let Ok(permit) = Arc::clone(&self.inflight).acquire_owned().await else {
                return;
            };

            // Gather until the token limit, the queue delay, or an empty queue.
            let deadline = tokio::time::Instant::now() + self.limits.max_queue_delay;
            let mut tokens = first.tokens;
            let mut batch = vec![first];
            loop {
                let next = match receiver.try_recv() {
                    Ok(pending) => Some(pending),
                    Err(mpsc::error::TryRecvError::Empty) if !self.limits.max_queue_delay.is_zero() => {
                        tokio::time::timeout_at(deadline, receiver.recv()).await.ok().flatten()
                    }
                    Err(_) => None,
                };
                let Some(pending) = next else { break };
                if !pending.is_live(tokio::time::Instant::now()) {
                    drop_request(pending);
                    continue;
                }
                if tokens + pending.tokens > self.limits.max_batch_tokens {
                    carried = Some(pending);
                    break;
                }
                tokens += pending.tokens;
                batch.push(pending);
            }

            // Requests that expired or left while the batch gathered or
            // waited for a slot do not run.
            let now = tokio::time::Instant::now();
            let (mut batch, gone): (Vec<Pending>, Vec<Pending>) =
                batch.into_iter().partition(|pending| pending.is_live(now));
            gone.into_iter().for_each(drop_request);
            if batch.is_empty() {
                continue;
            }
            let tokens = batch.iter().map(|pending| pending.tokens).sum();
            for pending in &mut batch {
                pending.admission.release();
            }

            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.run_batch(key, tokens, batch).await;
                drop(permit);
            });
        }
    }

    async fn run_batch(&self, key: Key, tokens: usize, mut batch: Vec<Pending>) {
        let requests = batch.len();
        let hidden = if requests == 1 {
            batch[0].hidden.clone()
        } else {
            let mut joined = BytesMut::with_capacity(tokens * self.shape.hidden_size * key.dtype.size());
            for pending in &batch {
                joined.extend_from_slice(&pending.hidden);
            }
            joined.freeze()
        };
        let layer_batch = LayerBatch {
            layer: key.layer,
            dtype: key.dtype,
            tokens,
            hidden,
            mode: key.mode,
            deadline: batch_deadline(&batch),
        };
        let started = Instant::now();
        for pending in &batch {
            self.metrics.record_queue((started - pending.enqueued).as_secs_f64());
        }
        // The batch continues the trace of its first request and links the others.
        let span = tracing::debug_span!(
            parent: &batch[0].span,
            "batch",
            otel.name = "moge.batch",
            moge.layer = key.layer,
            moge.tokens = tokens,
            moge.requests = requests,
        );
        for pending in &batch[1..] {
            span.add_link(pending.span.context().span().span_context().clone());
        }
        tracing::debug!(parent: &span, layer = key.layer, tokens, requests, "running batch");
        let run = pipeline::execute(&self.upstreams, self.shape, self.max_message_bytes, layer_batch).instrument(span);
        let result = tokio::select! {
            result = run => result,
            () = all_closed(&mut batch) => {
                tracing::debug!(layer = key.layer, tokens, requests, "every client of the batch left; batch stopped");
                return;
            }
        };
        match result {
            Ok((result, mut stats)) => {
                stats.requests = requests;
                self.metrics.record_batch(&stats);
                let (h, k) = (self.shape.hidden_size, self.shape.top_k);
                let mut row = 0;
                for pending in batch {
                    let rows = row..row + pending.tokens;
                    let own = LayerResult {
                        output: result.output[rows.start * h..rows.end * h].to_vec(),
                        expert_ids: result.expert_ids[rows.start * k..rows.end * k].to_vec(),
                        expert_weights: result.expert_weights[rows.start * k..rows.end * k].to_vec(),
                    };
                    row = rows.end;
                    let _ = pending.reply.send(Ok(own));
                }
            }
            Err(error) => {
                tracing::warn!(layer = key.layer, tokens, requests, %error, "batch failed");
                let status = crate::frontend::status_of(error);
                for pending in batch {
                    let _ = pending.reply.send(Err(Status::new(status.code(), status.message())));
                }
            }
        }
    }
}

/// Replies DEADLINE_EXCEEDED to a request that expired in the queue, or
/// drops one whose client left. Either way its tokens leave the queue count.
fn drop_request(pending: Pending) {
    if pending.reply.is_closed() {
        tracing::debug!(
            tokens = pending.tokens,
            "client left before its batch ran; request dropped"
        );
        return;
    }
    let waited = pending.enqueued.elapsed();
    tracing::debug!(
        tokens = pending.tokens,
        waited_ms = waited.as_millis() as u64,
        "request expired in the queue"
    );
    let _ = pending.reply.send(Err(Status::deadline_exceeded(format!(
        "request timeout passed after {} ms in the batch queue",
        waited.as_millis()
    ))));
}

/// Returns the latest deadline of the batch's requests, or None when one
/// has none. The upstream calls may run as long as any request still
/// waits, and a request whose own deadline passes earlier gets
/// DEADLINE_EXCEEDED from its own timer without failing the others.
fn batch_deadline(batch: &[Pending]) -> Option<tokio::time::Instant> {
    batch
        .iter()
        .map(|pending| pending.deadline)
        .try_fold(None, |latest: Option<tokio::time::Instant>, deadline| {
            deadline.map(|deadline| Some(latest.map_or(deadline, |latest| latest.max(deadline))))
        })
        .flatten()
}

/// Completes once every client of the batch has stopped waiting.
async fn all_closed(batch: &mut [Pending]) {
    for pending in batch {
        pending.reply.closed().await;
    }
}
