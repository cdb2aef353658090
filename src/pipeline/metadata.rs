//! Settings that travel with an image to other tools and back.
//!
//! Out: the `parameters` text in the layout Automatic1111, Forge and civitai read (the prompt,
//! a `Negative prompt:` line, then `Steps: ..., Sampler: ..., CFG scale: ..., Seed: ..., Size:
//! ..., Model: ...` with Parallax's own keys after them), written as a PNG text chunk, or for
//! JPEG and WebP as EXIF `UserComment` (UTF-16) beside Parallax's full settings as JSON in
//! `ImageDescription` (the same two places A1111 and its readers use).
//!
//! Back: [`recall`] reads what a file says about how it was made: Parallax's own JSON when
//! present (everything), else A1111's `parameters` text, else ComfyUI's `prompt` graph (the text
//! encoders' prompts, the sampler's seed and steps, the latent's size, FLUX guidance), as far as
//! each one's metadata allows.

use std::path::Path;

use super::cache::CacheSpec;
use super::GenerationSettings;
use crate::error::{Error, Result};

/// A1111's `parameters` text for `s`. FLUX's distilled guidance goes under Forge's name
/// (`Distilled CFG Scale`); `CFG scale` is the true CFG scale (1: off).
pub fn a1111_parameters(s: &GenerationSettings) -> String {
    let mut out = s.prompt.replace('\n', " ");
    if let Some(n) = s
        .negative_prompt
        .as_deref()
        .filter(|n| !n.trim().is_empty())
    {
        out.push_str("\nNegative prompt: ");
        out.push_str(&n.replace('\n', " "));
    }
    out.push_str(&format!(
        "\nSteps: {}, Sampler: Euler, Schedule type: {}, CFG scale: {}, Distilled CFG Scale: {}, \
         Seed: {}, Size: {}x{}, Model: {}, Parallax cache: {}, Parallax dtype: {}, Version: \
         Parallax {}",
        s.steps,
        quote(&s.schedule),
        s.true_cfg,
        s.guidance,
        s.seed,
        s.width,
        s.height,
        quote(&s.model),
        quote(&s.cache_spec().to_string()),
        s.dtype,
        s.parallax_version
    ));
    if !s.loras.is_empty() {
        let loras: Vec<String> = s.loras.iter().map(|l| l.to_string()).collect();
        out.push_str(&format!(", Parallax LoRAs: {}", quote(&loras.join("; "))));
    }
    out
}

/// A value in A1111's `key: value, ...` list: quoted when it holds a comma or colon.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '"']) {
        format!("\"{}\"", v.replace('"', "'"))
    } else {
        v.to_string()
    }
}

/// What an image says about how it was made; every field is what the file stated, none guessed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recalled {
    /// Which tool's metadata this came from ("Parallax", "Automatic1111", "ComfyUI").
    pub source: &'static str,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub seed: Option<u64>,
    /// FLUX's distilled guidance.
    pub guidance: Option<f64>,
    pub true_cfg: Option<f64>,
    pub cache: Option<CacheSpec>,
    pub model: Option<String>,
    /// Everything, when Parallax made the image (the fields above are taken from it).
    pub settings: Option<GenerationSettings>,
}

impl Recalled {
    fn from_settings(s: GenerationSettings) -> Self {
        Self {
            source: "Parallax",
            prompt: Some(s.prompt.clone()),
            negative_prompt: s.negative_prompt.clone(),
            width: Some(s.width),
            height: Some(s.height),
            steps: Some(s.steps),
            seed: Some(s.seed),
            guidance: Some(s.guidance),
            true_cfg: Some(s.true_cfg),
            cache: Some(s.cache_spec()),
            model: Some(s.model.clone()),
            settings: Some(s),
        }
    }
}

/// What the text chunks (or EXIF fields, as `parallax`/`parameters` pairs) of an image say.
pub fn recall(text: &[(String, String)]) -> Result<Recalled> {
    if let Ok(s) = GenerationSettings::from_png_text(text) {
        return Ok(Recalled::from_settings(s));
    }
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    if let Some(p) = get("parameters").and_then(parse_a1111) {
        return Ok(p);
    }
    if let Some(p) = get("prompt").and_then(parse_comfy) {
        return Ok(p);
    }
    Err(Error::Image(
        "no settings found in this image (neither Parallax's, Automatic1111's `parameters` nor \
         ComfyUI's workflow)"
            .into(),
    ))
}

/// The settings stored in an image file (PNG, JPEG or WebP), for the studio's drop-to-restore.
pub fn recall_file(path: &Path) -> Result<Recalled> {
    let text = match extension(path).as_deref() {
        Some("png") => super::image::PngHeader::open(path)?.text,
        Some(ext @ ("jpg" | "jpeg" | "webp")) => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let tiff = if ext == "webp" {
                webp_exif(&bytes)
            } else {
                jpeg_exif(&bytes)
            };
            let tiff = tiff.ok_or_else(|| {
                Error::Image(format!("{}: no settings (no EXIF block)", path.display()))
            })?;
            exif_text(tiff)
        }
        _ => {
            return Err(Error::Image(format!(
                "{}: settings can be read from PNG, JPEG and WebP files",
                path.display()
            )))
        }
    };
    recall(&text).map_err(|e| Error::Image(format!("{}: {e}", path.display())))
}

/// A file name's extension, lower case.
pub fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

/// A1111's `parameters`: prompt lines, an optional `Negative prompt:` line, then the
/// `Steps: ...` line of `key: value` pairs.
fn parse_a1111(params: &str) -> Option<Recalled> {
    let lines: Vec<&str> = params.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("Steps:"))?;
    let mut prompt = Vec::new();
    let mut negative: Option<String> = None;
    for l in &lines[..last] {
        if let Some(n) = l.strip_prefix("Negative prompt:") {
            negative = Some(n.trim().to_string());
        } else if let Some(n) = negative.as_mut() {
            n.push('\n');
            n.push_str(l);
        } else {
            prompt.push(*l);
        }
    }
    let mut r = Recalled {
        source: "Automatic1111",
        prompt: Some(prompt.join("\n").trim().to_string()),
        negative_prompt: negative.filter(|n| !n.is_empty()),
        ..Default::default()
    };
    for (k, v) in key_values(&lines[last..].join(", ")) {
        match k.as_str() {
            "Steps" => r.steps = v.parse().ok(),
            "Seed" => r.seed = v.parse().ok(),
            "CFG scale" => r.true_cfg = v.parse().ok(),
            "Distilled CFG Scale" => r.guidance = v.parse().ok(),
            "Size" => {
                if let Some((w, h)) = v.split_once('x') {
                    r.width = w.trim().parse().ok();
                    r.height = h.trim().parse().ok();
                }
            }
            "Model" => r.model = Some(v),
            "Parallax cache" => r.cache = v.parse().ok(),
            _ => {}
        }
    }
    // An A1111 image made without FLUX has a real CFG scale and no distilled guidance: the CFG
    // scale is then what its author set, and is kept as the true CFG scale.
    Some(r)
}

/// `key: value, key: "quoted, value", ...` pairs.
fn key_values(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once(':') else {
            break;
        };
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.split_once('"') {
                Some((v, n)) => (v.to_string(), n),
                None => (q.to_string(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((v, n)) => (v.trim().to_string(), n),
                None => (after.trim().to_string(), ""),
            }
        };
        out.push((key.trim().to_string(), value));
        rest = next.trim_start_matches([',', ' ']);
    }
    out
}

/// ComfyUI's `prompt` chunk: the graph it ran, node id -> {class_type, inputs}. Reads the
/// sampler's seed and steps (KSampler, or RandomNoise + BasicScheduler), the latent's size, the
/// FLUX guidance, and the text of the encoders wired to the sampler's positive and negative
/// inputs (directly or through a FluxGuidance node).
fn parse_comfy(json: &str) -> Option<Recalled> {
    let graph: serde_json::Value = serde_json::from_str(json).ok()?;
    let nodes = graph.as_object()?;
    let node = |id: &serde_json::Value| -> Option<&serde_json::Value> {
        // A link is [node id, output index].
        let id = id.as_array()?.first()?;
        let key = id
            .as_str()
            .map(str::to_string)
            .or_else(|| id.as_u64().map(|n| n.to_string()))?;
        nodes.get(&key)
    };
    let class = |n: &serde_json::Value| n["class_type"].as_str().unwrap_or("").to_string();
    // The text at the end of a conditioning link (through FluxGuidance and friends).
    fn text_of<'a>(
        n: &'a serde_json::Value,
        node: &dyn Fn(&serde_json::Value) -> Option<&'a serde_json::Value>,
        depth: usize,
    ) -> Option<String> {
        if depth > 8 {
            return None;
        }
        let inputs = &n["inputs"];
        for k in ["text", "t5xxl", "clip_l"] {
            if let Some(t) = inputs[k].as_str() {
                return Some(t.to_string());
            }
        }
        let up = node(&inputs["conditioning"])?;
        text_of(up, node, depth + 1)
    }
    let mut r = Recalled {
        source: "ComfyUI",
        ..Default::default()
    };
    let mut found = false;
    for n in nodes.values() {
        let inputs = &n["inputs"];
        match class(n).as_str() {
            "KSampler" | "KSamplerAdvanced" => {
                found = true;
                r.seed = inputs["seed"]
                    .as_u64()
                    .or_else(|| inputs["noise_seed"].as_u64());
                r.steps = inputs["steps"].as_u64().map(|s| s as usize);
                r.true_cfg = inputs["cfg"].as_f64();
                if let Some(p) = node(&inputs["positive"]) {
                    r.prompt = text_of(p, &node, 0);
                }
                if let Some(p) = node(&inputs["negative"]) {
                    r.negative_prompt = text_of(p, &node, 0).filter(|t| !t.trim().is_empty());
                }
            }
            "RandomNoise" => r.seed = inputs["noise_seed"].as_u64(),
            "BasicScheduler" => r.steps = inputs["steps"].as_u64().map(|s| s as usize),
            "FluxGuidance" => r.guidance = inputs["guidance"].as_f64(),
            "CLIPTextEncodeFlux" => {
                r.guidance = r.guidance.or(inputs["guidance"].as_f64());
                r.prompt = r
                    .prompt
                    .or_else(|| inputs["t5xxl"].as_str().map(str::to_string));
            }
            "EmptyLatentImage" | "EmptySD3LatentImage" => {
                r.width = inputs["width"].as_u64().map(|w| w as usize);
                r.height = inputs["height"].as_u64().map(|h| h as usize);
            }
            "UNETLoader" => r.model = inputs["unet_name"].as_str().map(str::to_string),
            "CheckpointLoaderSimple" => r.model = inputs["ckpt_name"].as_str().map(str::to_string),
            "BasicGuider" | "CFGGuider" => {
                if let Some(p) = node(&inputs["conditioning"]).or_else(|| node(&inputs["positive"]))
                {
                    r.prompt = r.prompt.or_else(|| text_of(p, &node, 0));
                }
            }
            _ => {}
        }
        found |= r.seed.is_some() || r.prompt.is_some();
    }
    found.then_some(r)
}

// --- EXIF (for JPEG and WebP) -------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GenerationSettings {
        GenerationSettings {
            prompt: "a red circle, blue sky — ünïcode".into(),
            negative_prompt: Some("blurry".into()),
            true_cfg: 1.0,
            width: 256,
            height: 128,
            steps: 12,
            seed: 42,
            guidance: 3.5,
            cache_threshold: 0.0,
            cache: Some("taylorseer:n=3".parse().expect("spec")),
            model: "demo".into(),
            loras: vec!["styles/ink.safetensors:0.8".parse().expect("lora")],
            variant: crate::model::layout::Variant::Demo,
            synthetic: true,
            dtype: "F32".into(),
            sampler: "euler".into(),
            schedule: "flux, shifted".into(),
            noise: "x".into(),
            parallax_version: "0.1.0".into(),
        }
    }

    #[test]
    fn a1111_text_reads_back() {
        let s = settings();
        let text = a1111_parameters(&s);
        assert!(text.starts_with("a red circle"));
        assert!(text.contains("\nNegative prompt: blurry\nSteps: 12, Sampler: Euler"));
        let r = parse_a1111(&text).expect("parsed");
        assert_eq!(r.prompt.as_deref(), Some(s.prompt.as_str()));
        assert_eq!(r.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(
            (r.width, r.height, r.steps, r.seed),
            (Some(256), Some(128), Some(12), Some(42))
        );
        assert_eq!((r.guidance, r.true_cfg), (Some(3.5), Some(1.0)));
        assert_eq!(r.cache, s.cache);
        assert_eq!(r.model.as_deref(), Some("demo"));
    }

    #[test]
    fn an_a1111_image_from_elsewhere_is_read() {
        let text = "portrait of a cat, oil painting\nNegative prompt: lowres, bad hands\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, Model hash: abc123, Model: sd_xl_base_1.0, Version: v1.10.1";
        let r = recall(&[("parameters".into(), text.into())]).expect("read");
        assert_eq!(r.source, "Automatic1111");
        assert_eq!(r.prompt.as_deref(), Some("portrait of a cat, oil painting"));
        assert_eq!(r.negative_prompt.as_deref(), Some("lowres, bad hands"));
        assert_eq!((r.width, r.height), (Some(512), Some(768)));
        assert_eq!(
            (r.steps, r.seed, r.true_cfg),
            (Some(20), Some(1234567890), Some(7.0))
        );
        assert_eq!(r.guidance, None);
        assert_eq!(r.model.as_deref(), Some("sd_xl_base_1.0"));
    }

    #[test]
    fn a_comfyui_flux_graph_is_read() {
        let graph = r#"{
          "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox in snow", "clip": ["11", 0]}},
          "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
          "22": {"class_type": "BasicGuider", "inputs": {"model": ["12", 0], "conditioning": ["26", 0]}},
          "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 987}},
          "17": {"class_type": "BasicScheduler", "inputs": {"steps": 20, "denoise": 1.0}},
          "27": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 768, "batch_size": 1}},
          "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors"}}
        }"#;
        let r = recall(&[("prompt".into(), graph.into())]).expect("read");
        assert_eq!(r.source, "ComfyUI");
        assert_eq!(r.prompt.as_deref(), Some("a fox in snow"));
        assert_eq!(
            (r.seed, r.steps, r.guidance),
            (Some(987), Some(20), Some(3.5))
        );
        assert_eq!((r.width, r.height), (Some(1024), Some(768)));
        assert_eq!(r.model.as_deref(), Some("flux1-dev.safetensors"));
    }

    #[test]
    fn exif_round_trips_and_bad_blocks_give_nothing() {
        let s = settings();
        let json = serde_json::to_string(&s).expect("json");
        let params = a1111_parameters(&s);
        let tiff = exif_block(&json, &params, "Parallax 0.1.0");
        let text = exif_text(&tiff);
        let r = recall(&text).expect("read");
        assert_eq!(r.source, "Parallax");
        assert_eq!(r.prompt.as_deref(), Some(s.prompt.as_str()));
        assert!(text.iter().any(|(k, v)| k == "parameters" && *v == params));
        // Truncated or garbage blocks: nothing, never a panic.
        for n in [0, 3, 8, 20, 49, tiff.len() / 2] {
            let _ = exif_text(&tiff[..n]);
        }
        assert!(exif_text(b"garbage that is not tiff").is_empty());
        assert!(jpeg_exif(&[0xFF, 0xD8, 0xFF, 0xE1, 0xFF]).is_none());
        assert!(webp_exif(b"RIFF\x10\0\0\0WEBPEXIF\xff\xff\xff\xff").is_none());
    }
}
