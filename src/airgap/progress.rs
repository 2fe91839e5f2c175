//! Prefetch progress for a terminal: one bar per image and one for the bytes of all of them
//! (indicatif). When stderr is not a terminal the bars are hidden, and each finished image is
//! still reported on a plain line, so logs of scripted runs say what happened.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::prefetch::{ImageOutcome, Progress};
use crate::oci::ImageRef;

pub struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    images: Vec<ProgressBar>,
    /// Bytes announced so far: the total bar grows as images learn their sizes.
    announced: Mutex<u64>,
}

impl Bars {
    pub fn new(images: &[ImageRef]) -> Bars {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let style = ProgressStyle::with_template(
            "{prefix:30!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        let total = multi.add(ProgressBar::new(0).with_style(style.clone()));
        total.set_prefix("total");
        let images = images
            .iter()
            .map(|image| {
                let bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
                bar.set_prefix(image.to_string());
                bar.set_message("resolving");
                bar
            })
            .collect();
        Bars {
            multi,
            total,
            images,
            announced: Mutex::new(0),
        }
    }

    /// Close the total bar (the summary follows it).
    pub fn finish(&self) {
        self.total.finish();
    }
}

impl Progress for Bars {
    fn sized(&self, image: usize, bytes: u64) {
        let bar = &self.images[image];
        bar.set_length(bytes);
        bar.set_message("");
        let mut announced = self.announced.lock().expect("progress lock");
        *announced += bytes;
        self.total.set_length(*announced);
    }

    fn advanced(&self, image: usize, bytes: u64) {
        self.images[image].inc(bytes);
        self.total.inc(bytes);
    }

    fn finished(&self, image: usize, outcome: &ImageOutcome) {
        let bar = &self.images[image];
        let line = match &outcome.result {
            Ok(counts) => {
                bar.finish_with_message("done");
                format!("{}: ok: {counts}", outcome.image)
            }
            Err(e) => {
                bar.abandon_with_message("FAILED");
                format!("{}: FAILED: {e}", outcome.image)
            }
        };
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}
