//! Fuzzes a multi-head layer whose settings come from raw bytes (model width,
//! heads and grouped heads, head width, causality and window, rotary or ALiBi
//! positions, soft-cap, sinks, biases, any of them invalid) on inputs whose
//! sizes, padding and float bits come from them too. Every call must return
//! `Ok` or `Err`, never panic, and:
//! - a padded row gives the numbers of its sequence alone, under a bias of the
//!   call too, and fails only where the unpadded batch fails;
//! - a causal layer fed in chunks, through a contiguous cache or a paged one
//!   (all rows' chunks in one call), gives the numbers of the whole sequence;
//! - the backward answers where the forward does, with gradients shaped like
//!   the inputs.
#![no_main]

use attn::{Causality, Init, Mask, MultiHeadConfig, PagedKvCache, PositionEncoding, Rope};
use libfuzzer_sys::fuzz_target;
use ndarray::{concatenate, Array2, Array3, Array4, ArrayView2, Axis};

#[path = "bytes.rs"]
mod bytes;
use bytes::Bytes;

/// `got` and `want` within a relative 1e-9 (NaN where the other has NaN).
fn agree(got: ArrayView2<'_, f64>, want: ArrayView2<'_, f64>, what: &str) {
    assert_eq!(got.dim(), want.dim(), "{what}");
    for (x, y) in got.iter().zip(want.iter()) {
        let ok = (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-9 * (1.0 + y.abs());
        assert!(ok, "{what}: {x} vs the sequence alone {y}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let flags = [bytes.byte(), bytes.byte()];
    let (d_model, n_heads, n_kv) = (bytes.size(12), bytes.size(4), 1 + bytes.size(3));
    let mut config = MultiHeadConfig::new(d_model, n_heads).with_kv_heads(n_kv);
    if flags[0] & 1 != 0 {
        config = config.with_head_dim(bytes.size(6));
    }
    config = config.with_causality(match (flags[0] >> 1) % 3 {
        0 => Causality::None,
        1 => Causality::Causal,
        _ => Causality::SlidingWindow(bytes.size(5)),
    });
    config = config.with_positions(match (flags[0] >> 3) % 3 {
        0 => PositionEncoding::None,
        1 => PositionEncoding::Rope(Rope::new(match bytes.byte() % 4 {
            0 => bytes.float(),
            _ => 10_000.0,
        })),
        _ => PositionEncoding::Alibi,
    });
    if flags[0] & 32 != 0 {
        config = config.with_softcap(bytes.float());
    }
    if flags[0] & 64 != 0 {
        config = config.with_sinks();
    }
    if flags[0] & 128 != 0 {
        config = config.without_bias();
    }
    let Ok(mha) = config.random::<f64>(Init::XavierUniform, u64::from(flags[1])) else {
        return;
    };
    let (batch, t) = (1 + bytes.size(2), bytes.size(8));
    let x = Array3::from_shape_simple_fn((batch, t, d_model), || bytes.float());
    let real = Array2::from_shape_simple_fn((batch, t), || bytes.byte() % 4 != 0);
    // large inputs make scores whose rounding the check cannot see
    let compare = x.iter().all(|x| x.abs() <= 16.0);

    // a bias of the call, in the caller's slots, or none
    let bias = (bytes.byte() % 2 == 1).then(|| {
        Array4::from_shape_simple_fn((batch, 1, t, t), || {
            (f64::from(bytes.byte()) - 128.0) / 32.0
        })
    });
    let call: Vec<Mask<'_, f64>> = bias.iter().map(|b| Mask::bias(b)).collect();
    let padded = mha.forward_padded(&x, &real, &call);
    let d_out = Array3::from_shape_simple_fn((batch, t, d_model), || bytes.float());
    let grads = mha.backward_batched(&x, &x, &x, &[], &d_out);
    let forward = mha.forward_batched(&x, &x, &x, &[]);
    match (&forward, &grads) {
        (Ok(_), Ok(g)) => {
            assert_eq!(
                (g.query.dim(), g.key.dim(), g.value.dim()),
                (x.dim(), x.dim(), x.dim())
            )
        }
        (Err(_), Err(_)) => {}
        _ => panic!(
            "forward {:?} and backward {:?} disagree on failing",
            forward.as_ref().err(),
            grads.as_ref().err()
        ),
    }
    assert_eq!(
        padded.is_ok(),
        forward.is_ok(),
        "padded {:?}, not padded {:?}",
        padded.as_ref().err(),
        forward.as_ref().err()
    );

    // each row's real tokens, in order, and the row alone
    let keeps: Vec<Vec<usize>> = (0..batch)
        .map(|b| (0..t).filter(|&i| real[[b, i]]).collect())
        .collect();
    let rows: Vec<Array2<f64>> = (keeps.iter().enumerate())
        .map(|(b, keep)| x.index_axis(Axis(0), b).select(Axis(0), keep))
        .collect();
    let alone: Vec<Option<Array2<f64>>> = rows
        .iter()
        .map(|row| {
            let row = row.view().insert_axis(Axis(0));
            let out = mha.forward_batched(&row, &row, &row, &[]).ok()?;
            Some(out.index_axis_move(Axis(0), 0))
        })
        .collect();
    if let (Ok(padded), true) = (&padded, compare) {
        for (b, keep) in keeps.iter().enumerate() {
            let row = rows[b].view().insert_axis(Axis(0));
            let alone = match &bias {
                None => alone[b].clone(),
                Some(bias) => {
                    let own = (bias.slice(ndarray::s![b..=b, .., .., ..]))
                        .select(Axis(2), keep)
                        .select(Axis(3), keep);
                    let out = mha.forward_batched(&row, &row, &row, &[Mask::bias(&own)]);
                    out.ok().map(|out| out.index_axis_move(Axis(0), 0))
                }
            };
            if let (Some(alone), false) = (alone, keep.is_empty()) {
                let got = padded.index_axis(Axis(0), b).select(Axis(0), keep);
                agree(got.view(), alone.view(), "a padded row");
            }
        }
    }

    // a causal layer in chunks: every row's real tokens (`rows`), a chunk per step
    if config.causality() == Causality::None {
        return;
    }
    let hd = config.head_dim();
    let Ok(mut pool) = PagedKvCache::<f64>::new(64, 1 + bytes.size(4), n_kv, hd.max(1), hd.max(1))
    else {
        return;
    };
    let sequences: Vec<_> = (0..batch).map(|_| pool.add_sequence()).collect();
    let mut caches: Vec<_> = (0..batch).map(|_| mha.new_cache(1)).collect();
    let mut done = vec![0; batch];
    let (mut by_cache, mut by_pages) = (vec![Vec::new(); batch], vec![Vec::new(); batch]);
    while (0..batch).any(|b| done[b] < rows[b].nrows()) {
        let step = 1 + bytes.size(3);
        let mut chunks = Vec::new();
        let mut offsets = vec![0];
        for b in 0..batch {
            let end = (done[b] + step).min(rows[b].nrows());
            let chunk = rows[b].slice(ndarray::s![done[b]..end, ..]).to_owned();
            let cached = mha.forward_cached(&chunk.view().insert_axis(Axis(0)), &mut caches[b]);
            if let Ok(out) = cached {
                by_cache[b].push(out.index_axis_move(Axis(0), 0));
            }
            offsets.push(offsets[b] + chunk.nrows());
            chunks.push(chunk);
            done[b] = end;
        }
        let views: Vec<_> = chunks.iter().map(|c| c.view()).collect();
        let all = concatenate(Axis(0), &views).expect("rows of d_model");
        if let Ok(out) = mha.forward_paged(&all, &offsets, &mut pool, &sequences) {
            for b in 0..batch {
                by_pages[b].push(
                    out.slice(ndarray::s![offsets[b]..offsets[b + 1], ..])
                        .to_owned(),
                );
            }
        }
    }
    if !compare {
        return;
    }
    for b in 0..batch {
        let Some(alone) = &alone[b] else { continue };
        for (outs, what) in [
            (&by_cache[b], "a cached row in chunks"),
            (&by_pages[b], "a paged row in chunks"),
        ] {
            let views: Vec<_> = outs.iter().map(|o| o.view()).collect();
            if let Ok(whole) = concatenate(Axis(0), &views) {
                if whole.nrows() == alone.nrows() {
                    agree(whole.view(), alone.view(), what);
                }
            }
        }
    }
});
