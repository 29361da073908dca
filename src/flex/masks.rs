//! Built-in keep predicates: packed documents, prefix-LM and the tree of a
//! speculative decoding step.

use std::ops::Range;

use super::function::{At, BlockClass, KeepMod};
use crate::error::{Error, Result};

/// Packed sequences: several documents laid end to end in one sequence, each
/// attending only within itself (and, if [`causal`](Self::causal), to its own
/// past) — the document mask of packed training and of variable-length
/// prefill. Queries and keys are the same packed positions (`L = S`).
///
/// # Examples
///
/// ```
/// use attn::flex::{At, Documents, KeepMod};
///
/// // documents of 3, 4 and 2 tokens: cumulative lengths 0, 3, 7, 9
/// let docs = Documents::from_offsets(&[0, 3, 7, 9])?;
/// let at = |query, key| At { batch: 0, head: 0, query, key };
/// assert!(docs.keep(at(4, 6))); // both in the second document
/// assert!(!docs.keep(at(4, 2)));
/// assert!(!docs.causal().keep(at(4, 6))); // the future of its own document
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Documents {
    /// The document of each position.
    ids: Vec<u32>,
    causal: bool,
}

impl Documents {
    /// From cumulative lengths `offsets = [0, l₀, l₀ + l₁, …, total]` (FlashAttention's
    /// and vLLM's `cu_seqlens`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] unless the offsets start at 0 and never decrease.
    pub fn from_offsets(offsets: &[usize]) -> Result<Self> {
        Self::check_offsets(offsets)?;
        let ids = offsets
            .windows(2)
            .enumerate()
            .flat_map(|(doc, w)| std::iter::repeat_n(doc as u32, w[1] - w[0]))
            .collect();
        Ok(Documents { ids, causal: false })
    }

    /// The error [`from_offsets`](Self::from_offsets) gives for `offsets`, if
    /// any, without building the documents.
    pub(crate) fn check_offsets(offsets: &[usize]) -> Result<()> {
        let ordered = offsets.windows(2).all(|w| w[0] <= w[1]);
        if offsets.first() != Some(&0) || !ordered || offsets.len() > u32::MAX as usize {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "document offsets must start at 0 and never decrease, got {offsets:?}"
                ),
            });
        }
        Ok(())
    }

    /// From each document's length.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when the lengths add up past `usize`.
    pub fn from_lengths(lengths: &[usize]) -> Result<Self> {
        let mut offsets = vec![0];
        for &length in lengths {
            let end = offsets[offsets.len() - 1];
            let end = usize::checked_add(end, length).ok_or_else(|| Error::InvalidConfig {
                reason: "document lengths add up past usize".to_string(),
            })?;
            offsets.push(end);
        }
        Self::from_offsets(&offsets)
    }

    /// The same documents, each attending only to its own past and present.
    pub fn causal(mut self) -> Self {
        self.causal = true;
        self
    }

    /// The number of packed positions.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no position is packed.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl KeepMod for Documents {
    #[inline(always)]
    fn keep(&self, at: At) -> bool {
        self.ids[at.query] == self.ids[at.key] && (!self.causal || at.key <= at.query)
    }

    /// From the first and last document of each range: O(1) a block, so a
    /// long packed sequence's mask is built without visiting its positions.
    fn block(
        &self,
        _: usize,
        _: usize,
        queries: Range<usize>,
        keys: Range<usize>,
    ) -> Option<BlockClass> {
        if queries.is_empty() || keys.is_empty() {
            return Some(BlockClass::Empty);
        }
        let (last_query, last_key) = (queries.end - 1, keys.end - 1);
        let (q0, q1) = (self.ids[queries.start], self.ids[last_query]);
        let (k0, k1) = (self.ids[keys.start], self.ids[last_key]);
        let future = self.causal && keys.start > last_query;
        if k1 < q0 || q1 < k0 || future {
            return Some(BlockClass::Empty);
        }
        let past = !self.causal || last_key <= queries.start;
        let one_document = q0 == q1 && k0 == k1 && q0 == k0;
        Some(if one_document && past {
            BlockClass::Full
        } else {
            BlockClass::Partial
        })
    }

    fn check(&self, scores: [usize; 4]) -> Result<()> {
        check_len(
            "packed documents: L = S = their total length",
            scores,
            [self.len(), self.len()],
        )
    }
}

/// Prefix-LM (T5's and PaLI's): every query sees the first `prefix` keys
/// (bidirectional), and the rest causally (`key ≤ query`).
///
/// # Examples
///
/// ```
/// use attn::flex::{At, KeepMod, PrefixLm};
///
/// let lm = PrefixLm::new(3);
/// let at = |query, key| At { batch: 0, head: 0, query, key };
/// assert!(lm.keep(at(0, 2))); // inside the prefix, both ways
/// assert!(!lm.keep(at(4, 5))); // after it, causal
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLm {
    prefix: usize,
}

impl PrefixLm {
    /// A prefix of `prefix` positions.
    pub fn new(prefix: usize) -> Self {
        PrefixLm { prefix }
    }
}

impl KeepMod for PrefixLm {
    #[inline(always)]
    fn keep(&self, at: At) -> bool {
        at.key < self.prefix || at.key <= at.query
    }
}

/// The tree of a speculative decoding step (SpecInfer, Medusa, EAGLE): the
/// draft tokens form a tree after a cached prefix; each draft token (a query)
/// sees the whole prefix and its own ancestors in the tree, itself included.
/// Keys are the prefix's `prefix` positions followed by the tree's nodes;
/// queries are the nodes (`L = nodes`, `S = prefix + nodes`).
///
/// # Examples
///
/// ```
/// use attn::flex::{At, KeepMod, TreeMask};
///
/// // node 0 is the root; 1 and 2 its children; 3 a child of 1
/// let tree = TreeMask::new(5, &[None, Some(0), Some(0), Some(1)])?;
/// let at = |query, key| At { batch: 0, head: 0, query, key };
/// assert!(tree.keep(at(3, 4))); // the prefix
/// assert!(tree.keep(at(3, 5 + 1))); // its parent
/// assert!(!tree.keep(at(3, 5 + 2))); // its parent's sibling
/// # Ok::<(), attn::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMask {
    prefix: usize,
    /// Row `n`: the ancestors of node `n`, itself included, as bits.
    ancestors: Vec<Vec<u64>>,
}

impl TreeMask {
    /// The tree of nodes whose parents are `parents` (`None` for a root; a
    /// parent comes before its child), after `prefix` cached positions.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when a parent does not come before its child.
    pub fn new(prefix: usize, parents: &[Option<usize>]) -> Result<Self> {
        let words = parents.len().div_ceil(64);
        let mut ancestors: Vec<Vec<u64>> = Vec::with_capacity(parents.len());
        for (node, parent) in parents.iter().enumerate() {
            let mut bits = match *parent {
                None => vec![0; words],
                Some(p) if p < node => ancestors[p].clone(),
                Some(p) => {
                    return Err(Error::InvalidConfig {
                        reason: format!(
                            "tree node {node} has parent {p}, which does not come before it"
                        ),
                    });
                }
            };
            bits[node / 64] |= 1 << (node % 64);
            ancestors.push(bits);
        }
        Ok(TreeMask { prefix, ancestors })
    }

    /// The number of nodes.
    pub fn nodes(&self) -> usize {
        self.ancestors.len()
    }
}

impl KeepMod for TreeMask {
    #[inline(always)]
    fn keep(&self, at: At) -> bool {
        match at.key.checked_sub(self.prefix) {
            None => true,
            Some(node) => self.ancestors[at.query][node / 64] >> (node % 64) & 1 == 1,
        }
    }

    fn check(&self, scores: [usize; 4]) -> Result<()> {
        let keys = self.prefix.checked_add(self.nodes());
        let keys = keys.ok_or_else(|| Error::InvalidConfig {
            reason: "a tree's prefix and nodes add up past usize".to_string(),
        })?;
        check_len(
            "a tree mask: L = nodes, S = prefix + nodes",
            scores,
            [self.nodes(), keys],
        )
    }
}

/// Checks that scores `[batch, heads, L, S]` have `[L, S] = expected`.
fn check_len(what: &'static str, scores: [usize; 4], expected: [usize; 2]) -> Result<()> {
    if [scores[2], scores[3]] == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            what,
            expected: expected.to_vec(),
            found: scores[2..].to_vec(),
        })
    }
}
