//! A bounded fuzz run of the internal protocol's tensor decoding: any
//! dtype, shape and byte string must decode or fail with an error, never
//! panic or allocate more than the bytes received call for.

use bytes::Bytes;
use moge_shared::proto::moge::v1::Tensor;
use moge_shared::wire::{WireError, decode_f32s, decode_matrix, decode_u32s};
use proptest::prelude::*;

fn dimension() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..40,
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(1u64 << 62),
        any::<u64>()
    ]
}

fn tensor() -> impl Strategy<Value = Tensor> {
    (
        prop_oneof![0i32..5, any::<i32>()],
        proptest::collection::vec(dimension(), 0..4),
        proptest::collection::vec(any::<u8>(), 0..400),
    )
        .prop_map(|(dtype, shape, data)| Tensor {
            dtype,
            shape,
            data: Bytes::from(data),
        })
}

/// Builds a tensor whose declaration matches its data, then damages one part.
fn near_valid_tensor() -> impl Strategy<Value = (Tensor, usize)> {
    (1i32..4, 0u64..12, 1usize..9, 0usize..4, any::<u8>()).prop_map(|(dtype, rows, cols, damage, byte)| {
        let size = if dtype == 3 { 4 } else { 2 };
        let mut data = vec![byte; rows as usize * cols * size];
        let mut shape = vec![rows, cols as u64];
        match damage {
            0 => {}
            1 => {
                data.pop();
            }
            2 => shape[0] = shape[0].wrapping_add(u64::MAX / 3),
            _ => shape.push(1),
        }
        let tensor = Tensor {
            dtype,
            shape,
            data: Bytes::from(data),
        };
        (tensor, cols)
    })
}

fn check(tensor: &Tensor, cols: usize) -> Result<(), TestCaseError> {
    match decode_matrix("hidden_states", tensor, cols) {
        Ok((rows, values)) => {
            prop_assert_eq!(tensor.shape.len(), 2);
            prop_assert_eq!(values.len(), rows * cols);
            prop_assert!(values.len() * 2 <= tensor.data.len() || tensor.data.is_empty());
        }
        Err(error) => {
            let text = error.to_string();
            prop_assert!(text.starts_with("hidden_states: "), "{}", text);
            let known = matches!(
                error,
                WireError::DataType { .. } | WireError::Shape { .. } | WireError::Length { .. }
            );
            prop_assert!(known);
        }
    }
    Ok(())
}

proptest! {
    // The normal suite runs a bounded number of cases; PROPTEST_CASES raises it.
    #![proptest_config(ProptestConfig::with_cases(10000))]

    #[test]
    fn decode_matrix_never_panics(tensor in tensor(), cols in prop_oneof![0usize..40, Just(usize::MAX)]) {
        check(&tensor, cols)?;
    }

    #[test]
    fn decode_matrix_rejects_damaged_tensors((tensor, cols) in near_valid_tensor()) {
        check(&tensor, cols)?;
    }

    #[test]
    fn assignment_arrays_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let decoded = decode_u32s("rows", &bytes);
        prop_assert_eq!(decoded.is_ok(), bytes.len() % 4 == 0);
        if let Ok(values) = decoded {
            prop_assert_eq!(values.len(), bytes.len() / 4);
        }
        prop_assert_eq!(decode_f32s("weights", &bytes).is_ok(), bytes.len() % 4 == 0);
    }
}
