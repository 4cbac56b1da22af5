//! Generated protocol types: the KServe v2 inference API (`inference`) and
//! moge-serve's internal API (`moge.v1`), from the files in `proto/`.
#![allow(missing_docs)]
#![allow(clippy::all)]

/// KServe v2 / Open Inference Protocol, gRPC binding.
pub mod inference {
    tonic::include_proto!("inference");
}

/// The internal gateway, router and expert protocol.
pub mod moge {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("moge.v1");
    }
}

/// Encoded file descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("moge_descriptor");

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::inference::{InferParameter, ModelInferRequest, infer_parameter::ParameterChoice};

    #[test]
    fn infer_request_uses_protocol_field_numbers() {
        let request = ModelInferRequest {
            model_name: "moge".to_owned(),
            raw_input_contents: vec![bytes::Bytes::from_static(&[1, 2])],
            ..Default::default()
        };
        let encoded = request.encode_to_vec();
        // Field 1 (model_name, length-delimited) then field 7 (raw_input_contents).
        assert_eq!(encoded[0], (1 << 3) | 2);
        assert_eq!(encoded[6], (7 << 3) | 2);
    }

    #[test]
    fn triton_parameter_choices_decode() {
        // Field 4 is double_param and field 5 is uint64_param in Triton's API.
        let double = InferParameter::decode(&[0x21, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f][..]).unwrap();
        assert_eq!(double.parameter_choice, Some(ParameterChoice::DoubleParam(1.0)));
        let unsigned = InferParameter::decode(&[0x28, 7][..]).unwrap();
        assert_eq!(unsigned.parameter_choice, Some(ParameterChoice::Uint64Param(7)));
    }

    #[test]
    fn descriptor_set_names_every_service() {
        let set = String::from_utf8_lossy(super::FILE_DESCRIPTOR_SET);
        for service in ["GRPCInferenceService", "Router", "ExpertGroup", "Host"] {
            assert!(set.contains(service), "{service} missing from the descriptor set");
        }
    }
}
