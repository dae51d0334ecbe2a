//! The training curves as an SVG beside the CSV log: the training loss above, the validation
//! errors below, one point per epoch, redrawn from the whole log after every epoch (so a
//! resumed run's picture holds the run from its start).

use std::path::{Path, PathBuf};

use alexnet_cuda::Error;
use plotters::prelude::*;

/// One parsed row of the CSV log.
struct Point {
    epoch: f64,
    train_loss: f64,
    top1: Option<f64>,
    top5: Option<f64>,
}

/// Where the plot of the log at `log` goes: the same name with `.svg`.
pub fn plot_path(log: &Path) -> PathBuf {
    log.with_extension("svg")
}

/// Redraws the plot of the CSV log at `log` into `out`.
pub fn plot_log(log: &Path, out: &Path) -> Result<(), Error> {
    let text = std::fs::read_to_string(log).map_err(|e| Error::io(log, e))?;
    let points: Vec<Point> = text.lines().skip(1).filter_map(parse_row).collect();
    if points.is_empty() {
        return Ok(());
    }
    draw(&points, out).map_err(|e| Error::io(out, std::io::Error::other(e.to_string())))
}

fn parse_row(line: &str) -> Option<Point> {
    let fields: Vec<&str> = line.split(',').collect();
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    Some(Point {
        epoch: number(0)?,
        train_loss: number(2)?,
        top1: number(3),
        top5: number(4),
    })
}

fn draw(points: &[Point], out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(out, (800, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(300);
    let last_epoch = points.iter().map(|p| p.epoch).fold(1.0, f64::max);
    let finite = |v: f64| v.is_finite().then_some(v);
    let max_loss = points
        .iter()
        .filter_map(|p| finite(p.train_loss))
        .fold(0.0, f64::max)
        .max(1e-3);

    let mut loss = ChartBuilder::on(&upper)
        .caption("training loss", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..last_epoch, 0.0..max_loss * 1.05)?;
    loss.configure_mesh().x_desc("epoch").draw()?;
    loss.draw_series(LineSeries::new(
        points
            .iter()
            .filter_map(|p| Some((p.epoch, finite(p.train_loss)?))),
        &BLUE,
    ))?;

    let mut errors = ChartBuilder::on(&lower)
        .caption("validation error (%)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..last_epoch, 0.0..100.0)?;
    errors.configure_mesh().x_desc("epoch").draw()?;
    for (series, colour, label) in [(0, &RED, "top-1"), (1, &GREEN, "top-5")] {
        let line = points.iter().filter_map(|p| {
            let value = if series == 0 { p.top1 } else { p.top5 };
            Some((p.epoch, 100.0 * value?))
        });
        errors
            .draw_series(LineSeries::new(line, colour))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    errors
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
