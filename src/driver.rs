//! Whether a CUDA driver can be reached at all: below the error type (which names driver errors
//! with the driver's own words only where it can be loaded) and the device.

/// Whether the CUDA driver library can be loaded on this machine. With cudarc's
/// `dynamic-loading` (the default), cudarc loads `libcuda` on its first call and panics when it
/// is missing; this asks first, so the absence of a GPU is an error value rather than a panic.
pub fn driver_library_present() -> bool {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    names.iter().any(|name| {
        // SAFETY: loading the driver library runs its initialisers, which only set up the
        // driver's own state; the handle is closed again when dropped here. cudarc loads the
        // same library the same way.
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}
