//! Weight matrices as the kernels read them: row-major `[rows, cols]` in
//! bf16, f16 or f32, either owned or borrowed from a memory-mapped
//! safetensors file without a copy.

use std::str::FromStr;
use std::sync::Arc;

use bytemuck::Pod;
use half::{bf16, f16};
use memmap2::Mmap;

use crate::dtype::DType;

/// In-memory storage format of expert weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// Keep the checkpoint's dtype, mapped from the file without a copy when
    /// the data is aligned. A bf16 checkpoint then takes half the bytes of
    /// f32 and, as measured by `moge-bench`, runs faster at every batch size.
    /// The kernels widen each element to f32 exactly, so results equal those
    /// of [`WeightFormat::F32`].
    #[default]
    Stored,
    /// Convert every weight to f32 when loading.
    F32,
}

impl FromStr for WeightFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "stored" => Ok(WeightFormat::Stored),
            "f32" => Ok(WeightFormat::F32),
            other => Err(format!(
                "unknown weight format {other:?}, expected \"stored\" or \"f32\""
            )),
        }
    }
}

/// A contiguous slice of elements, owned or inside a shared memory map.
#[derive(Clone, Debug)]
pub struct Buffer<T> {
    inner: BufferInner<T>,
}

#[derive(Clone, Debug)]
enum BufferInner<T> {
    Owned(Arc<Vec<T>>),
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
}

impl<T: Pod> Buffer<T> {
    /// Wraps an owned vector.
    pub fn owned(values: Vec<T>) -> Self {
        Buffer {
            inner: BufferInner::Owned(Arc::new(values)),
        }
    }

    /// Borrows `len` elements at byte `offset` of `map`, or returns `None`
    /// when that range is out of bounds or not aligned for `T`.
    pub fn mapped(map: Arc<Mmap>, offset: usize, len: usize) -> Option<Self> {
        let bytes = map.get(offset..offset.checked_add(len * size_of::<T>())?)?;
        bytemuck::try_cast_slice::<u8, T>(bytes).ok()?;
        Some(Buffer {
            inner: BufferInner::Mapped { map, offset, len },
        })
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        match &self.inner {
            BufferInner::Owned(values) => values,
            BufferInner::Mapped { map, offset, len } => {
                // The range and alignment were checked in `Buffer::mapped`.
                bytemuck::cast_slice(&map[*offset..*offset + len * size_of::<T>()])
            }
        }
    }

    /// Returns whether the elements live in a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, BufferInner::Mapped { .. })
    }
}

/// Elements of a weight matrix in one of the supported storage dtypes.
#[derive(Clone, Debug)]
pub enum WeightData {
    /// f32 elements.
    F32(Buffer<f32>),
    /// bf16 elements.
    BF16(Buffer<bf16>),
    /// f16 elements.
    F16(Buffer<f16>),
}

/// A row-major `[rows, cols]` weight matrix, as PyTorch stores `nn.Linear`
/// weights: `rows` is the output size and `cols` the input size.
#[derive(Clone, Debug)]
pub struct WeightMatrix {
    rows: usize,
    cols: usize,
    data: WeightData,
}

/// Elements that do not match the matrix shape.
#[derive(Debug, thiserror::Error)]
#[error("weight matrix [{rows}, {cols}] needs {expected} elements, got {actual}")]
pub struct ShapeError {
    /// Rows requested.
    pub rows: usize,
    /// Columns requested.
    pub cols: usize,
    /// `rows * cols`.
    pub expected: usize,
    /// Elements supplied.
    pub actual: usize,
}

impl WeightMatrix {
    /// Builds a matrix, checking that `data` contains `rows * cols` elements.
    pub fn new(rows: usize, cols: usize, data: WeightData) -> Result<Self, ShapeError> {
        let actual = match &data {
            WeightData::F32(buffer) => buffer.as_slice().len(),
            WeightData::BF16(buffer) => buffer.as_slice().len(),
            WeightData::F16(buffer) => buffer.as_slice().len(),
        };
        if actual != rows * cols {
            return Err(ShapeError {
                rows,
                cols,
                expected: rows * cols,
                actual,
            });
        }
        Ok(WeightMatrix { rows, cols, data })
    }

    /// Builds an f32 matrix from owned values.
    pub fn from_f32(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self, ShapeError> {
        Self::new(rows, cols, WeightData::F32(Buffer::owned(values)))
    }

    /// Builds a bf16 matrix from owned values.
    pub fn from_bf16(rows: usize, cols: usize, values: Vec<bf16>) -> Result<Self, ShapeError> {
        Self::new(rows, cols, WeightData::BF16(Buffer::owned(values)))
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The elements.
    pub fn data(&self) -> &WeightData {
        &self.data
    }

    /// Storage dtype.
    pub fn dtype(&self) -> DType {
        match self.data {
            WeightData::F32(_) => DType::F32,
            WeightData::BF16(_) => DType::BF16,
            WeightData::F16(_) => DType::F16,
        }
    }

    /// Bytes of weight data.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size()
    }

    /// Returns whether the data is borrowed from a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        match &self.data {
            WeightData::F32(buffer) => buffer.is_mapped(),
            WeightData::BF16(buffer) => buffer.is_mapped(),
            WeightData::F16(buffer) => buffer.is_mapped(),
        }
    }

    /// Element at `(row, col)` widened to f32; for tests and references.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let index = row * self.cols + col;
        match &self.data {
            WeightData::F32(buffer) => buffer.as_slice()[index],
            WeightData::BF16(buffer) => buffer.as_slice()[index].to_f32(),
            WeightData::F16(buffer) => buffer.as_slice()[index].to_f32(),
        }
    }

    /// Returns a copy converted to f32, or a clone if it already is f32.
    pub fn to_f32(&self) -> WeightMatrix {
        let values: Vec<f32> = match &self.data {
            WeightData::F32(_) => return self.clone(),
            WeightData::BF16(buffer) => buffer.as_slice().iter().map(|v| v.to_f32()).collect(),
            WeightData::F16(buffer) => buffer.as_slice().iter().map(|v| v.to_f32()).collect(),
        };
        WeightMatrix {
            rows: self.rows,
            cols: self.cols,
            data: WeightData::F32(Buffer::owned(values)),
        }
    }

    /// Returns the matrix converted to `format`.
    pub fn into_format(self, format: WeightFormat) -> WeightMatrix {
        match format {
            WeightFormat::Stored => self,
            WeightFormat::F32 => self.to_f32(),
        }
    }
}
