//! The caller's choices: which implementation, and whether to use threads.

/// Which implementation computes attention's output.
///
/// # Examples
///
/// ```
/// use attn::{Kernel, ScaledDotProduct};
/// use ndarray::Array2;
///
/// let x = Array2::from_shape_fn((300, 64), |(i, j)| ((i * 31 + j * 17) % 13) as f32 / 13.0);
/// let fused = ScaledDotProduct::new().with_kernel(Kernel::Fused).forward(&x, &x, &x)?;
/// let plain = ScaledDotProduct::new().with_kernel(Kernel::Plain).forward(&x, &x, &x)?;
/// let diff = (&fused - &plain).iter().fold(0.0_f32, |m, d| m.max(d.abs()));
/// assert!(diff < 1e-5);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernel {
    /// The fused kernel (default): tiled; for heads of at most eight query rows
    /// (decoding), direct over the unpacked keys and values; row by row for tiny
    /// problems.
    #[default]
    Auto,
    /// The readable reference path: the score matrix, its softmax, then the product.
    Plain,
    /// The tiled fused kernel at every size.
    Fused,
}

/// Whether the fused kernel spreads its work over threads.
///
/// # Examples
///
/// ```
/// use attn::{Parallelism, ScaledDotProduct};
/// use ndarray::Array2;
///
/// let x = Array2::<f64>::ones((256, 32));
/// let one_thread = ScaledDotProduct::new().with_parallelism(Parallelism::Sequential);
/// assert_eq!(one_thread.forward(&x, &x, &x)?, ScaledDotProduct::new().forward(&x, &x, &x)?);
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Parallelism {
    /// On the calling thread only.
    Sequential,
    /// Blocks of query rows over the current rayon thread pool (default): the global
    /// pool, sized by `RAYON_NUM_THREADS` or the number of cores, or the pool of a
    /// surrounding `ThreadPool::install`.
    #[default]
    Rayon,
}
