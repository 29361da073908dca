//! A cache's storage: the checks on its sizes, and its arrays, which grow as
//! positions arrive (never for sizes alone) and take new keys and values.

use ndarray::{Array2, Array4, ArrayRef4, ArrayView2, Axis, s};

use super::KvCache;
use crate::core::reorder::Reorder;
use crate::decode::position::Run;
use crate::element::{Element, Storage};
use crate::error::{Error, Result};

impl<A: Storage> KvCache<A> {
    /// [`append`](Self::append) of checked keys, values and padding flags; only
    /// the storage's growth can fail, and then nothing is written.
    pub(super) fn write(
        &mut self,
        k: &ArrayRef4<A>,
        v: &ArrayRef4<A>,
        real: ArrayView2<'_, bool>,
    ) -> Result<()> {
        let t = k.dim().2;
        self.reserve(t)?;
        match self.window {
            None => {
                let new = s![.., .., self.len..self.len + t, ..];
                self.keys.slice_mut(new).assign(k);
                self.values.slice_mut(new).assign(v);
                self.real
                    .slice_mut(s![.., self.len..self.len + t])
                    .assign(&real);
                self.len += t;
            }
            Some(window) => {
                // only the last `window` new positions can survive; a slot's
                // second copy is read only once positions have wrapped (the held
                // run then ends past `window`, in copies of the newest positions)
                for i in t.saturating_sub(window)..t {
                    let position = self.seen + i;
                    let slot = position % window;
                    let copies = if position < window { 1 } else { 2 };
                    for copy in [slot, slot + window].into_iter().take(copies) {
                        self.keys
                            .slice_mut(s![.., .., copy, ..])
                            .assign(&k.slice(s![.., .., i, ..]));
                        self.values
                            .slice_mut(s![.., .., copy, ..])
                            .assign(&v.slice(s![.., .., i, ..]));
                        self.real.column_mut(copy).assign(&real.column(i));
                    }
                }
                self.len = (self.len + t).min(window);
            }
        }
        for ((count, run), row) in self
            .positions
            .iter_mut()
            .zip(&mut self.runs)
            .zip(real.rows())
        {
            *count += row.iter().filter(|&&r| r).count();
            *run = row.iter().fold(*run, |run, &r| run.then(r));
        }
        self.seen += t;
        Ok(())
    }

    /// Moves the padding of each row that `rows` marks before its real tokens
    /// (both in their order), in the held keys, values and flags of a cache
    /// that keeps every position: the row's distances between real tokens then
    /// count real tokens only. Returns how the held slots moved.
    pub(super) fn padding_first(&mut self, rows: &[bool]) -> Reorder {
        debug_assert!(self.window.is_none(), "a ring's slots are its window");
        let reorder = Reorder::padding_first(self.real(), rows);
        let held = s![.., .., ..self.len, ..];
        let keys = reorder.apply(&self.keys.slice(held), Axis(2));
        self.keys.slice_mut(held).assign(&keys);
        let values = reorder.apply(&self.values.slice(held), Axis(2));
        self.values.slice_mut(held).assign(&values);
        let real = reorder.apply(&self.real(), Axis(1));
        self.real.slice_mut(s![.., ..self.len]).assign(&real);
        for (run, &moved) in self.runs.iter_mut().zip(rows) {
            if moved {
                *run = Run::Within;
            }
        }
        reorder
    }

    /// Slots for `t` more positions: where the storage has too few it grows
    /// (doubling, at least 16 slots, a ring at most `2 · window`), keeping the
    /// held run; where the system refuses the memory, an [`Error::Cache`] and the
    /// cache as it was.
    fn reserve(&mut self, t: usize) -> Result<()> {
        let (batch, kv_heads, capacity, d_k) = self.keys.dim();
        let d_v = self.values.dim().3;
        let needed = match self.window {
            None => self.len.saturating_add(t),
            // both copies of every slot once positions wrap
            Some(window) if self.seen.saturating_add(t) > window => 2 * window,
            Some(_) => self.seen + t,
        };
        if needed <= capacity {
            return Ok(());
        }
        let most = self.window.map_or(usize::MAX, |w| 2 * w);
        let slots = capacity.saturating_mul(2).max(needed).max(16).min(most);
        let sizes = [batch, kv_heads, d_k, d_v];
        let refused = || Error::Cache {
            reason: format!(
                "{}: the memory for {slots} positions cannot be allocated",
                constructor(sizes, self.window)
            ),
        };
        let mut bigger = Arrays::allocate(sizes, slots).ok_or_else(refused)?;
        // before wrapping, a ring's held run starts at slot 0 like a growing cache's
        let held = s![.., .., ..self.len, ..];
        bigger.keys.slice_mut(held).assign(&self.keys.slice(held));
        bigger
            .values
            .slice_mut(held)
            .assign(&self.values.slice(held));
        bigger
            .real
            .slice_mut(s![.., ..self.len])
            .assign(&self.real.slice(s![.., ..self.len]));
        self.keys = bigger.keys;
        self.values = bigger.values;
        self.real = bigger.real;
        Ok(())
    }
}

/// Sizes that make a cache: each at least 1, and `batch · kv_heads · slots · d`
/// values (and `batch · slots` flags) addressable.
pub(super) fn check_sizes<A>(
    sizes: [usize; 4],
    window: Option<usize>,
    slots: Option<usize>,
) -> Result<()> {
    let [batch, kv_heads, d_k, d_v] = sizes;
    let named = || constructor(sizes, window);
    if sizes.contains(&0) || window == Some(0) {
        return Err(Error::InvalidConfig {
            reason: format!("{}: every size must be at least 1", named()),
        });
    }
    let limit = isize::MAX as usize / std::mem::size_of::<A>().max(1);
    let values = |d: usize| {
        [batch, kv_heads, d]
            .iter()
            .try_fold(slots?.max(1), |n, &x| n.checked_mul(x))
            .filter(|&n| n <= limit)
    };
    if values(d_k).is_none() || values(d_v).is_none() {
        return Err(Error::InvalidConfig {
            reason: format!(
                "{}: {} positions of keys and values do not fit in memory",
                named(),
                slots.map_or("so many".to_string(), |n| n.to_string())
            ),
        });
    }
    Ok(())
}

/// The call that made a cache of these sizes, for its errors.
pub(super) fn constructor(sizes: [usize; 4], window: Option<usize>) -> String {
    let [batch, kv_heads, d_k, d_v] = sizes;
    match window {
        Some(w) => format!(
            "KvCache::sliding(batch {batch}, kv_heads {kv_heads}, d_k {d_k}, d_v {d_v}, window {w})"
        ),
        None => format!("KvCache::new(batch {batch}, kv_heads {kv_heads}, d_k {d_k}, d_v {d_v})"),
    }
}

/// A cache's arrays, allocated only where the allocator can give them (a size
/// that passes the address checks may still be more than the machine has).
pub(super) struct Arrays<A> {
    pub(super) keys: Array4<A>,
    pub(super) values: Array4<A>,
    pub(super) real: Array2<bool>,
}

impl<A: Storage> Arrays<A> {
    pub(super) fn empty() -> Self {
        Arrays {
            keys: Array4::from_elem((0, 0, 0, 0), zero()),
            values: Array4::from_elem((0, 0, 0, 0), zero()),
            real: Array2::from_elem((0, 0), true),
        }
    }

    /// Zeroed arrays of `slots` positions, or `None` where their sizes overflow or
    /// the allocator refuses them.
    pub(super) fn allocate(sizes: [usize; 4], slots: usize) -> Option<Self> {
        let [batch, kv_heads, d_k, d_v] = sizes;
        let count = |d: usize| {
            [kv_heads, slots, d]
                .iter()
                .try_fold(batch, |n, &x| n.checked_mul(x))
        };
        let keys = filled(count(d_k)?, zero())?;
        let values = filled(count(d_v)?, zero())?;
        let real = filled(batch.checked_mul(slots)?, true)?;
        Some(Arrays {
            keys: Array4::from_shape_vec((batch, kv_heads, slots, d_k), keys).ok()?,
            values: Array4::from_shape_vec((batch, kv_heads, slots, d_v), values).ok()?,
            real: Array2::from_shape_vec((batch, slots), real).ok()?,
        })
    }
}

/// `n` copies of `value`, or `None` where the allocator refuses the memory.
pub(super) fn filled<T: Clone>(n: usize, value: T) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, value);
    Some(v)
}

/// Zero in any storage type.
fn zero<A: Storage>() -> A {
    A::from_compute(<A::Compute as Element>::from_f64(0.0))
}
