//! Activation dtypes and their little-endian byte encoding.
//!
//! Activations travel as raw little-endian bytes and are computed in f32.
//! Decoding bf16 or f16 to f32 is exact; encoding f32 to bf16 or f16 rounds
//! to nearest, ties to even (the `half` crate's conversion).

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};

/// Element type of an activation or weight tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16.
    BF16,
    /// IEEE 754 half precision.
    F16,
    /// IEEE 754 single precision.
    F32,
}

/// A byte buffer that does not hold the expected number of elements.
#[derive(Debug, thiserror::Error)]
#[error("{dtype} tensor of {elements} elements needs {expected} bytes, got {actual}")]
pub struct ByteLengthError {
    /// Element type of the tensor.
    pub dtype: DType,
    /// Elements the shape calls for.
    pub elements: usize,
    /// Bytes the shape calls for.
    pub expected: usize,
    /// Bytes received.
    pub actual: usize,
}

impl DType {
    /// All supported dtypes.
    pub const ALL: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Name in the KServe v2 protocol (`BF16`, `FP16`, `FP32`).
    pub fn kserve_name(self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "FP16",
            DType::F32 => "FP32",
        }
    }

    /// Name in the safetensors header (`BF16`, `F16`, `F32`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
        }
    }

    /// Maps a safetensors dtype, or `None` for a dtype the kernels do not read.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::F32 => Some(DType::F32),
            _ => None,
        }
    }

    /// Decodes `elements` little-endian values from `bytes` into `out`.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) -> Result<(), ByteLengthError> {
        let expected = out.len() * self.size();
        if bytes.len() != expected {
            return Err(ByteLengthError {
                dtype: self,
                elements: out.len(),
                expected,
                actual: bytes.len(),
            });
        }
        match self {
            DType::BF16 => {
                for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *value = bf16::from_le_bytes([chunk[0], chunk[1]]).to_f32();
                }
            }
            DType::F16 => {
                for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *value = f16::from_le_bytes([chunk[0], chunk[1]]).to_f32();
                }
            }
            DType::F32 => {
                for (value, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                }
            }
        }
        Ok(())
    }

    /// Decodes a whole buffer of little-endian values into a new vector.
    pub fn decode(self, bytes: &[u8]) -> Result<Vec<f32>, ByteLengthError> {
        let mut out = vec![0.0; bytes.len() / self.size()];
        self.decode_into(bytes, &mut out)?;
        Ok(out)
    }

    /// Encodes f32 values as little-endian bytes of this dtype, appending to `out`.
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            DType::BF16 => {
                for &value in values {
                    out.extend_from_slice(&bf16::from_f32(value).to_le_bytes());
                }
            }
            DType::F16 => {
                for &value in values {
                    out.extend_from_slice(&f16::from_f32(value).to_le_bytes());
                }
            }
            DType::F32 => {
                for &value in values {
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
        }
    }

    /// Encodes f32 values as little-endian bytes of this dtype.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(values, &mut out);
        out
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// A dtype name that is not BF16, F16/FP16 or F32/FP32.
#[derive(Debug, thiserror::Error)]
#[error("unsupported dtype {0:?}, expected one of bf16, f16, f32")]
pub struct UnknownDType(pub String);

impl FromStr for DType {
    type Err = UnknownDType;

    /// Parses safetensors, KServe and PyTorch spellings, case-insensitively.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            "f32" | "fp32" | "float32" | "float" => Ok(DType::F32),
            _ => Err(UnknownDType(text.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_for_representable_values() {
        let values = [0.0f32, -1.5, 2.0, 0.15625, -1024.0];
        for dtype in DType::ALL {
            let bytes = dtype.encode(&values);
            assert_eq!(bytes.len(), values.len() * dtype.size());
            assert_eq!(dtype.decode(&bytes).unwrap(), values, "{dtype}");
        }
    }

    #[test]
    fn bf16_encoding_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two bf16 values and rounds to even (1.0).
        let bytes = DType::BF16.encode(&[1.0 + 2f32.powi(-8)]);
        assert_eq!(DType::BF16.decode(&bytes).unwrap(), [1.0]);
    }

    #[test]
    fn wrong_byte_length_names_both_lengths() {
        let mut out = [0.0f32; 3];
        let error = DType::F16.decode_into(&[0u8; 5], &mut out).unwrap_err();
        assert_eq!(error.to_string(), "F16 tensor of 3 elements needs 6 bytes, got 5");
    }

    #[test]
    fn names_parse_in_every_spelling() {
        assert_eq!("BF16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert_eq!("FP16".parse::<DType>().unwrap(), DType::F16);
        assert_eq!("float32".parse::<DType>().unwrap(), DType::F32);
        assert!("int8".parse::<DType>().is_err());
    }
}
