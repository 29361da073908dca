//! `Linear`, the building block of every projection: its products on a weight
//! packed for the kernels' register tiles.

use attn::Linear;
use ndarray::{Array2, s};

/// Products run on the packed weight, which follows the weight through
/// `weight_mut` and clones.
#[test]
fn the_packed_weight_follows_the_weight() {
    let w = Array2::from_shape_fn((70, 45), |(i, j)| ((i * 7 + j * 3) % 13) as f64 - 6.0);
    let x = Array2::from_shape_fn((5, 70), |(i, j)| ((i + 2 * j) % 5) as f64 - 2.0);
    let mut layer = Linear::new(w.clone());
    let (y, paths) = attn::kernel_paths(|| layer.forward(&x));
    assert_eq!(paths.weight_products, 1);
    // integers: every order of summation is exact
    assert_eq!(y.expect("valid"), x.dot(&w));
    let (y, paths) = attn::kernel_paths(|| layer.forward(&x.slice(s![..1, ..])));
    assert_eq!(
        (y.expect("valid"), paths.weight_products),
        (x.slice(s![..1, ..]).dot(&w), 1),
        "one row (a decoding step) on the packed weight too"
    );
    let before = layer.clone();
    layer.weight_mut().mapv_inplace(|v| 2.0 * v);
    assert_eq!(layer.forward(&x).expect("valid"), x.dot(&w) * 2.0);
    assert_eq!(before.forward(&x).expect("valid"), x.dot(&w));
    assert_ne!(before, layer);
    let mut twin = before.clone();
    assert_eq!(twin, before, "packed or not, the same layer");
    twin.weight_mut()[[0, 0]] += 1.0;
    assert_eq!(
        twin.forward(&x).expect("valid")[[0, 0]],
        x.dot(&w)[[0, 0]] + x[[0, 0]]
    );
}

/// A row's projection does not depend on the rows beside it (a padded batch
/// gives each sequence its numbers alone), for every count from one: the
/// register tile sums its last rows in a smaller block, with the same bits.
#[test]
fn a_row_has_the_same_bits_among_any_rows() {
    let w = Array2::from_shape_fn((33, 29), |(i, j)| {
        ((i * 37 + j * 11) % 97) as f32 / 31.0 - 1.5
    });
    let x = Array2::from_shape_fn((40, 33), |(i, j)| {
        ((i * 13 + j * 5) % 89) as f32 / 23.0 - 1.9
    });
    let layer = Linear::new(w);
    let all = layer.forward(&x).expect("valid");
    for rows in [1, 2, 3, 4, 5, 8, 9, 11, 12, 13, 16, 21, 25] {
        for start in [0, 7, 40 - rows] {
            let part = layer
                .forward(&x.slice(s![start..start + rows, ..]))
                .expect("valid");
            assert_eq!(
                part,
                all.slice(s![start..start + rows, ..]),
                "{rows} rows from {start}"
            );
        }
    }
}

/// A column-major weight (the loader's transposed view of a file's `(out, in)`)
/// gives the bits of the same weight row-major, one row (a decoding step) or many.
#[test]
fn a_column_major_weight_gives_the_same_bits() {
    let w = Array2::from_shape_fn((70, 45), |(i, j)| {
        ((i * 37 + j * 11) % 97) as f32 / 31.0 - 1.5
    });
    let columns = w.t().as_standard_layout().into_owned().reversed_axes();
    assert!(columns.t().is_standard_layout() && !columns.is_standard_layout());
    let (rows, by_columns) = (Linear::new(w.clone()), Linear::new(columns));
    for n in [1, 2, 3, 13, 30] {
        let x = Array2::from_shape_fn((n, 70), |(i, j)| {
            ((i * 13 + j * 5) % 89) as f32 / 23.0 - 1.9
        });
        assert_eq!(
            by_columns.forward(&x).expect("valid"),
            rows.forward(&x).expect("valid"),
            "{n} rows"
        );
    }
}

/// Empty products: no output column, no input row, or no input column (the
/// sums of nothing, zero), each of any other size, on one and two threads
/// (found by the `attention` fuzz target: no output column panicked).
#[test]
fn empty_products_give_empty_or_zero_outputs() {
    for (rows, depth, cols) in [(3, 4, 0), (200, 64, 0), (0, 4, 3), (0, 0, 0), (5, 0, 3)] {
        let layer = Linear::new(Array2::<f32>::ones((depth, cols)));
        let x = Array2::<f32>::ones((rows, depth));
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a pool");
            let y = pool.install(|| layer.forward(&x)).expect("valid");
            assert_eq!(
                y,
                Array2::<f32>::zeros((rows, cols)),
                "{rows} × {depth} × {cols}"
            );
        }
    }
}
