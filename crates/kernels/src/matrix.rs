//! The weight matrix every product takes: rows of one type, borrowed in place.

use std::ops::Range;

use crate::packed::Layout;
use crate::types::{check_len, row_size, Error, GgmlType, Result};

/// A `rows × cols` weight matrix of type `ty`, `rows * row_size(ty, cols)` bytes in `data`: stored row after row
/// exactly as in a GGUF tensor ([`QuantMatrix::new`]), or in a layout of its own made once from that
/// ([`crate::PackedMatrix`]). Borrowed, never copied.
#[derive(Clone, Copy, Debug)]
pub struct QuantMatrix<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    layout: Layout,
    data: &'a [u8],
}

impl<'a> QuantMatrix<'a> {
    /// Checks that `cols` is a whole number of blocks and that `data` holds exactly `rows` rows, in GGUF's layout.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<QuantMatrix<'a>> {
        QuantMatrix::with_layout(ty, rows, cols, data, Layout::Ggml)
    }

    /// [`QuantMatrix::new`] for data in `layout` (made by [`crate::PackedMatrix`], which takes the same bytes).
    pub(crate) fn with_layout(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
        layout: Layout,
    ) -> Result<QuantMatrix<'a>> {
        let row_bytes = row_size(ty, cols)?;
        check_len("weight data", rows * row_bytes, data.len())?;
        if ty == GgmlType::Q8_K {
            // Only activations are ever q8_K; ggml has no q8_K weights either.
            return Err(Error::Unsupported { op: "a weight matrix", ty });
        }
        Ok(QuantMatrix { ty, rows, cols, row_bytes, layout, data })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes per row, `row_size(ty, cols)`.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// The bytes of rows `rows`. In an interleaved layout, a range that reaches into the groups of rows must start
    /// and end on group boundaries (or at the last row): a row inside a group has no bytes of its own.
    pub fn rows_data(&self, rows: Range<usize>) -> &'a [u8] {
        &self.data[rows.start * self.row_bytes..rows.end * self.row_bytes]
    }
}
