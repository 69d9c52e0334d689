//! Fresh "shapes" scenes with their true captions, drawn by the rules of `tools/scenes.py`
//! (the specification the embedded models were trained on), so tests caption images the models
//! have never seen.

use rand::{rngs::StdRng, Rng};

pub const CANVAS: u32 = 128;
const MARGIN: f64 = 2.0;
const MIN_GAP: f64 = 6.0;
const MAX_PLACEMENT_TRIES: usize = 100;

const BACKGROUNDS: [&str; 3] = ["white", "black", "gray"];
const SHAPE_COLOURS: [&str; 6] = ["red", "green", "blue", "yellow", "purple", "orange"];
const KINDS: [&str; 3] = ["circle", "square", "triangle"];
const SIZES: [&str; 2] = ["small", "large"];

fn palette(name: &str) -> [u8; 3] {
    match name {
        "red" => [220, 40, 40],
        "green" => [40, 170, 60],
        "blue" => [40, 80, 220],
        "yellow" => [240, 210, 40],
        "purple" => [140, 60, 190],
        "orange" => [245, 140, 30],
        "white" => [245, 245, 245],
        "black" => [20, 20, 20],
        "gray" => [128, 128, 128],
        other => panic!("no colour {other}"),
    }
}

#[derive(Debug, Clone)]
struct Shape {
    kind: &'static str,
    colour: &'static str,
    size: &'static str,
    r: f64,
    cx: f64,
    cy: f64,
}

impl Shape {
    fn contains(&self, px: f64, py: f64) -> bool {
        let (cx, cy, r) = (self.cx, self.cy, self.r);
        match self.kind {
            "circle" => (px - cx).powi(2) + (py - cy).powi(2) <= r * r,
            "square" => (px - cx).abs() <= 0.9 * r && (py - cy).abs() <= 0.9 * r,
            "triangle" => {
                let (a, b, c) = ((cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r));
                let edge = |p: (f64, f64), q: (f64, f64)| (q.0 - p.0) * (py - p.1) - (q.1 - p.1) * (px - p.0);
                let (e1, e2, e3) = (edge(a, b), edge(b, c), edge(c, a));
                (e1 >= 0.0 && e2 >= 0.0 && e3 >= 0.0) || (e1 <= 0.0 && e2 <= 0.0 && e3 <= 0.0)
            }
            other => panic!("no kind {other}"),
        }
    }
}

/// A drawn scene: 128×128 RGB pixels and its caption.
pub struct Scene {
    pub image: image::RgbImage,
    pub caption: String,
}

impl Scene {
    pub fn png(&self) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        self.image.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
        out.into_inner()
    }
}

pub fn draw_scene(rng: &mut StdRng) -> Scene {
    loop {
        let bg = BACKGROUNDS[rng.random_range(0..BACKGROUNDS.len())];
        let n = rng.random_range(1..=2);
        let mut shapes: Vec<Shape> = (0..n)
            .map(|_| {
                let kind = KINDS[rng.random_range(0..KINDS.len())];
                let colour = SHAPE_COLOURS[rng.random_range(0..SHAPE_COLOURS.len())];
                let size = SIZES[rng.random_range(0..SIZES.len())];
                let (lo, hi) = if size == "small" { (10.0, 14.0) } else { (22.0, 30.0) };
                Shape { kind, colour, size, r: rng.random_range(lo..hi), cx: 0.0, cy: 0.0 }
            })
            .collect();
        let mut placed = false;
        for _ in 0..MAX_PLACEMENT_TRIES {
            for s in shapes.iter_mut() {
                let (lo, hi) = (MARGIN + s.r, f64::from(CANVAS) - MARGIN - s.r);
                s.cx = rng.random_range(lo..hi);
                s.cy = rng.random_range(lo..hi);
            }
            if n == 1 {
                placed = true;
                break;
            }
            let mut sorted = shapes.clone();
            sorted.sort_by(|a, b| a.cx.total_cmp(&b.cx));
            if (sorted[1].cx - sorted[1].r) - (sorted[0].cx + sorted[0].r) >= MIN_GAP {
                placed = true;
                break;
            }
        }
        if !placed {
            continue;
        }
        let mut image = image::RgbImage::from_pixel(CANVAS, CANVAS, image::Rgb(palette(bg)));
        for s in &shapes {
            for y in 0..CANVAS {
                for x in 0..CANVAS {
                    if s.contains(f64::from(x) + 0.5, f64::from(y) + 0.5) {
                        image.put_pixel(x, y, image::Rgb(palette(s.colour)));
                    }
                }
            }
        }
        let mut ordered = shapes.clone();
        ordered.sort_by(|a, b| a.cx.total_cmp(&b.cx));
        let parts: Vec<String> = ordered.iter().map(|s| format!("a {} {} {}", s.size, s.colour, s.kind)).collect();
        let caption = format!("{} on a {bg} background", parts.join(" and "));
        return Scene { image, caption };
    }
}
