//! Writing to a paged cache: new rows encoded (and checked) first, then
//! committed to the sequence's blocks, taking and copying blocks as needed.

use ndarray::ArrayRef3;

use super::{CacheElement, PagedKvCache, SequenceId};
use crate::error::{Error, Result};

/// New rows of one sequence in the stored type, `(kv_heads, T, ·)` row-major,
/// with their scales (int8).
pub(crate) struct Encoded<E> {
    keys: Vec<E>,
    key_scales: Vec<f32>,
    values: Vec<E>,
    value_scales: Vec<f32>,
    t: usize,
    /// The free blocks writing them takes (`blocks_needed`).
    pub(crate) blocks: usize,
}

impl<E: CacheElement> PagedKvCache<E> {
    /// Appends keys and values to `sequence` (taking blocks from the pool as it
    /// grows, copying its last block first if another sequence shares it).
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when they are not `(kv_heads, T, d_k)` and
    /// `(kv_heads, T, d_v)`, [`Error::Cache`] as for a step; nothing is
    /// written then.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut cache = attn::PagedKvCache::<f32>::new(2, 2, 1, 2, 2)?;
    /// let s = cache.add_sequence();
    /// let kv = ndarray::Array3::<f32>::ones((1, 3, 2));
    /// cache.append(s, &kv, &kv)?;
    /// assert_eq!((cache.len(s)?, cache.free_blocks()), (3, 0));
    /// assert!(matches!(cache.append(s, &kv, &kv), Err(attn::Error::Cache { .. })));
    /// assert_eq!(cache.len(s)?, 3);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn append(
        &mut self,
        sequence: SequenceId,
        k: &ArrayRef3<E::Compute>,
        v: &ArrayRef3<E::Compute>,
    ) -> Result<()> {
        let rows = self.encode(sequence, k, v)?;
        self.commit(sequence, &rows);
        Ok(())
    }

    /// Checks and encodes new keys and values of `sequence`: their shapes,
    /// that the stored type can hold them, and that the pool has the blocks
    /// they need. Nothing is written.
    pub(crate) fn encode(
        &self,
        sequence: SequenceId,
        k: &ArrayRef3<E::Compute>,
        v: &ArrayRef3<E::Compute>,
    ) -> Result<Encoded<E>> {
        let (kv_heads, d_k, d_v) = (self.sizes.kv_heads, self.sizes.d_k, self.sizes.d_v);
        let t = k.dim().1;
        if k.dim() != (kv_heads, t, d_k) {
            return Err(Error::Shape {
                what: "new keys must be (the cache's kv_heads, T, d_k)",
                expected: vec![kv_heads, t, d_k],
                found: k.shape().to_vec(),
            });
        }
        if v.dim() != (kv_heads, t, d_v) {
            return Err(Error::Shape {
                what: "new values must be (the cache's kv_heads, T of the new keys, d_v)",
                expected: vec![kv_heads, t, d_v],
                found: v.shape().to_vec(),
            });
        }
        let needed = self.blocks_needed(sequence, t)?;
        if needed > self.free.len() {
            return Err(Error::Cache {
                reason: format!(
                    "the pool has {} free blocks, appending {t} positions needs {needed}",
                    self.free.len()
                ),
            });
        }
        let (keys, key_scales) = encode_rows::<E>(k, "key")?;
        let (values, value_scales) = encode_rows::<E>(v, "value")?;
        Ok(Encoded {
            keys,
            key_scales,
            values,
            value_scales,
            t,
            blocks: needed,
        })
    }

    /// The free blocks appending `t` positions to `sequence` takes: new
    /// blocks, and a copy of its last block if another sequence shares it.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] when `sequence` was freed or belongs to another cache,
    /// or its length would overflow.
    fn blocks_needed(&self, sequence: SequenceId, t: usize) -> Result<usize> {
        let held = self.sequence(sequence)?;
        let size = self.sizes.block_size;
        let len = held.len.checked_add(t).ok_or_else(|| Error::Cache {
            reason: "the sequence's length overflows".into(),
        })?;
        let shared_last =
            held.len % size != 0 && t > 0 && held.table.last().is_some_and(|&b| self.refs[b] > 1);
        Ok(len.div_ceil(size) - held.table.len() + usize::from(shared_last))
    }

    /// Writes encoded rows after the end of `sequence` (checked by `encode`
    /// against this state of the cache).
    pub(crate) fn commit(&mut self, sequence: SequenceId, rows: &Encoded<E>) {
        let size = self.sizes.block_size;
        let (kv_heads, d_k, d_v) = (self.sizes.kv_heads, self.sizes.d_k, self.sizes.d_v);
        let mut held = self.slots[sequence.slot]
            .sequence
            .take()
            .expect("checked by encode");
        let t = rows.t;
        // a shared, partly filled last block is copied before it is written
        if !held.len.is_multiple_of(size) && t > 0 {
            let last = held.table.len() - 1;
            let old = held.table[last];
            if self.refs[old] > 1 {
                let new = self.take_block();
                self.copy_block(old, new);
                self.refs[old] -= 1;
                held.table[last] = new;
            }
        }
        while held.table.len() * size < held.len + t {
            let block = self.take_block();
            held.table.push(block);
        }
        for kv in 0..kv_heads {
            for i in 0..t {
                let p = held.len + i;
                let row = self.first_row(held.table[p / size], kv) + p % size;
                let new = kv * t + i;
                self.keys[row * d_k..(row + 1) * d_k]
                    .copy_from_slice(&rows.keys[new * d_k..(new + 1) * d_k]);
                self.values[row * d_v..(row + 1) * d_v]
                    .copy_from_slice(&rows.values[new * d_v..(new + 1) * d_v]);
                if E::SCALED {
                    self.key_scales[row] = rows.key_scales[new];
                    self.value_scales[row] = rows.value_scales[new];
                }
            }
        }
        held.len += t;
        self.slots[sequence.slot].sequence = Some(held);
    }

    /// A free block, now held once (`encode` checked there are enough).
    fn take_block(&mut self) -> usize {
        let block = self.free.pop().expect("checked by encode");
        self.refs[block] = 1;
        block
    }

    /// Block `from`'s rows, every head's, copied to block `to`.
    fn copy_block(&mut self, from: usize, to: usize) {
        let (d_k, d_v) = (self.sizes.d_k, self.sizes.d_v);
        let size = self.sizes.block_size;
        for kv in 0..self.sizes.kv_heads {
            let (src, dst) = (self.first_row(from, kv), self.first_row(to, kv));
            self.keys
                .copy_within(src * d_k..(src + size) * d_k, dst * d_k);
            self.values
                .copy_within(src * d_v..(src + size) * d_v, dst * d_v);
            if E::SCALED {
                self.key_scales.copy_within(src..src + size, dst);
                self.value_scales.copy_within(src..src + size, dst);
            }
        }
    }
}

/// `x`'s rows in the stored type with their scales, or why one cannot be
/// stored (`what`: key or value).
fn encode_rows<E: CacheElement>(
    x: &ArrayRef3<E::Compute>,
    what: &str,
) -> Result<(Vec<E>, Vec<f32>)> {
    let width = x.dim().2;
    let standard = x.as_standard_layout();
    let flat = standard
        .as_slice()
        .expect("a standard-layout array is a slice");
    let mut stored = vec![E::zero(); flat.len()];
    let mut scales = Vec::with_capacity(if E::SCALED { x.dim().0 * x.dim().1 } else { 0 });
    if width > 0 {
        for (row, out) in flat.chunks_exact(width).zip(stored.chunks_exact_mut(width)) {
            let scale = E::store(row, out).map_err(|e| match e {
                Error::Cache { reason } => Error::Cache {
                    reason: format!("new {what}: {reason}"),
                },
                other => other,
            })?;
            if E::SCALED {
                scales.push(scale);
            }
        }
    }
    Ok((stored, scales))
}
