//! Attention of new tokens over a key/value cache: causal, padded, windowed.

use ndarray::{Array2, Array4, ArrayRef1, ArrayRef2, ArrayRef4, Axis};

use super::KvCache;
use crate::core::mask::{Mask, broadcast_all};
use crate::core::problem::check_scale;
use crate::core::reorder::Reorder;
use crate::decode::position::{broken_runs, check_runs};
use crate::element::Storage;
use crate::error::{Error, Result};
use crate::sdpa::{AttentionOutput, ScaledDotProduct};

/// What one step of attention over the cache returns: the output, and the
/// weights when asked for.
type Step<A> = (Array4<A>, Option<Array4<A>>);

/// What a step attends with, beside the cache's causal order: the scores' scale
/// (`None`: `1/√d_k`), a window, and how its attention runs. A call on the
/// cache itself uses the cache's own ([`KvCache::with_scale`], the window its
/// ring already keeps, plain attention); a layer passes its own, so each
/// setting has one home: the caller's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings<A, R> {
    pub(crate) scale: Option<A>,
    /// The positions a query sees, itself included; a mask where the cache holds
    /// more than this.
    pub(crate) window: Option<usize>,
    pub(crate) run: R,
}

/// A forward call over new queries and the held keys and values, with the
/// weights when asked for.
pub(crate) struct Forward<'h, A> {
    q: &'h ArrayRef4<A>,
    k: &'h ArrayRef4<A>,
    v: &'h ArrayRef4<A>,
    weights: bool,
}

/// How a step's attention runs, given its masks and scale: a type per way,
/// so that a cache of any storage type builds only the kernels its caller
/// uses.
pub(crate) trait StepAttention<A: Storage> {
    fn run<'a>(
        &'a self,
        attention: ScaledDotProduct<'a, A>,
        forward: Forward<'_, A>,
    ) -> Result<Step<A>>;
}

/// Plain attention: the cache's own calls.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlainStep;

impl<A: Storage> StepAttention<A> for PlainStep {
    fn run<'a>(
        &'a self,
        attention: ScaledDotProduct<'a, A>,
        forward: Forward<'_, A>,
    ) -> Result<Step<A>> {
        let Forward { q, k, v, weights } = forward;
        if weights {
            let out = attention.forward_batched_with_weights(q, k, v)?;
            Ok((out.output, Some(out.weights)))
        } else {
            Ok((attention.forward_batched(q, k, v)?, None))
        }
    }
}

/// A layer's attention: with its soft-cap (Gemma 2) and sinks (gpt-oss).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerStep<'s, A: Storage> {
    pub(crate) softcap: Option<A::Compute>,
    pub(crate) sinks: Option<&'s ArrayRef1<A>>,
}

impl<A: Storage> StepAttention<A> for LayerStep<'_, A> {
    fn run<'a>(
        &'a self,
        attention: ScaledDotProduct<'a, A>,
        forward: Forward<'_, A>,
    ) -> Result<Step<A>> {
        let Forward { q, k, v, weights } = forward;
        attention
            .layered(self.softcap, self.sinks)
            .forward_heads(q, k, v, weights)
    }
}

impl<A: Storage> KvCache<A> {
    /// Appends `k_new`, `v_new` and returns the new queries' attention over every
    /// cached position: bottom-right causal, within the window of a sliding cache.
    ///
    /// # Shapes
    ///
    /// `q: (batch, heads, T, d_k)` with `kv_heads` dividing `heads`,
    /// `k_new: (batch, kv_heads, T, d_k)`, `v_new: (batch, kv_heads, T, d_v)` →
    /// `(batch, heads, T, d_v)`.
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when the new queries, keys or values do not match the cache
    /// (the cache is then left as it was), and the errors of
    /// [`ScaledDotProduct::forward_batched`].
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::Array4;
    ///
    /// let mut cache = attn::KvCache::<f32>::sliding(1, 1, 4, 4, 2)?;
    /// for _ in 0..5 {
    ///     let x = Array4::<f32>::ones((1, 1, 1, 4));
    ///     cache.attend(&x, &x, &x)?;
    /// }
    /// assert_eq!((cache.len(), cache.positions_seen()), (2, 5));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn attend(
        &mut self,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
    ) -> Result<Array4<A>> {
        let (b, _, t, _) = q.dim();
        let real = Array2::from_elem((b, t), true);
        Ok(self.step(self.own(), q, k_new, v_new, &real, &[], false)?.0)
    }

    /// [`attend`](Self::attend) for a batch whose rows have padding: `real[[b, t]]`
    /// says whether new token `t` of row `b` is a real token (Hugging Face's
    /// `attention_mask`, 1 = real). No query attends to a padding key, so a
    /// left-padded row gives the numbers of its sequence alone; a padding query
    /// sees no real key before it and gives output 0. `masks` apply too (ALiBi, a
    /// bias); they broadcast to `(batch, heads, T, S)`, where the `S` keys are the
    /// held positions, oldest first, then the new ones (for a sliding cache and
    /// `T > 1`, the held positions before this step's).
    ///
    /// A real token after padding that followed real tokens (a right-padded
    /// prompt, then decoding) gives the numbers of its sequence alone too. Where
    /// a mask reads distances ([`Mask::Alibi`], [`Mask::SlidingWindow`]), which
    /// would count that padding, the step first moves the row's padding before
    /// its real tokens, in the cache (for the steps after it:
    /// [`keys`](Self::keys)) and in its own new tokens; the masks it is given
    /// and the weights it returns keep the order of the call (the held positions
    /// as they were, then the new ones). A sliding cache, whose ring holds a
    /// window of slots, refuses such a step.
    ///
    /// # Shapes
    ///
    /// As [`attend`](Self::attend), and `real: (batch, T)`.
    ///
    /// # Errors
    ///
    /// As [`attend`](Self::attend), [`Error::Shape`] when `real` is not
    /// `(batch, T)`, and [`Error::InvalidConfig`] when a sliding cache's row
    /// would hold padding between real tokens (a real token after padding that
    /// followed real ones): it would take slots of the row's window. The cache
    /// is then left as it was. (A [`PagedKvCache`](crate::PagedKvCache) holds
    /// each sequence's real tokens only, with no padding at all.)
    ///
    /// # Examples
    ///
    /// ```
    /// use attn::KvCache;
    /// use ndarray::{array, s, Array4};
    ///
    /// // row 1 is row 0's last two tokens, left-padded
    /// let x = Array4::from_shape_fn((1, 1, 3, 2), |(_, _, t, j)| (t * 2 + j) as f64 / 5.0);
    /// let padded = ndarray::concatenate(ndarray::Axis(0), &[x.view(), x.view()])?;
    /// let mut cache = KvCache::<f64>::new(2, 1, 2, 2);
    /// let out = cache.attend_padded(&padded, &padded, &padded, &array![[true; 3], [false, true, true]], &[])?;
    /// let mut alone = KvCache::<f64>::new(1, 1, 2, 2);
    /// let tail = x.slice(s![.., .., 1.., ..]);
    /// let expected = alone.attend(&tail, &tail, &tail)?;
    /// assert!((&out.slice(s![1.., .., 1.., ..]) - &expected).iter().all(|e| e.abs() < 1e-15));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn attend_padded(
        &mut self,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
    ) -> Result<Array4<A>> {
        Ok(self
            .step(self.own(), q, k_new, v_new, real, masks, false)?
            .0)
    }

    /// [`attend_padded`](Self::attend_padded), also returning the step's attention
    /// weights over the keys it saw (for pictures of decoding).
    ///
    /// # Shapes
    ///
    /// Output `(batch, heads, T, d_v)`, weights `(batch, heads, T, S)` with `S`
    /// as in [`attend_padded`](Self::attend_padded).
    ///
    /// # Errors
    ///
    /// As [`attend_padded`](Self::attend_padded).
    ///
    /// # Examples
    ///
    /// ```
    /// use ndarray::{array, Array4};
    ///
    /// let mut cache = attn::KvCache::<f32>::new(1, 1, 2, 2);
    /// let x = Array4::<f32>::ones((1, 1, 4, 2));
    /// let step = cache.attend_padded_with_weights(&x, &x, &x, &array![[true; 4]], &[])?;
    /// assert_eq!(step.weights.dim(), (1, 1, 4, 4));
    /// assert_eq!(step.weights[[0, 0, 3, 0]], 0.25);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn attend_padded_with_weights(
        &mut self,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
    ) -> Result<AttentionOutput<A, ndarray::Ix4>> {
        let (output, weights) = self.step(self.own(), q, k_new, v_new, real, masks, true)?;
        Ok(AttentionOutput {
            output,
            weights: weights.expect("asked for the weights"),
        })
    }

    /// The cache's own settings: its scale, and no window beyond its ring.
    fn own(&self) -> Settings<A, PlainStep> {
        Settings {
            scale: self.scale,
            window: None,
            run: PlainStep,
        }
    }

    /// One step with the caller's `settings`: checks everything before writing,
    /// attends, appends.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn step(
        &mut self,
        settings: Settings<A, impl StepAttention<A>>,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<Step<A>> {
        self.check(k_new, v_new)?;
        if let Some(scale) = settings.scale {
            check_scale(scale.to_compute())?;
        }
        // a window the ring does not already keep is a mask
        let window = settings
            .window
            .filter(|&w| self.window != Some(w))
            .map(Mask::SlidingWindow);
        let masks: Vec<Mask<'_, A>> = masks.iter().map(Mask::reborrow).chain(window).collect();
        let masks = &masks[..];

        let (b, kv_heads, _, d_k) = self.keys.dim();
        let (qb, heads, t, qd) = q.dim();
        // checked before anything is written: a failed call leaves the cache as it was
        if k_new.dim().2 != t || qb != b || heads % kv_heads.max(1) != 0 || qd != d_k {
            return Err(Error::Shape {
                what: "new queries must be (batch, a multiple of kv_heads, as many positions as the new keys, d_k)",
                expected: vec![
                    b,
                    heads.next_multiple_of(kv_heads.max(1)),
                    k_new.dim().2,
                    d_k,
                ],
                found: q.shape().to_vec(),
            });
        }
        if real.dim() != (b, t) {
            return Err(Error::Shape {
                what: "real (which new tokens are not padding) must be (batch, new tokens)",
                expected: vec![b, t],
                found: real.shape().to_vec(),
            });
        }
        // distances are counted in slots: a ring keeps a window of slots, so each
        // row's real tokens must stay one run; a cache that keeps every position
        // moves a row's padding before its real tokens where a mask reads distances
        if self.window.is_some() {
            check_runs(&self.runs, real)?;
        }
        if let (Some(window), true) = (self.window, t > 1) {
            return self.chunk_in_window(window, settings, q, k_new, v_new, real, masks, weights);
        }
        // read before `write` folds the new flags into the runs
        let broken = if masks.iter().any(Mask::reads_distance) {
            broken_runs(&self.runs, real)
        } else {
            vec![false; b]
        };
        // the masks must fit the keys this step will see, before any is written
        let keys_seen = match self.window {
            Some(window) => (self.len + t).min(window),
            None => self.len + t,
        };
        broadcast_all(masks, &[b, heads, t, keys_seen])?;
        // one new position in a ring: after writing it, every held slot is within
        // its window; so are all positions of a cache that keeps everything
        self.write(k_new, v_new, real.view())?;
        if broken.contains(&true) {
            return self.padding_first_step(&broken, settings, q, real, masks, weights);
        }
        self.attend_held(settings, q, masks, weights)
    }

    /// The step of a row whose real tokens the new ones broke into runs: its
    /// held slots and its new queries (as `real` says) with their padding first,
    /// the masks' arrays with them; the output and weights back in the order of
    /// the call.
    fn padding_first_step(
        &mut self,
        rows: &[bool],
        settings: Settings<A, impl StepAttention<A>>,
        q: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<Step<A>> {
        let keys = self.padding_first(rows);
        let queries = Reorder::padding_first(real.view(), rows);
        let masks: Vec<_> = (masks.iter())
            .map(|mask| Reorder::mask(&queries, &keys, mask))
            .collect();
        let q = queries.apply(q, Axis(2));
        let (output, step_weights) = self.attend_held(settings, &q, &masks, weights)?;
        Ok((
            queries.undo(&output, Axis(2)),
            step_weights.map(|w| Reorder::undo_weights(&queries, &keys, &w)),
        ))
    }

    /// The new queries' attention over every held position, the new ones
    /// written: bottom-right causal, the held padding masked.
    fn attend_held(
        &self,
        settings: Settings<A, impl StepAttention<A>>,
        q: &ArrayRef4<A>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<Step<A>> {
        // the held flags as a (batch, 1, 1, S) view: a mask only where there is padding
        let keep = self.real().insert_axis(Axis(1)).insert_axis(Axis(1));
        let mut attention = scaled(settings.scale).with_mask(Mask::CausalBottomRight);
        if keep.iter().any(|&r| !r) {
            attention = attention.with_mask(Mask::keep(&keep));
        }
        for mask in masks {
            attention = attention.with_mask(mask.reborrow());
        }
        let (keys, values) = (self.keys(), self.values());
        let forward = Forward {
            q,
            k: &keys,
            v: &values,
            weights,
        };
        settings.run.run(attention, forward)
    }

    /// Several new positions in a sliding cache: attend over the held slots and the
    /// new positions together (one copy of the window), masked by position, then
    /// keep the newest.
    #[allow(clippy::too_many_arguments)]
    fn chunk_in_window(
        &mut self,
        window: usize,
        settings: Settings<A, impl StepAttention<A>>,
        q: &ArrayRef4<A>,
        k_new: &ArrayRef4<A>,
        v_new: &ArrayRef4<A>,
        real: &ArrayRef2<bool>,
        masks: &[Mask<'_, A>],
        weights: bool,
    ) -> Result<Step<A>> {
        let (b, _, t, _) = q.dim();
        let held = self.len;
        // `check` made the new keys and values match the cache in every other axis
        let keys = ndarray::concatenate(Axis(2), &[self.keys(), k_new.view()])
            .expect("checked: new keys match the cache");
        let values = ndarray::concatenate(Axis(2), &[self.values(), v_new.view()])
            .expect("checked: new values match the cache");
        let flags = ndarray::concatenate(Axis(1), &[self.real(), real.view()])
            .expect("checked: one flag per row and new token");
        // key j sits at position seen − held + j; new query i at seen + i
        let keep = Array4::from_shape_fn((b, 1, t, held + t), |(row, _, i, j)| {
            let (query, key) = (held + i, j);
            flags[[row, j]] && key <= query && key + window > query
        });
        let mut attention = scaled(settings.scale).with_mask(Mask::keep(&keep));
        for mask in masks {
            attention = attention.with_mask(mask.reborrow());
        }
        let forward = Forward {
            q,
            k: &keys,
            v: &values,
            weights,
        };
        let out = settings.run.run(attention, forward)?;
        self.write(k_new, v_new, real.view())?;
        Ok(out)
    }
}

/// Attention at `scale` (`None`: `1/√d_k`), no masks yet.
fn scaled<'m, A: Storage>(scale: Option<A>) -> ScaledDotProduct<'m, A> {
    match scale {
        Some(scale) => ScaledDotProduct::new().with_scale(scale),
        None => ScaledDotProduct::new(),
    }
}
