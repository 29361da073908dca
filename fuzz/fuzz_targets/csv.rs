//! Fuzzes the CSV tables of the `csv_attention` example: six files from raw
//! bytes (separated by `0xFF`, a byte no UTF-8 text holds), each parsed, then
//! the whole pipeline on them. Every call must return `Ok` or `Err`, never
//! panic, and:
//! - a table read has one class per row, four features per row, all finite;
//! - a table written back as CSV reads back to the same classes and bits;
//! - the pipeline's attention, where it answers, is finite.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../examples/csv_attention.rs"]
mod csv_attention;
use csv_attention::{attend_tables, parse_table, Table};

/// The table as CSV: `class,X0..X3`, each number in its shortest exact form.
fn written(table: &Table) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .write_record(["class", "X0", "X1", "X2", "X3"])
        .expect("into memory");
    for (class, row) in table.classes.iter().zip(table.features.rows()) {
        let fields = std::iter::once(class.clone()).chain(row.iter().map(|v| format!("{v:?}")));
        writer.write_record(fields).expect("into memory");
    }
    writer.into_inner().expect("into memory")
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.csv");
    let mut parts = data.split(|&b| b == 0xff);
    let mut tables = Vec::new();
    for _ in 0..6 {
        let text = parts.next().unwrap_or_default();
        let table = match parse_table(path, text) {
            Ok(table) => table,
            Err(e) => {
                assert!(e.to_string().starts_with("fuzz.csv"), "{e}");
                return;
            }
        };
        assert_eq!(table.features.dim(), (table.classes.len(), 4));
        assert!(table.features.iter().all(|v| v.is_finite()));
        let again = parse_table(path, &written(&table)[..]).expect("a table written reads");
        assert_eq!(again.classes, table.classes);
        let bits = |t: &Table| t.features.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&again), bits(&table));
        tables.push(table);
    }
    let valid: Vec<Table> = tables.split_off(3);
    let (Ok(learn), Ok(valid)) = (
        <[Table; 3]>::try_from(tables),
        <[Table; 3]>::try_from(valid),
    ) else {
        unreachable!("six tables")
    };
    match attend_tables(learn, valid) {
        Ok(results) => {
            for result in &results {
                assert!(
                    result.attention.iter().all(|v| v.is_finite()),
                    "{}: {:?}",
                    result.name,
                    result.attention
                );
                let _ = result.class_means();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
