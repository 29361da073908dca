//! Working memory a thread keeps from call to call, so that it is written over
//! instead of allocated anew: f32 buffers by size ([`take`], [`give`]: the
//! copies of half-precision queries, keys and values widened for the kernels,
//! and the f32 output narrowed at the end), and one value of each type lent out
//! ([`Loan`]: the tiled kernel's per-task scratch and its packed keys and
//! values). Allocated anew for every call, such memory came back from the
//! system as fresh pages whenever the allocator had returned it (glibc does, on
//! some threads' heaps and not others): an f16 call of 8 heads at N = 512 on two
//! threads then faulted in 3–5 MB of pages a call and ran at 0.6–0.7 of its
//! speed, in most runs of the process. Kept, it is written over call after call.

use std::any::Any;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread keeps, at most: a call's queries, keys, values (widened
/// where the kernel reads them as f32) and output.
const KEPT_BUFFERS: usize = 4;

/// Bytes of the largest buffer or lent value a thread keeps (8 MiB: one f32
/// array of 8 heads × 4096 rows × 64). A larger call's memory goes back to the
/// allocator, whose faults cost little beside the call's arithmetic.
const KEPT_BYTES: usize = 8 << 20;

/// Values of the largest f32 buffer a thread keeps.
const KEPT_VALUES: usize = KEPT_BYTES / size_of::<f32>();

thread_local! {
    static KEPT: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    /// At most one value of each type, given back by a [`Loan`].
    static LENT: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

/// `len` values for the caller to write over: the smallest buffer this
/// thread kept that is large enough, if any (its values are those of its last
/// use).
pub(crate) fn take(len: usize) -> Option<Vec<f32>> {
    let mut values = KEPT.with_borrow_mut(|kept| {
        let fits = (0..kept.len())
            .filter(|&i| kept[i].capacity() >= len)
            .min_by_key(|&i| kept[i].capacity())?;
        Some(kept.swap_remove(fits))
    })?;
    // within the capacity: pages written before, no fault
    values.resize(len, 0.0);
    Some(values)
}

/// Keeps `values` for this thread's next [`take`], if small enough; of more
/// than [`KEPT_BUFFERS`], the largest stay.
pub(crate) fn give(values: Vec<f32>) {
    if values.capacity() > KEPT_VALUES || values.capacity() == 0 {
        return;
    }
    KEPT.with_borrow_mut(|kept| {
        kept.push(values);
        if kept.len() > KEPT_BUFFERS {
            let smallest = (0..kept.len())
                .min_by_key(|&i| kept[i].capacity())
                .expect("more than one kept");
            kept.swap_remove(smallest);
        }
    });
}

/// Memory a [`Loan`] can keep: its size decides whether it is kept.
pub(crate) trait Kept: 'static {
    /// The most bytes a thread keeps of it: a larger value is freed.
    const MOST_BYTES: usize = KEPT_BYTES;

    /// The bytes it holds (allocated, used or not).
    fn bytes(&self) -> usize;
}

/// A value of type `T` lent to the thread that made the loan: the one this
/// thread last gave back, or a new one. Dropped, it goes back to the thread
/// that drops it (one value of each type; one of more than
/// [`Kept::MOST_BYTES`] is freed).
pub(crate) struct Loan<T: Kept>(Option<T>);

impl<T: Kept> Loan<T> {
    /// The value of type `T` this thread kept, if any, else `make()`'s.
    pub(crate) fn take_or(make: impl FnOnce() -> T) -> Self {
        let kept = LENT.with_borrow_mut(|lent| {
            let at = lent.iter().position(|value| value.is::<T>())?;
            lent.swap_remove(at).downcast::<T>().ok()
        });
        Loan(Some(kept.map_or_else(make, |value| *value)))
    }
}

impl<T: Kept> Deref for Loan<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0
            .as_ref()
            .expect("a loan holds its value until dropped")
    }
}

impl<T: Kept> DerefMut for Loan<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0
            .as_mut()
            .expect("a loan holds its value until dropped")
    }
}

impl<T: Kept> Drop for Loan<T> {
    fn drop(&mut self) {
        let Some(value) = self.0.take() else { return };
        if value.bytes() > T::MOST_BYTES {
            return;
        }
        // `try_with`: a loan dropped as the thread ends finds no storage
        let _ = LENT.try_with(|lent| {
            if let Ok(mut lent) = lent.try_borrow_mut() {
                lent.retain(|kept| !kept.is::<T>());
                lent.push(Box::new(value));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer given is the one taken next (no new allocation), cut or
    /// grown within its capacity; the smallest that fits is taken; of more
    /// than [`KEPT_BUFFERS`], the smallest goes.
    #[test]
    fn a_thread_takes_back_what_it_gave() {
        std::thread::spawn(|| {
            assert_eq!(take(1), None);
            let first = vec![0.0; 1000];
            let at = first.as_ptr();
            give(first);
            let again = take(600).expect("kept");
            assert_eq!((again.as_ptr(), again.len()), (at, 600));
            give(again);
            let again = take(1000).expect("kept");
            assert_eq!((again.as_ptr(), again.len()), (at, 1000));
            give(again);
            for len in [10, 2000, 30, 40] {
                give(vec![1.0; len]);
            }
            let kept = KEPT.with_borrow(|kept| kept.iter().map(Vec::capacity).collect::<Vec<_>>());
            assert_eq!(kept.len(), KEPT_BUFFERS);
            assert!(kept.iter().all(|&c| c >= 30), "the smallest goes: {kept:?}");
            // the smallest that fits
            let fit = take(35).expect("kept");
            assert!((40..1000).contains(&fit.capacity()), "{}", fit.capacity());
            // too large to keep
            give(vec![0.0; KEPT_VALUES + 1]);
            assert!(KEPT.with_borrow(|kept| kept.iter().all(|v| v.capacity() <= KEPT_VALUES)));
        })
        .join()
        .expect("the test's thread");
    }

    /// A loan is the value its thread gave back last (one of each type), or a
    /// new one where there is none; a value past the limit is not kept.
    #[test]
    fn a_loan_is_what_the_thread_gave_back() {
        struct Bytes {
            values: Vec<u8>,
        }
        impl Kept for Bytes {
            fn bytes(&self) -> usize {
                self.values.capacity()
            }
        }
        let new = || Bytes { values: vec![0] };
        std::thread::spawn(move || {
            let mut first = Loan::take_or(|| Bytes {
                values: vec![1; 10],
            });
            first.values[0] = 7;
            drop(first);
            let again = Loan::take_or(new);
            assert_eq!(again.values[..2], [7, 1]);
            // two at once: the second is new, and the last given back stays
            let mut other = Loan::take_or(new);
            assert_eq!(other.values, [0]);
            other.values[0] = 2;
            drop(again);
            drop(other);
            let mut last = Loan::take_or(new);
            assert_eq!(last.values, [2]);
            last.values = vec![0; KEPT_BYTES + 1];
            drop(last);
            assert_eq!(Loan::take_or(new).values, [0], "too large to keep");
        })
        .join()
        .expect("the test's thread");
    }
}
