//! f32 working memory a thread keeps between half-precision calls: the copies
//! of the queries (and, on the plans that read f32, the keys and values)
//! widened for the kernels, and the f32 output narrowed at the end. Allocated
//! anew for every call, that memory came back from the system as fresh pages
//! whenever the allocator had returned it (glibc does, on some threads' heaps
//! and not others): an f16 call of 8 heads at N = 512 on two threads then
//! faulted in 3–5 MB of pages a call and ran at 0.6–0.7 of its speed, in most
//! runs of the process. Kept, it is written over call after call.

use std::cell::RefCell;

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
}
