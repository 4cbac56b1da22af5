//! Dynamic batching, as Triton's dynamic batcher does it: concurrent
//! requests for the same layer, routing mode and datatype are joined into
//! one batch, up to a token limit, and each request gets back its own rows.
//!
//! A request waits at most `max_queue_delay` for others to join. Batches run
//! concurrently up to `max_inflight`, so while one batch is in the experts
//! the next one gathers the requests that arrive meanwhile. Each output row
//! depends only on its own input row, so batching never changes a result.

use std::collections::HashMap;
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
    /// the result.
    pub async fn submit(
        self: &Arc<Self>,
        layer: u32,
        mode: i32,
        dtype: DType,
        tokens: usize,
        hidden: Bytes,
    ) -> Result<LayerResult, Status> {
        let key = Key { layer, mode, dtype };
        let (reply, result) = oneshot::channel();
        let pending = Pending {
            tokens,
            hidden,
            reply,
            span: tracing::Span::current(),
            enqueued: Instant::now(),
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
        result
            .await
            .map_err(|_| Status::internal("the batch ended without a result for this request"))?
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
                if tokens + pending.tokens > self.limits.max_batch_tokens {
                    carried = Some(pending);
                    break;
                }
                tokens += pending.tokens;
                batch.push(pending);
            }

            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.run_batch(key, tokens, batch).await;
                drop(permit);
            });
        }
    }

    async fn run_batch(&self, key: Key, tokens: usize, batch: Vec<Pending>) {
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
        let result = pipeline::execute(&self.upstreams, self.shape, self.max_message_bytes, layer_batch)
            .instrument(span)
            .await;
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
