//! Typed device tensors that carry their shape.

use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, ValidAsZeroBits,
};
use half::{bf16, f16};

use crate::device::Device;
use crate::error::{Error, Result};

/// Element types a [`DeviceTensor`] can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    BF16,
    F16,
    F32,
    U32,
    I32,
    F64,
}

/// A type that can live in a [`DeviceTensor`].
pub trait Element:
    DeviceRepr + ValidAsZeroBits + bytemuck::Pod + Default + std::fmt::Debug
{
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

/// A row-major tensor in device memory, owned, with its shape.
#[derive(Debug)]
pub struct DeviceTensor<T: Element> {
    data: CudaSlice<T>,
    shape: Vec<usize>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<T: Element> DeviceTensor<T> {
    /// Copies `host` to the device as a tensor of `shape`.
    pub fn from_host(dev: &Device, host: &[T], shape: &[usize]) -> Result<Self> {
        let n = numel(shape);
        if host.len() != n {
            return Err(Error::LengthMismatch {
                what: "host data for DeviceTensor::from_host",
                expected: n,
                actual: host.len(),
            });
        }
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

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the tensor back to the host, waiting for the work queued on its stream.
    pub fn to_host(&self) -> Result<Vec<T>> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.data.stream().clone_dtoh(&self.data)?)
    }

    /// Overwrites `host` into the tensor (same length).
    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        if host.len() != self.len() {
            return Err(Error::LengthMismatch {
                what: "host data for DeviceTensor::copy_from_host",
                expected: self.len(),
                actual: host.len(),
            });
        }
        if !host.is_empty() {
            let stream = self.data.stream().clone();
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
        // SAFETY: ptr is this tensor's own allocation of `bytes` bytes, written on its stream.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }?;
        Ok(())
    }

    /// The underlying cudarc buffer, for interoperation with other cudarc code (cuBLAS, your
    /// own kernels). Read-only: the shape stays the tensor's.
    pub fn cuda_slice(&self) -> &CudaSlice<T> {
        &self.data
    }

    /// The underlying cudarc buffer, writable (its length cannot change).
    pub fn cuda_slice_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.data
    }

    /// Checks that the tensor has `expected` as its shape.
    pub(crate) fn expect_shape(&self, what: &'static str, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::ShapeMismatch {
                what,
                expected: expected.to_vec(),
                actual: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// Checks that the tensor lives in `dev`'s context.
    pub(crate) fn expect_device(&self, what: &'static str, dev: &Device) -> Result<()> {
        if self.data.context().cu_ctx() != dev.context().cu_ctx() {
            return Err(Error::WrongContext { what });
        }
        Ok(())
    }
}

/// Raw device pointers for a launcher, with the guards that keep cudarc's stream ordering
/// correct until the launch has been enqueued.
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Launch<'a> {
    pub(crate) fn on(dev: &'a Device) -> Self {
        Self {
            stream: dev.stream(),
            guards: Vec::new(),
        }
    }

    /// A read-only input's pointer, checked for 16-byte alignment (the kernels' vector loads).
    pub(crate) fn input<T: Element>(
        &mut self,
        what: &'static str,
        t: &'a CudaSlice<T>,
    ) -> Result<*const T> {
        let (ptr, guard) = t.device_ptr(self.stream);
        self.guards.push(guard);
        aligned(what, ptr).map(|p| p as *const T)
    }

    /// An output's pointer, checked for 16-byte alignment.
    pub(crate) fn output<T: Element>(
        &mut self,
        what: &'static str,
        t: &'a mut CudaSlice<T>,
    ) -> Result<*mut T> {
        let (ptr, guard) = t.device_ptr_mut(self.stream);
        self.guards.push(guard);
        aligned(what, ptr).map(|p| p as *mut T)
    }

    /// An output's pointer, without the alignment check (scalars and index buffers that the
    /// kernels read one element at a time).
    pub(crate) fn output_raw<T: DeviceRepr>(&mut self, t: &'a mut CudaSlice<T>) -> *mut T {
        let (ptr, guard) = t.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr as *mut T
    }

    /// An input's pointer, without the alignment check.
    pub(crate) fn input_raw<T: DeviceRepr>(&mut self, t: &'a CudaSlice<T>) -> *const T {
        let (ptr, guard) = t.device_ptr(self.stream);
        self.guards.push(guard);
        ptr as *const T
    }

    /// The stream as the launchers take it.
    pub(crate) fn stream(&self) -> crate::ffi::remoe_stream_t {
        self.stream.cu_stream() as crate::ffi::remoe_stream_t
    }
}

fn aligned(what: &'static str, ptr: u64) -> Result<u64> {
    const ALIGN: u64 = 16;
    if ptr % ALIGN != 0 {
        return Err(Error::Misaligned {
            what,
            required: ALIGN as usize,
        });
    }
    Ok(ptr)
}
