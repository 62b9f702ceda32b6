//! Row gathers (kernels/gather.cu): `out[p] = src[rows[p]]` for the first |A| pairs, with |A|
//! read on the device. The backward gives the Hopper weight-gradient kernel its copy of X this
//! way, and an expert-parallel rank packs the rows it sends and unpacks the results it returns.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ffi;
use crate::tensor::{Element, InputBuf, Launch, OutputBuf};

/// `out[p, :] = src[rows[p], :]` for `p < count`, rows of `row_len` elements of 2 or 4 bytes,
/// where `count` is the device word `count_buf[count_at]` and at most `capacity` (which sizes
/// `rows` and `out`). `src_rows` is the rows `src` holds; every index below the count must be
/// one of them (the caller's dispatch says so).
#[allow(clippy::too_many_arguments)] // the source and its height, the index, the output, the count
pub(crate) fn gather_rows<'a, T: Element>(
    dev: &'a Device,
    src: impl InputBuf<'a, T>,
    src_rows: usize,
    rows: impl InputBuf<'a, u32>,
    out: impl OutputBuf<'a, T>,
    (count_buf, count_at): (impl InputBuf<'a, u32>, usize),
    capacity: usize,
    row_len: usize,
) -> Result<()> {
    let elem = std::mem::size_of::<T>();
    // The kernel moves 16-byte vectors of a 16-bit row: an f32 row of n is a 16-bit row of 2n.
    let h16 = row_len * elem / 2;
    if !(elem == 2 || elem == 4) || !h16.is_multiple_of(8) {
        return Err(Error::InvalidConfig(format!(
            "a row gather moves rows of whole 16-byte vectors, not {row_len} elements of {elem} \
             bytes"
        )));
    }
    if capacity == 0 {
        return Ok(());
    }
    let (cap_i, h_i) = (
        i32::try_from(capacity).map_err(|_| Error::TooLarge {
            what: "gathered rows",
            elements: capacity,
        })?,
        i32::try_from(h16).map_err(|_| Error::TooLarge {
            what: "row length",
            elements: h16,
        })?,
    );
    let mut l = Launch::on(dev);
    let sp = l.input("gather source", src, src_rows * row_len)?;
    let rp = l.input("gather rows", rows, capacity)?;
    let op = l.output("gather out", out, capacity * row_len)?;
    let count = l
        .input_raw("gather count", count_buf, count_at + 1)?
        .wrapping_add(count_at);
    // SAFETY: src holds src_rows rows, rows and out `capacity` rows (checked by `l`, 16-byte
    // aligned), each row h16 16-bit values with h16 % 8 == 0; the kernel reads the count at
    // `count` and touches p < min(count, capacity), whose row indices are below src_rows by the
    // caller's contract.
    let code =
        unsafe { ffi::remoe_gather_rows_16(sp as _, rp, op as _, count, cap_i, h_i, l.stream()) };
    ffi::check("gather_rows", code)
}
