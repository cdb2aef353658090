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
pub use super::exif::{
    exif_block, exif_text, extension, jpeg_exif, jpeg_with_exif, webp_exif, webp_with_exif,
};
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
    if let Some(init) = &s.init {
        // A1111's key for image-to-image's strength.
        out.push_str(&format!(", Denoising strength: {}", init.strength));
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
            init: None,
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
