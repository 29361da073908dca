//! The router's own tests: the cap read from its name, detection under the
//! cap, and each level's tiles against the whole tile and the operand's layout.

use super::*;

#[test]
fn the_cap_is_read_from_its_name() {
    assert_eq!(parse_cap(""), Ok(Cap::Amx));
    assert_eq!(parse_cap("amx"), Ok(Cap::Amx));
    assert_eq!(parse_cap("avx512bf16"), Ok(Cap::Avx512Bf16));
    assert_eq!(parse_cap("portable"), Ok(Cap::Portable));
    assert_eq!(parse_cap(" AVX2 "), Ok(Cap::Avx2));
    assert_eq!(parse_cap("avx512"), Ok(Cap::Avx512));
    let err = parse_cap("sse9").unwrap_err();
    assert!(
        err.contains("\"sse9\"") && err.contains("portable, avx2, avx512, avx512bf16 or amx"),
        "{err}"
    );
}

#[test]
fn detection_honours_the_cap() {
    let arch = Arch::detect().expect("ATTN_KERNEL_ARCH is valid in tests");
    let cap = cap().expect("valid");
    let mut best = Cap::Portable;
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::Avx2::detect().is_some() {
            best = Cap::Avx2;
        }
        if avx512::Avx512::detect().is_some() {
            best = Cap::Avx512;
        }
    }
    let expected = match cap.min(best) {
        Cap::Portable => KernelArch::Portable,
        Cap::Avx2 => KernelArch::Avx2,
        // the bf16 dot products and AMX serve only bf16 keys: `bf16_dots`,
        // `amx_tiles`
        Cap::Avx512 | Cap::Avx512Bf16 | Cap::Amx => KernelArch::Avx512,
    };
    assert_eq!(arch.kind(), expected);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_dot_products_need_the_cpu_and_the_cap() {
    let arch = Arch::detect().expect("ATTN_KERNEL_ARCH is valid in tests");
    let allowed = cap().expect("valid") >= Cap::Avx512Bf16
        && avx512::Avx512::detect().is_some()
        && is_x86_feature_detected!("avx512bf16");
    assert_eq!(arch.bf16_dots().is_some(), allowed);
}

/// AMX where the CPU says it has AMX-TILE and AMX-BF16 (Linux grants every
/// process the tile data since 5.16), the cap allows it and AVX512_BF16 is
/// there too.
#[cfg(target_arch = "x86_64")]
#[test]
fn amx_tiles_need_the_cpu_and_the_cap() {
    let arch = Arch::detect().expect("ATTN_KERNEL_ARCH is valid in tests");
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = |name: &str| {
        cpu.lines()
            .find(|line| line.starts_with("flags"))
            .is_some_and(|line| line.split_whitespace().any(|flag| flag == name))
    };
    let allowed = cap().expect("valid") == Cap::Amx
        && arch.bf16_dots().is_some()
        && flags("amx_tile")
        && flags("amx_bf16");
    assert_eq!(arch.amx_tiles().is_some(), allowed);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn each_token_needs_its_instruction_sets() {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq");
    assert_eq!(avx2::Avx2::detect().is_some(), avx2);
    assert_eq!(avx512::Avx512::detect().is_some(), avx2 && avx512);
}

/// Every instruction set this CPU has, whatever `ATTN_KERNEL_ARCH` says.
fn every_arch() -> Vec<Arch> {
    #[allow(unused_mut)]
    let mut arches = vec![Arch::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        arches.extend(avx2::Avx2::detect().map(Arch::Avx2));
        arches.extend(avx512::Avx512::detect().map(Arch::Avx512));
    }
    arches
}

/// The score tile's first `rows` rows, for each `rows`, against the whole tile.
struct RowsOfTile<A> {
    depth: usize,
    _element: std::marker::PhantomData<A>,
}

fn rows_of<A>(depth: usize) -> RowsOfTile<A> {
    RowsOfTile {
        depth,
        _element: std::marker::PhantomData,
    }
}

impl<A: KernelFloat> Op<A> for RowsOfTile<A> {
    /// `(rows, row, column)` of each entry whose bits differ.
    type Output = Vec<(usize, usize, usize)>;

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(self, token: T) -> Self::Output {
        use crate::kernel::params::MR;
        let value = |x: usize| A::from_f64(((x * 37) % 101) as f64 / 29.0 - 1.7);
        let q: Vec<[A; MR]> = (0..self.depth)
            .map(|p| std::array::from_fn(|i| value(p * MR + i)))
            .collect();
        let k: Vec<[A; NR]> = (0..self.depth)
            .map(|p| std::array::from_fn(|j| value(p * NR + j + 7)))
            .collect();
        let whole = token.score_tile(&q, &k, MR);
        let mut differ = Vec::new();
        for rows in 1..=MR {
            let tile = token.score_tile(&q, &k, rows);
            for (i, (row, want)) in tile.iter().zip(&whole).take(rows).enumerate() {
                for (j, (x, y)) in row.iter().zip(want).enumerate() {
                    if x != y {
                        differ.push((rows, i, j));
                    }
                }
            }
        }
        differ
    }
}

/// A tile of a few rows (the last of a product's rows, summed in a smaller
/// block) has the bits those rows have in a whole tile, on every
/// instruction set this CPU has: a row's value does not depend on the
/// others.
#[test]
fn a_tile_of_a_few_rows_has_the_bits_of_the_whole_tile() {
    for arch in every_arch() {
        for depth in [1, 2, 7, 64] {
            let differ: Vec<_> = Dispatch::<f32>::dispatch(arch, rows_of(depth));
            let first = differ.first();
            assert!(
                first.is_none(),
                "{:?} f32 depth {depth}: (rows, row, column) {first:?}",
                arch.kind()
            );
            let differ: Vec<_> = Dispatch::<f64>::dispatch(arch, rows_of(depth));
            let first = differ.first();
            assert!(
                first.is_none(),
                "{:?} f64 depth {depth}: (rows, row, column) {first:?}",
                arch.kind()
            );
        }
    }
}

/// The product tile over lines read where they lie (a matrix's rows or
/// columns, `W` apart) and over packed lines, against the score tile.
struct ProductTiles<A> {
    depth: usize,
    _element: std::marker::PhantomData<A>,
}

fn products<A>(depth: usize) -> ProductTiles<A> {
    ProductTiles {
        depth,
        _element: std::marker::PhantomData,
    }
}

/// Stride of the rows the product tiles read: wider than any depth below.
const W: usize = 40;

impl<A: KernelFloat> Op<A> for ProductTiles<A> {
    /// `(form, rows, add, row, column)` of each entry whose bits differ
    /// from the score tile's (plus `c`'s where added), and of each entry
    /// past the tile's rows or columns that was written.
    type Output = Vec<(&'static str, usize, bool, usize, usize)>;

    #[inline(always)]
    fn run<T: Token<A, NR> + KeyTiles<A, A, NR>, const NR: usize>(self, token: T) -> Self::Output {
        use crate::kernel::params::MR;
        let depth = self.depth;
        let value = |x: usize| A::from_f64(((x * 37) % 101) as f64 / 29.0 - 1.7);
        // A: (MR, depth) row-major W wide; its transpose (depth, MR) W wide
        let rows_of_a: Vec<A> = (0..MR * W).map(value).collect();
        let mut cols_of_a = vec![A::nan(); depth * W];
        let mut packed = vec![[A::zero(); MR]; depth];
        for i in 0..MR {
            for p in 0..depth {
                cols_of_a[p * W + i] = rows_of_a[i * W + p];
                packed[p][i] = rows_of_a[i * W + p];
            }
        }
        let k: Vec<[A; NR]> = (0..depth)
            .map(|p| std::array::from_fn(|j| value(p * NR + j + 7)))
            .collect();
        let want = token.score_tile(&packed, &k, MR);
        let stride = NR + 3;
        let start = |i: usize, j: usize| A::from_f64((i * 5 + j) as f64 / 8.0);
        let mut differ = Vec::new();
        for rows in 1..=MR {
            for add in [false, true] {
                for form in ["rows", "columns", "packed"] {
                    let mut c: Vec<A> = (0..MR * stride)
                        .map(|x| start(x / stride, x % stride))
                        .collect();
                    let (a, flat) = (&rows_of_a[..], packed.as_flattened());
                    match form {
                        "rows" => token.product_tile::<W, 1>(a, &k, rows, &mut c, stride, add),
                        "columns" => {
                            token.product_tile::<1, W>(&cols_of_a, &k, rows, &mut c, stride, add)
                        }
                        _ => token.product_tile::<1, MR>(flat, &k, rows, &mut c, stride, add),
                    }
                    for i in 0..MR {
                        for j in 0..stride {
                            let expect = match (i < rows && j < NR, add) {
                                (true, true) => start(i, j) + want[i][j],
                                (true, false) => want[i][j],
                                (false, _) => start(i, j),
                            };
                            if c[i * stride + j] != expect {
                                differ.push((form, rows, add, i, j));
                            }
                        }
                    }
                }
            }
        }
        differ
    }
}

/// The backward's products read `P` and `dS` where they lie: their
/// product tiles have the bits of the score tile on the same lines packed,
/// for every count of rows, and write nothing past the tile.
#[test]
fn product_tiles_read_where_the_operand_lies() {
    for arch in every_arch() {
        for depth in [0, 1, 2, 7, 33] {
            let differ: Vec<_> = Dispatch::<f32>::dispatch(arch, products(depth));
            let first = differ.first();
            assert!(
                first.is_none(),
                "{:?} f32 depth {depth}: {first:?}",
                arch.kind()
            );
            let differ: Vec<_> = Dispatch::<f64>::dispatch(arch, products(depth));
            let first = differ.first();
            assert!(
                first.is_none(),
                "{:?} f64 depth {depth}: {first:?}",
                arch.kind()
            );
        }
    }
}
