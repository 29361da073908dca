//! The demos' own code paths against the golden numbers of the notebooks they
//! reproduce, the training demo against what it promises, and the text of their
//! pictures measured against the pictures (`plot/fits.rs`).
// each example brings its own copy of examples/common
#![allow(clippy::duplicate_mod)]

use crate::common;

#[allow(dead_code)]
#[path = "../examples/tokyo.rs"]
mod tokyo;

#[allow(dead_code)]
#[path = "../examples/decode.rs"]
mod decode;

/// Every text the demos' pictures draw fits them (in this binary, which needs
/// `plot` as it does, rather than a test binary of its own).
#[path = "plot/fits.rs"]
mod fits;

use common::{array2, golden};
use ndarray::Array2;

/// Agreement to `digits` significant digits, entry by entry.
fn assert_digits(name: &str, got: &Array2<f64>, want: &Array2<f64>, digits: i32) {
    assert_eq!(got.dim(), want.dim(), "{name}: shapes");
    for ((idx, g), w) in got.indexed_iter().zip(want.iter()) {
        let tolerance = 10f64.powi(-digits) * w.abs().max(1e-3);
        assert!((g - w).abs() <= tolerance, "{name} {idx:?}: {g} vs {w}");
    }
}

#[test]
fn tokyo_matches_the_notebook() {
    let file = golden("tokyo.json");
    let demo = tokyo::tokyo().expect("the demo runs");
    let f = |m: &Array2<f32>| m.mapv(f64::from);
    // the weights are the notebook's torch.randn draws, bit for bit
    assert_eq!(f(demo.projection.w_q()), array2(&file["w_q"]));
    assert_eq!(f(demo.projection.w_k()), array2(&file["w_k"]));
    assert_eq!(f(demo.projection.w_v()), array2(&file["w_v"]));
    assert_eq!(f(&demo.x), array2(&file["x"]));
    assert_digits(
        "scores",
        &f(&demo.heads[0].scaled),
        &array2(&file["scores"]),
        6,
    );
    assert_digits(
        "weights",
        &f(&demo.heads[0].weights),
        &array2(&file["weights"]),
        6,
    );
    assert_digits(
        "output",
        &f(&demo.heads[0].output),
        &array2(&file["output"]),
        6,
    );
    let tokens: Vec<String> = file["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("a token").to_string())
        .collect();
    assert_eq!(tokens, demo.tokens);
    assert_eq!(demo.output, demo.heads[0].output);
}

/// The notebook's exercises as flags: more tokens, a wider model, several heads,
/// another seed; the defaults stay the notebook's.
#[test]
fn tokyo_takes_the_notebooks_exercises_as_flags() {
    let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let (options, rest) =
        tokyo::Options::parse(args("--tokens 6 out --d-model 8 --heads 2 --seed 7"))
            .expect("valid flags");
    assert_eq!(
        options,
        tokyo::Options {
            tokens: ["Tokyo", "is", "beautiful", "in", "the", "spring"]
                .map(String::from)
                .to_vec(),
            d_model: 8,
            heads: 2,
            seed: 7
        }
    );
    assert_eq!(rest, vec!["out".to_string()]);
    assert_eq!(
        tokyo::Options::parse(args("")).expect("none").0,
        tokyo::Options::default()
    );
    for bad in [
        "--tokens 11",
        "--tokens 0",
        "--tokens",
        "--heads 3 --d-model 8",
        "--seed x",
        "--colour red",
        "--heads",
    ] {
        assert!(tokyo::Options::parse(args(bad)).is_err(), "{bad}");
    }
    let demo = tokyo::run(options.clone()).expect("runs");
    assert_eq!(
        demo.tokens,
        ["Tokyo", "is", "beautiful", "in", "the", "spring"]
    );
    assert_eq!(
        (demo.x.dim(), demo.output.dim(), demo.heads.len()),
        ((6, 8), (6, 8), 2)
    );
    // each head attends on its 4 columns; the mean is the heads' average
    for head in &demo.heads {
        assert_eq!(head.output.dim(), (6, 4));
        for row in head.weights.rows() {
            assert!((row.sum() - 1.0).abs() < 1e-6);
        }
    }
    let mean = (&demo.heads[0].weights + &demo.heads[1].weights) / 2.0;
    assert_eq!(demo.mean_weights, mean);
    // head 1's output is attention on the second half of Q, K, V
    let (q, k, v) = (
        demo.projection.query(&demo.x).expect("fits"),
        demo.projection.key(&demo.x).expect("fits"),
        demo.projection.value(&demo.x).expect("fits"),
    );
    let half = ndarray::s![.., 4..];
    let want =
        attn::scaled_dot_product(&q.slice(half), &k.slice(half), &v.slice(half)).expect("fits");
    let gap = (&demo.output.slice(half) - &want)
        .iter()
        .fold(0.0_f32, |m, d| m.max(d.abs()));
    assert!(gap < 1e-5, "{gap:e}");
    // the seed changes the weights; the same seed repeats them
    let other = tokyo::run(tokyo::Options {
        seed: 8,
        ..options.clone()
    })
    .expect("runs");
    assert_ne!(other.projection.w_q(), demo.projection.w_q());
    assert_eq!(tokyo::run(options).expect("runs").output, demo.output);
}

/// `--tokens` takes the learner's own words too (the notebook's exercise): one
/// token per word, embeddings from the same seeded generator as a count of words;
/// a blank sentence is an error.
#[test]
fn tokyo_takes_your_own_words() {
    let args = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let (options, _) = tokyo::Options::parse(args(&["--tokens", "I love transformers so much"]))
        .expect("a sentence");
    assert_eq!(options.tokens, ["I", "love", "transformers", "so", "much"]);
    let own = tokyo::run(options).expect("runs");
    let (counted, _) = tokyo::Options::parse(args(&["--tokens", "5"])).expect("a count");
    let counted = tokyo::run(counted).expect("runs");
    assert_eq!(own.tokens.len(), 5);
    // the same seed and sizes: the same numbers, other labels
    assert_eq!(own.x, counted.x);
    assert_eq!(own.output, counted.output);
    assert_ne!(own.tokens, counted.tokens);
    assert!(tokyo::Options::parse(args(&["--tokens", "  "])).is_err());
}

#[allow(dead_code)]
#[path = "../examples/four_words.rs"]
mod four_words;

#[test]
fn four_words_matches_the_script() {
    let file = golden("four_words.json");
    let demo = four_words::four_words().expect("the demo runs");
    assert_eq!(demo.words, array2(&file["words"]));
    assert_eq!(demo.projection.w_q(), &array2(&file["w_q"]));
    assert_eq!(demo.projection.w_k(), &array2(&file["w_k"]));
    assert_eq!(demo.projection.w_v(), &array2(&file["w_v"]));
    assert_eq!(demo.q, array2(&file["q"]));
    assert_eq!(demo.k, array2(&file["k"]));
    assert_eq!(demo.v, array2(&file["v"]));
    assert_eq!(demo.scores, array2(&file["scores"]));
    for (name, got, key) in [
        (
            "whole-matrix probs",
            &demo.probs_whole_matrix,
            "probs_whole_matrix",
        ),
        (
            "whole-matrix attention",
            &demo.attention_whole_matrix,
            "attention_whole_matrix",
        ),
        ("row-wise probs", &demo.probs_rows, "probs_rows"),
        ("row-wise attention", &demo.attention_rows, "attention_rows"),
    ] {
        assert_digits(name, got, &array2(&file[key]), 12);
    }
}

#[allow(dead_code)]
#[path = "../examples/feature_map.rs"]
mod feature_map;

#[test]
fn feature_map_mixes_pixels_as_the_formula_says() {
    let (x, out) = feature_map::feature_map().expect("the demo runs");
    // o = X·Aᵀ with X = (C, N) and A = softmax(XᵀX), computed here directly
    let flat = x.to_shape((2, 4)).expect("2×2×2").to_owned();
    let s = flat.t().dot(&flat);
    let a = attn::softmax_rows(&s);
    assert!((&a - &out.weights).iter().all(|d| d.abs() < 1e-15));
    let o = flat.dot(&a.t());
    let got = out.output.to_shape((2, 4)).expect("2×2×2").to_owned();
    assert!((&o - &got).iter().all(|d| d.abs() < 1e-15));
    assert_eq!(feature_map::PIXELS.len(), 4);
}

#[allow(dead_code)]
#[path = "../examples/cross_vit.rs"]
mod cross_vit;

#[test]
fn cross_vit_exchange_has_the_papers_shapes() {
    let exchange = cross_vit::cls_exchange().expect("the demo runs");
    let shapes: Vec<Vec<usize>> = exchange.steps.iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(
        shapes,
        vec![
            vec![145, 64],
            vec![37, 128],
            vec![1, 64],
            vec![145, 64],
            vec![1, 64],
            vec![4, 1, 145],
            vec![1, 128]
        ]
    );
    assert!(exchange.new_cls.iter().all(|x| x.is_finite()));
    // the picture's grids: each head's 144 patch weights, plus its weight on itself, sum to 1
    for h in 0..4 {
        let grid = exchange.patch_grid(h);
        assert_eq!(grid.dim(), (12, 12));
        assert_eq!(grid[[1, 0]], exchange.weights[[h, 0, 1 + 12]]);
        let total = grid.sum() + exchange.weights[[h, 0, 0]];
        assert!((total - 1.0).abs() < 1e-5, "{total}");
    }
}

#[allow(dead_code)]
#[path = "../examples/csv_attention.rs"]
mod csv_attention;

#[test]
fn csv_attention_runs_the_seeds_pipeline_on_the_sample_files() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let results = csv_attention::csv_attention(&data).expect("the sample files are valid");
    assert_eq!(results.len(), 3);
    for result in &results {
        assert_eq!(result.attention.dim(), (30, 9));
        assert_eq!(result.classes.iter().filter(|c| *c == "NORMAL").count(), 10);
        assert_eq!(result.classes[10], "ERROR(A)");
        assert_eq!(result.classes[29], "ERROR(B)");
        // the picture's rows: each class's mean, NORMAL's signature all zeros
        let means = result.class_means();
        let by_hand = result
            .attention
            .slice(ndarray::s![10..20, ..])
            .mean_axis(ndarray::Axis(0));
        assert_eq!(means.row(1).to_owned(), by_hand.expect("ten rows"));
        let normal = means.row(0).to_vec();
        assert_eq!(csv_attention::signature(&normal, &normal), "000000000");
        assert_eq!(
            csv_attention::signature(&[1.0, 0.0, 0.5], &[0.5, 0.5, 0.5]),
            "+-0"
        );
        for &v in &result.attention {
            assert!(
                ((v * 1e5).round() - v * 1e5).abs() < 1e-6,
                "{v} is rounded to 5 decimals"
            );
        }
    }
}

fn malformed(name: &str, text: &str) -> String {
    let dir = std::env::temp_dir().join("attn-csv-tests");
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("a temp file");
    match csv_attention::read_table(&path) {
        Ok(_) => panic!("{name} should be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_csv_errors_name_file_line_and_column() {
    let e = malformed(
        "ragged.csv",
        "class,X0,X1,X2,X3\nNORMAL,1,2,3,4\nNORMAL,1,2,3\n",
    );
    assert!(
        e.contains("ragged.csv")
            && e.contains("line 3")
            && e.contains("4 fields where the header has 5"),
        "{e}"
    );
    let e = malformed(
        "word.csv",
        "class,X0,X1,X2,X3\nNORMAL,1,2,3,4\nNORMAL,1,two,3,4\n",
    );
    assert!(
        e.contains("word.csv, line 3, column 3") && e.contains("\"two\" is not a number"),
        "{e}"
    );
    let e = malformed("columns.csv", "class,X0,X1,X3\nNORMAL,1,2,3\n");
    assert!(
        e.contains("columns.csv, line 1") && e.contains("no column X2"),
        "{e}"
    );
    let e = malformed("nan.csv", "class,X0,X1,X2,X3\nNORMAL,1,2,NaN,4\n");
    assert!(
        e.contains("column 4") && e.contains("not a finite number"),
        "{e}"
    );
    let missing = csv_attention::read_table(std::path::Path::new("/nonexistent/attn.csv"));
    assert!(missing.is_err_and(|e| e.to_string().contains("/nonexistent/attn.csv")));
}

/// The decode demo: each step's weights are a distribution over exactly the cached
/// positions, weights·V is the step's output, and prompt + steps equal causal
/// attention over the whole sequence.
#[test]
fn decode_steps_match_causal_attention_and_their_weights() {
    use ndarray::s;
    let run = decode::decode().expect("the demo runs");
    assert_eq!(run.cache.len(), decode::TOKENS.len());
    assert_eq!(run.steps.len(), decode::TOKENS.len() - decode::PROMPT);
    let values = run.cache.values();
    for (n, step) in run.steps.iter().enumerate() {
        let seen = decode::PROMPT + n + 1;
        assert_eq!(step.weights.dim(), (decode::HEADS, seen));
        for (h, row) in step.weights.outer_iter().enumerate() {
            assert!((row.sum() - 1.0).abs() < 1e-6 && row.iter().all(|&w| w > 0.0));
            let by_hand = row.dot(&values.slice(s![0, h, ..seen, ..]));
            let output = step.output.slice(s![0, h, 0, ..]);
            assert!(
                (&by_hand - &output).iter().all(|d: &f32| d.abs() < 1e-6),
                "step {n} head {h}"
            );
        }
        let full = run.recomputed.slice(s![.., .., seen - 1..seen, ..]);
        assert!(
            (&step.output - &full).iter().all(|d| d.abs() < 1e-6),
            "step {n}"
        );
    }
    let prompt = run.recomputed.slice(s![.., .., ..decode::PROMPT, ..]);
    assert!((&run.prompt - &prompt).iter().all(|d| d.abs() < 1e-6));
}

#[allow(dead_code)]
#[path = "../examples/learn_attention.rs"]
mod learn_attention;

/// The training demo learns: its loss falls by more than 10× and attention goes
/// from uniform to sharp on the pair that holds the answer.
#[test]
fn learn_attention_learns_associative_recall() {
    let run = learn_attention::train(300, 7).expect("valid shapes");
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&run.losses[..10]), mean(&run.losses[290..]));
    assert!(first > 10.0 * last, "loss {first} → {last}");
    let before = learn_attention::mean_weight_on_answer(&run.before, &run.eval);
    let after = learn_attention::mean_weight_on_answer(&run.after, &run.eval);
    assert!(
        (before - 1.0 / 6.0).abs() < 0.01,
        "before training: {before}"
    );
    assert!(after > 0.9, "after training: {after}");
    // every evaluation row is a distribution over the six pairs
    for row in run.after.weights.rows() {
        assert!((row.sum() - 1.0).abs() < 1e-12);
    }
}

#[cfg(feature = "load")]
#[allow(dead_code)]
#[path = "../examples/llama_attention.rs"]
mod llama_attention;

/// The real-model demo: the checkpoint's block decodes a left-padded batch
/// exactly as transformers recorded it.
#[cfg(feature = "load")]
#[test]
fn llama_attention_decodes_as_transformers_recorded() {
    let run = llama_attention::run().expect("the demo runs");
    let (input, output, replay) = run.gaps.expect("the recording is in tests/golden/hf");
    assert!(
        replay < 1e-12,
        "the block from the recorded input: {replay:e}"
    );
    // the demo's own f32 RMSNorm differs from PyTorch's in the last bit
    assert!(input < 1e-6 && output < 1e-5, "{input:e}, {output:e}");
    assert_eq!(run.positions, vec![9, 7]);
    assert_eq!(run.weight_on_padding, 0.0);
    // the prompt's last token, then each decoded token of the padded row (two in
    // the second step), titled by its position, which its key label repeats
    assert_eq!(run.panels.len(), 5);
    let titles: Vec<&str> = run.panels.iter().map(|p| p.title()).collect();
    assert_eq!(titles[2], "row 1, step 2: token 28 at position 4");
    assert_eq!(titles[3], "row 1, step 2: token 28 at position 5");
    let last = &run.panels[4];
    assert!(last.title().ends_with("at position 6"), "{}", last.title());
    assert_eq!(last.values().ncols(), 9);
}

/// The examples' shared helpers, as each example has them.
#[path = "../examples/common/mod.rs"]
mod example_common;

/// Every example, as `cargo run --example` names it.
const EXAMPLES: [&str; 8] = [
    "tokyo",
    "four_words",
    "feature_map",
    "decode",
    "cross_vit",
    "csv_attention",
    "learn_attention",
    "llama_attention",
];

/// The example binary `name` as `cargo test` builds it, beside this test binary
/// (`target/<profile>/examples/`); `None` when only the tests were built
/// (`cargo test --test integration`).
fn example_binary(name: &str) -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe
        .parent()?
        .parent()?
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "{} is not built: run `cargo test` (it builds the examples)",
            path.display()
        );
        None
    }
}

/// Every example answers `--help` with its usage (its doc comment, which names
/// the command) and refuses a flag it does not take, with exit code 2.
#[test]
fn every_example_answers_help_and_refuses_unknown_flags() {
    for name in EXAMPLES {
        let Some(binary) = example_binary(name) else {
            continue;
        };
        for help in ["--help", "-h"] {
            let out = std::process::Command::new(&binary)
                .arg(help)
                .output()
                .expect("runs");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{name} {help}: {:?}", out.status);
            assert!(
                text.contains(&format!("cargo run --release --example {name}")),
                "{name} {help}: {text}"
            );
            assert!(!text.contains("//!"), "{name} {help}: {text}");
        }
        let out = std::process::Command::new(&binary)
            .arg("--frobnicate")
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} --frobnicate");
        assert!(
            text.contains("unknown flag --frobnicate") && text.contains("--help"),
            "{name}: {text}"
        );
    }
}

/// Run as a reader runs it, its output piped (not a terminal): tokyo prints its
/// tables as plain text, takes the learner's words, and puts its pictures under
/// `$CARGO_TARGET_DIR/attn-plots` when that is set.
#[test]
fn tokyo_prints_plain_tables_and_draws_into_the_target_dir() {
    let Some(binary) = example_binary("tokyo") else {
        return;
    };
    let target = std::env::temp_dir().join(format!("attn-target-{}", std::process::id()));
    let out = std::process::Command::new(&binary)
        .args(["--tokens", "I love transformers"])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains('\u{1b}'),
        "no colour codes in a pipe: {text}"
    );
    assert!(
        text.contains("transformers") && text.contains("attention weights"),
        "{text}"
    );
    let svg = target.join("attn-plots").join("tokyo.svg");
    assert!(text.contains(&format!("wrote {}", svg.display())), "{text}");
    assert!(svg.exists());
    let _ = std::fs::remove_dir_all(&target);
}

/// A heatmap shown once (cross_vit's per-head weights) is a coloured map on a
/// terminal and a plain table anywhere else; one shown in colour beside its
/// table stays off a pipe.
#[test]
fn heatmaps_print_as_plain_tables_off_a_terminal() {
    let map = attn::plot::Heatmap::new("w", &ndarray::array![[0.25_f64, 0.75]]);
    assert_eq!(example_common::once(&map, false), map.to_table());
    assert_eq!(example_common::once(&map, true), map.to_terminal());
    assert_ne!(map.to_table(), map.to_terminal());
    assert!(example_common::usage("//! one\n//! two\nfn main() {}").ends_with("one\ntwo"));
}

#[path = "../examples/packed_documents.rs"]
mod packed_documents;

#[test]
fn packed_documents_equal_each_document_alone() {
    let demo = packed_documents::packed().unwrap();
    assert!(packed_documents::max_diff(&demo.packed, &demo.alone) < 1e-6);
    assert!(packed_documents::max_diff(&demo.alibi_written, &demo.alibi_built_in) < 1e-6);
    // rows of weights sum to 1 within their own sentence
    for (i, row) in demo.weights.rows().into_iter().enumerate() {
        assert!((row.sum() - 1.0).abs() < 1e-6, "row {i}");
    }
    let [empty, partial, full] = demo.long.counts();
    assert_eq!(empty + partial + full, 256 * 64);
    assert!(empty > 10 * (partial + full), "{empty} {partial} {full}");
}

#[test]
fn csv_tables_that_cannot_be_normalised_or_overflow_are_errors() {
    use std::path::Path;
    let table = |text: &str| {
        csv_attention::parse_table(Path::new("t.csv"), text.as_bytes()).expect("a valid table")
    };
    let plain = "class,X0,X1,X2,X3\nA,0,1,2,3\nB,1,2,3,4\n";
    let plains = || [table(plain), table(plain), table(plain)];
    let learning = |first: &str| [table(first), table(plain), table(plain)];
    let error = |learn, valid| match csv_attention::attend_tables(learn, valid) {
        Ok(results) => panic!("refused, not {:?}", results[0].attention),
        Err(e) => e.to_string(),
    };
    let wide = "class,X0,X1,X2,X3\nA,-1e308,1e308,0,1\n";
    let e = error(learning(wide), plains());
    assert!(
        e.contains("learn_btY1.csv") && e.contains("too far apart"),
        "{e}"
    );
    let e = error(learning("class,X0,X1,X2,X3\n"), plains());
    assert!(e.contains("learn_btY1.csv has no rows"), "{e}");
    let e = error(learning("class,X0,X1,X2,X3\nA,5,5,5,5\n"), plains());
    assert!(e.contains("every value is 5"), "{e}");
    let far = "class,X0,X1,X2,X3\nA,0,1,2,3\nB,1e306,2,3,4\n";
    let e = error(plains(), [table(plain), table(far), table(plain)]);
    assert!(
        e.contains("valid_snY2.csv, row 2") && e.contains("overflows"),
        "{e}"
    );
    // the plain tables themselves go through
    assert!(csv_attention::attend_tables(plains(), plains()).is_ok());
}
