//! A paged cache's sequences: made, forked (sharing blocks), freed, and
//! looked up by id.

use super::{CacheElement, PagedKvCache, Sequence, SequenceId, Slot};
use crate::error::{Error, Result};

impl<E: CacheElement> PagedKvCache<E> {
    /// A new, empty sequence (it takes blocks as it grows).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut cache = attn::PagedKvCache::<f32>::new(4, 16, 1, 2, 2)?;
    /// let s = cache.add_sequence();
    /// assert_eq!(cache.len(s)?, 0);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn add_sequence(&mut self) -> SequenceId {
        let sequence = Some(Sequence::default());
        let slot = match self.slots.iter().position(|s| s.sequence.is_none()) {
            Some(slot) => {
                self.slots[slot].generation += 1;
                self.slots[slot].sequence = sequence;
                slot
            }
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    sequence,
                });
                self.slots.len() - 1
            }
        };
        SequenceId {
            cache: self.id,
            slot,
            generation: self.slots[slot].generation,
        }
    }

    /// A new sequence that starts as a copy of `parent` and shares its blocks
    /// (a common prompt, beams, parallel samples): no block is copied until one
    /// of the two writes into a shared block.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] when `parent` was freed or belongs to another cache.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mut cache = attn::PagedKvCache::<f32>::new(4, 16, 1, 2, 2)?;
    /// # let parent = cache.add_sequence();
    /// let child = cache.fork(parent)?;
    /// assert_eq!(cache.len(child)?, cache.len(parent)?);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn fork(&mut self, parent: SequenceId) -> Result<SequenceId> {
        let sequence = self.sequence(parent)?.clone();
        for &block in &sequence.table {
            self.refs[block] += 1;
        }
        let child = self.add_sequence();
        self.slots[child.slot].sequence = Some(sequence);
        Ok(child)
    }

    /// Ends `sequence`: its blocks go back to the pool (those no other
    /// sequence shares) and its id is refused from now on.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] when it was already freed or belongs to another cache.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mut cache = attn::PagedKvCache::<f32>::new(4, 16, 1, 2, 2)?;
    /// let s = cache.add_sequence();
    /// cache.free(s)?;
    /// assert!(matches!(cache.free(s), Err(attn::Error::Cache { .. })));
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn free(&mut self, sequence: SequenceId) -> Result<()> {
        self.sequence(sequence)?;
        let gone = self.slots[sequence.slot]
            .sequence
            .take()
            .unwrap_or_default();
        for block in gone.table {
            self.refs[block] -= 1;
            if self.refs[block] == 0 {
                self.free.push(block);
            }
        }
        Ok(())
    }

    /// Positions `sequence` holds.
    ///
    /// # Errors
    ///
    /// [`Error::Cache`] when it was freed or belongs to another cache.
    ///
    /// # Examples
    ///
    /// ```
    /// # let mut cache = attn::PagedKvCache::<f32>::new(4, 16, 1, 2, 2)?;
    /// let s = cache.add_sequence();
    /// assert_eq!(cache.len(s)?, 0);
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn len(&self, sequence: SequenceId) -> Result<usize> {
        Ok(self.sequence(sequence)?.len)
    }

    /// The blocks `sequence` holds, in order (its block table).
    ///
    /// # Errors
    ///
    /// As [`len`](Self::len).
    ///
    /// # Examples
    ///
    /// ```
    /// # let mut cache = attn::PagedKvCache::<f32>::new(4, 16, 1, 2, 2)?;
    /// let s = cache.add_sequence();
    /// assert!(cache.block_table(s)?.is_empty());
    /// # Ok::<(), attn::Error>(())
    /// ```
    pub fn block_table(&self, sequence: SequenceId) -> Result<&[usize]> {
        Ok(&self.sequence(sequence)?.table)
    }

    /// The live sequence `id` names.
    pub(crate) fn sequence(&self, id: SequenceId) -> Result<&Sequence> {
        let slot = (id.cache == self.id)
            .then(|| self.slots.get(id.slot))
            .flatten()
            .filter(|s| s.generation == id.generation);
        match slot.and_then(|s| s.sequence.as_ref()) {
            Some(sequence) => Ok(sequence),
            None if id.cache != self.id => Err(Error::Cache {
                reason: "the sequence belongs to another cache".into(),
            }),
            None => Err(Error::Cache {
                reason: "the sequence was freed".into(),
            }),
        }
    }
}
