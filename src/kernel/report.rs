//! Which path computed each head, observable by tests and diagnostics, so that a
//! test of a fast path can assert that the fast path is what ran.

use std::cell::Cell;

use super::arch::KernelArch;

/// How many heads (one `(batch, head)` pair each) every path computed during a
/// [`kernel_paths`] call, and the instruction set of the fused paths.
///
/// A testing and diagnostic hook: not part of the stable API.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelPaths {
    /// Heads computed by the reference path: [`Kernel::Plain`](crate::Kernel::Plain),
    /// and every head whose inputs the fused paths hand over (non-finite, overflow),
    /// forward or backward.
    pub reference: usize,
    /// Heads computed by the tiled kernel.
    pub tiled: usize,
    /// Heads computed by the direct (decoding) path.
    pub direct: usize,
    /// Heads computed row by row.
    pub rowwise: usize,
    /// Heads the fused backward pass's kernels computed: gradients, or the forward
    /// that keeps each row's log-sum-exp.
    pub backward: usize,
    /// Query heads of int8-cache steps scored and summed by integer dot
    /// products (AVX512_VNNI), also counted by the path that ran them.
    pub int8_dots: usize,
    /// Layer products `x·W` on a weight packed for the micro-kernels.
    pub weight_products: usize,
    /// The instruction set of the last call that ran the tiled or direct path.
    pub arch: Option<KernelArch>,
}

/// A path through the kernel.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Path {
    Reference,
    Tiled,
    Direct,
    Rowwise,
    FusedBackward,
    Int8Dots,
    WeightProduct,
}

thread_local! {
    static RECORD: Cell<Option<KernelPaths>> = const { Cell::new(None) };
}

/// Runs `f` and reports which paths computed the heads of the attention calls it
/// made on this thread (the paths are chosen on the calling thread, whatever
/// threads then compute them). Calls that return weights always take the
/// reference path and are not counted.
///
/// A testing and diagnostic hook: not part of the stable API.
///
/// # Examples
///
/// ```
/// use ndarray::Array2;
///
/// let x = Array2::<f32>::ones((512, 64));
/// let (out, paths) = attn::kernel_paths(|| attn::scaled_dot_product(&x, &x, &x));
/// assert_eq!(out?, x);
/// assert_eq!((paths.tiled, paths.reference), (1, 0));
/// # Ok::<(), attn::Error>(())
/// ```
#[doc(hidden)]
pub fn kernel_paths<R>(f: impl FnOnce() -> R) -> (R, KernelPaths) {
    /// Restores the caller's record even if `f` panics.
    struct Restore(Option<KernelPaths>);
    impl Drop for Restore {
        fn drop(&mut self) {
            RECORD.set(self.0);
        }
    }
    let restore = Restore(RECORD.replace(Some(KernelPaths::default())));
    let result = f();
    let paths = RECORD.get().unwrap_or_default();
    drop(restore);
    (result, paths)
}

/// Counts `heads` heads computed by `path`, when a [`kernel_paths`] call is listening.
pub(crate) fn count(path: Path, heads: usize) {
    RECORD.with(|record| {
        if let Some(mut paths) = record.get() {
            match path {
                Path::Reference => paths.reference += heads,
                Path::Tiled => paths.tiled += heads,
                Path::Direct => paths.direct += heads,
                Path::Rowwise => paths.rowwise += heads,
                Path::FusedBackward => paths.backward += heads,
                Path::Int8Dots => paths.int8_dots += heads,
                Path::WeightProduct => paths.weight_products += heads,
            }
            record.set(Some(paths));
        }
    });
}

/// Notes the instruction set the fused paths ran with.
pub(crate) fn arch_used(arch: KernelArch) {
    RECORD.with(|record| {
        if let Some(mut paths) = record.get() {
            paths.arch = Some(arch);
            record.set(Some(paths));
        }
    });
}
