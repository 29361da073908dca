//! f32 working memory a thread keeps between half-precision calls: the copies
//! of the queries (and, on the plans that read f32, the keys and values)
//! widened for the kernels, and the f32 output narrowed at the end. Allocated anew for every call, that memory came back from the system
//! as fresh pages whenever the allocator had returned it (glibc does, on some
//! threads' heaps and not others): a bf16 or f16 call of 8 heads at N = 512
//! on two threads then spent a quarter of its time in page faults, in one
//! run out of three. Kept, it is written over call after call.

use std::cell::RefCell;

use crate::element::filled;
use crate::kernel::Parallelism;

/// Buffers a thread keeps, at most: a call's queries, keys, values (widened
/// where the kernel reads them as f32) and output.
const KEPT_BUFFERS: usize = 4;

/// Values of the largest buffer a thread keeps (8 MiB of f32: one array of
/// 8 heads × 4096 rows × 64). A larger call's memory goes back to the
/// allocator, whose faults cost little beside the call's arithmetic.
const KEPT_VALUES: usize = 1 << 21;

thread_local! {
    static KEPT: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// `len` values for the caller to write over: a buffer this thread kept, if
/// one is large enough (its values are those of its last use), else new ones
/// set to 0 (on the pool where `parallelism` allows).
pub(crate) fn take(len: usize, parallelism: Parallelism) -> Vec<f32> {
    let kept = KEPT.with_borrow_mut(|kept| {
        let fits = kept.iter().position(|v| v.capacity() >= len)?;
        Some(kept.swap_remove(fits))
    });
    match kept {
        Some(mut values) => {
            // within the capacity: pages written before, no fault
            values.resize(len, 0.0);
            values
        }
        None => filled(len, 0.0, parallelism, |_, _| ()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer given back is the one taken next (no new allocation), cut or
    /// grown within its capacity; of more than [`KEPT_BUFFERS`], the smallest goes.
    #[test]
    fn a_thread_takes_back_what_it_gave() {
        std::thread::spawn(|| {
            let first = take(1000, Parallelism::Sequential);
            assert_eq!(first, vec![0.0; 1000]);
            let at = first.as_ptr();
            give(first);
            let again = take(600, Parallelism::Sequential);
            assert_eq!((again.as_ptr(), again.len()), (at, 600));
            give(again);
            let again = take(1000, Parallelism::Sequential);
            assert_eq!((again.as_ptr(), again.len()), (at, 1000));
            give(again);
            for len in [10, 2000, 30, 40] {
                give(vec![1.0; len]);
            }
            let kept = KEPT.with_borrow(|kept| kept.iter().map(Vec::capacity).collect::<Vec<_>>());
            assert_eq!(kept.len(), KEPT_BUFFERS);
            assert!(kept.iter().all(|&c| c >= 30), "the smallest goes: {kept:?}");
            // too large to keep
            give(vec![0.0; KEPT_VALUES + 1]);
            assert!(KEPT.with_borrow(|kept| kept.iter().all(|v| v.capacity() <= KEPT_VALUES)));
        })
        .join()
        .expect("the test's thread");
    }

    /// A half-precision call on memory a larger call left (its widened
    /// queries, keys and values, and its output) has the bits it has on a
    /// thread of its own.
    #[test]
    fn a_call_on_kept_memory_has_the_bits_of_a_fresh_one() {
        use crate::ScaledDotProduct;
        use half::f16;
        use ndarray::Array4;
        let x = |n: usize, seed: usize| {
            Array4::from_shape_fn((1, 2, n, 8), |(_, h, i, j)| {
                f16::from_f32(((h * 131 + i * 31 + j * 7 + seed) % 97) as f32 / 48.0 - 1.0)
            })
        };
        let call = move |n: usize| {
            let (q, k, v) = (x(n, 1), x(n, 2), x(n, 3));
            ScaledDotProduct::<f16>::new()
                .forward_batched(&q, &k, &v)
                .expect("valid")
        };
        let fresh = std::thread::spawn(move || call(40)).join().expect("thread");
        let after = std::thread::spawn(move || {
            drop(call(300));
            let kept = KEPT.with_borrow(Vec::len);
            (call(40), kept)
        })
        .join()
        .expect("thread");
        assert!(after.1 > 0, "the larger call left memory kept");
        assert_eq!(after.0, fresh);
    }
}
