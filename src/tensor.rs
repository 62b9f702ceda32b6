//! Typed device tensors that carry their shape, borrowed views of device memory with a shape,
//! and the launch helper that turns them into raw pointers for the kernels.
//!
//! ## Interoperation with other cudarc code
//!
//! - [`DeviceTensor::from_cuda_slice`] wraps a `CudaSlice` without a copy (its length must be the
//!   shape's element count); [`DeviceTensor::into_cuda_slice`] hands it back.
//! - [`DeviceTensor::cuda_slice`] lends the buffer read-only; [`DeviceTensor::cuda_view_mut`]
//!   lends it writable as a `CudaViewMut` of the full length, which cuBLAS and cudarc's kernel
//!   launches take. Neither lets a caller put a different (shorter) buffer into the tensor;
//!   [`DeviceTensor::replace_cuda_slice`] swaps the buffer for one of the same length.
//! - [`TensorView`] gives a shape to a borrowed `CudaView` (a whole `CudaSlice`, a sub-range of
//!   one, a framework's buffer) without a copy; the layer's inputs (X, the weights, dOut) take
//!   views as well as tensors.
//!
//! Every launch of the crate checks each buffer it passes to a kernel for the number of elements
//! that kernel reads or writes through it ([`Error::BufferTooShort`] otherwise), and for the
//! alignment of the kernels' vector loads, before anything is enqueued.

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtrMut, DeviceRepr, DeviceSlice,
    SyncOnDrop, ValidAsZeroBits,
};
use half::{bf16, f16};

use crate::device::Device;
use crate::error::{Error, Result};

/// Element types a [`DeviceTensor`] can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// [`half::bf16`].
    BF16,
    /// [`half::f16`].
    F16,
    /// `f32`.
    F32,
    /// `u32`.
    U32,
    /// `i32`.
    I32,
    /// `f64`.
    F64,
}

/// A type that can live in a [`DeviceTensor`].
pub trait Element:
    DeviceRepr + ValidAsZeroBits + bytemuck::Pod + Default + std::fmt::Debug
{
    /// The type's [`DType`].
    const DTYPE: DType;
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}

/// A row-major tensor in device memory, owned, with its shape. Its buffer always holds exactly
/// as many elements as the shape has: no method lets a caller change that.
#[derive(Debug)]
pub struct DeviceTensor<T: Element> {
    data: CudaSlice<T>,
    shape: Vec<usize>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// `actual` must be `expected` (a buffer wrapped as a tensor of a shape).
fn exact_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected != actual {
        return Err(Error::LengthMismatch {
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

/// A kernel reads or writes `required` elements through a buffer of `actual`.
pub(crate) fn check_len(what: &'static str, required: usize, actual: usize) -> Result<()> {
    if actual < required {
        return Err(Error::BufferTooShort {
            what,
            required,
            actual,
        });
    }
    Ok(())
}

impl<T: Element> DeviceTensor<T> {
    /// Copies `host` to the device as a tensor of `shape`.
    pub fn from_host(dev: &Device, host: &[T], shape: &[usize]) -> Result<Self> {
        let n = numel(shape);
        exact_len("host data for DeviceTensor::from_host", n, host.len())?;
        let data = if n == 0 {
            dev.stream().null()?
        } else {
            dev.stream().clone_htod(host)?
        };
        Ok(Self {
            data,
            shape: shape.to_vec(),
        })
    }

    /// A zero-filled tensor of `shape`.
    pub fn zeros(dev: &Device, shape: &[usize]) -> Result<Self> {
        let n = numel(shape);
        let data = if n == 0 {
            dev.stream().null()?
        } else {
            dev.stream().alloc_zeros(n)?
        };
        Ok(Self {
            data,
            shape: shape.to_vec(),
        })
    }

    /// Wraps a cudarc buffer as a tensor of `shape`, without a copy. The buffer must hold exactly
    /// the shape's element count ([`Error::LengthMismatch`] otherwise); it stays in its own
    /// context and stream ordering.
    pub fn from_cuda_slice(data: CudaSlice<T>, shape: &[usize]) -> Result<Self> {
        exact_len(
            "CudaSlice for DeviceTensor::from_cuda_slice",
            numel(shape),
            data.len(),
        )?;
        Ok(Self {
            data,
            shape: shape.to_vec(),
        })
    }

    /// Hands the buffer back, without a copy (the shape is dropped).
    pub fn into_cuda_slice(self) -> CudaSlice<T> {
        self.data
    }

    /// Puts `data` in place of the tensor's buffer and returns the old one, without a copy. The
    /// new buffer must have the tensor's element count ([`Error::LengthMismatch`] otherwise, and
    /// nothing changes).
    pub fn replace_cuda_slice(&mut self, data: CudaSlice<T>) -> Result<CudaSlice<T>> {
        exact_len(
            "CudaSlice for DeviceTensor::replace_cuda_slice",
            self.len(),
            data.len(),
        )?;
        Ok(std::mem::replace(&mut self.data, data))
    }

    /// The shape, row-major.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the tensor back to the host, waiting for the work queued on its stream.
    pub fn to_host(&self) -> Result<Vec<T>> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        crate::graph::check_host_read(self.data.stream())?;
        Ok(self.data.stream().clone_dtoh(&self.data)?)
    }

    /// Overwrites `host` into the tensor (same length).
    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        exact_len(
            "host data for DeviceTensor::copy_from_host",
            self.len(),
            host.len(),
        )?;
        if !host.is_empty() {
            let stream = self.data.stream().clone();
            // A captured copy would keep the address of `host`, which the caller may free.
            crate::graph::check_host_read(&stream)?;
            stream.memcpy_htod(host, &mut self.data)?;
        }
        Ok(())
    }

    /// Fills every byte with 0xFF: NaN for the float types, u32::MAX (or -1) for indices. Tests poison
    /// outputs before a kernel runs, so an element the kernel failed to write cannot pass.
    pub fn poison(&mut self) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let stream = self.data.stream().clone();
        let bytes = self.len() * std::mem::size_of::<T>();
        let (ptr, _guard) = self.data.device_ptr_mut(&stream);
        // SAFETY: ptr is this tensor's own allocation, which holds exactly len() elements
        // (`bytes` bytes: the type's invariant), written on its stream.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }?;
        Ok(())
    }

    /// The underlying cudarc buffer, for interoperation with other cudarc code (cuBLAS, your
    /// own kernels). Read-only: the shape stays the tensor's.
    pub fn cuda_slice(&self) -> &CudaSlice<T> {
        &self.data
    }

    /// The whole buffer as a read-only cudarc view.
    pub fn cuda_view(&self) -> CudaView<'_, T> {
        self.data.as_view()
    }

    /// The whole buffer as a writable cudarc view (what cuBLAS and cudarc's kernel launches
    /// take for an output). A view cannot be put in place of the tensor's buffer, so the
    /// buffer's length stays the shape's:
    ///
    /// ```compile_fail
    /// # use remoe_kernels::DeviceTensor;
    /// # use cudarc::driver::CudaSlice;
    /// fn shrink(t: &mut DeviceTensor<f32>, shorter: CudaSlice<f32>) {
    ///     *t.cuda_view_mut() = shorter; // does not compile: a view is not a slot
    /// }
    /// ```
    ///
    /// (To swap buffers use [`replace_cuda_slice`](Self::replace_cuda_slice), which checks the
    /// length.)
    pub fn cuda_view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.data.as_view_mut()
    }

    /// The tensor as a borrowed [`TensorView`] (what the layer's input arguments take).
    pub fn view(&self) -> TensorView<'_, T> {
        TensorView {
            view: self.data.as_view(),
            shape: self.shape.clone(),
        }
    }

    /// Checks that the tensor has `expected` as its shape.
    pub(crate) fn expect_shape(&self, what: &'static str, expected: &[usize]) -> Result<()> {
        expect_shape(what, &self.shape, expected)
    }

    /// Checks that the tensor lives in `dev`'s context.
    pub(crate) fn expect_device(&self, what: &'static str, dev: &Device) -> Result<()> {
        expect_context(what, self.data.context().cu_ctx(), dev)?;
        expect_ordered(what, self.data.stream(), dev)
    }
}

fn expect_shape(what: &'static str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(Error::ShapeMismatch {
            what,
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

fn expect_context(
    what: &'static str,
    ctx: cudarc::driver::sys::CUcontext,
    dev: &Device,
) -> Result<()> {
    if ctx != dev.context().cu_ctx() {
        return Err(Error::WrongContext { what });
    }
    Ok(())
}

/// A buffer of `stream` used on `dev`'s stream must be ordered with that stream's work: the same
/// stream, or cudarc's event tracking on in both handles (each launch then waits for the
/// buffer's last use on the other stream). With tracking off in one of them (an untracked
/// device's buffers, or an untracked device using another's) nothing orders them.
fn expect_ordered(what: &'static str, stream: &CudaStream, dev: &Device) -> Result<()> {
    let ours = dev.stream();
    let same = stream.cu_stream() == ours.cu_stream()
        && stream.context().cu_ctx() == ours.context().cu_ctx();
    if same || (stream.context().is_event_tracking() && dev.context().is_event_tracking()) {
        return Ok(());
    }
    Err(Error::UnorderedStream { what })
}

/// A borrowed, read-only, row-major tensor: a cudarc view of device memory (a whole
/// `CudaSlice`, a sub-range of one, any buffer cudarc can view) with a shape, made without a
/// copy. The layer's inputs take one wherever they take a `&DeviceTensor`.
#[derive(Debug)]
pub struct TensorView<'a, T: Element> {
    view: CudaView<'a, T>,
    shape: Vec<usize>,
}

impl<'a, T: Element> TensorView<'a, T> {
    /// A view of `shape` over `view`, which must hold exactly the shape's element count
    /// ([`Error::LengthMismatch`] otherwise). Take a sub-range with cudarc's `slice(a..b)`.
    /// Kernels load rows as 16-byte vectors: a view starting at an offset that breaks this
    /// alignment is refused when it is used ([`Error::Misaligned`]).
    pub fn new(view: CudaView<'a, T>, shape: &[usize]) -> Result<Self> {
        exact_len("CudaView for TensorView::new", numel(shape), view.len())?;
        Ok(Self {
            view,
            shape: shape.to_vec(),
        })
    }

    /// The shape, row-major.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    /// Whether the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The underlying cudarc view.
    pub fn cuda_view(&self) -> CudaView<'a, T> {
        self.view.slice(..)
    }

    /// Copies the viewed elements to the host, waiting for the work queued on their stream.
    pub fn to_host(&self) -> Result<Vec<T>> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        crate::graph::check_host_read(self.view.stream())?;
        Ok(self.view.stream().clone_dtoh(&self.view)?)
    }

    pub(crate) fn expect_shape(&self, what: &'static str, expected: &[usize]) -> Result<()> {
        expect_shape(what, &self.shape, expected)
    }

    pub(crate) fn expect_device(&self, what: &'static str, dev: &Device) -> Result<()> {
        expect_context(what, self.view.stream().context().cu_ctx(), dev)?;
        expect_ordered(what, self.view.stream(), dev)
    }
}

impl<T: Element> Clone for TensorView<'_, T> {
    fn clone(&self) -> Self {
        Self {
            view: self.view.slice(..),
            shape: self.shape.clone(),
        }
    }
}

impl<'a, T: Element> From<&'a DeviceTensor<T>> for TensorView<'a, T> {
    fn from(t: &'a DeviceTensor<T>) -> Self {
        t.view()
    }
}

impl<'a, T: Element> From<&TensorView<'a, T>> for TensorView<'a, T> {
    fn from(t: &TensorView<'a, T>) -> Self {
        t.clone()
    }
}

/// A buffer a kernel reads: turned into a cudarc view of the elements it may read.
pub(crate) trait InputBuf<'a, T> {
    fn input_view(self, what: &'static str) -> Result<CudaView<'a, T>>;
}

/// A buffer a kernel writes: turned into a writable cudarc view of the elements it may write.
pub(crate) trait OutputBuf<'a, T> {
    fn output_view(self, what: &'static str) -> Result<CudaViewMut<'a, T>>;
}

impl<'a, T> InputBuf<'a, T> for &'a CudaSlice<T> {
    fn input_view(self, _: &'static str) -> Result<CudaView<'a, T>> {
        Ok(self.as_view())
    }
}

impl<'a, T> InputBuf<'a, T> for CudaView<'a, T> {
    fn input_view(self, _: &'static str) -> Result<CudaView<'a, T>> {
        Ok(self)
    }
}

impl<'a, T: Element> InputBuf<'a, T> for &'a DeviceTensor<T> {
    fn input_view(self, _: &'static str) -> Result<CudaView<'a, T>> {
        Ok(self.data.as_view())
    }
}

impl<'a, 'b: 'a, T: Element> InputBuf<'a, T> for &'a TensorView<'b, T> {
    fn input_view(self, _: &'static str) -> Result<CudaView<'a, T>> {
        Ok(self.view.slice(..))
    }
}

impl<'a, T> OutputBuf<'a, T> for &'a mut CudaSlice<T> {
    fn output_view(self, _: &'static str) -> Result<CudaViewMut<'a, T>> {
        Ok(self.as_view_mut())
    }
}

impl<'a, T> OutputBuf<'a, T> for CudaViewMut<'a, T> {
    fn output_view(self, _: &'static str) -> Result<CudaViewMut<'a, T>> {
        Ok(self)
    }
}

impl<'a, T: Element> OutputBuf<'a, T> for &'a mut DeviceTensor<T> {
    fn output_view(self, _: &'static str) -> Result<CudaViewMut<'a, T>> {
        Ok(self.data.as_view_mut())
    }
}

/// Raw device pointers for a launcher, with the guards that keep cudarc's stream ordering
/// correct until the launch has been enqueued. Every pointer comes with the number of elements
/// the kernel accesses through it, checked against the buffer's length
/// ([`Error::BufferTooShort`]): a kernel launched through a `Launch` stays inside its buffers
/// as long as its own indexing matches the counts given here (which each call site states
/// beside its `unsafe` block).
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
    /// Set when this thread may not enqueue on the stream now (another thread's capture, see
    /// [`crate::graph`]): every buffer the launch asks for returns it, so nothing launches.
    refused: Option<Error>,
}

impl<'a> Launch<'a> {
    pub(crate) fn on(dev: &'a Device) -> Self {
        Self {
            stream: dev.stream(),
            guards: Vec::new(),
            refused: crate::graph::check_launch(dev).err(),
        }
    }

    fn refused(&self) -> Result<()> {
        match &self.refused {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn read_ptr<T>(
        &mut self,
        what: &'static str,
        view: CudaView<'a, T>,
        need: usize,
    ) -> Result<u64> {
        self.refused()?;
        check_len(what, need, view.len())?;
        let (ptr, guard) = view.view_ptr(self.stream);
        self.guards.push(guard);
        Ok(ptr)
    }

    fn write_ptr<T>(
        &mut self,
        what: &'static str,
        view: CudaViewMut<'a, T>,
        need: usize,
    ) -> Result<u64> {
        self.refused()?;
        check_len(what, need, view.len())?;
        let (ptr, guard) = view.view_ptr_mut(self.stream);
        self.guards.push(guard);
        Ok(ptr)
    }

    /// A read-only input of at least `need` elements, checked for 16-byte alignment (the
    /// kernels' vector loads).
    pub(crate) fn input<T: Element>(
        &mut self,
        what: &'static str,
        buf: impl InputBuf<'a, T>,
        need: usize,
    ) -> Result<*const T> {
        let view = buf.input_view(what)?;
        let ptr = self.read_ptr(what, view, need)?;
        aligned(what, ptr).map(|p| p as *const T)
    }

    /// An output of at least `need` elements, checked for 16-byte alignment.
    pub(crate) fn output<T: Element>(
        &mut self,
        what: &'static str,
        buf: impl OutputBuf<'a, T>,
        need: usize,
    ) -> Result<*mut T> {
        let view = buf.output_view(what)?;
        let ptr = self.write_ptr(what, view, need)?;
        aligned(what, ptr).map(|p| p as *mut T)
    }

    /// An output of at least `need` elements, without the alignment check (scalars and index
    /// buffers that the kernels access one element at a time).
    pub(crate) fn output_raw<T: Element>(
        &mut self,
        what: &'static str,
        buf: impl OutputBuf<'a, T>,
        need: usize,
    ) -> Result<*mut T> {
        let view = buf.output_view(what)?;
        Ok(self.write_ptr(what, view, need)? as *mut T)
    }

    /// An input of at least `need` elements, without the alignment check.
    pub(crate) fn input_raw<T: Element>(
        &mut self,
        what: &'static str,
        buf: impl InputBuf<'a, T>,
        need: usize,
    ) -> Result<*const T> {
        let view = buf.input_view(what)?;
        Ok(self.read_ptr(what, view, need)? as *const T)
    }

    /// The stream as the launchers take it.
    pub(crate) fn stream(&self) -> crate::ffi::remoe_stream_t {
        self.stream.cu_stream() as crate::ffi::remoe_stream_t
    }
}

fn aligned(what: &'static str, ptr: u64) -> Result<u64> {
    const ALIGN: u64 = 16;
    if !ptr.is_multiple_of(ALIGN) {
        return Err(Error::Misaligned {
            what,
            required: ALIGN as usize,
        });
    }
    Ok(ptr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_shorter_than_the_kernel_needs_is_refused() {
        assert_eq!(check_len("x", 4, 4), Ok(()));
        assert_eq!(check_len("x", 0, 0), Ok(()));
        assert_eq!(check_len("x", 3, 8), Ok(()));
        assert_eq!(
            check_len("x", 5, 4),
            Err(Error::BufferTooShort {
                what: "x",
                required: 5,
                actual: 4
            })
        );
    }

    #[test]
    fn a_wrapped_buffer_must_match_its_shape_exactly() {
        assert_eq!(exact_len("b", 6, 6), Ok(()));
        assert!(matches!(
            exact_len("b", 6, 5),
            Err(Error::LengthMismatch {
                expected: 6,
                actual: 5,
                ..
            })
        ));
        assert!(matches!(
            exact_len("b", 6, 7),
            Err(Error::LengthMismatch { .. })
        ));
    }

    #[test]
    fn misaligned_pointers_are_refused() {
        assert_eq!(aligned("p", 256), Ok(256));
        assert!(matches!(
            aligned("p", 258),
            Err(Error::Misaligned { required: 16, .. })
        ));
    }

    /// The launch-level check on a real device: a buffer of 3 elements given for a kernel that
    /// reads 4 is refused before anything is enqueued, as input and as output.
    #[test]
    fn launch_refuses_a_short_device_buffer() {
        let Some(dev) = crate::device::test_device_or_skip("launch_refuses_a_short_device_buffer")
        else {
            return;
        };
        let mut buf = dev.stream().alloc_zeros::<f32>(3).unwrap();
        {
            let mut l = Launch::on(&dev);
            let err = l.input("short input", &buf, 4).unwrap_err();
            assert_eq!(
                err,
                Error::BufferTooShort {
                    what: "short input",
                    required: 4,
                    actual: 3
                }
            );
            assert!(l.input("exact input", &buf, 3).is_ok());
        }
        {
            let mut l = Launch::on(&dev);
            assert!(matches!(
                l.output("short output", &mut buf, 4),
                Err(Error::BufferTooShort { .. })
            ));
        }
        // A tensor wrapped around a buffer, a view, a swap: all refuse a length that is not the
        // shape's.
        let short = dev.stream().alloc_zeros::<f32>(3).unwrap();
        assert!(matches!(
            DeviceTensor::from_cuda_slice(short, &[2, 2]),
            Err(Error::LengthMismatch { .. })
        ));
        let mut t = DeviceTensor::<f32>::zeros(&dev, &[2, 2]).unwrap();
        let short = dev.stream().alloc_zeros::<f32>(3).unwrap();
        assert!(matches!(
            t.replace_cuda_slice(short),
            Err(Error::LengthMismatch { .. })
        ));
        assert_eq!(t.cuda_slice().len(), 4);
        let four = dev.stream().alloc_zeros::<f32>(4).unwrap();
        assert!(matches!(
            TensorView::new(four.slice(1..), &[2, 2]),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(TensorView::new(four.slice(..), &[2, 2]).is_ok());
    }
}
