//! Attention over shards of the keys, as context-parallel attention computes
//! it: each shard's forward with its log-sum-exp, merged; each shard's backward
//! from the merged forward, whose parts add up to the whole's gradients.

use crate::common;

use attn::{Kernel, Mask, ScaledDotProduct, merge_attention};
use common::{backward_by, max_abs_diff, random2, random4};
use ndarray::{Array1, Array2, Array4, s};

#[test]
fn three_key_shards_merge_to_attention_over_all_keys() {
    let (l, s) = (40, 300);
    let (q, k, v) = (random2(l, 16, 60), random2(s, 16, 61), random2(s, 7, 62));
    let mut keep = Array2::from_shape_fn((l, s), |(i, j)| (3 * i + j) % 7 != 0);
    keep.slice_mut(s![5, ..100]).fill(false); // row 5 sees nothing in the first shard
    keep.row_mut(9).fill(false); // row 9 sees nothing anywhere
    let shards = [0..100, 100..220, 220..300];
    let parts: Vec<_> = shards
        .iter()
        .map(|keys| {
            let keep = keep.slice(s![.., keys.clone()]).to_owned();
            ScaledDotProduct::new()
                .with_mask(Mask::keep(&keep))
                .forward_with_lse(
                    &q,
                    &k.slice(s![keys.clone(), ..]),
                    &v.slice(s![keys.clone(), ..]),
                )
                .expect("valid")
        })
        .collect();
    let merged = attn::merge_attention(&parts).expect("same shapes");
    let all = ScaledDotProduct::new()
        .with_mask(Mask::keep(&keep))
        .forward_with_lse(&q, &k, &v)
        .expect("valid");
    assert!(max_abs_diff(&merged.output, &all.output) < 1e-14);
    assert!(max_abs_diff(&merged.lse, &all.lse) < 1e-12);
    assert_eq!(merged.lse[9], f64::NEG_INFINITY);
    assert!(merged.output.row(9).iter().all(|&x| x == 0.0));
    // errors: no parts, parts that do not fit each other
    assert!(attn::merge_attention::<f64, ndarray::Ix2>(&[]).is_err());
    let mut odd = parts[1].clone();
    odd.lse = Array1::zeros(l + 1);
    assert!(attn::merge_attention(&[parts[0].clone(), odd]).is_err());
}

/// Given the merged forward, each key shard's backward gives that shard's part
/// of the whole's gradients: `dQ` summed over the shards, `dK` and `dV` shard by
/// shard; on the fused backward and on the reference path, with grouped-query
/// heads, a row that sees nothing in one shard and a row that sees nothing.
#[test]
fn each_shards_backward_from_the_merged_forward_is_its_part_of_the_whole() {
    let q = random4((2, 4, 33, 8), 80);
    let (k, v) = (random4((2, 2, 50, 8), 81), random4((2, 2, 50, 5), 82));
    let d_out = random4((2, 4, 33, 5), 83);
    let mut keep = Array2::from_shape_fn((33, 50), |(i, j)| (2 * i + 3 * j) % 5 != 0);
    keep.slice_mut(s![4, ..20]).fill(false);
    keep.row_mut(7).fill(false);
    let shards = [0..20, 20..37, 37..50];
    for (kernel, fused) in [(Kernel::Auto, true), (Kernel::Plain, false)] {
        let attention = |keys: std::ops::Range<usize>| {
            let keep = keep.slice(s![.., keys]).to_owned();
            ScaledDotProduct::new()
                .with_kernel(kernel)
                .with_mask(Mask::keep_owned(keep))
        };
        let part = |keys: &std::ops::Range<usize>| {
            let keys = s![.., .., keys.clone(), ..];
            (k.slice(keys), v.slice(keys))
        };
        let parts: Vec<_> = shards
            .iter()
            .map(|keys| {
                let (k, v) = part(keys);
                attention(keys.clone())
                    .forward_with_lse(&q, &k, &v)
                    .expect("valid")
            })
            .collect();
        let merged = merge_attention(&parts).expect("same shapes");
        let whole = attention(0..50)
            .backward_batched(&q, &k, &v, &d_out)
            .expect("valid");
        let mut d_q = Array4::zeros(q.raw_dim());
        for keys in &shards {
            let (k_part, v_part) = part(keys);
            let g = backward_by(fused, 8, || {
                attention(keys.clone()).backward_with_lse(&q, &k_part, &v_part, &merged, &d_out)
            })
            .expect("valid");
            d_q += &g.q;
            let (whole_k, whole_v) = (
                whole.k.slice(s![.., .., keys.clone(), ..]).to_owned(),
                whole.v.slice(s![.., .., keys.clone(), ..]).to_owned(),
            );
            assert!(
                max_abs_diff(&g.k, &whole_k) < 1e-13,
                "{kernel:?} dK {keys:?}"
            );
            assert!(
                max_abs_diff(&g.v, &whole_v) < 1e-13,
                "{kernel:?} dV {keys:?}"
            );
        }
        assert!(max_abs_diff(&d_q, &whole.q) < 1e-13, "{kernel:?} dQ");
    }
}
