//! One memory-mapped safetensors file.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};

use super::{CheckpointError, supported_dtype};
use crate::dtype::DType;
use crate::weights::{Buffer, WeightData, WeightMatrix};

/// A mapped shard and its parsed header.
#[derive(Debug)]
pub(super) struct Shard {
    path: PathBuf,
    map: Arc<Mmap>,
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    /// Maps `path` and parses its header; no tensor data is read.
    pub(super) fn open(path: &Path) -> Result<Self, CheckpointError> {
        let io_error = |action, source| CheckpointError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(|source| io_error("failed to open", source))?;
        // SAFETY: the map is read-only. Like every reader of memory-mapped
        // model files, this relies on no process truncating or rewriting the
        // checkpoint while a process serves it.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| io_error("failed to map", source))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|error| CheckpointError::Format {
                path: path.to_owned(),
                message: format!("bad safetensors header: {error}"),
            })?;
        Ok(Shard {
            path: path.to_owned(),
            map: Arc::new(map),
            data_start: 8 + header_len,
            metadata,
        })
    }

    /// Tensor names in this shard, in file order.
    pub(super) fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    pub(super) fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// Loads a `[rows, cols]` matrix, without a copy when the data is aligned.
    pub(super) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix, CheckpointError> {
        self.matrix_with_shape(name, rows, cols, &[rows, cols])
    }

    /// Loads a tensor of shape `expected` as a `[rows, cols]` matrix.
    pub(super) fn matrix_with_shape(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        expected: &[usize],
    ) -> Result<WeightMatrix, CheckpointError> {
        let info = self.info(name).ok_or_else(|| CheckpointError::MissingTensor {
            name: name.to_owned(),
            dir: self.path.clone(),
        })?;
        if info.shape != expected {
            return Err(CheckpointError::Shape {
                name: name.to_owned(),
                expected: expected.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let dtype = supported_dtype(name, info.dtype)?;
        let offset = self.data_start + info.data_offsets.0;
        let len = rows * cols;
        let data = match dtype {
            DType::F32 => WeightData::F32(self.buffer::<f32>(offset, len)),
            DType::BF16 => WeightData::BF16(self.buffer::<bf16>(offset, len)),
            DType::F16 => WeightData::F16(self.buffer::<f16>(offset, len)),
        };
        WeightMatrix::new(rows, cols, data).map_err(|error| CheckpointError::Format {
            path: self.path.clone(),
            message: format!("tensor `{name}`: {error}"),
        })
    }

    /// Borrows the elements from the map, or copies them when misaligned.
    fn buffer<T: bytemuck::Pod>(&self, offset: usize, len: usize) -> Buffer<T> {
        Buffer::mapped(Arc::clone(&self.map), offset, len).unwrap_or_else(|| {
            let bytes = &self.map[offset..offset + len * size_of::<T>()];
            Buffer::owned(bytemuck::pod_collect_to_vec(bytes))
        })
    }
}
