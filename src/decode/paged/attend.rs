//! A step of attention over one sequence of a paged cache: checked, written,
//! then attended over the sequence's blocks.

use ndarray::{Array3, Array4, ArrayRef3, ArrayViewMut2, Axis, arr0};

use super::write::Encoded;
use super::{CacheElement, PagedKvCache, Sequence, SequenceId};
use crate::core::mask::{Mask, broadcast_all};
use crate::core::problem::{Problem, check_scale};
use crate::error::{Error, Result};
use crate::kernel::paged::{Pages, forward_pages, ready};
use crate::kernel::{DIRECT_MAX_ROWS, Parallelism};
use crate::sdpa::ScaledDotProduct;

impl<E: CacheElement> PagedKvCache<E> {
    /// Appends `k_new`, `v_new` to `sequence` and returns the new queries'
    /// attention over all of the sequence's positions: bottom-right causal
    /// (query `i` of `T` sits at position `len + i`), within the window if the
    /// cache has one, over the keys and values as stored.
    ///
    /// # Shapes
    ///
    /// `q: (heads, T, d_k)` with `kv_heads` dividing `heads`,
    /// `k_new: (kv_heads, T, d_k)`, `v_new: (kv_heads, T, d_v)` →
    /// `(heads, T, d_v)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when the queries, keys or values do not fit the cache
    /// or each other, [`Error::InvalidScale`] for a scale of zero, NaN or
    /// infinity, [`Error::Cache`] when the pool has too few free blocks,
    /// `sequence` was freed or belongs to another cache, or an int8 cache is
    /// given a value it cannot quantise. The cache is left as it was.
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::{KvCache, PagedKvCache};
    /// use ndarray::{Array3, Axis};
    ///
    /// // the same numbers as the contiguous cache
    /// let x = Array3::from_shape_fn((2, 5, 4), |(h, i, j)| ((h * 7 + i * 3 + j) % 11) as f64 / 11.0);
    /// let mut paged = PagedKvCache::<f64>::new(8, 2, 2, 4, 4)?;
    /// let s = paged.add_sequence();
    /// let out = paged.attend(s, &x, &x, &x)?;
    /// let mut contiguous = KvCache::<f64>::new(1, 2, 4, 4);
    /// let x4 = x.view().insert_axis(Axis(0));
    /// let expected = contiguous.attend(&x4, &x4, &x4)?;
    /// assert!((&out - &expected.index_axis(Axis(0), 0)).iter().all(|e| e.abs() < 1e-14));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn attend(
        &mut self,
        sequence: SequenceId,
        q: &ArrayRef3<E::Compute>,
        k_new: &ArrayRef3<E::Compute>,
        v_new: &ArrayRef3<E::Compute>,
    ) -> Result<Array3<E::Compute>> {
        let (scale, window) = (self.scale, self.window);
        self.step(sequence, scale, window, q, k_new, v_new, &[])
    }

    /// One step at `scale` (`None`: `1/√d_k`) and `window`, with further
    /// `masks` broadcasting to `(1, heads, T, S)` (`S` the positions after the
    /// step): checks everything, writes, attends.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &mut self,
        sequence: SequenceId,
        scale: Option<E::Compute>,
        window: Option<usize>,
        q: &ArrayRef3<E::Compute>,
        k_new: &ArrayRef3<E::Compute>,
        v_new: &ArrayRef3<E::Compute>,
        masks: &[Mask<'_, E::Compute>],
    ) -> Result<Array3<E::Compute>> {
        let rows = self.prepare(sequence, scale, q, k_new, v_new, masks)?;
        ready()?;
        self.commit(sequence, &rows);
        let masks = step_masks(window, masks);
        self.attend_held(sequence, scale, q, &masks)
    }

    /// Checks a step before anything is written (the queries' shape, the scale,
    /// the masks against the positions after it, and what `encode` checks),
    /// and returns the encoded new rows.
    pub(crate) fn prepare(
        &self,
        sequence: SequenceId,
        scale: Option<E::Compute>,
        q: &ArrayRef3<E::Compute>,
        k_new: &ArrayRef3<E::Compute>,
        v_new: &ArrayRef3<E::Compute>,
        masks: &[Mask<'_, E::Compute>],
    ) -> Result<Encoded<E>> {
        let (kv_heads, d_k) = (self.sizes.kv_heads, self.sizes.d_k);
        let (heads, t, qd) = q.dim();
        if heads == 0 || !heads.is_multiple_of(kv_heads) || qd != d_k || k_new.dim().1 != t {
            return Err(Error::Shape {
                what: "new queries must be (a multiple of kv_heads, as many positions as the new keys, d_k)",
                expected: vec![heads.max(1).next_multiple_of(kv_heads), k_new.dim().1, d_k],
                found: q.shape().to_vec(),
            });
        }
        if let Some(scale) = scale {
            check_scale(scale)?;
        }
        let rows = self.encode(sequence, k_new, v_new)?;
        let s = self.sequence(sequence)?.len + t;
        broadcast_all(masks, &[1, heads, t, s])?;
        Ok(rows)
    }

    /// Attention of the last `T` positions' queries `q` over every position of
    /// `sequence` (written already), under `masks` (the causal one included).
    pub(crate) fn attend_held(
        &self,
        sequence: SequenceId,
        scale: Option<E::Compute>,
        q: &ArrayRef3<E::Compute>,
        masks: &[Mask<'_, E::Compute>],
    ) -> Result<Array3<E::Compute>> {
        let (kv_heads, d_k, d_v) = (self.sizes.kv_heads, self.sizes.d_k, self.sizes.d_v);
        let (heads, t, _) = q.dim();
        let held = self.sequence(sequence)?;
        let s = held.len;
        if t == 0 {
            return Ok(Array3::from_elem((heads, 0, d_v), zero::<E>()));
        }
        let q4 = q.view().insert_axis(Axis(0));
        if t > DIRECT_MAX_ROWS {
            // a prompt: the sequence's rows gathered once, the tiled kernel
            let (keys, values) = self.gathered(held);
            let mut attention = ScaledDotProduct::new();
            if let Some(scale) = scale {
                attention = attention.with_scale(scale);
            }
            for mask in masks {
                attention = attention.with_mask(mask.reborrow());
            }
            let out = attention.forward_batched(&q4, &keys, &values)?;
            return Ok(out.index_axis_move(Axis(0), 0));
        }
        // decoding: the direct path over the blocks where they lie; the
        // problem's keys and values are only their shapes
        let unit = arr0(());
        let (Some(k), Some(v)) = (
            unit.broadcast((1, kv_heads, s, d_k)),
            unit.broadcast((1, kv_heads, s, d_v)),
        ) else {
            unreachable!("a 0-d array broadcasts to any shape")
        };
        let problem = Problem::new(q4, k, v, masks, scale)?;
        let pages = Pages {
            keys: &self.keys,
            values: &self.values,
            key_scales: &self.key_scales,
            value_scales: &self.value_scales,
            table: &held.table,
            size: self.sizes.block_size,
            blocks: self.sizes.blocks,
            kv_heads,
            d_k,
            d_v,
        };
        // gathered once, for the first head that needs them
        let gathered = std::cell::OnceCell::new();
        let fallback = |h: usize, mut out: ArrayViewMut2<'_, E::Compute>| {
            // inputs the fused arithmetic cannot stand for: the reference path
            let (keys, values) = gathered.get_or_init(|| self.gathered(held));
            let problem = problem.with_keys_values(keys.view(), values.view());
            problem.solve_head(0, h, Some(out.view_mut()), None);
        };
        let mut out = Array4::from_elem((1, heads, t, d_v), zero::<E>());
        forward_pages(
            &problem,
            &pages,
            out.view_mut(),
            Parallelism::Rayon,
            &fallback,
        )?;
        Ok(out.index_axis_move(Axis(0), 0))
    }

    /// A sequence's keys and values as a batch of one, `(1, kv_heads, len, ·)`.
    fn gathered(&self, held: &Sequence) -> (Array4<E::Compute>, Array4<E::Compute>) {
        let (d_k, d_v) = (self.sizes.d_k, self.sizes.d_v);
        let keys = self.gather(held, &self.keys, &self.key_scales, d_k);
        let values = self.gather(held, &self.values, &self.value_scales, d_v);
        (keys.insert_axis(Axis(0)), values.insert_axis(Axis(0)))
    }
}

/// A step's masks: causal, the window if any, then the caller's.
pub(crate) fn step_masks<'m, A>(
    window: Option<usize>,
    masks: &'m [Mask<'_, A>],
) -> Vec<Mask<'m, A>> {
    let mut all = vec![Mask::CausalBottomRight];
    all.extend(window.map(Mask::SlidingWindow));
    all.extend(masks.iter().map(Mask::reborrow));
    all
}

/// Zero in the compute type.
fn zero<E: CacheElement>() -> E::Compute {
    <E::Compute as crate::element::Element>::from_f64(0.0)
}
