//! The macros the x86-64 tokens share: the trampoline that compiles an operation
//! for a token, and the register tiles.

/// The one trampoline of a token whose instruction sets are `$features`:
/// `token.vectorize(op)` runs `op` inside a `#[target_feature]` function, so the
/// whole operation (its `run` is `#[inline(always)]`) is compiled with those
/// instruction sets and inlines the token's intrinsic micro-kernels. Only the
/// token can call it, and only run-time detection makes a token.
macro_rules! trampoline {
    ($token:ty, $features:literal) => {
        impl $token {
            /// Runs `op` with this token's micro-kernels in tiles `NR` wide,
            #[doc = concat!("compiled with ", $features, ".")]
            #[inline]
            pub(crate) fn vectorize<A, K, O, const NR: usize>(self, op: O) -> O::Output
            where
                A: $crate::kernel::float::KernelFloat,
                O: $crate::kernel::arch::Op<A, K>,
                Self:
                    $crate::kernel::arch::Token<A, NR> + $crate::kernel::tiled::KeyTiles<A, K, NR>,
            {
                #[target_feature(enable = $features)]
                fn compiled<A, K, O, T, const NR: usize>(token: T, op: O) -> O::Output
                where
                    A: $crate::kernel::float::KernelFloat,
                    O: $crate::kernel::arch::Op<A, K>,
                    T: $crate::kernel::arch::Token<A, NR>
                        + $crate::kernel::tiled::KeyTiles<A, K, NR>,
                {
                    op.run::<T, NR>(token)
                }
                // SAFETY: `self` exists, so the CPU has the instruction sets.
                unsafe { compiled::<A, K, O, Self, NR>(self, op) }
            }
        }
    };
}

/// The tile micro-kernels of an x86-64 token for one element type, written once:
/// a tile row is two registers of `$lanes` lanes (`$nr = 2 · $lanes` columns), and
/// the `MR` rows of a tile are summed `$rows` at a time (`2·$rows` accumulators:
/// all of `MR` with AVX-512's 32 registers, half of it with AVX2's 16, which then
/// reads each step of the keys or values twice); `$features` names what the token
/// proves. A token with faster transpositions and softmax than the generic ones
/// names them last (`pack_panel = f, pack_query_tile = g, exp_and_sum = h`:
/// `f(token, src, stride, lines, out)`, `g(token, rows, scale, out)`,
/// `h(token, row, shift)`).
macro_rules! two_register_tiles {
    ($token:ty, $features:literal, $module:ident, $ty:ty, $nr:expr, $lanes:literal, $rows:literal, $reg:ident, $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident $(, pack_panel = $pack:path, pack_query_tile = $pack_queries:path)? $(, exp_and_sum = $exp:path)? $(, block_softmax = $softmax:ident)?) => {
        mod $module {
            use super::*;
            use $crate::kernel::params::{BC, MR};
            use $crate::kernel::tiled::Tiles;

            /// Rows summed in registers at a time.
            const ROWS: usize = $rows;
            const _: () = assert!(MR % ROWS == 0);

            /// One rank-1 update of `R` rows of the tile: `acc[i] += a[i] · row`.
            ///
            /// # Safety
            ///
            #[doc = concat!("The CPU must support ", $features, ".")]
            #[inline(always)]
            unsafe fn rank1<const R: usize>(acc: &mut [[$reg; 2]; R], a: &[$ty; R], row: &[$ty; $nr]) {
                // SAFETY: the caller upholds this function's contract (its `# Safety`).
                unsafe {
                    let r0 = $load(row.as_ptr());
                    let r1 = $load(row.as_ptr().add($lanes));
                    for i in 0..R {
                        let s = $splat(a[i]);
                        acc[i][0] = $fma(s, r0, acc[i][0]);
                        acc[i][1] = $fma(s, r1, acc[i][1]);
                    }
                }
            }

            /// Rows `first .. first + R` of `S = Q·Kᵀ` into `out`: the product
            /// rows of the packed queries (so each entry's bits do not depend
            /// on `R`).
            ///
            /// # Safety
            ///
            #[doc = concat!("The CPU must support ", $features, "; `first + R ≤ MR`.")]
            #[inline(always)]
            unsafe fn score_rows<const R: usize>(
                q: &[[$ty; MR]],
                k: &[[$ty; $nr]],
                first: usize,
                out: &mut [[$ty; $nr]; MR],
            ) {
                if k.is_empty() {
                    // a sum of no steps: `out` holds its zeros
                    return;
                }
                let q = &q.as_flattened()[first..];
                let out = &mut out.as_flattened_mut()[first * $nr..];
                // SAFETY: the caller upholds this function's contract: with
                // `first + R ≤ MR`, entry `(R − 1, k.len() − 1)` of the packed
                // queries lies in `q` and row `R − 1` of the tile in `out`.
                unsafe { product_rows::<R, 1, MR>(q, k, out, $nr, false) }
            }

            /// Rows `0 .. R` of `C (=|+=) A·B` straight into `c` (rows `stride`
            /// apart), `A(i, p) = a[i·LINE + p·STEP]`: each entry one
            /// accumulator, summed over the steps in order, then added to
            /// `c`'s.
            ///
            /// # Safety
            ///
            #[doc = concat!("The CPU must support ", $features, "; `a` must hold")]
            /// `A(R − 1, b.len() − 1)` and `c` row `R − 1`'s first `NR` entries.
            #[inline(always)]
            unsafe fn product_rows<const R: usize, const LINE: usize, const STEP: usize>(
                a: &[$ty],
                b: &[[$ty; $nr]],
                c: &mut [$ty],
                stride: usize,
                add: bool,
            ) {
                // SAFETY: the caller upholds this function's contract: every
                // index below is at most the two it names.
                unsafe {
                    let at = |p: usize| -> [$ty; R] {
                        std::array::from_fn(|i| *a.get_unchecked(i * LINE + p * STEP))
                    };
                    let mut acc = [[$zero(); 2]; R];
                    // two steps of the sum per trip: half the loop overhead
                    let (pairs, last) = b.as_chunks::<2>();
                    for (k, pair) in pairs.iter().enumerate() {
                        rank1(&mut acc, &at(2 * k), &pair[0]);
                        rank1(&mut acc, &at(2 * k + 1), &pair[1]);
                    }
                    if let [row] = last {
                        rank1(&mut acc, &at(b.len() - 1), row);
                    }
                    // `c + Σ` rounded once, as an addition would
                    let one = $splat(1.0);
                    for (i, [x0, x1]) in acc.into_iter().enumerate() {
                        let row = c.as_mut_ptr().add(i * stride);
                        let (x0, x1) = if add {
                            ($fma($load(row), one, x0), $fma($load(row.add($lanes)), one, x1))
                        } else {
                            (x0, x1)
                        };
                        $store(row, x0);
                        $store(row.add($lanes), x1);
                    }
                }
            }

            impl $crate::kernel::arch::Token<$ty, { $nr }> for $token {
                type MulAdd = $crate::kernel::float::Fused;
            }

            impl Tiles<$ty, { $nr }> for $token {
                /// Blocks of `ROWS` rows, then the rows left in a block of 1, 2,
                /// 4 or 8 where that is fewer than `ROWS` (a tile of 3 rows costs
                /// a third of a full one; one row, a decoding step's token, half
                /// of four rows: its two sums wait on each other's latency).
                #[inline(always)]
                fn score_tile(self, q: &[[$ty; MR]], k: &[[$ty; $nr]], rows: usize) -> [[$ty; $nr]; MR] {
                    let mut out = [[0.0; $nr]; MR];
                    // SAFETY: `self` is the token, so the CPU has the instruction
                    // sets; every block ends within the tile's `MR` rows.
                    unsafe {
                        if rows >= MR {
                            // the whole tile: a loop of constant length
                            for first in (0..MR).step_by(ROWS) {
                                score_rows::<ROWS>(q, k, first, &mut out);
                            }
                            return out;
                        }
                        let whole = rows - rows % ROWS;
                        for first in (0..whole).step_by(ROWS) {
                            score_rows::<ROWS>(q, k, first, &mut out);
                        }
                        match rows - whole {
                            0 => {}
                            1 => score_rows::<1>(q, k, whole, &mut out),
                            2 => score_rows::<2>(q, k, whole, &mut out),
                            3..=4 if ROWS > 4 => score_rows::<4>(q, k, whole, &mut out),
                            5..=8 if ROWS > 8 => score_rows::<8>(q, k, whole, &mut out),
                            _ => score_rows::<ROWS>(q, k, whole, &mut out),
                        }
                    }
                    out
                }

                /// Blocks of `ROWS` rows, then the rows left in blocks of 8, 4,
                /// 2 and 1 (no line past `rows` is read).
                #[inline(always)]
                fn product_tile<const LINE: usize, const STEP: usize>(
                    self,
                    a: &[$ty],
                    b: &[[$ty; $nr]],
                    rows: usize,
                    c: &mut [$ty],
                    stride: usize,
                    add: bool,
                ) {
                    assert!(rows <= MR, "at most MR rows");
                    if rows == 0 {
                        return;
                    }
                    if b.is_empty() {
                        // a sum of no steps
                        if !add {
                            for row in c.chunks_mut(stride).take(rows) {
                                row[..$nr].fill(0.0);
                            }
                        }
                        return;
                    }
                    let last_a = (rows - 1) * LINE + (b.len() - 1) * STEP;
                    assert!(
                        last_a < a.len() && (rows - 1) * stride + $nr <= c.len(),
                        "a tile's operands lie in `a` and `c`"
                    );
                    let mut first = 0;
                    while first < rows {
                        let left = rows - first;
                        let r = match left {
                            _ if left >= ROWS => ROWS,
                            8.. if ROWS > 8 => 8,
                            4.. if ROWS > 4 => 4,
                            2.. => 2,
                            _ => 1,
                        };
                        let (a, c) = (&a[first * LINE..], &mut c[first * stride..]);
                        // SAFETY: `self` is the token, so the CPU has the
                        // instruction sets; the block's rows are the tile's
                        // (checked above) from `first`.
                        unsafe {
                            match r {
                                1 => product_rows::<1, LINE, STEP>(a, b, c, stride, add),
                                2 => product_rows::<2, LINE, STEP>(a, b, c, stride, add),
                                4 => product_rows::<4, LINE, STEP>(a, b, c, stride, add),
                                8 => product_rows::<8, LINE, STEP>(a, b, c, stride, add),
                                _ => product_rows::<ROWS, LINE, STEP>(a, b, c, stride, add),
                            }
                        }
                        first += r;
                    }
                }

                #[inline(always)]
                fn value_tile(
                    self,
                    p: &[&[$ty; BC]; MR],
                    v: &[[$ty; $nr]],
                    alpha: &[$ty; MR],
                    o: &mut [[$ty; $nr]; MR],
                ) {
                    let v = &v[..v.len().min(BC)];
                    // SAFETY: as in `score_tile`.
                    unsafe {
                        for first in (0..MR).step_by(ROWS) {
                            let weights = |j: usize| std::array::from_fn(|i| p[first + i][j]);
                            let mut acc = [[$zero(); 2]; ROWS];
                            // two keys per trip: half the loop overhead
                            let (pairs, last) = v.as_chunks::<2>();
                            for (pair, rows) in pairs.iter().enumerate() {
                                let j = 2 * pair;
                                rank1(&mut acc, &weights(j), &rows[0]);
                                rank1(&mut acc, &weights(j + 1), &rows[1]);
                            }
                            if let [row] = last {
                                rank1(&mut acc, &weights(v.len() - 1), row);
                            }
                            for i in 0..ROWS {
                                let a = $splat(alpha[first + i]);
                                let row = o[first + i].as_mut_ptr();
                                $store(row, $fma($load(row), a, acc[i][0]));
                                $store(row.add($lanes), $fma($load(row.add($lanes)), a, acc[i][1]));
                            }
                        }
                    }
                }
                $(
                    #[inline(always)]
                    fn pack_query_tile(
                        self,
                        rows: ndarray::ArrayView2<'_, $ty>,
                        scale: $ty,
                        out: &mut [[$ty; MR]],
                    ) {
                        $pack_queries(self, rows, scale, out)
                    }
                )?
                $(
                    #[inline(always)]
                    fn exp_and_sum<M: $crate::kernel::float::MulAdd>(
                        self,
                        row: &mut [$ty],
                        shift: $ty,
                    ) -> $ty {
                        $exp(self, row, shift)
                    }
                )?
                $(
                    #[inline(always)]
                    fn block_softmax<M: $crate::kernel::float::MulAdd>(
                        self,
                        s: &mut [$ty],
                        width: usize,
                        rows: usize,
                        scale: Option<$ty>,
                        state: $crate::kernel::tiled::RowStates<'_, $ty>,
                    ) {
                        $softmax::<M>(self, s, width, rows, scale, state)
                    }
                )?
            }

            impl $crate::kernel::pack::PackPanel<$ty, { $nr }> for $token {
                $(
                    #[inline(always)]
                    fn pack_panel(
                        self,
                        src: &[$ty],
                        stride: usize,
                        lines: usize,
                        out: &mut [[$ty; $nr]],
                    ) {
                        $pack(self, src, stride, lines, out)
                    }
                )?
            }
        }
    };
}

/// `Dots<f32>` and `HalfDots` of `$token` by those of its field `$inner`, the
/// token whose instruction sets it extends (its own kernels are the tiled
/// kernel's: the direct path and the quantized cache run on `$inner`'s).
macro_rules! inner_dots {
    ($token:ty, $inner:ident) => {
        impl $crate::kernel::direct::Dots<f32> for $token {
            #[inline(always)]
            fn dot4(
                self,
                q: &[[f32; $crate::kernel::params::LANES]],
                k: &[&[[f32; $crate::kernel::params::LANES]]; 4],
            ) -> [f32; 4] {
                self.$inner.dot4(q, k)
            }

            #[inline(always)]
            fn value_rows(
                self,
                p: &[&[f32]; 4],
                values: &[f32],
                d_v: usize,
                c0: usize,
            ) -> [[f32; $crate::kernel::params::LANES]; 4] {
                self.$inner.value_rows(p, values, d_v, c0)
            }

            #[inline(always)]
            fn exp_and_sum<M: $crate::kernel::float::MulAdd>(
                self,
                row: &mut [f32],
                shift: f32,
            ) -> f32 {
                $crate::kernel::direct::Dots::<f32>::exp_and_sum::<M>(self.$inner, row, shift)
            }
        }

        impl $crate::kernel::direct::HalfDots for $token {
            #[inline(always)]
            fn scores_i8(self, q: &[i16], keys: &[i8], d: usize, out: &mut [i32]) {
                self.$inner.scores_i8(q, keys, d, out);
            }

            #[inline(always)]
            fn values_i8(self, w: &[i16], values: &[i8], d_v: usize, out: &mut [i32]) {
                self.$inner.values_i8(w, values, d_v, out);
            }

            #[inline(always)]
            fn dot4_half<H: $crate::kernel::direct::Narrow>(
                self,
                q: &[[f32; $crate::kernel::params::LANES]],
                k: &[&[[H; $crate::kernel::params::LANES]]; 4],
            ) -> [f32; 4] {
                self.$inner.dot4_half(q, k)
            }

            #[inline(always)]
            fn value_row_half<H: $crate::kernel::direct::Narrow>(
                self,
                p: &[f32],
                values: &[H],
                d_v: usize,
                c0: usize,
            ) -> [[f32; $crate::kernel::params::LANES]; $crate::kernel::params::TILE_BLOCKS] {
                self.$inner.value_row_half(p, values, d_v, c0)
            }
        }
    };
}
