//! Attention whose data and weight matrices come from CSV files. The
//! learning data are min–max normalised (×2), thresholded and used as the weights
//! (`W_Q = value_dataᵀ`, `W_K = query_dataᵀ`, `W_V = key_dataᵀ`); each validation
//! file (10 NORMAL, 10 ERROR(A), 10 ERROR(B) rows) goes through attention, and the
//! result is written as CSV, rounded to 5 decimals, with each row's class.
//!
//! What the output means: each row of `attention_*.csv` is one validation sample:
//! `class` is its label, and `A0`…`A8` are the nine values of its attention output
//! (nine, because `W_V` is a learning file transposed and each learning file has nine
//! rows). The printed summary gives each class's mean row, and its *signature*: for
//! each column, `+` where the class's mean is above NORMAL's, `-` where below, `0`
//! within 0.001. Classes with different signatures are told apart by the signs of
//! their blocks, as the original spreadsheet does. The picture draws the three class
//! means of each file on one colour scale (`csv_attention.svg`/`.png`).
//!
//! `cargo run --release --example csv_attention [OUTPUT_DIR]`

mod common;

use std::fmt;
use std::path::{Path, PathBuf};

use attn::plot::{Figure, Heatmap};
use attn::{QkvProjection, ScaledDotProduct};
use ndarray::{Array2, Axis};

/// The classes of the validation files, in their order.
pub const CLASSES: [&str; 3] = ["NORMAL", "ERROR(A)", "ERROR(B)"];

/// The feature columns every file must have.
const FEATURES: [&str; 4] = ["X0", "X1", "X2", "X3"];

/// A CSV file that cannot be used, with where and why.
#[derive(Debug)]
pub struct CsvError {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub column: Option<usize>,
    pub reason: String,
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if let Some(column) = self.column {
            write!(f, ", column {column}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for CsvError {}

/// A table read from CSV: each row's class and its features `X0..X3`.
pub struct Table {
    pub classes: Vec<String>,
    pub features: Array2<f64>,
}

/// Reads `class,X0..X3` from the file at `path` (see [`parse_table`]).
pub fn read_table(path: &Path) -> Result<Table, CsvError> {
    let file = std::fs::File::open(path).map_err(|e| CsvError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        reason: e.to_string(),
    })?;
    parse_table(path, file)
}

/// Parses `class,X0..X3` (in any column order, other columns ignored) from
/// `text`; `path` names the file in the errors. Every feature must be a finite
/// number.
pub fn parse_table(path: &Path, text: impl std::io::Read) -> Result<Table, CsvError> {
    let error = |line, column, reason: String| CsvError {
        file: path.to_path_buf(),
        line,
        column,
        reason,
    };
    let mut reader = csv::Reader::from_reader(text);
    let headers = reader
        .headers()
        .map_err(|e| error(Some(1), None, e.to_string()))?
        .clone();
    let find = |name: &str| headers.iter().position(|h| h.trim() == name);
    let class_column = find("class");
    let mut columns = Vec::new();
    for name in FEATURES {
        let at = find(name).ok_or_else(|| {
            error(
                Some(1),
                None,
                format!("no column {name} in the header {headers:?}"),
            )
        })?;
        columns.push(at);
    }
    let (mut classes, mut values) = (Vec::new(), Vec::new());
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line());
            let reason = match e.kind() {
                csv::ErrorKind::UnequalLengths {
                    expected_len, len, ..
                } => {
                    format!("{len} fields where the header has {expected_len}")
                }
                _ => e.to_string(),
            };
            error(line, None, reason)
        })?;
        let line = record.position().map(|p| p.line());
        for &at in &columns {
            let field = record.get(at).unwrap_or("").trim();
            let value: f64 = field
                .parse()
                .map_err(|_| error(line, Some(at + 1), format!("{field:?} is not a number")))?;
            if !value.is_finite() {
                return Err(error(
                    line,
                    Some(at + 1),
                    format!("{field:?} is not a finite number"),
                ));
            }
            values.push(value);
        }
        classes.push(
            class_column
                .and_then(|c| record.get(c))
                .unwrap_or("")
                .to_string(),
        );
    }
    let features = Array2::from_shape_vec((classes.len(), FEATURES.len()), values)
        .map_err(|e| error(None, None, e.to_string()))?;
    Ok(Table { classes, features })
}

/// `(x − min) / (max − min) · 2` with the learning file's min and max.
fn normalise(x: &Array2<f64>, (min, max): (f64, f64)) -> Array2<f64> {
    x.mapv(|v| (v - min) / (max - min) * 2.0)
}

fn range(x: &Array2<f64>) -> (f64, f64) {
    x.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    })
}

/// One validation file through attention.
pub struct Attended {
    pub name: &'static str,
    pub classes: Vec<String>,
    /// 30 × 9, rounded to 5 decimals.
    pub attention: Array2<f64>,
}

/// The three pairs of files, by name: `learn_NAME.csv` and `valid_NAME.csv`.
const FILES: [&str; 3] = ["btY1", "snY2", "gmY3"];

/// Runs the whole pipeline on the files in `data`.
pub fn csv_attention(data: &Path) -> Result<Vec<Attended>, Box<dyn std::error::Error>> {
    let read = |kind: &str| -> Result<[Table; 3], CsvError> {
        let [a, b, c] = FILES.map(|name| read_table(&data.join(format!("{kind}_{name}.csv"))));
        Ok([a?, b?, c?])
    };
    attend_tables(read("learn")?, read("valid")?)
}

/// The pipeline on tables already read: `learn` and `valid` in the order of
/// the files (the query, key and value learning files, then the validation file
/// of each).
pub fn attend_tables(
    learn: [Table; 3],
    valid: [Table; 3],
) -> Result<Vec<Attended>, Box<dyn std::error::Error>> {
    let mut learned = Vec::new();
    let mut ranges = Vec::new();
    for (name, table) in FILES.into_iter().zip(&learn) {
        if table.features.is_empty() {
            return Err(format!("learn_{name}.csv has no rows, nothing to learn").into());
        }
        let range = range(&table.features);
        let spread = range.1 - range.0;
        if spread == 0.0 {
            return Err(format!(
                "learn_{name}.csv: every value is {}, nothing to normalise",
                range.0
            )
            .into());
        }
        if !spread.is_finite() {
            return Err(format!(
                "learn_{name}.csv: the values run from {} to {}, too far apart to normalise",
                range.0, range.1
            )
            .into());
        }
        // the threshold for learning data: below 0.5 → 0, else squared
        let w = normalise(&table.features, range).mapv(|v| if v < 0.5 { 0.0 } else { v * v });
        learned.push(w);
        ranges.push(range);
    }
    let [query, key, value] = [&learned[0], &learned[1], &learned[2]];
    let projection = QkvProjection::new(
        value.t().to_owned(),
        query.t().to_owned(),
        key.t().to_owned(),
    )?;
    let mut results = Vec::new();
    for ((name, table), range) in FILES.into_iter().zip(valid).zip(ranges) {
        // the threshold for validation data: below 0.3 → 0
        let words = normalise(&table.features, range).mapv(|v| if v < 0.3 { 0.0 } else { v });
        let attention = projection.self_attention(&words, &ScaledDotProduct::new())?;
        // attention propagates an overflow (as PyTorch does): values far outside
        // the learning file's range overflow the normalised scores
        if let Some(row) = attention
            .rows()
            .into_iter()
            .position(|r| r.iter().any(|v| !v.is_finite()))
        {
            return Err(format!(
                "valid_{name}.csv, row {}: its values lie too far outside learn_{name}.csv's \
                 range {} to {}, and its attention overflows",
                row + 1,
                range.0,
                range.1
            )
            .into());
        }
        results.push(Attended {
            name,
            classes: table.classes,
            attention: attention.mapv(|v| (v * 1e5).round() / 1e5),
        });
    }
    Ok(results)
}

impl Attended {
    /// Each class's mean row, in the order of [`CLASSES`] (`3 × 9`).
    pub fn class_means(&self) -> Array2<f64> {
        let mut means = Array2::zeros((CLASSES.len(), self.attention.ncols()));
        for (mut row, class) in means.rows_mut().into_iter().zip(CLASSES) {
            let members: Vec<usize> = (0..self.classes.len())
                .filter(|&i| self.classes[i] == class)
                .collect();
            if let Some(mean) = self.attention.select(Axis(0), &members).mean_axis(Axis(0)) {
                row.assign(&mean);
            }
        }
        means
    }
}

/// Per column, `+` where `mean` is above `normal`, `-` where below, `0` within 0.001.
pub fn signature(mean: &[f64], normal: &[f64]) -> String {
    mean.iter()
        .zip(normal)
        .map(|(m, n)| match m - n {
            d if d > 1e-3 => '+',
            d if d < -1e-3 => '-',
            _ => '0',
        })
        .collect()
}

/// Writes `class,A0..A8` rows.
fn write_csv(path: &Path, result: &Attended) -> Result<(), Box<dyn std::error::Error>> {
    let mut writer = csv::Writer::from_path(path)?;
    let header: Vec<String> = std::iter::once("class".to_string())
        .chain((0..result.attention.ncols()).map(|j| format!("A{j}")))
        .collect();
    writer.write_record(&header)?;
    for (class, row) in result.classes.iter().zip(result.attention.rows()) {
        let fields = std::iter::once(class.clone()).chain(row.iter().map(|v| format!("{v:.5}")));
        writer.write_record(fields)?;
    }
    writer.flush()?;
    Ok(())
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::help(include_str!("csv_attention.rs"), &[]);
    let data = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("data");
    let results = match csv_attention(&data) {
        Ok(results) => results,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let out = common::output_dir();
    println!(
        "btY1, snY2 and gmY3 are the seed's three data sets, as its file names call them \
         (examples/data/learn_NAME.csv gives the weights, valid_NAME.csv the 30 inputs; \
         examples/data/README.md): one block of output per data set\n"
    );
    for result in &results {
        let path = out.join(format!("attention_{}.csv", result.name));
        write_csv(&path, result)?;
        println!(
            "---- {} ({} rows × {} values) → {}",
            result.name,
            result.attention.nrows(),
            result.attention.ncols(),
            path.display()
        );
        // each class's mean row, and the signs of its difference from NORMAL's
        let means = result.class_means();
        let normal = means.row(0).to_vec();
        for (class, mean) in CLASSES.iter().zip(means.rows()) {
            let shown: Vec<String> = mean.iter().map(|m| format!("{m:8.4}")).collect();
            let signs = signature(&mean.to_vec(), &normal);
            println!("{class:>9} mean {}   vs NORMAL {signs}", shown.join(""));
        }
    }
    println!(
        "\nA0..A8: the nine values of each sample's attention output; the signature marks, per\n\
         column, a class mean above (+), below (-) or within 0.001 (0) of NORMAL's."
    );
    // the three class means of every file, on one colour scale
    let all: Vec<Array2<f64>> = results.iter().map(Attended::class_means).collect();
    let (low, high) = all
        .iter()
        .flatten()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let panels: Vec<Heatmap> = results
        .iter()
        .zip(&all)
        .map(|(result, means)| {
            Heatmap::new(&format!("{}: mean attention per class", result.name), means)
                .with_row_labels(CLASSES)
                .with_col_labels((0..means.ncols()).map(|j| format!("A{j}")))
                .with_decimals(2)
                .with_range(low, high)
        })
        .collect();
    common::save(&Figure::new(panels), "csv_attention");
    Ok(())
}
