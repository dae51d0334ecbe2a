//! The training curves as a PNG and an SVG beside the CSV log: the training loss above, the
//! validation errors below, one point per epoch, redrawn from the whole log after every epoch
//! (so a resumed run's picture holds the run from its start).

use std::path::{Path, PathBuf};

use alexnet_cuda::Error;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// The extensions of the pictures drawn beside a log.
pub const PICTURES: [&str; 2] = ["png", "svg"];

/// One parsed row of the CSV log.
struct Point {
    epoch: f64,
    train_loss: f64,
    top1: Option<f64>,
    top5: Option<f64>,
}

/// Where the pictures of the log at `log` go: the same name with `.png` and `.svg`.
pub fn plot_paths(log: &Path) -> [PathBuf; 2] {
    PICTURES.map(|extension| log.with_extension(extension))
}

/// Redraws the pictures of the CSV log at `log` (the paths of [`plot_paths`]).
pub fn plot_log(log: &Path) -> Result<(), Error> {
    let text = std::fs::read_to_string(log).map_err(|e| Error::io(log, e))?;
    let points: Vec<Point> = text.lines().skip(1).filter_map(parse_row).collect();
    if points.is_empty() {
        return Ok(());
    }
    let [png, svg] = plot_paths(log);
    let failed = |out: &Path| {
        let out = out.to_path_buf();
        move |e: Box<dyn std::error::Error>| Error::io(&out, std::io::Error::other(e.to_string()))
    };
    // Text is measured (and, in the PNG, drawn) with this font whatever the backend.
    register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| failed(&png)("the embedded font did not parse".into()))?;
    draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), &points).map_err(failed(&png))?;
    draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), &points).map_err(failed(&svg))
}

/// The pictures' size in pixels.
const SIZE: (u32, u32) = (800, 600);

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

fn draw<B: DrawingBackend>(
    root: DrawingArea<B, Shift>,
    points: &[Point],
) -> Result<(), Box<dyn std::error::Error>>
where
    B::ErrorType: 'static,
{
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
    let losses: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| Some((p.epoch, finite(p.train_loss)?)))
        .collect();
    loss.draw_series(LineSeries::new(losses.clone(), &BLUE))?;
    // A dot per epoch too: a line needs two epochs, and the first epoch's picture should
    // show something.
    loss.draw_series(losses.into_iter().map(|p| Circle::new(p, 3, BLUE.filled())))?;

    let mut errors = ChartBuilder::on(&lower)
        .caption("validation error (%)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..last_epoch, 0.0..100.0)?;
    errors.configure_mesh().x_desc("epoch").draw()?;
    let mut drawn = 0;
    for (series, colour, label) in [(0, &RED, "top-1"), (1, &GREEN, "top-5")] {
        let line: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|p| {
                let value = if series == 0 { p.top1 } else { p.top5 };
                Some((p.epoch, 100.0 * value?))
            })
            .collect();
        if line.is_empty() {
            continue; // (no validation, or no top-5 with five classes or fewer): no legend
        }
        drawn += 1;
        errors.draw_series(line.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
        errors
            .draw_series(LineSeries::new(line, colour))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    if drawn > 0 {
        errors
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
