//! Fuzzes the caches with runs of steps whose sizes, padding and values come
//! from raw bytes. Every call must return `Ok` or `Err`, never panic; a padded
//! batch row must give the numbers of that sequence alone, in a contiguous
//! cache and in a paged one (NaN where the other has NaN); a call that fails
//! must leave the cache as it was, so the run goes on from there.
//!
//! A second padded batch reads distances (ALiBi or a sliding-window mask): its
//! rows, padding between real tokens included, must give the numbers of their
//! sequences alone under the same mask.
//!
//! The first row alone must give the same numbers in a sliding cache and in a
//! paged pool with the same window. Beside them, on the same steps (Ok or Err
//! only): a padded sliding cache, paged caches in int8 (which must refuse a
//! NaN or infinite key or value) and bf16 with a window, and forks and frees
//! of paged sequences.
#![no_main]

use attn::half::bf16;
use attn::{KvCache, Mask, PagedKvCache, SequenceId};
use libfuzzer_sys::fuzz_target;
use ndarray::{s, Array1, Array2, Array3, Array4, ArrayView3, Axis};

#[path = "bytes.rs"]
mod bytes;
use bytes::Bytes;

/// `got` and `alone` within `slack` (NaN where the other has NaN).
fn agree(got: ArrayView3<'_, f64>, alone: ArrayView3<'_, f64>, slack: f64, what: &str) {
    assert_eq!(got.dim(), alone.dim(), "{what}");
    for (x, y) in got.iter().zip(alone.iter()) {
        let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= slack;
        assert!(
            ok,
            "{what}: {x} vs the sequence alone {y} (slack {slack:e})"
        );
    }
}

/// The rows of `x: (heads, T, d)` whose step is real.
fn real_rows(x: ArrayView3<'_, f64>, real: &[bool]) -> Array3<f64> {
    let keep: Vec<usize> = (0..real.len()).filter(|&t| real[t]).collect();
    x.select(Axis(1), &keep)
}

/// The largest magnitude in `x` and `so_far`.
fn largest(x: &Array4<f64>, so_far: f64) -> f64 {
    x.iter().fold(so_far, |a, x| a.max(x.abs()))
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let (batch, kv_heads, group) = (1 + bytes.size(2), 1 + bytes.size(2), 1 + bytes.size(2));
    let (d, d_v) = (1 + bytes.size(6), 1 + bytes.size(6));
    let heads = kv_heads * group;
    let block = 1 + bytes.size(4);
    let window = bytes.size(6);

    let mut padded = KvCache::<f64>::new(batch, kv_heads, d, d_v);
    // the same steps under a mask that reads distances, and each row alone
    let slopes = Array1::from_shape_simple_fn(heads, || f64::from(bytes.byte()) / 64.0);
    let distance = match bytes.byte() % 2 {
        0 => Mask::Alibi(slopes.view()),
        _ => Mask::SlidingWindow(window.max(1)),
    };
    let distances = [distance];
    let mut by_distance = KvCache::<f64>::new(batch, kv_heads, d, d_v);
    let mut alone_by_distance: Vec<KvCache<f64>> = (0..batch)
        .map(|_| KvCache::new(1, kv_heads, d, d_v))
        .collect();
    let mut alone: Vec<KvCache<f64>> = (0..batch)
        .map(|_| KvCache::new(1, kv_heads, d, d_v))
        .collect();
    // a window of 0 is an error, every other a cache
    let mut sliding = KvCache::<f64>::sliding(batch, kv_heads, d, d_v, window);
    assert_eq!(sliding.is_err(), window == 0);
    let mut paged = PagedKvCache::<f64>::new(1 + bytes.size(40), block, kv_heads, d, d_v)
        .expect("sizes of at least 1");
    let mut sequences: Vec<Option<SequenceId>> =
        (0..batch).map(|_| Some(paged.add_sequence())).collect();
    let mut int8 = PagedKvCache::<i8>::new(1 + bytes.size(8), block, kv_heads, d, d_v)
        .expect("sizes of at least 1");
    let quantised = int8.add_sequence();
    let mut half = PagedKvCache::<bf16>::new(1 + bytes.size(8), block, kv_heads, d, d_v)
        .expect("sizes of at least 1")
        .with_window(window.max(1))
        .expect("a window of at least 1");
    let mut halves = vec![half.add_sequence()];
    // row 0 alone in a sliding cache, and in a paged pool with the same window
    let mut ring = KvCache::<f64>::sliding(1, kv_heads, d, d_v, window.max(1))
        .expect("a window of at least 1");
    let mut windowed = PagedKvCache::<f64>::new(1 + bytes.size(40), block, kv_heads, d, d_v)
        .expect("sizes of at least 1")
        .with_window(window.max(1))
        .expect("a window of at least 1");
    let mut in_window = Some(windowed.add_sequence());
    // the largest key and value magnitudes so far: paths that sum the scores
    // in other orders differ by about `d·ε·|q|·|k|` in a score, which moves
    // an output by that much of the largest value
    let (mut keys, mut values) = (0.0, 0.0);

    for _ in 0..bytes.size(6) {
        let t = bytes.size(4);
        let q = Array4::from_shape_simple_fn((batch, heads, t, d), || bytes.float());
        let k = Array4::from_shape_simple_fn((batch, kv_heads, t, d), || bytes.float());
        let v = Array4::from_shape_simple_fn((batch, kv_heads, t, d_v), || bytes.float());
        let real = Array2::from_shape_simple_fn((batch, t), || bytes.byte() % 4 != 0);
        let op = bytes.byte();
        if op % 16 == 0 {
            // a step of the wrong shape: an error, nothing written
            let (len, short) = (padded.len(), q.slice(s![.., .., .., ..d - 1]));
            assert!(padded.attend_padded(&short, &k, &v, &real, &[]).is_err());
            assert_eq!(padded.len(), len);
            continue;
        }
        let out = padded.attend_padded(&q, &k, &v, &real, &[]);
        let out_by_distance = by_distance.attend_padded(&q, &k, &v, &real, &distances);
        if let Ok(sliding) = sliding.as_mut() {
            let _ = sliding.attend_padded(&q, &k, &v, &real, &[]);
        }
        (keys, values) = (largest(&k, keys), largest(&v, values));
        let bound = d as f64 * largest(&q, 0.0) * keys;
        let slack = values * (8.0 * f64::EPSILON * bound + 1e-12);
        // scores past ~1e12 overflow the check's own arithmetic
        let compare = bound.is_finite() && bound < 1e12 && slack.is_finite();
        // ALiBi adds at most the largest slope times the longest distance
        let biased =
            bound + slopes.iter().fold(0.0_f64, |m, &x| m.max(x)) * by_distance.len() as f64;
        let slack_by_distance = values * (8.0 * f64::EPSILON * biased + 1e-12);
        for row in 0..batch {
            let real = real.row(row).to_vec();
            let (q, k, v) = (
                real_rows(q.index_axis(Axis(0), row), &real),
                real_rows(k.index_axis(Axis(0), row), &real),
                real_rows(v.index_axis(Axis(0), row), &real),
            );
            if q.dim().1 == 0 {
                continue;
            }
            let one = |x: &Array3<f64>| x.view().insert_axis(Axis(0)).to_owned();
            let all_real = Array2::from_elem((1, q.dim().1), true);
            let by_itself_by_distance = alone_by_distance[row].attend_padded(
                &one(&q),
                &one(&k),
                &one(&v),
                &all_real,
                &distances,
            );
            match (&out_by_distance, by_itself_by_distance) {
                (Ok(out), Ok(by_itself)) if compare && slack_by_distance.is_finite() => {
                    let out = real_rows(out.index_axis(Axis(0), row), &real);
                    let by_itself = by_itself.index_axis_move(Axis(0), 0);
                    let what = "a padded row under a mask that reads distances";
                    agree(out.view(), by_itself.view(), slack_by_distance, what);
                }
                (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
                (out, by_itself) => panic!(
                    "padded {:?} and alone {:?} disagree on failing under {:?}",
                    out.as_ref().err(),
                    by_itself.err(),
                    distances[0]
                ),
            }
            let by_itself = alone[row].attend(&one(&q), &one(&k), &one(&v));
            let by_itself = match (&out, by_itself) {
                (Ok(_), Ok(by_itself)) => by_itself,
                (Err(_), Err(_)) => continue,
                (out, by_itself) => {
                    panic!(
                        "padded {:?} and alone {:?} disagree on failing",
                        out.as_ref().err(),
                        by_itself.err()
                    )
                }
            };
            let by_itself = by_itself.index_axis_move(Axis(0), 0);
            if let (Ok(out), true) = (&out, compare) {
                let out = real_rows(out.index_axis(Axis(0), row), &real);
                agree(out.view(), by_itself.view(), slack, "a padded row");
            }
            let Some(sequence) = sequences[row] else {
                continue;
            };
            match paged.attend(sequence, &q, &k, &v) {
                Ok(pages) if compare => {
                    agree(pages.view(), by_itself.view(), slack, "a paged sequence")
                }
                Ok(_) => {}
                // the pool ran out: the sequence is left as it was and stops here
                Err(attn::Error::Cache { .. }) => sequences[row] = None,
                Err(e) => panic!("a paged step failed where its sequence alone did not: {e}"),
            }
            if let (0, Some(sequence)) = (row, in_window) {
                let by_ring = ring.attend(&one(&q), &one(&k), &one(&v));
                match (windowed.attend(sequence, &q, &k, &v), by_ring) {
                    (Ok(pages), Ok(by_ring)) if compare => {
                        let by_ring = by_ring.index_axis_move(Axis(0), 0);
                        agree(
                            pages.view(),
                            by_ring.view(),
                            slack,
                            "a windowed paged sequence",
                        )
                    }
                    (Ok(_), Ok(_)) => {}
                    (Err(attn::Error::Cache { .. }), _) => in_window = None,
                    (pages, by_ring) => panic!(
                        "a windowed step: paged {:?}, sliding cache {:?}",
                        pages.err(),
                        by_ring.err()
                    ),
                }
            }
            if row == 0 {
                let finite = k.iter().chain(v.iter()).all(|&x| (x as f32).is_finite());
                let before = int8.len(quantised).expect("a live sequence");
                let narrow = |x: &Array3<f64>| x.mapv(|x| x as f32);
                let stored = int8.attend(quantised, &narrow(&q), &narrow(&k), &narrow(&v));
                if !finite {
                    assert!(stored.is_err(), "int8 took a non-finite key or value");
                }
                if stored.is_err() {
                    assert_eq!(int8.len(quantised).expect("a live sequence"), before);
                }
            }
        }
        // the bf16 pool: a step on one of its sequences, then a fork or a free
        let at = usize::from(op / 16) % halves.len();
        let first = |x: &Array4<f64>| x.index_axis(Axis(0), 0).mapv(|x| x as f32);
        let _ = half.attend(halves[at], &first(&q), &first(&k), &first(&v));
        match op % 4 {
            1 => {
                if let Ok(child) = half.fork(halves[at]) {
                    halves.push(child);
                }
            }
            2 if halves.len() > 1 => {
                let freed = halves.swap_remove(at);
                half.free(freed).expect("a live sequence");
                assert!(half.len(freed).is_err(), "a freed sequence is gone");
                assert!(half.len(halves[0]).is_ok());
            }
            _ => {}
        }
    }
});
