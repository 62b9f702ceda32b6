//! Device buffers that grow to the largest size asked of them and are then reused: what keeps
//! the layer's forward and backward free of allocations in steady state.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceSlice};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{Element, InputBuf, OutputBuf};

/// A device buffer with a capacity and a logical length. `ensure(n)` reallocates only when `n`
/// exceeds the capacity; the contents are not preserved across a reallocation (every user
/// rewrites what it reads). A kernel is given the first `len` elements only (the logical length
/// set by the last `ensure`), so the launch-time length checks see what the current call sized
/// the buffer for, not a larger allocation left by an earlier batch.
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
    /// whether it had to allocate. On an allocation failure the buffer is left empty (length 0,
    /// no allocation), never with a length its allocation does not have.
    ///
    /// Growing while the stream is being captured into a CUDA graph is refused
    /// ([`Error::CaptureUnsupported`]): the allocation would become the graph's, and the free of
    /// the old buffer a node of it. A context is warmed up by an eager call of the same (or a
    /// larger) size before it is captured.
    pub(crate) fn ensure(&mut self, dev: &Device, n: usize) -> Result<bool> {
        let need = n.max(1);
        if self.data.as_ref().is_some_and(|d| d.len() >= need) {
            self.len = n;
            return Ok(false);
        }
        if dev.is_capturing()? {
            return Err(Error::CaptureUnsupported(format!(
                "a workspace buffer must grow to {n} elements while the stream is being captured; \
                 run the same call once before capturing it (or reserve a larger capacity)"
            )));
        }
        self.len = 0;
        self.data = None; // free before allocating the larger one
        self.data = Some(dev.stream().alloc_zeros::<T>(need)?);
        self.len = n;
        Ok(true)
    }

    /// The logical length (as set by the last `ensure`).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Elements of the allocation (0 before the first `ensure`).
    pub(crate) fn capacity(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.len())
    }

    /// Sets the logical length to `n` without allocating: for a buffer whose contents were
    /// written by a call of that size (a replayed graph's) after another call set another
    /// length. More than the allocation is an error.
    pub(crate) fn set_len(&mut self, n: usize) -> Result<()> {
        if n > self.capacity() {
            return Err(Error::BufferTooShort {
                what: "workspace buffer",
                required: n,
                actual: self.capacity(),
            });
        }
        self.len = n;
        Ok(())
    }

    /// Bytes of the allocation (0 before the first `ensure`).
    pub(crate) fn bytes(&self) -> usize {
        self.data
            .as_ref()
            .map_or(0, |d| d.len() * std::mem::size_of::<T>())
    }

    /// The first `len` elements, read-only.
    pub(crate) fn view(&self) -> Result<CudaView<'_, T>> {
        let d = self.data.as_ref().ok_or_else(unallocated)?;
        Ok(d.slice(..self.len))
    }

    /// The first `len` elements, writable.
    pub(crate) fn view_mut(&mut self) -> Result<CudaViewMut<'_, T>> {
        let len = self.len;
        let d = self.data.as_mut().ok_or_else(unallocated)?;
        Ok(d.slice_mut(..len))
    }

    /// Fills the whole allocation with 0xFF bytes (NaN, or -1 / u32::MAX for indices).
    pub(crate) fn poison(&mut self) -> Result<()> {
        self.fill_bytes(0xFF)
    }

    /// Sets elements `range` (of the logical length) to zero.
    pub(crate) fn zero_range(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        let zeros = vec![<T as bytemuck::Zeroable>::zeroed(); range.len()];
        let mut v = self.view_mut()?;
        let mut part = v.slice_mut(range);
        let stream = part.stream().clone();
        stream.memcpy_htod(&zeros, &mut part)?;
        Ok(())
    }

    fn fill_bytes(&mut self, byte: u8) -> Result<()> {
        if let Some(d) = self.data.as_mut() {
            let stream = d.stream().clone();
            let bytes = d.num_bytes();
            let (ptr, _guard) = cudarc::driver::DevicePtrMut::device_ptr_mut(d, &stream);
            // SAFETY: ptr is this buffer's own allocation of `bytes` bytes, on its stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, byte, bytes, stream.cu_stream())
            }?;
        }
        Ok(())
    }

    /// The first `len` elements (as set by the last `ensure`), copied to the host (synchronises
    /// the stream).
    pub(crate) fn to_host(&self) -> Result<Vec<T>> {
        self.prefix_to_host(self.len)
    }

    /// The first `n` elements (at most the allocation: the caller knows from the context's
    /// record how many the last call that wrote them wrote, whatever length a later call set),
    /// copied to the host (synchronises the stream).
    pub(crate) fn prefix_to_host(&self, n: usize) -> Result<Vec<T>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let d = self.data.as_ref().ok_or_else(unallocated)?;
        if n > d.len() {
            return Err(Error::BufferTooShort {
                what: "workspace read",
                required: n,
                actual: d.len(),
            });
        }
        let v = d.slice(..n);
        crate::graph::check_host_read(v.stream())?;
        Ok(v.stream().clone_dtoh(&v)?)
    }
}

fn unallocated() -> Error {
    Error::InvalidConfig("a workspace buffer was used before any forward sized it".into())
}

impl<'a, T: Element> InputBuf<'a, T> for &'a GrowBuf<T> {
    fn input_view(self, _: &'static str) -> Result<CudaView<'a, T>> {
        self.view()
    }
}

impl<'a, T: Element> OutputBuf<'a, T> for &'a mut GrowBuf<T> {
    fn output_view(self, _: &'static str) -> Result<CudaViewMut<'a, T>> {
        self.view_mut()
    }
}

/// What every workspace (a named set of buffers) can say of itself.
pub(crate) trait Buffers {
    /// Bytes of the allocations.
    fn bytes(&self) -> usize;
    /// Fills every allocation with 0xFF bytes (see [`GrowBuf::poison`]).
    fn poison(&mut self) -> Result<()>;
}

impl<T: Element> Buffers for GrowBuf<T> {
    fn bytes(&self) -> usize {
        GrowBuf::bytes(self)
    }

    fn poison(&mut self) -> Result<()> {
        GrowBuf::poison(self)
    }
}

/// A workspace: a struct of buffers (each a [`Buffers`]: a [`GrowBuf`] or another workspace)
/// listed once, with its `Default`, `bytes` and `poison` made from that one list.
macro_rules! workspace {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident<$t:ident> {
            $($(#[$fmeta:meta])* $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug)]
        $vis struct $name<$t: $crate::tensor::Element> {
            $($(#[$fmeta])* pub(crate) $field: $ty,)*
            _elem: std::marker::PhantomData<$t>,
        }

        impl<$t: $crate::tensor::Element> Default for $name<$t> {
            fn default() -> Self {
                Self {
                    $($field: Default::default(),)*
                    _elem: std::marker::PhantomData,
                }
            }
        }

        impl<$t: $crate::tensor::Element> $crate::workspace::Buffers for $name<$t> {
            fn bytes(&self) -> usize {
                0 $(+ $crate::workspace::Buffers::bytes(&self.$field))*
            }

            fn poison(&mut self) -> $crate::error::Result<()> {
                $($crate::workspace::Buffers::poison(&mut self.$field)?;)*
                Ok(())
            }
        }
    };
}
pub(crate) use workspace;
