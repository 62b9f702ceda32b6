//! Device buffers that grow to the largest size asked of them and are then reused: what keeps
//! the layer's forward and backward free of allocations in steady state.

use cudarc::driver::CudaSlice;

use crate::device::Device;
use crate::error::Result;
use crate::tensor::Element;

/// A device buffer with a capacity. `ensure(n)` reallocates only when `n` exceeds the capacity;
/// the contents are not preserved across a reallocation (every user rewrites what it reads).
#[derive(Debug)]
pub(crate) struct GrowBuf<T: Element> {
    data: Option<CudaSlice<T>>,
    len: usize,
}

impl<T: Element> Default for GrowBuf<T> {
    fn default() -> Self {
        Self { data: None, len: 0 }
    }
}

impl<T: Element> GrowBuf<T> {
    /// Makes room for `n` elements (at least one, so the buffer always has an address); returns
    /// whether it had to allocate.
    pub(crate) fn ensure(&mut self, dev: &Device, n: usize) -> Result<bool> {
        self.len = n;
        let need = n.max(1);
        if self.data.as_ref().is_some_and(|d| d.len() >= need) {
            return Ok(false);
        }
        self.data = None; // free before allocating the larger one
        self.data = Some(dev.stream().alloc_zeros::<T>(need)?);
        Ok(true)
    }

    /// Bytes of the logical contents (as set by the last `ensure`).
    pub(crate) fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    pub(crate) fn slice(&self) -> &CudaSlice<T> {
        self.data.as_ref().expect("GrowBuf used before ensure")
    }

    pub(crate) fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        self.data.as_mut().expect("GrowBuf used before ensure")
    }

    /// Fills the whole allocation with 0xFF bytes (NaN, or -1 / u32::MAX for indices).
    pub(crate) fn poison(&mut self) -> Result<()> {
        if let Some(d) = self.data.as_mut() {
            let stream = d.stream().clone();
            let bytes = d.num_bytes();
            let (ptr, _guard) = cudarc::driver::DevicePtrMut::device_ptr_mut(d, &stream);
            // SAFETY: ptr is this buffer's own allocation of `bytes` bytes, on its stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream())
            }?;
        }
        Ok(())
    }

    /// The first `len` elements (as set by the last `ensure`), copied to the host (synchronises the stream).
    pub(crate) fn to_host(&self) -> Result<Vec<T>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        let d = self.slice();
        let mut v = d.stream().clone_dtoh(&d.slice(..self.len))?;
        v.truncate(self.len);
        Ok(v)
    }
}
