//! Just enough of SVG to draw the benchmark chart: rectangles, lines and text on a canvas, as a
//! text file any browser shows. The text is real text (selectable, searchable, scalable), and
//! the code is a few string writes instead of a picture encoder.

use std::fmt::Write as _;

/// The palette: index 0 is the background.
pub const PALETTE: [&str; 10] = [
    "#ffffff", // 0 white
    "#282828", // 1 ink
    "#c8c8c8", // 2 grid
    "#1f77b4", // 3 blue
    "#ff7f0e", // 4 orange
    "#2ca02c", // 5 green
    "#d62728", // 6 red
    "#9467bd", // 7 purple
    "#8c564b", // 8 brown
    "#7f7f7f", // 9 grey
];
pub const INK: u8 = 1;
pub const GRID: u8 = 2;
/// Colours for series, in order.
pub const SERIES: [u8; 7] = [9, 3, 4, 5, 6, 7, 8];

/// Width of one character of text at scale 1, in canvas units (a monospace font).
const CHAR_W: i64 = 6;

pub struct Canvas {
    w: usize,
    h: usize,
    body: String,
}

fn colour(c: u8) -> &'static str {
    PALETTE.get(usize::from(c)).copied().unwrap_or(PALETTE[1])
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl Canvas {
    pub fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            body: String::new(),
        }
    }

    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: u8) {
        let _ = writeln!(
            self.body,
            r#"<rect x="{x}" y="{y}" width="{}" height="{}" fill="{}"/>"#,
            w.max(0),
            h.max(0),
            colour(c)
        );
    }

    /// A line two units wide.
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: u8) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="{}" stroke-width="2"/>"#,
            colour(c)
        );
    }

    /// Text with its top left at (x, y), `scale` times the base size; returns the width drawn.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: u8) -> i64 {
        let size = 8 * scale;
        let _ = writeln!(
            self.body,
            r#"<text x="{x}" y="{}" font-family="monospace" font-size="{size}" fill="{}">{}</text>"#,
            y + size,
            colour(c),
            escape(s)
        );
        CHAR_W * scale * s.chars().count() as i64
    }

    /// The SVG file.
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"{bg}\"/>\n{}</svg>\n",
            self.body,
            w = self.w,
            h = self.h,
            bg = PALETTE[0]
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_well_formed_picture() {
        let mut c = Canvas::new(100, 50);
        c.rect(1, 2, 3, 4, GRID);
        c.line((0, 0), (10, 10), SERIES[1]);
        assert_eq!(c.text(5, 5, "a<b & \"c\"", 2, INK), 9 * 12);
        let svg = String::from_utf8(c.encode()).unwrap();
        assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a&lt;b &amp; &quot;c&quot;"));
        assert!(svg.contains(r##"fill="#c8c8c8""##));
        // Every element is closed.
        assert_eq!(svg.matches('<').count(), svg.matches('>').count());
    }
}
