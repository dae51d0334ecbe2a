//! The per-epoch CSV log and the progress bar.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::path::Path;

use alexnet_cuda::Error;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The CSV header; a log that already has rows is appended to (a resumed run continues it).
pub const CSV_HEADER: &str =
    "epoch,step,train_loss,val_top1_error,val_top5_error,learning_rate,images_per_second";

/// One epoch's figures.
pub struct EpochRow {
    pub epoch: u64,
    pub step: u64,
    pub train_loss: f64,
    pub val_top1_error: Option<f64>,
    pub val_top5_error: Option<f64>,
    pub learning_rate: f32,
    pub images_per_second: f64,
}

impl EpochRow {
    fn csv(&self) -> String {
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        format!(
            "{},{},{:.6},{},{},{},{:.2}",
            self.epoch,
            self.step,
            self.train_loss,
            opt(self.val_top1_error),
            opt(self.val_top5_error),
            rate(self.learning_rate),
            self.images_per_second
        )
    }
}

/// A learning rate as people write it: f32's division by 10 leaves 9.999999e-6 where 1e-5 was
/// meant, so six significant digits, then the shortest form of that (`0.00001`, not
/// `0.000009999999`).
pub fn rate(learning_rate: f32) -> String {
    let rounded: f64 = format!("{learning_rate:.5e}")
        .parse()
        .unwrap_or(learning_rate as f64);
    rounded.to_string()
}

/// Appends `row` to the CSV at `path`, writing the header first into an empty or new file.
pub fn append_row(path: &Path, row: &EpochRow) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let empty = file.metadata().map_err(|e| Error::io(path, e))?.len() == 0;
    let mut text = String::new();
    if empty {
        text.push_str(CSV_HEADER);
        text.push('\n');
    }
    text.push_str(&row.csv());
    text.push('\n');
    file.write_all(text.as_bytes())
        .and_then(|()| file.flush())
        .map_err(|e| Error::io(path, e))
}

/// A progress bar over the run's steps on stderr, hidden when stderr is not a terminal.
pub fn progress_bar(total: u64, done: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] step {pos}/{len} {elapsed_precise} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_position(done);
    bar
}

#[cfg(test)]
mod tests {
    use super::rate;

    #[test]
    fn learning_rates_print_as_people_write_them() {
        let mut lr = 0.01f32;
        let mut shown = vec![rate(lr)];
        for _ in 0..4 {
            lr /= 10.0;
            shown.push(rate(lr));
        }
        assert_eq!(shown, ["0.01", "0.001", "0.0001", "0.00001", "0.000001"]);
        assert_eq!(rate(0.0125), "0.0125");
        assert_eq!(rate(3e-9), "0.000000003");
    }
}
