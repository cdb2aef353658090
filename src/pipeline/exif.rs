//! Settings inside JPEG and WebP files: an EXIF block (a little TIFF) with the settings JSON in
//! ImageDescription and the `parameters` text in UserComment, put into and found in a JPEG's
//! APP1 segment and a WebP's `EXIF` chunk. What the pipeline writes ([`super::image::save_image`])
//! and reads back ([`super::metadata::recall_file`]).

use std::path::Path;

use crate::error::{Error, Result};

/// A file name's extension, lower case.
pub fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

const TAG_DESCRIPTION: u16 = 0x010E;
const TAG_SOFTWARE: u16 = 0x0131;
const TAG_EXIF_IFD: u16 = 0x8769;
const TAG_USER_COMMENT: u16 = 0x9286;

/// JSON with every character past ASCII written as `\uXXXX` (EXIF's ImageDescription is ASCII).
fn ascii_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for u in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// A big-endian TIFF block: IFD0 with ImageDescription (Parallax's JSON), Software and the
/// pointer to an Exif IFD holding UserComment (`parameters`, UTF-16BE under the UNICODE code).
pub fn exif_block(json: &str, parameters: &str, software: &str) -> Vec<u8> {
    let mut desc = ascii_json(json).into_bytes();
    desc.push(0);
    let mut soft = software.as_bytes().to_vec();
    soft.push(0);
    let mut comment = b"UNICODE\0".to_vec();
    for u in parameters.encode_utf16() {
        comment.extend_from_slice(&u.to_be_bytes());
    }
    let ifd0 = 8u32;
    let ifd0_len = 2 + 3 * 12 + 4;
    let exif_ifd = ifd0 + ifd0_len;
    let exif_len = 2 + 12 + 4;
    let mut data_at = exif_ifd + exif_len;
    let mut place = |len: usize| {
        let at = data_at;
        data_at += (len as u32 + 1) & !1;
        at
    };
    let (desc_at, soft_at, comment_at) =
        (place(desc.len()), place(soft.len()), place(comment.len()));
    let mut b = Vec::with_capacity(data_at as usize);
    b.extend_from_slice(b"MM\0\x2a");
    b.extend_from_slice(&ifd0.to_be_bytes());
    let entry = |b: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: u32| {
        b.extend_from_slice(&tag.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&count.to_be_bytes());
        b.extend_from_slice(&value.to_be_bytes());
    };
    b.extend_from_slice(&3u16.to_be_bytes());
    entry(&mut b, TAG_DESCRIPTION, 2, desc.len() as u32, desc_at);
    entry(&mut b, TAG_SOFTWARE, 2, soft.len() as u32, soft_at);
    entry(&mut b, TAG_EXIF_IFD, 4, 1, exif_ifd);
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    entry(
        &mut b,
        TAG_USER_COMMENT,
        7,
        comment.len() as u32,
        comment_at,
    );
    b.extend_from_slice(&0u32.to_be_bytes());
    for part in [&desc, &soft, &comment] {
        b.extend_from_slice(part);
        if part.len() % 2 == 1 {
            b.push(0);
        }
    }
    b
}

/// The `parallax` JSON and `parameters` text an EXIF block holds (either byte order; the
/// UserComment in UNICODE, ASCII or undefined code), as text-chunk pairs for [`recall`].
pub fn exif_text(tiff: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(t) = Tiff::new(tiff) else {
        return out;
    };
    let Some(ifd0) = t.u32(4) else {
        return out;
    };
    for (tag, kind, count, value_at) in t.entries(ifd0 as usize) {
        match (tag, kind) {
            (TAG_DESCRIPTION, 2) => {
                if let Some(s) = t.ascii(value_at, count) {
                    if s.trim_start().starts_with('{') {
                        out.push(("parallax".to_string(), s));
                    }
                }
            }
            (TAG_EXIF_IFD, 4) => {
                let Some(at) = t.u32(value_at) else { continue };
                for (tag, _, count, value_at) in t.entries(at as usize) {
                    if tag == TAG_USER_COMMENT {
                        if let Some(c) = t.user_comment(value_at, count) {
                            out.push(("parameters".to_string(), c));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// A TIFF block's byte order and bounds-checked reads.
struct Tiff<'a> {
    b: &'a [u8],
    big: bool,
}

impl<'a> Tiff<'a> {
    fn new(b: &'a [u8]) -> Option<Self> {
        let big = match b.get(..4)? {
            [b'M', b'M', 0, 42] => true,
            [b'I', b'I', 42, 0] => false,
            _ => return None,
        };
        Some(Self { b, big })
    }

    fn u16(&self, at: usize) -> Option<u16> {
        let s: [u8; 2] = self.b.get(at..at + 2)?.try_into().ok()?;
        Some(if self.big {
            u16::from_be_bytes(s)
        } else {
            u16::from_le_bytes(s)
        })
    }

    fn u32(&self, at: usize) -> Option<u32> {
        let s: [u8; 4] = self.b.get(at..at + 4)?.try_into().ok()?;
        Some(if self.big {
            u32::from_be_bytes(s)
        } else {
            u32::from_le_bytes(s)
        })
    }

    /// (tag, type, count, where the value is: inline at the entry, or at its offset).
    fn entries(&self, ifd: usize) -> Vec<(u16, u16, usize, usize)> {
        let n = self.u16(ifd).unwrap_or(0) as usize;
        (0..n.min(512))
            .filter_map(|i| {
                let e = ifd + 2 + 12 * i;
                let (tag, kind, count) =
                    (self.u16(e)?, self.u16(e + 2)?, self.u32(e + 4)? as usize);
                let size = match kind {
                    3 => 2,
                    4 => 4,
                    _ => 1,
                } * count;
                let at = if size <= 4 {
                    e + 8
                } else {
                    self.u32(e + 8)? as usize
                };
                Some((tag, kind, count, at))
            })
            .collect()
    }

    fn bytes(&self, at: usize, len: usize) -> Option<&'a [u8]> {
        self.b.get(at..at.checked_add(len)?)
    }

    fn ascii(&self, at: usize, count: usize) -> Option<String> {
        let s = self.bytes(at, count)?;
        let s = s.split(|&c| c == 0).next().unwrap_or(s);
        String::from_utf8(s.to_vec()).ok()
    }

    fn user_comment(&self, at: usize, count: usize) -> Option<String> {
        let s = self.bytes(at, count)?;
        let (code, text) = s.split_at(8.min(s.len()));
        if code.starts_with(b"UNICODE") {
            // UTF-16 in the block's byte order; some writers use big-endian regardless: take
            // whichever decodes to more ASCII.
            let units = |big: bool| -> Vec<u16> {
                text.chunks_exact(2)
                    .map(|p| {
                        if big {
                            u16::from_be_bytes([p[0], p[1]])
                        } else {
                            u16::from_le_bytes([p[0], p[1]])
                        }
                    })
                    .collect()
            };
            let ascii = |u: &[u16]| u.iter().filter(|&&c| c < 128).count();
            let (be, le) = (units(true), units(false));
            let best = if ascii(&be) >= ascii(&le) { be } else { le };
            Some(
                String::from_utf16_lossy(&best)
                    .trim_end_matches('\0')
                    .to_string(),
            )
        } else {
            Some(
                String::from_utf8_lossy(text)
                    .trim_end_matches('\0')
                    .to_string(),
            )
        }
    }
}

/// A JPEG's EXIF block (the TIFF bytes of its `APP1 Exif` segment).
pub fn jpeg_exif(b: &[u8]) -> Option<&[u8]> {
    let mut at = 2;
    if b.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    while at + 4 <= b.len() {
        if b[at] != 0xFF {
            return None;
        }
        let marker = b[at + 1];
        // Start of scan: no metadata after it.
        if marker == 0xDA {
            return None;
        }
        let len = u16::from_be_bytes([b[at + 2], b[at + 3]]) as usize;
        let seg = b.get(at + 4..at + 2 + len)?;
        if marker == 0xE1 && seg.starts_with(b"Exif\0\0") {
            return Some(&seg[6..]);
        }
        at += 2 + len;
    }
    None
}

/// `jpeg` with an `APP1 Exif` segment holding `tiff` after its first segment.
pub fn jpeg_with_exif(jpeg: &[u8], tiff: &[u8]) -> Result<Vec<u8>> {
    let len = tiff.len() + 6 + 2;
    if len > u16::MAX as usize {
        return Err(Error::Image(format!(
            "the settings ({} bytes) do not fit a JPEG's metadata segment (64 KiB); save as PNG",
            tiff.len()
        )));
    }
    if jpeg.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err(Error::Image("the JPEG encoder wrote no JPEG".into()));
    }
    // After SOI and, when present, the JFIF APP0 segment.
    let mut at = 2;
    if jpeg.get(2..4) == Some(&[0xFF, 0xE0]) {
        let l = u16::from_be_bytes([jpeg[4], jpeg[5]]) as usize;
        at += 2 + l;
    }
    let mut out = Vec::with_capacity(jpeg.len() + len + 2);
    out.extend_from_slice(&jpeg[..at]);
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(b"Exif\0\0");
    out.extend_from_slice(tiff);
    out.extend_from_slice(&jpeg[at..]);
    Ok(out)
}

/// The chunks of a RIFF WebP file after its 12-byte header: (fourcc, payload).
fn webp_chunks(b: &[u8]) -> Vec<([u8; 4], &[u8])> {
    let mut out = Vec::new();
    if b.get(..4) != Some(b"RIFF") || b.get(8..12) != Some(b"WEBP") {
        return out;
    }
    let mut at = 12;
    while at + 8 <= b.len() {
        let Ok(id) = <[u8; 4]>::try_from(&b[at..at + 4]) else {
            break;
        };
        let len = u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]) as usize;
        let Some(payload) = b.get(at + 8..at + 8 + len) else {
            break;
        };
        out.push((id, payload));
        at += 8 + len + (len & 1);
    }
    out
}

/// A WebP's EXIF chunk.
pub fn webp_exif(b: &[u8]) -> Option<&[u8]> {
    webp_chunks(b)
        .into_iter()
        .find(|(id, _)| id == b"EXIF")
        .map(|(_, p)| p.strip_prefix(b"Exif\0\0").unwrap_or(p))
}

/// A simple-format WebP (one VP8L or VP8 chunk) rewritten in the extended format with an EXIF
/// chunk holding `tiff`.
pub fn webp_with_exif(webp: &[u8], tiff: &[u8], width: usize, height: usize) -> Result<Vec<u8>> {
    let chunks = webp_chunks(webp);
    let image: Vec<_> = chunks
        .iter()
        .filter(|(id, _)| id == b"VP8L" || id == b"VP8 ")
        .collect();
    let [(id, payload)] = image.as_slice() else {
        return Err(Error::Image(
            "the WebP encoder wrote an unexpected file".into(),
        ));
    };
    let mut body = Vec::new();
    let mut chunk = |id: &[u8; 4], p: &[u8]| {
        body.extend_from_slice(id);
        body.extend_from_slice(&(p.len() as u32).to_le_bytes());
        body.extend_from_slice(p);
        if p.len() % 2 == 1 {
            body.push(0);
        }
    };
    let mut vp8x = vec![0x08, 0, 0, 0];
    vp8x.extend_from_slice(&((width - 1) as u32).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&((height - 1) as u32).to_le_bytes()[..3]);
    chunk(b"VP8X", &vp8x);
    chunk(id, payload);
    chunk(b"EXIF", tiff);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&body);
    Ok(out)
}
