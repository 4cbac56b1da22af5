//! Conversions between the internal protocol's raw-byte tensors and the
//! f32 buffers the kernels use, with the checks every service applies
//! before it allocates anything sized by a request.

use bytes::Bytes;

use crate::dtype::DType;
use crate::proto::moge::v1::{DataType, Tensor};

/// A tensor or array in a request that does not match its declaration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The dtype is unset or unknown.
    #[error("{field}: dtype {value} is not supported, expected BF16, F16 or F32")]
    DataType {
        /// Request field.
        field: &'static str,
        /// The enum value received.
        value: i32,
    },
    /// The shape has the wrong rank or a wrong dimension.
    #[error("{field}: shape {actual:?} is invalid, expected {expected}")]
    Shape {
        /// Request field.
        field: &'static str,
        /// Shape received.
        actual: Vec<u64>,
        /// The expected shape, in words.
        expected: String,
    },
    /// The byte length does not match the shape and dtype.
    #[error("{field}: {actual} bytes do not match the declared size of {expected} bytes")]
    Length {
        /// Request field.
        field: &'static str,
        /// Bytes the declaration calls for.
        expected: u64,
        /// Bytes received.
        actual: usize,
    },
}

impl From<DType> for DataType {
    fn from(dtype: DType) -> Self {
        match dtype {
            DType::BF16 => DataType::Bf16,
            DType::F16 => DataType::F16,
            DType::F32 => DataType::F32,
        }
    }
}

/// Maps a wire dtype to a kernel dtype.
pub fn dtype_of(field: &'static str, value: i32) -> Result<DType, WireError> {
    match DataType::try_from(value) {
        Ok(DataType::Bf16) => Ok(DType::BF16),
        Ok(DataType::F16) => Ok(DType::F16),
        Ok(DataType::F32) => Ok(DType::F32),
        _ => Err(WireError::DataType { field, value }),
    }
}

/// Encodes `[rows, cols]` f32 values as a wire tensor of `dtype`.
pub fn encode_matrix(values: &[f32], rows: usize, cols: usize, dtype: DType) -> Tensor {
    debug_assert_eq!(values.len(), rows * cols);
    Tensor {
        dtype: DataType::from(dtype) as i32,
        shape: vec![rows as u64, cols as u64],
        data: Bytes::from(dtype.encode(values)),
    }
}

/// Decodes a `[T, cols]` wire tensor, checking rank, width and byte length
/// (with overflow-safe arithmetic) before allocating. Returns T and the
/// values as f32.
pub fn decode_matrix(field: &'static str, tensor: &Tensor, cols: usize) -> Result<(usize, Vec<f32>), WireError> {
    let dtype = dtype_of(field, tensor.dtype)?;
    let shape_error = || WireError::Shape {
        field,
        actual: tensor.shape.clone(),
        expected: format!("[T, {cols}]"),
    };
    let [rows, width] = tensor.shape[..] else {
        return Err(shape_error());
    };
    if width != cols as u64 {
        return Err(shape_error());
    }
    let expected = rows
        .checked_mul(width)
        .and_then(|elements| elements.checked_mul(dtype.size() as u64))
        .ok_or_else(shape_error)?;
    if expected != tensor.data.len() as u64 {
        return Err(WireError::Length {
            field,
            expected,
            actual: tensor.data.len(),
        });
    }
    let rows = rows as usize;
    let mut values = vec![0.0f32; rows * cols];
    dtype
        .decode_into(&tensor.data, &mut values)
        .expect("the byte length was checked above");
    Ok((rows, values))
}

/// Encodes u32 values as little-endian bytes.
pub fn encode_u32s(values: &[u32]) -> Bytes {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

/// Encodes f32 values as little-endian bytes.
pub fn encode_f32s(values: &[f32]) -> Bytes {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

/// Decodes little-endian u32 values, rejecting a length that is not a
/// multiple of 4.
pub fn decode_u32s(field: &'static str, bytes: &[u8]) -> Result<Vec<u32>, WireError> {
    check_multiple(field, bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect())
}

/// Decodes little-endian f32 values, rejecting a length that is not a
/// multiple of 4.
pub fn decode_f32s(field: &'static str, bytes: &[u8]) -> Result<Vec<f32>, WireError> {
    check_multiple(field, bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect())
}

fn check_multiple(field: &'static str, bytes: &[u8]) -> Result<(), WireError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(WireError::Length {
            field,
            expected: (bytes.len() / 4 * 4) as u64,
            actual: bytes.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_round_trips_in_every_dtype() {
        let values = [0.5f32, -2.0, 3.25, 0.0, 1.0, -0.125];
        for dtype in DType::ALL {
            let tensor = encode_matrix(&values, 2, 3, dtype);
            let (rows, decoded) = decode_matrix("hidden_states", &tensor, 3).unwrap();
            assert_eq!(rows, 2);
            assert_eq!(decoded, values, "{dtype}");
        }
    }

    #[test]
    fn wrong_width_names_field_and_expected_shape() {
        let tensor = encode_matrix(&[0.0; 4], 2, 2, DType::F32);
        let error = decode_matrix("hidden_states", &tensor, 3).unwrap_err();
        assert_eq!(
            error.to_string(),
            "hidden_states: shape [2, 2] is invalid, expected [T, 3]"
        );
    }

    #[test]
    fn overflowing_shape_is_rejected_before_allocation() {
        let mut tensor = encode_matrix(&[0.0; 4], 2, 2, DType::F32);
        tensor.shape = vec![u64::MAX / 2, 2];
        let error = decode_matrix("hidden_states", &tensor, 2).unwrap_err();
        assert!(matches!(error, WireError::Shape { .. }), "{error}");
    }

    #[test]
    fn truncated_bytes_are_rejected() {
        let mut tensor = encode_matrix(&[1.0; 6], 3, 2, DType::BF16);
        tensor.data = tensor.data.slice(..11);
        let error = decode_matrix("hidden_states", &tensor, 2).unwrap_err();
        assert_eq!(
            error.to_string(),
            "hidden_states: 11 bytes do not match the declared size of 12 bytes"
        );
    }

    #[test]
    fn unset_dtype_is_rejected() {
        let mut tensor = encode_matrix(&[1.0; 2], 1, 2, DType::F32);
        tensor.dtype = 0;
        let error = decode_matrix("hidden_states", &tensor, 2).unwrap_err();
        assert_eq!(
            error.to_string(),
            "hidden_states: dtype 0 is not supported, expected BF16, F16 or F32"
        );
    }

    #[test]
    fn assignment_arrays_round_trip() {
        assert_eq!(
            decode_u32s("rows", &encode_u32s(&[0, 7, u32::MAX])).unwrap(),
            [0, 7, u32::MAX]
        );
        assert_eq!(
            decode_f32s("weights", &encode_f32s(&[0.25, -1.0])).unwrap(),
            [0.25, -1.0]
        );
        assert!(decode_u32s("rows", &[1, 2, 3]).is_err());
    }
}
