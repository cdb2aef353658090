//! The studio's settings: what the panels edit, kept between runs (a JSON file of their own,
//! see `super::settings_file`), and how they become engine requests.

use serde::{Deserialize, Serialize};

use crate::engine::{Degrees, Devices, LayoutChoice, Placement, Plan};
use crate::parallel::mesh::{ParallelLayout, Stale};
use crate::parallel::pipefusion::StageBalance;
use crate::parallel::refusal::{self, Refusal};
use crate::pipeline::cache::CacheSpec;
use crate::pipeline::{GenerateRequest, GenerationSettings};
use crate::runtime::EngineSpec;

use super::lora::{self, LoraEntry};

/// Resolution presets (width, height).
pub const PRESETS: &[(&str, usize, usize)] = &[
    ("256 x 256 (demo)", 256, 256),
    ("512 x 512", 512, 512),
    ("1024 x 1024", 1024, 1024),
    ("1344 x 768 (16:9)", 1344, 768),
    ("768 x 1344 (9:16)", 768, 1344),
    ("2048 x 2048", 2048, 2048),
];

/// The one size the demo model was trained at (`scripts/train-demo/`: 256 x 256 scenes), and
/// the only one the panel offers it.
pub const DEMO_SIZE: usize = 256;

/// Saved between runs. Files written before the sampling fields moved into `request` (flat
/// `prompt`, `steps`, ... at the top level) still load: see [`SettingsFile`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "SettingsFile")]
pub struct Settings {
    pub model: String,
    pub device: String,
    /// Worker threads on the CPU, when `device` is `cpu` (GPUs are listed in `device` itself).
    pub workers: usize,
    pub layout_auto: bool,
    /// The layout set by hand, run when `layout_auto` is off.
    pub layout: ParallelLayout,
    /// The sampling settings (prompt, size, steps, seed, guidance, true CFG, cache threshold),
    /// as the engine takes them. The optional fields are always `Some` here (the panel edits
    /// them); an empty negative prompt means none (see [`Settings::request`]).
    pub request: GenerateRequest,
    pub random_seed: bool,
    /// Jobs one Generate queues (seeds s, s + 1, ...; fresh ones with `random_seed`).
    pub batch: usize,
    pub compare_thresholds: Vec<f64>,
    /// Cache policies the compare sweep runs after the thresholds.
    pub compare_caches: Vec<CacheSpec>,
    /// How many times the compare sweep times each cell (`compare --repeats`).
    pub compare_repeats: usize,
    pub heatmap_gain: f32,
    /// FP8 products in the transformer blocks (`--precision fp8`: real on sm_89+ GPUs in bf16,
    /// simulated by rounding elsewhere).
    pub fp8: bool,
    /// FP8 attention (`--fp8-attention`: the scores from E4M3 queries and keys; real on H100/H200
    /// in bf16, simulated elsewhere).
    pub fp8_attention: bool,
    /// GPU memory to fit the model within, in GiB (`--memory-budget`); none: load as asked.
    pub memory_budget_gib: Option<u32>,
    /// The model's parts named apart from it (`--vae`, `--clip`, `--t5`).
    pub parts: ModelParts,
    /// The LoRA list: every file added, on or off, at its strength (the ones on go into each
    /// request; `request.loras` stays empty here).
    pub loras: Vec<LoraEntry>,
    /// LoRA strengths the compare sweep crosses with its cache cells (empty: none).
    pub compare_lora_strengths: Vec<Strength>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: "demo".into(),
            device: "cpu".into(),
            workers: 1,
            layout_auto: true,
            layout: ParallelLayout::default(),
            request: default_request(),
            random_seed: false,
            batch: 1,
            // On the demo at its 12 steps the cache starts reusing steps near 0.12.
            compare_thresholds: vec![0.0, 0.08, 0.12, 0.2],
            compare_caches: default_compare_caches(),
            compare_repeats: 3,
            heatmap_gain: 4.0,
            fp8: false,
            fp8_attention: false,
            memory_budget_gib: None,
            parts: ModelParts::default(),
            loras: Vec::new(),
            compare_lora_strengths: vec![Strength(0.0), Strength(0.5), Strength(1.0)],
        }
    }
}

/// Steps when a request leaves them to the model (the demo's twelve).
const DEFAULT_STEPS: usize = 12;

fn default_request() -> GenerateRequest {
    GenerateRequest {
        // Something the built-in demo model knows how to draw (coloured shapes, simple skies).
        prompt: "two yellow stars above a red square, night sky".into(),
        negative_prompt: Some(String::new()),
        true_cfg: Some(1.0),
        width: 256,
        height: 256,
        steps: Some(DEFAULT_STEPS),
        seed: 42,
        guidance: Some(1.0),
        cache_threshold: 0.0,
        cache: None,
        ..GenerateRequest::default()
    }
}

/// The settings file as read: today's fields, plus the flat sampling fields of older versions
/// (`prompt`, `width`, ... at the top level), which are moved into `request`, and their flat
/// layout fields (`ulysses`, `pipeline`, ...), which become `layout`. Missing fields take their
/// defaults.
#[derive(Deserialize)]
#[serde(default)]
struct SettingsFile {
    model: String,
    device: String,
    workers: usize,
    layout_auto: bool,
    layout: Option<ParallelLayout>,
    request: Option<GenerateRequest>,
    random_seed: bool,
    batch: usize,
    compare_thresholds: Vec<f64>,
    compare_caches: Vec<CacheSpec>,
    compare_repeats: usize,
    heatmap_gain: f32,
    fp8: bool,
    fp8_attention: bool,
    memory_budget_gib: Option<u32>,
    parts: ModelParts,
    loras: Vec<LoraEntry>,
    compare_lora_strengths: Vec<Strength>,
    #[serde(flatten)]
    flat: FlatSampling,
    #[serde(flatten)]
    flat_layout: FlatLayout,
}

/// The layout fields as versions before `layout` wrote them.
#[derive(Default, Deserialize)]
#[serde(default)]
struct FlatLayout {
    ulysses: Option<usize>,
    ring: Option<usize>,
    cfg: Option<usize>,
    dp: Option<usize>,
    displaced_warmup: Option<usize>,
    displaced_rotate: bool,
    pipeline: Option<usize>,
    pipeline_patches: Option<usize>,
    pipeline_warmup: Option<usize>,
    pipeline_by_memory: bool,
}

impl FlatLayout {
    /// The layout these fields described: PipeFusion over more than one stage, else displaced
    /// patches when their warm-up is set, else exact.
    fn layout(&self) -> ParallelLayout {
        let stages = self.pipeline.unwrap_or(1);
        let stale = match self.displaced_warmup {
            _ if stages > 1 => Stale::PipeFusion {
                stages,
                patches: self.pipeline_patches.unwrap_or(2).max(1),
                warmup: self.pipeline_warmup.unwrap_or(1),
                balance: if self.pipeline_by_memory {
                    StageBalance::Memory
                } else {
                    StageBalance::Work
                },
            },
            Some(warmup) => Stale::Displaced {
                warmup,
                rotate: self.displaced_rotate,
            },
            None => Stale::Exact,
        };
        ParallelLayout {
            dp: self.dp.unwrap_or(1),
            cfg: self.cfg.unwrap_or(1),
            ring: self.ring.unwrap_or(1),
            ulysses: self.ulysses.unwrap_or(1),
            stale,
        }
    }
}

/// The sampling fields as versions before `request` wrote them.
#[derive(Default, Deserialize)]
#[serde(default)]
struct FlatSampling {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    true_cfg: Option<f64>,
    width: Option<usize>,
    height: Option<usize>,
    steps: Option<usize>,
    seed: Option<u64>,
    guidance: Option<f64>,
    cache_threshold: Option<f64>,
}

impl Default for SettingsFile {
    fn default() -> Self {
        let d = Settings::default();
        Self {
            model: d.model,
            device: d.device,
            workers: d.workers,
            layout_auto: d.layout_auto,
            layout: None,
            request: None,
            random_seed: d.random_seed,
            batch: d.batch,
            compare_thresholds: d.compare_thresholds,
            compare_caches: d.compare_caches,
            compare_repeats: d.compare_repeats,
            heatmap_gain: d.heatmap_gain,
            fp8: d.fp8,
            fp8_attention: d.fp8_attention,
            memory_budget_gib: d.memory_budget_gib,
            parts: d.parts,
            loras: d.loras,
            compare_lora_strengths: d.compare_lora_strengths,
            flat: FlatSampling::default(),
            flat_layout: FlatLayout::default(),
        }
    }
}

impl From<SettingsFile> for Settings {
    fn from(f: SettingsFile) -> Self {
        let base = default_request();
        let mut r = f.request.unwrap_or_else(|| base.clone());
        let old = f.flat;
        // Older files: the flat fields, where present, are the settings.
        if let Some(v) = old.prompt {
            r.prompt = v;
        }
        if let Some(v) = old.negative_prompt {
            r.negative_prompt = Some(v);
        }
        if let Some(v) = old.width {
            r.width = v;
        }
        if let Some(v) = old.height {
            r.height = v;
        }
        if let Some(v) = old.seed {
            r.seed = v;
        }
        if let Some(v) = old.cache_threshold {
            r.cache_threshold = v;
        }
        r.true_cfg = old.true_cfg.or(r.true_cfg).or(base.true_cfg);
        r.steps = old.steps.or(r.steps).or(base.steps);
        r.guidance = old.guidance.or(r.guidance).or(base.guidance);
        r.negative_prompt.get_or_insert_with(String::new);
        // LoRAs a request kept (a restored image's) join the list, on.
        let mut loras = f.loras;
        lora::add_choices(&mut loras, std::mem::take(&mut r.loras));
        Settings {
            model: f.model,
            device: f.device,
            workers: f.workers,
            layout_auto: f.layout_auto,
            layout: f.layout.unwrap_or_else(|| f.flat_layout.layout()),
            request: r,
            random_seed: f.random_seed,
            batch: f.batch.max(1),
            compare_thresholds: f.compare_thresholds,
            compare_caches: f.compare_caches,
            compare_repeats: f.compare_repeats.clamp(1, 20),
            heatmap_gain: f.heatmap_gain,
            fp8: f.fp8,
            fp8_attention: f.fp8_attention,
            memory_budget_gib: f.memory_budget_gib,
            parts: f.parts,
            loras,
            compare_lora_strengths: f.compare_lora_strengths,
        }
    }
}

/// A model's parts named apart from its transformer (ComfyUI keeps them in other folders); empty:
/// found beside it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelParts {
    pub vae: String,
    pub clip: String,
    pub t5: String,
}

/// The policies a compare sweep runs besides First Block Cache: each one's balanced preset.
pub fn default_compare_caches() -> Vec<CacheSpec> {
    ["dbcache", "taylorseer", "magcache"]
        .iter()
        .filter_map(|p| CacheSpec::preset(p, "balanced"))
        .collect()
}

/// Cache policies as typed (`dbcache:t=0.2,taylor=1; magcache:t=0.3`), separated by `;`; empty
/// text is no policies. On error, says which entry is wrong and why.
pub fn parse_caches(text: &str) -> Result<Vec<CacheSpec>, String> {
    text.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<CacheSpec>().map_err(|e| e.to_string()))
        .collect()
}

/// The policies as [`parse_caches`] reads them.
pub fn format_caches(list: &[CacheSpec]) -> String {
    list.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The compare sweep's thresholds as typed (`0, 0.06, 0.08`): numbers from 0 to 1, separated by
/// commas or spaces. On error, says which entry is wrong.
pub fn parse_thresholds(text: &str) -> Result<Vec<f64>, String> {
    parse_numbers(
        text,
        0.0..=1.0,
        "give at least one threshold (e.g. 0, 0.06, 0.1)",
    )
}

/// Numbers as typed, separated by commas or spaces, each within `range`; on error, says which
/// entry is wrong (`empty`: what to say when there is none).
fn parse_numbers(
    text: &str,
    range: std::ops::RangeInclusive<f64>,
    empty: &str,
) -> Result<Vec<f64>, String> {
    let mut out = Vec::new();
    for part in text
        .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
        .filter(|p| !p.is_empty())
    {
        let v: f64 = part
            .parse()
            .map_err(|_| format!("`{part}` is not a number"))?;
        if !range.contains(&v) {
            return Err(format!(
                "{part} is outside {}..={}",
                range.start(),
                range.end()
            ));
        }
        out.push(v);
    }
    if out.is_empty() {
        return Err(empty.into());
    }
    Ok(out)
}

/// A LoRA strength in the compare sweep's list (typed as `0, 0.5, 1`; -2 to 2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Strength(pub f64);

/// The sweep's LoRA strengths as typed (`0, 0.5, 1`), as [`parse_thresholds`] reads its list.
pub fn parse_strengths(text: &str) -> Result<Vec<Strength>, String> {
    parse_numbers(
        text,
        lora::STRENGTHS,
        "give at least one strength (e.g. 0, 0.5, 1)",
    )
    .map(|v| v.into_iter().map(Strength).collect())
}

/// How the strengths are shown in the field.
pub fn format_strengths(v: &[Strength]) -> String {
    format_thresholds(&v.iter().map(|s| s.0).collect::<Vec<_>>())
}

/// How a threshold list is shown in the field.
pub fn format_thresholds(v: &[f64]) -> String {
    v.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A warning for sizes that will take long and need much memory (above 2048 px a side or 4 MP):
/// the estimated time for `steps` steps and the memory, `None` for ordinary sizes.
///
/// The time is FLUX.1-dev's on one H100 (BENCHMARKS.md: 130.7 ms a step at 1024 px, 684.9 ms at
/// 2048), through a cost of a·n + b·n² in the sequence length n fitted to those two; the memory
/// is the autoencoder's decode (20.7 GiB at 4096 px, growing with the pixels) and the largest
/// block's activations.
pub fn size_warning(width: usize, height: usize, steps: usize) -> Option<String> {
    let mp = (width * height) as f64 / 1e6;
    if width <= 2048 && height <= 2048 && mp <= 4.2 {
        return None;
    }
    // FLUX packs 2x2 latent patches of the 8x-downsampled image: one token per 16x16 pixels, plus
    // 512 text tokens.
    let tokens = (width / 16) * (height / 16);
    let seq = (tokens + 512) as f64;
    let (n1, t1, n2, t2) = (4608.0, 130.7, 16896.0, 684.9);
    let b = (t2 / n2 - t1 / n1) / (n2 - n1);
    let a = t1 / n1 - b * n1;
    let step_s = (a * seq + b * seq * seq) / 1e3;
    let total_s = step_s * steps.max(1) as f64;
    // The decode: 20.66 GiB at 4096x4096 (16.8 MP); one block's activations (hidden 3072, about
    // 12 values a token in f32).
    let decode_gib = 20.66 * mp / 16.78;
    let act_gib = seq * 3072.0 * 12.0 * 4.0 / (1u64 << 30) as f64;
    Some(format!(
        "{width}x{height} is {mp:.1} MP ({tokens} latent tokens; 1024x1024 has 4096). With \
         FLUX.1-dev on one H100 expect about {} a step, {} for {steps} steps (longer on smaller \
         GPUs), and about {:.0} GiB of GPU memory besides the model's weights ({decode_gib:.0} \
         GiB to decode the image, {act_gib:.1} GiB of activations).",
        duration(step_s),
        duration(total_s),
        decode_gib + act_gib
    ))
}

/// "45 s", "3.5 min", "2.1 h".
fn duration(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

impl Settings {
    /// The request for the current settings (the seed as shown; a blank negative prompt is none).
    pub fn request(&self) -> GenerateRequest {
        let mut r = self.request.clone();
        r.loras = lora::choices(&self.loras);
        if r.negative_prompt
            .as_deref()
            .is_none_or(|n| n.trim().is_empty())
        {
            r.negative_prompt = None;
        }
        r
    }

    /// Whether the model is the built-in demo.
    pub fn is_demo(&self) -> bool {
        self.model.trim().eq_ignore_ascii_case("demo")
    }

    /// A note when the demo model is asked for a size it was not trained at.
    pub fn demo_size_note(&self) -> Option<String> {
        let r = &self.request;
        (self.is_demo() && (r.width, r.height) != (DEMO_SIZE, DEMO_SIZE)).then(|| {
            format!(
                "the demo model was trained at 256 x 256 only: at {}x{} it draws poorly (choose \
                 256 x 256 under Size)",
                r.width, r.height
            )
        })
    }

    /// Steps as the panel shows them.
    pub fn steps(&self) -> usize {
        self.request.steps.unwrap_or(DEFAULT_STEPS)
    }

    /// Steps a job runs: all of them, or with a source image the part its strength leaves.
    pub fn steps_run(&self) -> usize {
        let n = self.steps();
        match &self.request.init {
            Some(i) => n - crate::pipeline::img2img::start_step(n, i.strength).min(n),
            None => n,
        }
    }

    /// The layout set by hand, or `None` for the automatic one.
    pub fn hand_layout(&self) -> Option<ParallelLayout> {
        (!self.layout_auto).then_some(self.layout)
    }

    /// The placement these settings name: the device list (`cpu`, `cuda:0,1`, ...), with
    /// `workers` CPU threads when it says `cpu`.
    pub fn placement(&self) -> crate::Result<Placement> {
        let device = self.device.trim();
        let devices = match (Devices::parse(device)?, self.workers.max(1)) {
            (Devices::Cpu(1), n) => Devices::Cpu(n),
            (d, _) => d,
        };
        Ok(Placement {
            devices,
            layout: self.hand_layout().map_or(LayoutChoice::Auto, |l| {
                LayoutChoice::Degrees(Degrees::of(l))
            }),
        })
    }

    /// Take a placement given at start-up (`parallax studio --devices ...`).
    pub fn set_placement(&mut self, p: &Placement) {
        match p.devices {
            Devices::Cpu(n) => {
                self.device = "cpu".into();
                self.workers = n;
            }
            ref gpus => self.device = gpus.to_string(),
        }
        match p.layout {
            LayoutChoice::Auto => self.layout_auto = true,
            LayoutChoice::Degrees(d) => {
                // The degrees as they resolve over these workers (ring takes the rest).
                let workers = p
                    .devices
                    .named_count()
                    .unwrap_or_else(|| crate::engine::gpus_present().max(1));
                self.set_layout(d.layout_for(workers));
            }
        }
    }

    /// Set the degrees by hand to `l`'s (auto layout off).
    pub fn set_layout(&mut self, l: ParallelLayout) {
        self.layout_auto = false;
        self.layout = l;
    }

    /// Auto layout was just turned off: the degrees start from what auto chose (kept as they
    /// were where auto has no plan for these settings).
    pub fn layout_by_hand(&mut self, model: ModelShape) {
        let auto = Settings {
            layout_auto: true,
            ..self.clone()
        };
        match auto.plan(model.heads) {
            Ok(plan) => self.set_layout(plan.layout),
            Err(_) => self.layout_auto = false,
        }
    }

    pub fn engine_spec(&self) -> EngineSpec {
        let mut spec = EngineSpec::new(self.model.trim(), self.placement().unwrap_or_default());
        if self.fp8 {
            spec.model.precision = crate::engine::Precision::Fp8;
        }
        spec.model.fp8_attention = self.fp8_attention;
        spec.model.memory_budget_mib = self.memory_budget_gib.map(|g| u64::from(g) * 1024);
        let path = |s: &str| (!s.trim().is_empty()).then(|| std::path::PathBuf::from(s.trim()));
        spec.model.vae = path(&self.parts.vae);
        spec.model.clip = path(&self.parts.clip);
        spec.model.t5 = path(&self.parts.t5);
        spec
    }

    /// Problems with the settings as typed, shown next to the fields and blocking Generate.
    pub fn problems(&self, model: ModelShape) -> Vec<String> {
        let mut out = Vec::new();
        // The request's own values, in the words the CLI and the pipeline refuse them with.
        for e in crate::pipeline::request_problems(&self.request()) {
            out.push(in_studio_words(&e));
        }
        if self.model.trim().is_empty() {
            out.push("choose a model (demo, a file, a folder or a Hugging Face repo id)".into());
        }
        if let Err(e) = self.layout_check(model) {
            out.push(e);
        }
        out.extend(self.source_problem());
        out
    }

    /// What is wrong with the source image (gone, or a strength that leaves no step).
    fn source_problem(&self) -> Option<String> {
        let init = self.request.init.as_ref()?;
        if !init.image.is_file() {
            return Some(format!(
                "the source image {} is not there any more: open another, or Clear it",
                init.image.display()
            ));
        }
        (self.steps_run() == 0).then(|| {
            format!(
                "strength {} leaves none of the {} steps to run: raise the strength or the steps",
                init.strength,
                self.steps()
            )
        })
    }

    /// The engine's plan for these settings (what a job will run with).
    pub fn plan(&self, heads: usize) -> crate::Result<Plan> {
        self.placement()?.plan(
            heads,
            crate::engine::wants_true_cfg(&self.request()),
            crate::engine::gpus_present(),
        )
    }

    /// The layout these settings give, or why they are refused: the engine's own checks (the
    /// plan, then what the layout refuses for this request at Generate), so the panel shows
    /// exactly the plan a job will run with, and refuses what the engine would, in the panel's
    /// words.
    pub fn layout_check(&self, model: ModelShape) -> Result<String, String> {
        let plan = self.plan(model.heads).map_err(|e| in_studio_words(&e))?;
        self.refusal_for(&plan, &self.request(), model)?;
        Ok(plan.describe())
    }

    /// Why a compare sweep cannot run on these settings' layout (its cells use the caches).
    pub fn compare_check(&self, model: ModelShape) -> Result<(), String> {
        let plan = self.plan(model.heads).map_err(|e| in_studio_words(&e))?;
        let base = self.request();
        let sweep = crate::runtime::JobSpec::Compare {
            base,
            thresholds: self.compare_thresholds.clone(),
            caches: self.compare_caches.clone(),
            repeats: self.compare_repeats,
            lora_strengths: self.lora_sweep(),
        };
        for r in sweep.requests() {
            self.refusal_for(&plan, &r, model)
                .map_err(|e| format!("the compare sweep: {e}"))?;
        }
        Ok(())
    }

    fn refusal_for(
        &self,
        plan: &Plan,
        req: &GenerateRequest,
        model: ModelShape,
    ) -> Result<(), String> {
        if let Some(r) = refusal::check(plan.layout, req, model.blocks) {
            return Err(refusal_words(r));
        }
        if !model.magcache && matches!(req.cache, Some(CacheSpec::MagCache { .. })) {
            return Err(
                "MagCache needs a calibration this model does not have (make one with \
                        `parallax calibrate-magcache`): pick another cache, or take MagCache out \
                        of the compare policies"
                    .into(),
            );
        }
        Ok(())
    }

    /// Take the settings an image was made with (gallery "restore").
    pub fn restore(&mut self, s: &GenerationSettings) {
        // An image-to-image's source, strength, mask and outpainting come back with it (shown
        // under "Start from an image", where they can be cleared).
        self.request = s.to_request();
        self.request.negative_prompt = Some(s.negative_prompt.clone().unwrap_or_default());
        self.random_seed = false;
        self.model = s.model.clone();
        // The image's LoRAs, and only them, are on (others in the list stay, turned off).
        for e in &mut self.loras {
            e.on = false;
        }
        lora::add_choices(&mut self.loras, std::mem::take(&mut self.request.loras));
    }

    /// The strengths a compare sweep crosses with its cells: the list when a LoRA is on, else
    /// none (a sweep without LoRAs has nothing to vary).
    pub fn lora_sweep(&self) -> Vec<f64> {
        if self.loras.iter().any(|l| l.on) {
            self.compare_lora_strengths.iter().map(|s| s.0).collect()
        } else {
            Vec::new()
        }
    }

    /// Take what another tool's image states (prompt, size, steps, seed, guidance, ...), leaving
    /// the rest and the model as they are; returns the names of what was taken.
    pub fn recall(&mut self, r: &crate::pipeline::metadata::Recalled) -> Vec<&'static str> {
        let mut took = Vec::new();
        let req = &mut self.request;
        if let Some(p) = &r.prompt {
            req.prompt = p.clone();
            took.push("prompt");
        }
        if let Some(n) = &r.negative_prompt {
            req.negative_prompt = Some(n.clone());
            took.push("negative prompt");
        }
        if let (Some(w), Some(h)) = (r.width, r.height) {
            req.width = w;
            req.height = h;
            took.push("size");
        }
        if let Some(n) = r.steps {
            req.steps = Some(n);
            took.push("steps");
        }
        if let Some(seed) = r.seed {
            req.seed = seed;
            self.random_seed = false;
            took.push("seed");
        }
        if let Some(g) = r.guidance {
            req.guidance = Some(g);
            took.push("guidance");
        }
        if let Some(c) = r.true_cfg.filter(|c| c.is_finite() && *c >= 1.0) {
            req.true_cfg = Some(c);
            took.push("true CFG");
        }
        if let Some(c) = &r.cache {
            req.cache = Some(c.clone());
            took.push("cache");
        }
        took
    }
}

/// What the studio knows of the loaded model's shape: what a layout must divide (attention
/// heads) and how many PipeFusion stages it takes at most (blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub heads: usize,
    pub blocks: usize,
    /// Whether the model has a MagCache calibration (assumed until a model has loaded).
    pub magcache: bool,
}

impl Default for ModelShape {
    /// FLUX.1's (until a model has loaded).
    fn default() -> Self {
        Self {
            heads: 24,
            blocks: 57,
            magcache: true,
        }
    }
}

/// A refusal of the engine's, in the panel's words, with the fix the panel offers.
pub fn refusal_words(r: Refusal) -> String {
    match r {
        Refusal::StaleNeedsCfg2 { what } => {
            let what = if what == "displaced" {
                "displaced patches keep"
            } else {
                "PipeFusion keeps"
            };
            format!(
                "{what} one pass's keys and values a step, and True CFG above 1 needs two: set \
                 cfg to 2 (twice the workers), or True CFG to 1"
            )
        }
        Refusal::TooManyStages { stages, blocks } => format!(
            "pipefusion {stages}: the model has {blocks} blocks, so at most {blocks} stages"
        ),
        Refusal::TooManyPatches { patches, tokens } => format!(
            "{patches} PipeFusion patches: a {tokens}-token image takes at most {tokens}; \
             lower the patches or make the image larger"
        ),
        Refusal::PipeFusionCache => "PipeFusion runs without a cache: set Cache to First Block \
             Cache with the threshold at 0, or pipefusion to 1"
            .into(),
        Refusal::Cfg2WithoutTrueCfg => "cfg 2 runs the negative prompt's branch at the same \
             time: write a negative prompt and set True CFG above 1, or set cfg to 1"
            .into(),
    }
}

/// An engine error about the devices or the layout in the panel's words: the panel's names for
/// the command line's flags, and no `invalid setting` preamble.
pub fn in_studio_words(e: &crate::Error) -> String {
    let text = match e {
        crate::Error::InvalidSetting {
            name,
            value,
            reason,
        } => match name.as_str() {
            "parallel layout" => format!("layout {value}: {reason}"),
            "devices" => format!("device list `{value}`: {reason}"),
            _ => format!("{name} {value}: {reason}"),
        },
        other => other.to_string(),
    };
    [
        ("--negative-prompt", "a negative prompt"),
        ("--true-cfg", "True CFG"),
        ("--pipefusion", "pipefusion"),
        ("--ulysses", "ulysses"),
        ("--ring", "ring"),
        ("--cfg", "cfg"),
        ("--dp", "dp"),
        ("--displaced", "displaced patches"),
        ("--warmup-steps", "warm-up"),
        ("--devices", "the device list"),
    ]
    .iter()
    .fold(text, |t, (flag, words)| t.replace(flag, words))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model without a MagCache calibration: the panel refuses a sweep with MagCache in it as
    /// typed (the engine would fail at that cell, after the ones before it), not otherwise.
    #[test]
    fn magcache_without_a_calibration_is_refused_as_typed() {
        let s = Settings::default();
        assert!(s
            .compare_caches
            .iter()
            .any(|c| matches!(c, CacheSpec::MagCache { .. })));
        let uncalibrated = ModelShape {
            magcache: false,
            ..ModelShape::default()
        };
        let e = s.compare_check(uncalibrated).expect_err("refused");
        assert!(e.contains("MagCache needs a calibration"), "{e}");
        assert!(s.compare_check(ModelShape::default()).is_ok());
        let mut one = s.clone();
        one.request.cache = CacheSpec::preset("magcache", "balanced");
        assert!(one.layout_check(uncalibrated).is_err());
        assert!(one.layout_check(ModelShape::default()).is_ok());
    }

    #[test]
    fn defaults_are_valid_and_bad_input_is_explained() {
        let s = Settings::default();
        assert!(
            s.problems(ModelShape::default()).is_empty(),
            "{:?}",
            s.problems(ModelShape::default())
        );
        let bad = Settings {
            request: GenerateRequest {
                width: 100,
                steps: Some(0),
                ..Settings::default().request
            },
            workers: 4,
            layout_auto: false,
            layout: ParallelLayout {
                ulysses: 5,
                ring: 1,
                ..ParallelLayout::default()
            },
            ..Settings::default()
        };
        let p = bad.problems(ModelShape::default());
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].contains("width 100: must be a positive multiple of 16"),
            "{p:?}"
        );
    }

    #[test]
    fn auto_layout_and_restore() {
        let s = Settings {
            workers: 4,
            ..Settings::default()
        };
        assert!(s
            .layout_check(ModelShape::default())
            .expect("valid")
            .contains("ulysses 4"));
        let mut t = Settings::default();
        let g = GenerationSettings {
            prompt: "p".into(),
            negative_prompt: Some("n".into()),
            true_cfg: 2.0,
            width: 64,
            height: 48,
            steps: 7,
            seed: 9,
            guidance: 2.5,
            cache_threshold: 0.08,
            cache: None,
            model: "demo".into(),
            loras: vec![crate::model::lora::LoraChoice {
                path: "ink.safetensors".into(),
                strength: -0.5,
            }],
            variant: crate::model::layout::Variant::Schnell,
            synthetic: true,
            dtype: "f32".into(),
            sampler: "euler".into(),
            schedule: "x".into(),
            noise: "y".into(),
            parallax_version: "0".into(),
            init: None,
        };
        t.restore(&g);
        assert_eq!(t.request(), g.to_request());
        // A restored image without a negative prompt gives a request without one.
        t.restore(&GenerationSettings {
            negative_prompt: None,
            ..g.clone()
        });
        assert_eq!(t.request().negative_prompt, None);
        assert_eq!(t.request.negative_prompt.as_deref(), Some(""));
    }

    #[test]
    fn persisted_settings_round_trip_and_old_files_still_load() {
        let s = Settings {
            request: GenerateRequest {
                prompt: "x".into(),
                seed: 5,
                ..Settings::default().request
            },
            compare_thresholds: vec![0.0, 0.1],
            workers: 3,
            ..Settings::default()
        };
        let text = serde_json::to_string(&s).expect("serialise");
        assert!(text.contains(r#""request":{"#), "{text}");
        assert_eq!(serde_json::from_str::<Settings>(&text).expect("parse"), s);
        // A file from an older version with fewer fields takes defaults for the rest.
        let old: Settings =
            serde_json::from_str(r#"{"prompt": "old", "steps": 9}"#).expect("parse");
        assert_eq!(
            (old.request.prompt.as_str(), old.steps(), old.request.width),
            ("old", 9, 256)
        );
        // A whole file of the old flat format: every sampling field moves into `request`.
        let flat = r#"{"model": "demo", "device": "cpu", "workers": 2, "layout_auto": true,
            "ulysses": 1, "ring": 1, "cfg": 1, "dp": 1, "prompt": "a fox",
            "negative_prompt": "blur", "true_cfg": 2.5, "width": 512, "height": 768,
            "steps": 12, "seed": 77, "random_seed": true, "guidance": 4.0,
            "cache_threshold": 0.08, "compare_thresholds": [0.0, 0.05], "heatmap_gain": 6.0}"#;
        let old: Settings = serde_json::from_str(flat).expect("parse the old flat format");
        assert_eq!(
            old.request,
            GenerateRequest {
                prompt: "a fox".into(),
                negative_prompt: Some("blur".into()),
                true_cfg: Some(2.5),
                width: 512,
                height: 768,
                steps: Some(12),
                seed: 77,
                guidance: Some(4.0),
                cache_threshold: 0.08,
                cache: None,
                ..GenerateRequest::default()
            }
        );
        assert_eq!(old.workers, 2);
        assert!(old.random_seed);
        assert_eq!(old.compare_thresholds, vec![0.0, 0.05]);
        assert_eq!(old.heatmap_gain, 6.0);
        // Files from before the precision setting run at native precision.
        assert!(!old.fp8);
        assert_eq!(
            old.engine_spec().model.precision,
            crate::engine::Precision::Native
        );
        // Parts named apart from the model go to the engine; blank ones are looked for beside it.
        let parts = Settings {
            parts: ModelParts {
                clip: " /m/clip/clip_l.safetensors ".into(),
                t5: "/m/clip/t5xxl_fp16.safetensors".into(),
                vae: String::new(),
            },
            ..old.clone()
        };
        let m = parts.engine_spec().model;
        assert_eq!(
            (m.vae, m.clip, m.t5),
            (
                None,
                Some("/m/clip/clip_l.safetensors".into()),
                Some("/m/clip/t5xxl_fp16.safetensors".into())
            )
        );
        let fp8 = Settings {
            fp8: true,
            ..old.clone()
        };
        assert_eq!(
            fp8.engine_spec().model.precision,
            crate::engine::Precision::Fp8
        );
        // Nor FP8 attention, which reaches the engine's model choice when on.
        assert!(!old.fp8_attention && !old.engine_spec().model.fp8_attention);
        let attention = Settings {
            fp8_attention: true,
            ..old.clone()
        };
        assert!(attention.engine_spec().model.fp8_attention);
        // Nor a memory budget or displaced patches.
        assert_eq!(old.memory_budget_gib, None);
        assert_eq!(old.layout.stale, Stale::Exact);
        let lean = Settings {
            memory_budget_gib: Some(24),
            layout_auto: false,
            layout: ParallelLayout {
                ring: 2,
                stale: Stale::Displaced {
                    warmup: 3,
                    rotate: true,
                },
                ..old.layout
            },
            ..old.clone()
        };
        assert_eq!(lean.engine_spec().model.memory_budget_mib, Some(24 * 1024));
        assert_eq!(lean.hand_layout().and_then(|l| l.stale.warmup()), Some(3));
        assert!(lean
            .hand_layout()
            .is_some_and(|l| matches!(l.stale, Stale::Displaced { rotate: true, .. })));
        let text = serde_json::to_string(&lean).expect("serialise");
        assert_eq!(
            serde_json::from_str::<Settings>(&text).expect("parse"),
            lean
        );
        // Saved again, it is in the new format and reads back the same.
        let again = serde_json::to_string(&old).expect("serialise");
        assert_eq!(
            serde_json::from_str::<Settings>(&again).expect("parse"),
            old
        );
    }

    #[test]
    fn layouts_saved_in_the_old_flat_fields_still_load() {
        let layout = |json: &str| {
            serde_json::from_str::<Settings>(json)
                .expect("parse")
                .hand_layout()
        };
        // PipeFusion by hand, as a file before `layout` wrote it.
        let pipe = r#"{"layout_auto": false, "ulysses": 2, "ring": 1, "cfg": 2, "dp": 1,
            "displaced_warmup": null, "displaced_rotate": false, "pipeline": 2,
            "pipeline_patches": 4, "pipeline_warmup": 3, "pipeline_by_memory": true}"#;
        assert_eq!(
            layout(pipe),
            Some(ParallelLayout {
                dp: 1,
                cfg: 2,
                ring: 1,
                ulysses: 2,
                stale: Stale::PipeFusion {
                    stages: 2,
                    patches: 4,
                    warmup: 3,
                    balance: StageBalance::Memory,
                },
            })
        );
        // Displaced patches, rotating; PipeFusion's fields left at one stage are not used.
        let displaced = r#"{"layout_auto": false, "ulysses": 1, "ring": 4, "cfg": 1, "dp": 2,
            "displaced_warmup": 2, "displaced_rotate": true, "pipeline": 1,
            "pipeline_patches": 2, "pipeline_warmup": 1, "pipeline_by_memory": false}"#;
        assert_eq!(
            layout(displaced),
            Some(ParallelLayout {
                dp: 2,
                ring: 4,
                stale: Stale::Displaced {
                    warmup: 2,
                    rotate: true
                },
                ..ParallelLayout::default()
            })
        );
        // Plain degrees; with auto on, the degrees are kept for when it is turned off.
        let auto: Settings =
            serde_json::from_str(r#"{"layout_auto": true, "ulysses": 2, "ring": 2}"#)
                .expect("parse");
        assert_eq!(auto.hand_layout(), None);
        assert_eq!((auto.layout.ulysses, auto.layout.ring), (2, 2));
        assert_eq!(auto.layout.stale, Stale::Exact);
        // Written again, the layout is one field and reads back the same.
        let s = Settings {
            layout_auto: false,
            layout: layout(pipe).expect("by hand"),
            ..Settings::default()
        };
        let text = serde_json::to_string(&s).expect("serialise");
        assert!(text.contains(r#""layout":{"#), "{text}");
        assert!(!text.contains("pipeline_patches"), "{text}");
        assert_eq!(serde_json::from_str::<Settings>(&text).expect("parse"), s);
    }

    #[test]
    fn thresholds_are_parsed_not_reformatted() {
        assert_eq!(
            parse_thresholds("0, 0.06,0.08 0.12"),
            Ok(vec![0.0, 0.06, 0.08, 0.12])
        );
        assert_eq!(parse_thresholds("0.2,3"), Err("3 is outside 0..=1".into()));
        assert_eq!(parse_thresholds("61"), Err("61 is outside 0..=1".into()));
        assert!(parse_thresholds("0, x")
            .unwrap_err()
            .contains("`x` is not a number"));
        assert!(parse_thresholds("  ").is_err());
        let d = Settings::default().compare_thresholds;
        assert_eq!(parse_thresholds(&format_thresholds(&d)), Ok(d));
    }

    #[test]
    fn large_sizes_are_warned_about() {
        assert_eq!(size_warning(1024, 1024, 28), None);
        assert_eq!(size_warning(2048, 2048, 28), None);
        let w = size_warning(8000, 8000, 28).expect("a warning");
        assert!(w.contains("250000 latent tokens"), "{w}");
        assert!(w.contains("64.0 MP"), "{w}");
        // 68 s a step from the fitted cost; 79 GiB to decode and 34 GiB of activations.
        assert!(
            w.contains("about 68 s a step, 31.8 min for 28 steps"),
            "{w}"
        );
        assert!(w.contains("about 113 GiB of GPU memory"), "{w}");
        assert!(!w.contains("x the time"), "{w}");
        let w = size_warning(4096, 512, 12).expect("wider than 2048");
        assert!(w.contains("for 12 steps"), "{w}");
    }

    #[test]
    fn strengths_are_parsed_with_their_range() {
        assert_eq!(
            parse_strengths("0, 0.5 1,-1"),
            Ok(vec![
                Strength(0.0),
                Strength(0.5),
                Strength(1.0),
                Strength(-1.0)
            ])
        );
        assert_eq!(parse_strengths("3"), Err("3 is outside -2..=2".into()));
        assert!(parse_strengths("x").unwrap_err().contains("`x`"));
        assert!(parse_strengths(" ").is_err());
        let v = vec![Strength(0.0), Strength(0.5)];
        assert_eq!(parse_strengths(&format_strengths(&v)), Ok(v));
    }
}
