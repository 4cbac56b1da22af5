//! Validation of an inference request against the served model, apart from
//! any transport or upstream, so that it can be fuzzed on its own.
//!
//! Every size the request declares is checked against the limits before
//! anything sized by it is allocated: the rank, each dimension, the token
//! count (at most `max_batch_tokens`), and the data length against the
//! shape. Element counts use checked arithmetic.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use moge_shared::DType;
use moge_shared::proto::moge::v1::RoutingMode as WireMode;
use tonic::Status;

use crate::frontend::{INPUT, InferRequest, InputData, ModelSpec, OUTPUTS, Parameter, ValidRequest, clip, shorter};

/// Request parameters that Triton clients may send and the gateway ignores;
/// Triton's perf_analyzer sends `triton_enable_empty_final_response`.
const IGNORED_PARAMETERS: [&str; 5] = [
    "priority",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "triton_enable_empty_final_response",
];

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

fn parse_datatype(text: &str) -> Result<DType, Status> {
    match text {
        "BF16" => Ok(DType::BF16),
        "FP16" => Ok(DType::F16),
        "FP32" => Ok(DType::F32),
        other => Err(invalid(format!(
            "input {INPUT}: datatype {:?} is not supported, expected BF16, FP16 or FP32",
            clip(other)
        ))),
    }
}

/// Request parameters the gateway acts on.
struct Parameters {
    layer: Option<i64>,
    mode: WireMode,
    timeout: Option<Duration>,
}

fn parse_parameters(parameters: Vec<(String, Parameter)>) -> Result<Parameters, Status> {
    let mut parsed = Parameters {
        layer: None,
        mode: WireMode::Unspecified,
        timeout: None,
    };
    for (key, value) in parameters {
        match (key.as_str(), value) {
            ("layer", Parameter::Int(value)) => parsed.layer = Some(value),
            ("layer", _) => return Err(invalid("parameter layer: expected an int64 value".to_owned())),
            ("routing", Parameter::Str(value)) => {
                parsed.mode = match value.as_str() {
                    "moge" => WireMode::Moge,
                    "top-k" => WireMode::TopK,
                    "group-limited" => WireMode::GroupLimited,
                    other => {
                        return Err(invalid(format!(
                            "parameter routing: {:?} is not a routing mode, expected moge, top-k or group-limited",
                            clip(other)
                        )));
                    }
                }
            }
            ("routing", _) => return Err(invalid("parameter routing: expected a string value".to_owned())),
            // Triton's request timeout, in microseconds; 0 sets none.
            ("timeout", Parameter::Int(micros)) if micros >= 0 => {
                parsed.timeout = (micros > 0).then(|| Duration::from_micros(micros as u64));
            }
            ("timeout", _) => {
                return Err(invalid(
                    "parameter timeout: expected an int64 number of microseconds >= 0".to_owned(),
                ));
            }
            (key, _) if IGNORED_PARAMETERS.contains(&key) => {}
            (key, _) => {
                return Err(invalid(format!(
                    "parameter {:?} is not supported, expected layer, routing or timeout",
                    clip(key)
                )));
            }
        }
    }
    Ok(parsed)
}

impl ModelSpec {
    /// Checks every part of `request` against the served model and the
    /// limits, and returns it in the form the batcher takes. Each error
    /// names the field, the value received and the value expected.
    pub fn validate(&self, request: InferRequest) -> Result<ValidRequest, Status> {
        self.check_model(&request.model_name, &request.model_version)?;
        let parameters = parse_parameters(request.parameters)?;
        let layer = match parameters.layer {
            None => self.layers[0],
            Some(value) => u32::try_from(value)
                .ok()
                .filter(|layer| self.layers.contains(layer))
                .ok_or_else(|| {
                    invalid(format!(
                        "parameter layer: {value} is not hosted, expected one of {:?}",
                        self.layers
                    ))
                })?,
        };

        // The one input: name, datatype, shape, then its data.
        let mut inputs = request.inputs;
        if inputs.len() != 1 {
            let mut names = BTreeSet::new();
            let repeated = inputs.iter().find(|input| !names.insert(input.name.as_str()));
            let repeated = repeated.map_or_else(String::new, |input| {
                format!("; input {:?} is repeated", clip(&input.name))
            });
            return Err(invalid(format!(
                "inputs: {} given, expected exactly one, {INPUT}{repeated}",
                inputs.len()
            )));
        }
        let input = inputs.remove(0);
        if input.name != INPUT {
            return Err(invalid(format!(
                "input {:?} is not known, expected {INPUT}",
                clip(&input.name)
            )));
        }
        let dtype = parse_datatype(&input.datatype)?;
        let tokens = self.check_shape(&input.shape)?;
        let h = self.shape.hidden_size;
        // Bounded by max_batch_tokens * H, so this cannot overflow; checked anyway.
        let elements = tokens
            .checked_mul(h)
            .ok_or_else(|| invalid(format!("input {INPUT}: shape {:?} has too many elements", input.shape)))?;
        let hidden: Bytes = match input.data {
            InputData::Raw(raw) => {
                let expected = elements * dtype.size();
                if raw.len() != expected {
                    return Err(invalid(format!(
                        "input {INPUT}: {} bytes do not match shape [{tokens}, {h}] of {} ({expected} bytes)",
                        raw.len(),
                        input.datatype
                    )));
                }
                raw
            }
            InputData::Fp32(values) => {
                if values.len() != elements {
                    return Err(invalid(format!(
                        "input {INPUT}: {} values do not match shape [{tokens}, {h}] ({elements} values)",
                        values.len()
                    )));
                }
                DType::F32.encode(&values).into()
            }
            InputData::TypedNotFp32 => {
                return Err(invalid(format!(
                    "input {INPUT}: typed contents carry only FP32, send {} as raw bytes",
                    input.datatype
                )));
            }
            InputData::Ambiguous => {
                return Err(invalid(format!(
                    "input {INPUT}: expected its data in exactly one of raw_input_contents or contents"
                )));
            }
        };
        let values = dtype
            .decode(&hidden)
            .map_err(|error| invalid(format!("input {INPUT}: {error}")))?;
        if let Some(index) = values.iter().position(|value| !value.is_finite()) {
            return Err(invalid(format!(
                "input {INPUT}: element [{}, {}] is {}, expected finite values",
                index / h,
                index % h,
                values[index]
            )));
        }

        // Requested outputs: `output` when none are named.
        let mut outputs = request.outputs;
        if outputs.is_empty() {
            outputs.push("output".to_owned());
        }
        let mut seen = BTreeSet::new();
        for name in &outputs {
            if !OUTPUTS.contains(&name.as_str()) || !seen.insert(name.as_str()) {
                return Err(invalid(format!(
                    "output {:?} is unknown or repeated, expected each of {OUTPUTS:?} at most once",
                    clip(name)
                )));
            }
        }

        Ok(ValidRequest {
            layer,
            mode: parameters.mode,
            dtype,
            datatype: input.datatype,
            tokens,
            hidden,
            outputs,
            timeout: shorter(request.timeout, parameters.timeout),
        })
    }

    /// Checks a `[T, H]` shape and returns T.
    fn check_shape(&self, shape: &[i64]) -> Result<usize, Status> {
        let h = self.shape.hidden_size;
        let [tokens, width] = shape[..] else {
            return Err(invalid(format!(
                "input {INPUT}: shape {:?} has rank {}, expected [T, {h}] (rank 2)",
                &shape[..shape.len().min(8)],
                shape.len()
            )));
        };
        if tokens < 0 || width < 0 {
            return Err(invalid(format!(
                "input {INPUT}: shape {shape:?} has a negative dimension, expected [T, {h}] with T >= 0"
            )));
        }
        if width != h as i64 {
            return Err(invalid(format!(
                "input {INPUT}: shape {shape:?} is invalid, expected [T, {h}]"
            )));
        }
        if tokens as u64 > self.max_batch_tokens as u64 {
            return Err(invalid(format!(
                "input {INPUT}: {tokens} tokens exceed the limit of {} (--max-batch-tokens)",
                self.max_batch_tokens
            )));
        }
        Ok(tokens as usize)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::frontend::InputTensor;
    use crate::pipeline::Shape;

    const H: usize = 8;

    fn spec() -> ModelSpec {
        ModelSpec {
            model_name: "moge".to_owned(),
            layers: vec![0, 1],
            shape: Shape {
                hidden_size: H,
                top_k: 2,
                num_groups: 2,
                experts_per_group: 4,
            },
            max_batch_tokens: 16,
        }
    }

    fn request(shape: Vec<i64>, datatype: &str, data: InputData) -> InferRequest {
        InferRequest {
            model_name: "moge".to_owned(),
            model_version: String::new(),
            parameters: Vec::new(),
            inputs: vec![InputTensor {
                name: INPUT.to_owned(),
                datatype: datatype.to_owned(),
                shape,
                data,
            }],
            outputs: Vec::new(),
            timeout: None,
        }
    }

    fn good(tokens: usize) -> InferRequest {
        let values: Vec<f32> = (0..tokens * H).map(|i| i as f32 * 0.25).collect();
        request(vec![tokens as i64, H as i64], "FP32", InputData::Fp32(values))
    }

    fn message(request: InferRequest) -> String {
        spec().validate(request).unwrap_err().message().to_owned()
    }

    #[test]
    fn good_request_passes() {
        let valid = spec().validate(good(3)).unwrap();
        assert_eq!(valid.tokens, 3);
        assert_eq!(valid.hidden.len(), 3 * H * 4);
        assert_eq!(valid.outputs, ["output"]);
    }

    #[test]
    fn overflowing_shape_is_rejected_before_allocation() {
        let data = InputData::Raw(Bytes::from_static(&[0; 4]));
        let text = message(request(vec![i64::MAX, i64::MAX], "FP32", data));
        assert!(text.contains("expected [T, 8]"), "{text}");
        let data = InputData::Raw(Bytes::from_static(&[0; 4]));
        let text = message(request(vec![i64::MAX, H as i64], "BF16", data));
        assert!(text.contains("exceed the limit of 16"), "{text}");
    }

    #[test]
    fn negative_dimension_is_named() {
        let text = message(request(vec![-1, H as i64], "FP32", InputData::Fp32(Vec::new())));
        assert!(text.contains("negative dimension"), "{text}");
    }

    #[test]
    fn rank_other_than_two_is_rejected() {
        let text = message(request(vec![1; 40], "FP32", InputData::Fp32(Vec::new())));
        assert!(text.contains("has rank 40, expected [T, 8] (rank 2)"), "{text}");
    }

    #[test]
    fn fp32_count_must_match_shape() {
        let text = message(request(vec![2, H as i64], "FP32", InputData::Fp32(vec![0.0; 3])));
        assert!(text.contains("3 values do not match shape [2, 8]"), "{text}");
    }

    #[test]
    fn timeout_parameter_is_microseconds() {
        let mut with_timeout = good(1);
        with_timeout.parameters = vec![("timeout".to_owned(), Parameter::Int(2_500))];
        with_timeout.timeout = Some(Duration::from_secs(1));
        let valid = spec().validate(with_timeout).unwrap();
        assert_eq!(valid.timeout, Some(Duration::from_micros(2_500)));
        let mut negative = good(1);
        negative.parameters = vec![("timeout".to_owned(), Parameter::Int(-1))];
        assert!(message(negative).contains("parameter timeout"));
    }

    #[test]
    fn long_names_are_clipped_in_messages() {
        let mut long = good(1);
        long.model_name = "m".repeat(100_000);
        assert!(message(long).len() < 300);
    }

    fn datatype() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("FP32".to_owned()),
            Just("FP16".to_owned()),
            Just("BF16".to_owned()),
            Just("BYTES".to_owned()),
            Just("INT32".to_owned()),
            "[A-Z0-9]{0,6}",
        ]
    }

    fn dimension() -> impl Strategy<Value = i64> {
        prop_oneof![
            0i64..20,
            Just(H as i64),
            Just(-1i64),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>(),
        ]
    }

    fn float_bits() -> impl Strategy<Value = f32> {
        prop_oneof![
            -4.0f32..4.0,
            Just(f32::NAN),
            Just(f32::INFINITY),
            any::<u32>().prop_map(f32::from_bits),
        ]
    }

    fn input_data() -> impl Strategy<Value = InputData> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(|raw| InputData::Raw(raw.into())),
            proptest::collection::vec(float_bits(), 0..80).prop_map(InputData::Fp32),
            Just(InputData::TypedNotFp32),
            Just(InputData::Ambiguous),
        ]
    }

    fn parameter() -> impl Strategy<Value = (String, Parameter)> {
        let key = prop_oneof![
            Just("layer".to_owned()),
            Just("routing".to_owned()),
            Just("timeout".to_owned()),
            Just("priority".to_owned()),
            "[a-z]{1,8}",
        ];
        let value = prop_oneof![
            any::<i64>().prop_map(Parameter::Int),
            (-2i64..4).prop_map(Parameter::Int),
            "[a-z-]{0,14}".prop_map(Parameter::Str),
            Just(Parameter::Other),
        ];
        (key, value)
    }

    fn any_request() -> impl Strategy<Value = InferRequest> {
        let input = (
            prop_oneof![Just(INPUT.to_owned()), "[a-z_]{0,14}"],
            datatype(),
            proptest::collection::vec(dimension(), 0..4),
            input_data(),
        )
            .prop_map(|(name, datatype, shape, data)| InputTensor {
                name,
                datatype,
                shape,
                data,
            });
        let output = prop_oneof![
            Just("output".to_owned()),
            Just("expert_ids".to_owned()),
            Just("expert_weights".to_owned()),
            "[a-z_]{0,10}",
        ];
        (
            prop_oneof![Just("moge".to_owned()), "[a-z]{0,6}"],
            prop_oneof![Just(String::new()), Just("1".to_owned()), "[0-9]{1,3}"],
            proptest::collection::vec(parameter(), 0..4),
            proptest::collection::vec(input, 0..3),
            proptest::collection::vec(output, 0..4),
        )
            .prop_map(
                |(model_name, model_version, parameters, inputs, outputs)| InferRequest {
                    model_name,
                    model_version,
                    parameters,
                    inputs,
                    outputs,
                    timeout: None,
                },
            )
    }

    /// Builds a request that is valid apart from what the fuzzer changes:
    /// a shape that matches its data, so most cases get past the early checks.
    fn near_valid_request() -> impl Strategy<Value = InferRequest> {
        (
            0usize..20,
            prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        )
            .prop_flat_map(|(tokens, dtype)| {
                (
                    Just(tokens),
                    Just(dtype),
                    proptest::collection::vec(float_bits(), tokens * H),
                    proptest::option::of(0usize..tokens * H * 4 + 1),
                )
            })
            .prop_map(|(tokens, dtype, values, truncate)| {
                let mut raw = dtype.encode(&values);
                if let Some(length) = truncate {
                    raw.truncate(length);
                }
                request(
                    vec![tokens as i64, H as i64],
                    dtype.kserve_name(),
                    InputData::Raw(raw.into()),
                )
            })
    }

    /// Checks the contract of `validate` on any outcome: an error is
    /// INVALID_ARGUMENT or NOT_FOUND with a message, and an accepted
    /// request is within the limits, with data that matches its shape.
    fn check_outcome(outcome: Result<ValidRequest, Status>) -> Result<(), TestCaseError> {
        match outcome {
            Ok(valid) => {
                prop_assert!(valid.tokens <= spec().max_batch_tokens);
                prop_assert_eq!(valid.hidden.len(), valid.tokens * H * valid.dtype.size());
                let values = valid.dtype.decode(&valid.hidden).unwrap();
                prop_assert!(values.iter().all(|value| value.is_finite()));
                prop_assert!(!valid.outputs.is_empty() && valid.outputs.len() <= OUTPUTS.len());
            }
            Err(status) => {
                prop_assert!(
                    matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::NotFound),
                    "{:?}",
                    status
                );
                prop_assert!(!status.message().is_empty());
                prop_assert!(status.message().len() < 1000, "{}", status.message());
            }
        }
        Ok(())
    }

    proptest! {
        // A bounded fuzz run in the normal test suite; PROPTEST_CASES raises it.
        #![proptest_config(ProptestConfig::with_cases(10000))]

        #[test]
        fn validate_never_panics_on_any_request(request in any_request()) {
            check_outcome(spec().validate(request))?;
        }

        #[test]
        fn validate_checks_near_valid_requests(request in near_valid_request()) {
            check_outcome(spec().validate(request))?;
        }
    }
}
