//! Runs a plan against a gateway over the KServe v2 gRPC API and collects
//! one record per call.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moge_shared::proto::inference::infer_parameter::ParameterChoice;
use moge_shared::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use moge_shared::proto::inference::{InferParameter, ModelInferRequest};
use moge_shared::{DType, RoutingMode};
use rand::SeedableRng;
use rand_distr::Distribution;
use tokio::sync::mpsc;

use crate::connect::Client;
use crate::trace::PlannedRequest;

/// Kind of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// The request's context tokens.
    Prefill,
    /// One generated token.
    Decode,
}

/// Status of a failed call.
#[derive(Clone, Debug)]
pub struct CallFailure {
    /// gRPC status code.
    pub code: tonic::Code,
    /// The status message from the gateway, or the reason the response was
    /// rejected here.
    pub message: String,
}

/// One call's outcome.
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// Kind of call.
    pub kind: CallKind,
    /// Tokens sent.
    pub tokens: usize,
    /// Seconds from sending the first layer's request to the last layer's response.
    pub seconds: f64,
    /// The failure, or None on success.
    pub failure: Option<CallFailure>,
}

/// How to send the plan.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Model name.
    pub model: String,
    /// Layers each call runs through, in order; a layer's output is the next layer's input.
    pub layers: Vec<u32>,
    /// Routing mode sent as the `routing` parameter.
    pub routing: Option<RoutingMode>,
    /// Datatype of the hidden states.
    pub dtype: DType,
    /// Hidden size H.
    pub hidden_size: usize,
    /// Closed loop with this many requests in flight; None keeps arrival times.
    pub concurrency: Option<usize>,
    /// Seed of the random hidden states.
    pub seed: u64,
}

/// Random hidden states for the largest call, shared by every call: a call
/// of T tokens sends the first T rows, so no call generates data.
pub fn input_pool(dtype: DType, tokens: usize, hidden_size: usize, seed: u64) -> Bytes {
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let values: Vec<f32> = (0..tokens * hidden_size)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    dtype.encode(&values).into()
}

struct Caller {
    client: Client,
    options: Arc<RunOptions>,
    pool: Bytes,
}

impl Caller {
    /// Runs one call of `tokens` tokens through every layer.
    async fn call(&mut self, kind: CallKind, tokens: usize) -> CallRecord {
        let options = &self.options;
        let row_bytes = options.hidden_size * options.dtype.size();
        let mut hidden = self.pool.slice(..tokens * row_bytes);
        let started = Instant::now();
        let mut failure = None;
        for &layer in &options.layers {
            let mut parameters = std::collections::HashMap::from([(
                "layer".to_owned(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(i64::from(layer))),
                },
            )]);
            if let Some(mode) = &options.routing {
                parameters.insert(
                    "routing".to_owned(),
                    InferParameter {
                        parameter_choice: Some(ParameterChoice::StringParam(mode.as_str().to_owned())),
                    },
                );
            }
            let request = ModelInferRequest {
                model_name: options.model.clone(),
                parameters,
                inputs: vec![InferInputTensor {
                    name: "hidden_states".to_owned(),
                    datatype: options.dtype.kserve_name().to_owned(),
                    shape: vec![tokens as i64, options.hidden_size as i64],
                    ..Default::default()
                }],
                outputs: vec![InferRequestedOutputTensor {
                    name: "output".to_owned(),
                    ..Default::default()
                }],
                raw_input_contents: vec![hidden.clone()],
                ..Default::default()
            };
            match self.client.model_infer(request).await {
                Ok(response) => match response.into_inner().raw_output_contents.into_iter().next() {
                    Some(output) if output.len() == hidden.len() => hidden = output,
                    output => {
                        failure = Some(CallFailure {
                            code: tonic::Code::Internal,
                            message: format!(
                                "layer {layer}: the response has {} bytes of raw output, expected {}",
                                output.map_or(0, |output| output.len()),
                                hidden.len()
                            ),
                        });
                        break;
                    }
                },
                Err(status) => {
                    failure = Some(CallFailure {
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                    break;
                }
            }
        }
        CallRecord {
            kind,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
            failure,
        }
    }

    /// Runs a request's prefill, then its decode calls unless the prefill failed.
    async fn request(&mut self, request: PlannedRequest, records: &mpsc::UnboundedSender<CallRecord>) {
        let prefill = self.call(CallKind::Prefill, request.context_tokens).await;
        let failed = prefill.failure.is_some();
        let _ = records.send(prefill);
        if failed {
            return;
        }
        for _ in 0..request.decode_steps {
            let decode = self.call(CallKind::Decode, 1).await;
            let failed = decode.failure.is_some();
            let _ = records.send(decode);
            if failed {
                return;
            }
        }
    }
}

/// Runs `plan` on `clients` (calls spread over them in turn) and sends
/// every call's record to `records`. Returns the wall time of the run.
pub async fn run(
    plan: Vec<PlannedRequest>,
    clients: Vec<Client>,
    options: RunOptions,
    records: mpsc::UnboundedSender<CallRecord>,
) -> Duration {
    let largest = plan.iter().map(|request| request.context_tokens).max().unwrap_or(1);
    let pool = input_pool(options.dtype, largest, options.hidden_size, options.seed);
    let options = Arc::new(options);
    let caller = |index: usize| Caller {
        client: clients[index % clients.len()].clone(),
        options: Arc::clone(&options),
        pool: pool.clone(),
    };
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match options.concurrency {
        Some(concurrency) => {
            let plan = Arc::new(plan);
            let next = Arc::new(AtomicUsize::new(0));
            for worker in 0..concurrency {
                let (plan, next, records) = (Arc::clone(&plan), Arc::clone(&next), records.clone());
                let mut caller = caller(worker);
                tasks.spawn(async move {
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&request) = plan.get(index) else { break };
                        caller.request(request, &records).await;
                    }
                });
            }
        }
        None => {
            let start = tokio::time::Instant::now();
            for (index, request) in plan.into_iter().enumerate() {
                tokio::time::sleep_until(start + Duration::from_secs_f64(request.arrival_seconds)).await;
                let mut caller = caller(index);
                let records = records.clone();
                tasks.spawn(async move { caller.request(request, &records).await });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}
