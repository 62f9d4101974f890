//! Training curves as a PNG: one panel per metric, each with its name and value range written in
//! a tiny built-in bitmap font. The PNG encoder is the smallest valid one: 8-bit RGB, filter 0,
//! zlib "stored" blocks, CRC-32 and Adler-32 computed here.

use crate::ppo::CycleMetrics;

/// A named curve: `(x, y)` points in order.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// The curves of a PPO run, x = cycle.
pub fn ppo_series(metrics: &[CycleMetrics]) -> Vec<Series> {
    let series = |name: &str, f: &dyn Fn(&CycleMetrics) -> f64| Series {
        name: name.to_string(),
        points: metrics.iter().map(|m| (m.iteration as f64, f(m))).collect(),
    };
    vec![
        series("mean_score", &|m| m.mean_score),
        series("mean_kl", &|m| m.mean_kl),
        series("kl_coef", &|m| m.kl_coef),
        series("loss", &|m| m.loss.loss),
        series("pg_loss", &|m| m.loss.pg_loss),
        series("vf_loss", &|m| m.loss.vf_loss),
        series("approx_kl", &|m| m.loss.approx_kl),
        series("response_len", &|m| m.mean_response_len),
    ]
}

const PANEL_W: usize = 400;
const PANEL_H: usize = 220;
const COLUMNS: usize = 2;
const MARGIN: usize = 16;
const SCALE: usize = 2;

struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Canvas { width, height, rgb: vec![255; width * height * 3] }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&color);
        }
    }

    /// Bresenham, two pixels thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, color);
            self.set(x, y + 1, color);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, text: &str, color: [u8; 3]) {
        for (k, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for (ox, oy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            let px = x + (k * 4 + col) * SCALE + ox;
                            let py = y + r * SCALE + oy;
                            self.set(px as i64, py as i64, color);
                        }
                    }
                }
            }
        }
    }
}

/// A 3×5 glyph, one row of 3 bits per entry; unknown characters are blank.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'j' => [1, 1, 1, 5, 2],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'q' => [2, 5, 5, 6, 3],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [6, 1, 2, 4, 7],
        '3' => [6, 1, 2, 1, 6],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 6, 1, 6],
        '6' => [3, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 6],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        '_' => [0, 0, 0, 0, 7],
        ':' => [0, 2, 0, 2, 0],
        _ => [0; 5],
    }
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-3) {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

/// Draw every series in its own panel and encode the PNG.
pub fn render_png(series: &[Series]) -> Vec<u8> {
    let rows = series.len().div_ceil(COLUMNS).max(1);
    let mut canvas = Canvas::new(COLUMNS * PANEL_W, rows * PANEL_H);
    let (axis, curve, ink) = ([160, 160, 160], [31, 119, 180], [0, 0, 0]);
    for (k, s) in series.iter().enumerate() {
        let (px, py) = ((k % COLUMNS) * PANEL_W, (k / COLUMNS) * PANEL_H);
        let (left, top) = (px + MARGIN + 56, py + MARGIN + 16);
        let (right, bottom) = (px + PANEL_W - MARGIN, py + PANEL_H - MARGIN);
        canvas.text(px + MARGIN, py + MARGIN - 8, &s.name, ink);
        canvas.line((left as i64, top as i64), (left as i64, bottom as i64), axis);
        canvas.line((left as i64, bottom as i64), (right as i64, bottom as i64), axis);
        let finite: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        if finite.is_empty() {
            continue;
        }
        let (mut x0, mut x1) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (mut y0, mut y1) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if x1 <= x0 {
            x0 -= 0.5;
            x1 += 0.5;
        }
        if y1 <= y0 {
            y0 -= 0.5;
            y1 += 0.5;
        }
        canvas.text(px + MARGIN, top, &label(y1), ink);
        canvas.text(px + MARGIN, bottom - 10, &label(y0), ink);
        canvas.text(left, bottom + 3, &label(x0), ink);
        canvas.text(right - 40, bottom + 3, &label(x1), ink);
        let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
            let fx = (x - x0) / (x1 - x0);
            let fy = (y - y0) / (y1 - y0);
            ((left as f64 + fx * (right - left) as f64) as i64, (bottom as f64 - fy * (bottom - top) as f64) as i64)
        };
        let mut prev = to_px(finite[0]);
        canvas.line(prev, prev, curve);
        for &p in &finite[1..] {
            let next = to_px(p);
            canvas.line(prev, next, curve);
            prev = next;
        }
    }
    encode_png(canvas.width, canvas.height, &canvas.rgb)
}

/// PNG of 8-bit RGB pixels (row-major, 3 bytes each).
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(height * (width * 3 + 1));
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, filter 0, no interlace
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &zlib_stored(&raw));
    chunk(&mut png, b"IEND", &[]);
    png
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream of uncompressed deflate blocks (at most 65535 bytes each).
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65535).collect() };
    for (i, block) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        // Standard check values of CRC-32/ISO-HDLC and Adler-32.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn stored_zlib_blocks_frame_the_data() {
        let data: Vec<u8> = (0..70000u32).map(|i| (i * 7) as u8).collect();
        let z = zlib_stored(&data);
        // header, two blocks (65535 + 4465 bytes) with 5-byte headers, adler
        assert_eq!(z.len(), 2 + 5 + 65535 + 5 + 4465 + 4);
        assert_eq!(z[2], 0, "first block is not final");
        assert_eq!(z[2 + 5 + 65535], 1, "second block is final");
        assert_eq!(&z[3..5], &65535u16.to_le_bytes());
    }
}
