//! The `parallax` command line. What a user runs: `studio` (the default), `generate`, `compare`,
//! `bench`, `info`, `memory`, `plan`, `download`, `worker`. The project's own instruments sit under
//! `parallax dev` ([`DevCommand`]: `selfcheck`, `profile`, `bench-vae`, `export-demo`, `dataset`,
//! `score`, `calibrate-magcache`, `fp8-error`, `displaced-error`); their old top-level spellings
//! still work.

/// `println!` throughout the command line (this module and those declared below) is
/// [`out::line`]'s: a closed pipe ends the command quietly instead of panicking.
macro_rules! println {
    () => {
        $crate::cli::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::line(format_args!($($arg)*))
    };
}

mod out;

mod bench_klein;
mod bench_vae;
mod calibrate;
mod dataset;
mod displaced_error;
mod download;
mod fp8_error;
mod gguf;
mod launcher;
mod memory;
pub mod plan;
mod profile;
mod random_lora;
mod score;
mod selfcheck;
mod worker_job;
mod write_checkpoint;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::{
    gpus_present, load_pipeline, model_config, DTypeChoice, Degrees, Devices, Engine, LayoutChoice,
    ModelChoice, Placement,
};
use crate::model::layout::{self, ModelSpec, Resolved, Variant};
use crate::pipeline::{describe_cache, image, step_pattern, GenerateRequest, Progress};

#[derive(Debug, Parser)]
#[command(
    name = "parallax",
    version,
    about = "FLUX.1 text-to-image on candle, built for many GPUs"
)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do; with none, the studio opens on the built-in demo model.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open the studio window (the default when no command is given).
    Studio(StudioArgs),
    /// Generate one image and save it as PNG with its settings.
    Generate(GenerateArgs),
    /// The studio's compare sweep without the window: one prompt and seed at several cache
    /// thresholds through the runtime, as JSON (steps computed and reused, wall time, speedup,
    /// PSNR and SSIM against the uncached image).
    Compare(CompareArgs),
    /// Show which model and layout a --model value resolves to, and why.
    Info(InfoArgs),
    /// Fetch a model (`schnell`, `dev` or a repo id) from the Hugging Face Hub into the Hugging
    /// Face cache, where --model finds it; an interrupted download resumes.
    Download(download::DownloadArgs),
    /// What one image needs on one GPU under memory budgets (8/10/12/16/24/48/80 GiB by
    /// default), which measures each takes, and how many GPUs would do where one is not enough:
    /// an estimate from the configs, no weights read (`dev`/`schnell` need not be downloaded).
    Memory(memory::MemoryArgs),
    /// The predicted step time of every valid layout on N GPUs (or CPU workers), fastest
    /// first, from the compute measured on one device and the link's latency and bandwidth.
    Plan(plan::PlanArgs),
    /// Run one rank of a generation spread over several processes (CPU ranks; see README,
    /// "Past one machine"). Rank 0 serves the rendezvous at --init and writes the image.
    Worker(WorkerArgs),
    /// Time a generation: per-step, total, peak memory, as JSON.
    Bench(BenchArgs),
    /// The project's own instruments: kernel checks and timings, quality measurements, the demo
    /// model's tools (`parallax dev --help`).
    Dev(DevArgs),
}

/// `parallax dev ...`: the project's own instruments, kept out of the user's list. Their old
/// spellings (`parallax selfcheck`, ...) still work: [`dev_alias`] routes them here.
#[derive(Debug, Args)]
pub struct DevArgs {
    #[command(subcommand)]
    pub command: DevCommand,
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Check a device against the CPU: fused kernels against plain candle ops, the tiny model in
    /// bf16 on the device against f32 on the CPU.
    Selfcheck(SelfcheckArgs),
    /// Time the pieces of one FLUX.1-dev step (attention, linear layers, norms, blocks) on a device.
    Profile(ProfileArgs),
    /// Time the autoencoder decode alone (FLUX.1's autoencoder, random weights): time and peak
    /// device memory, as JSON.
    BenchVae(bench_vae::BenchVaeArgs),
    /// Write the built-in demo model to a folder in FLUX.1's real file layouts (to try the loaders).
    ExportDemo(ExportDemoArgs),
    /// Write the demo model's procedural training scenes (or its evaluation prompts) for the
    /// trainer in scripts/train-demo/.
    Dataset(dataset::DatasetArgs),
    /// How well images follow their prompts (the demo dataset's scorer): one image, or the
    /// evaluation prompts generated at one or more cache thresholds, as JSON.
    Score(score::ScoreArgs),
    /// Measure this model's residual-magnitude rate for the MagCache policy and save it.
    CalibrateMagcache(calibrate::CalibrateArgs),
    /// What FP8 products cost each group of the transformer's layers: the relative error of the
    /// velocity at three steps of one image, per group and for all of them, as JSON.
    Fp8Error(fp8_error::Fp8ErrorArgs),
    /// How far displaced patch parallelism lands from the one-device result: the relative error
    /// of the final latent per (ranks, warm-up steps), the ranks as threads sharing one device.
    DisplacedError(displaced_error::DisplacedErrorArgs),
    /// Write a FLUX transformer (a Black Forest Labs single file) as a GGUF file in a chosen
    /// GGML type (Q8_0, Q5_K, Q4_0, ...), the layout the community's quantised files use.
    ExportGguf(gguf::ExportGgufArgs),
    /// What each GGUF type costs the demo model: velocity error, PSNR/SSIM against the
    /// unquantised images, prompt accuracy and file size, as JSON.
    GgufError(gguf::GgufErrorArgs),
    /// FLUX.2 klein's whole image with random weights on one device (text, steps, decode), timed
    /// by phase with the peak memory, as JSON lines.
    BenchKlein(bench_klein::BenchKleinArgs),
    /// A LoRA file with random weights for a FLUX.1 size (rank as asked, on the blocks'
    /// products): what LoRA overhead is timed with.
    RandomLora(random_lora::RandomLoraArgs),
    /// A FLUX.1 transformer of real size with random weights written in Black Forest Labs'
    /// single-file layout, bf16 or FP8, tensor by tensor (for timing a cold start from disk).
    WriteCheckpoint(write_checkpoint::WriteCheckpointArgs),
}

/// The instruments' names, as `parallax dev` lists them.
const DEV_COMMANDS: [&str; 14] = [
    "selfcheck",
    "profile",
    "bench-vae",
    "export-demo",
    "dataset",
    "score",
    "calibrate-magcache",
    "fp8-error",
    "displaced-error",
    "export-gguf",
    "gguf-error",
    "bench-klein",
    "random-lora",
    "write-checkpoint",
];

/// The command line with an instrument's old top-level spelling (`parallax score ...`) routed to
/// `parallax dev score ...`; anything else unchanged.
pub fn dev_alias(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    // The subcommand is the first argument that is not a global flag (-v, -vv, --verbose).
    let at = args
        .iter()
        .skip(1)
        .position(|a| {
            !(a == "--verbose"
                || a.to_str().is_some_and(|s| {
                    s.len() > 1 && s.starts_with('-') && s[1..].chars().all(|c| c == 'v')
                }))
        })
        .map(|i| i + 1);
    match at {
        Some(i) if args[i].to_str().is_some_and(|s| DEV_COMMANDS.contains(&s)) => {
            let mut out = args;
            out.insert(i, "dev".into());
            out
        }
        _ => args,
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// This process's rank, 0..world (default: torchrun's RANK or Slurm's SLURM_PROCID).
    #[arg(long)]
    pub rank: Option<usize>,
    /// How many processes take part (default: WORLD_SIZE or SLURM_NTASKS).
    #[arg(long)]
    pub world: Option<usize>,
    /// Rendezvous: tcp://HOST:PORT, where rank 0 listens and the others connect (default:
    /// MASTER_ADDR and MASTER_PORT, or Slurm's first node).
    #[arg(long)]
    pub init: Option<String>,
    /// Seconds to wait for every rank to arrive (1 to 86400; also the longest rank 0 waits for
    /// the others to finish).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    /// Seconds a rank that has loaded the model and encoded the prompt waits for the others to
    /// (1 to 86400). Each step after that is bounded by PARALLAX_COLLECTIVE_TIMEOUT_S.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub load_timeout: u64,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub source: InitArgs,
    #[command(flatten)]
    pub degrees: Degrees,
    /// Output PNG, written by rank 0 (default: parallax-<seed>.png).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// A file holding the job's worker token (default: `PARALLAX_WORKER_TOKEN`; with neither,
    /// rank 0 makes one: see README, "Past one machine").
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct StudioArgs {
    /// Model to load (overrides the one remembered from the last session).
    #[arg(long)]
    pub model: Option<String>,
    /// One device (`cpu`, `cuda` = GPU 0, `cuda:N`); several go in --devices.
    #[arg(long)]
    pub device: Option<String>,
    /// The devices and layout, as for `generate` (overrides the remembered ones).
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Gallery folder (default: $PARALLAX_HOME/gallery or ~/.local/share/parallax/gallery).
    #[arg(long)]
    pub gallery: Option<PathBuf>,
    /// Start generating as soon as the model is loaded.
    #[arg(long)]
    pub auto_generate: bool,
    /// With --auto-generate: run a compare sweep instead.
    #[arg(long)]
    pub compare: bool,
    /// After the first job, save a screenshot of the window here.
    #[arg(long)]
    pub screenshot: Option<PathBuf>,
    /// Close the window after the first Generate's jobs (a batch of N is N jobs) and the screenshot.
    #[arg(long)]
    pub quit_after_job: bool,
    /// Write frame times and step-to-preview latencies (JSON) here on exit.
    #[arg(long)]
    pub ui_stats: Option<PathBuf>,
    /// Start from default settings instead of the remembered ones.
    #[arg(long)]
    pub fresh: bool,
    /// Steps (overrides the remembered setting).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Image size in pixels, e.g. 512x512 (overrides the remembered setting).
    #[arg(long)]
    pub size: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ProfileArgs {
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Image size the sequence lengths are taken from.
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
}

#[derive(Debug, Clone, Args)]
pub struct SelfcheckArgs {
    /// The device to check (`cuda`, `cuda:N`; `cpu` checks the CPU fallbacks only).
    #[arg(long, default_value = "cuda")]
    pub device: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    /// flux1-dev.safetensors + ae.safetensors (Black Forest Labs names)
    Bfl,
    /// transformer/, vae/, text_encoder*/, tokenizer*/ (diffusers names)
    Diffusers,
    /// models/diffusion_models/, models/vae/, models/clip/ single files (a ComfyUI install)
    Comfyui,
}

#[derive(Debug, Clone, Args)]
pub struct ExportDemoArgs {
    /// The folder to write (created if needed; must be empty or new).
    pub dir: PathBuf,
    #[arg(long, value_enum, default_value_t = LayoutArg::Diffusers)]
    pub layout: LayoutArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    Native,
    Fp8,
}

impl From<PrecisionArg> for crate::engine::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Native => Self::Native,
            PrecisionArg::Fp8 => Self::Fp8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// f32 for the demo model, bf16 for real weights.
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// `demo` (built in, no files), `dev`/`schnell` or a repo id (from the Hugging Face cache),
    /// a BFL `.safetensors` file, or a diffusers/BFL folder.
    #[arg(long, default_value = "demo")]
    pub model: String,
    /// Folder with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ (defaults to the
    /// model's folder). `random` beside a transformer file: random text encoders and
    /// autoencoder made on the device (for timing a transformer read from disk; images are noise).
    #[arg(long)]
    pub text_encoders: Option<PathBuf>,
    /// The autoencoder, anywhere: `ae.safetensors` or a diffusers `vae/` folder (default: beside
    /// the transformer, or ComfyUI's models/vae/ae.safetensors).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// The CLIP text model, anywhere: a single file such as ComfyUI's `clip_l.safetensors`, or a
    /// diffusers `text_encoder/` folder.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// The T5 encoder, anywhere: a single file such as ComfyUI's `t5xxl_fp16.safetensors` or
    /// `t5xxl_fp8_e4m3fn.safetensors`, or a diffusers `text_encoder_2/` folder.
    #[arg(long)]
    pub t5: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DTypeArg::Auto)]
    pub dtype: DTypeArg,
    /// Precision of the transformer blocks' products: `native` (the dtype's), or `fp8` (E4M3
    /// weights per output channel and activations per token: cuBLASLt's FP8 products in bf16 on
    /// sm_89+ GPUs, simulated by rounding elsewhere (FP8's quality without its speed); embedders,
    /// modulations and the output layer stay native).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Native)]
    pub precision: PrecisionArg,
    /// FP8 attention: the scores Q Kᵀ from E4M3 queries and keys (per head, a scale for each 64
    /// query rows and each 128 keys), the rest in the run's dtype. Experimental: runs on H100/H200
    /// in bf16 but is not faster yet (a step takes as long); simulated on the CPU (its quality, not
    /// its speed). Any layout.
    #[arg(long)]
    pub fp8_attention: bool,
    /// Fit each GPU's share of the model within this much memory (`24`, `24G`, `20000M`; GiB
    /// without a unit), planned for the command's --width and --height (1024 px when it names
    /// none; the studio: 1024 px): T5 built for each prompt and freed after it, then
    /// FP8 products without bf16 copies, then the modulations stored in FP8 (weight-only), as
    /// far as needed; refused with the estimate when even that does not fit. See `parallax
    /// memory` for what fits where.
    #[arg(long, value_parser = crate::engine::memory::parse_budget)]
    pub memory_budget: Option<f64>,
    /// Device: `cpu`, `cuda` (GPU 0) or `cuda:N` (builds with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Clone, Args)]
pub struct SampleArgs {
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Negative prompt for true classifier-free guidance (with --true-cfg above 1).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// True CFG scale: v = v_neg + s (v_pos - v_neg); 1 (default) is off. Costs a second
    /// transformer pass a step, or a second group of workers with --cfg 2.
    #[arg(long, allow_negative_numbers = true)]
    pub true_cfg: Option<f64>,
    /// Image width in pixels, a multiple of 16 (default 256 for the demo, 1024 otherwise).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps (default: 28 for dev, 4 for schnell, 12 for the demo).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Noise seed (default: random, printed and stored in the PNG).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Distilled guidance strength for dev-style models (default 3.5; 1 for the demo).
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// First Block Cache residual_diff_threshold; 0 turns it off (FLUX default when on: 0.08).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub cache_threshold: f64,
    /// Cache policy and settings, replacing --cache-threshold: `none`, `fbcache:t=0.12`,
    /// `dbcache:f=1,b=1,t=0.12,max=0,warmup=0,taylor=0`, `taylorseer:n=3,order=1,warmup=2`,
    /// `magcache:t=0.3,k=3,warmup=2` (MagCache needs the model's calibration: the demo ships
    /// one, `parallax calibrate-magcache` makes one).
    #[arg(long)]
    pub cache: Option<crate::pipeline::cache::CacheSpec>,
    /// A LoRA file beside the model, `FILE` or `FILE:STRENGTH` (default 1; negative turns its
    /// effect around). Repeat for several; kohya, diffusers/PEFT and BFL/ComfyUI files are read.
    #[arg(
        long = "lora",
        value_name = "FILE[:STRENGTH]",
        allow_hyphen_values = true
    )]
    pub lora: Vec<crate::model::lora::LoraChoice>,
}

/// Image-to-image, inpainting and outpainting (on `generate` and `worker`).
#[derive(Debug, Clone, Default, Args)]
pub struct InitArgs {
    /// Image-to-image from this source (PNG, JPEG or WebP); the size defaults to the source's,
    /// rounded down to a multiple of 16 (a source of another size is resized).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// How much of the schedule image-to-image runs, above 0 and at most 1 (default 0.6, as
    /// diffusers): 1 repaints from noise, lower keeps more of the source.
    #[arg(long, requires = "image", allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Inpainting mask, the source's size: white is repainted, black kept.
    #[arg(long, requires = "image")]
    pub mask: Option<PathBuf>,
    /// Blend by the mask's grey values, so a feathered edge mixes the repainted and the kept,
    /// instead of repainting where the mask is at least half white (diffusers' way). A FLUX.1
    /// Fill model thresholds its mask anyway.
    #[arg(long, requires = "mask")]
    pub soft_mask: bool,
    /// Outpainting: pixels added to the canvas LEFT,TOP,RIGHT,BOTTOM of the source (e.g.
    /// `0,0,256,0`), repainted from the prompt; the source's edges start them.
    #[arg(long, requires = "image", value_parser = parse_extend)]
    pub extend: Option<[usize; 4]>,
}

/// `--extend LEFT,TOP,RIGHT,BOTTOM` in pixels.
fn parse_extend(v: &str) -> Result<[usize; 4], String> {
    let sides: Vec<usize> = v
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!("{v}: give four whole pixel counts LEFT,TOP,RIGHT,BOTTOM, e.g. 0,0,256,0")
        })?;
    <[usize; 4]>::try_from(sides)
        .map_err(|_| format!("{v}: give four pixel counts LEFT,TOP,RIGHT,BOTTOM, e.g. 0,0,256,0"))
}

/// How to spread one image over workers.
#[derive(Debug, Clone, Default, Args)]
pub struct ParallelArgs {
    /// Workers, one rank each: `cpu:N` (N CPU worker threads standing in for GPUs), `cuda` (every
    /// GPU) or `cuda:0,1` (those GPUs; `cuda` builds, NCCL between them). Default: one worker on
    /// --device.
    #[arg(long)]
    pub devices: Option<String>,
    #[command(flatten)]
    pub degrees: Degrees,
    /// `auto` picks the layout for the workers present (see `parallax info`).
    #[arg(long)]
    pub parallel: Option<String>,
}

impl ModelArgs {
    /// The library's model choice.
    pub fn choice(&self) -> ModelChoice {
        ModelChoice {
            model: self.model.clone(),
            text_encoders: self.text_encoders.clone(),
            vae: self.vae.clone(),
            clip: self.clip.clone(),
            t5: self.t5.clone(),
            dtype: match self.dtype {
                DTypeArg::Auto => DTypeChoice::Auto,
                DTypeArg::F32 => DTypeChoice::F32,
                DTypeArg::Bf16 => DTypeChoice::Bf16,
                DTypeArg::F16 => DTypeChoice::F16,
            },
            precision: self.precision.into(),
            memory_budget_mib: self.memory_budget.map(|b| (b / (1u64 << 20) as f64) as u64),
            fp8_attention: self.fp8_attention,
            plan_size: None,
        }
    }

    /// [`Self::choice`] with a memory budget planned for the size the request will have (its
    /// --width/--height, else the source image's or the model's default, as [`request_with`]
    /// sizes it); without a budget, [`Self::choice`] as it is (nothing to plan).
    pub fn choice_at(&self, sample: &SampleArgs, init: &InitArgs) -> anyhow::Result<ModelChoice> {
        let mut choice = self.choice();
        if choice.memory_budget_mib.is_some() {
            let req = request_with(is_demo(&choice.resolve()?), sample, init);
            plan_for(&mut choice, &req);
        }
        Ok(choice)
    }
}

/// A memory budget in `choice` planned for `req`'s size (nothing to plan without a budget).
fn plan_for(choice: &mut ModelChoice, req: &GenerateRequest) {
    if choice.memory_budget_mib.is_some() {
        choice.plan_size = Some((req.width, req.height));
    }
}

impl ParallelArgs {
    /// The library's placement for these flags: `--devices` (or the one `--device`) and the
    /// degrees or `--parallel auto`. Checked against the model by [`Placement::plan`].
    pub fn placement(&self, device: &str) -> anyhow::Result<Placement> {
        let explicit = self.degrees.any();
        let layout = match self.parallel.as_deref() {
            Some("auto") if !explicit => LayoutChoice::Auto,
            Some("auto") => {
                bail!("--parallel auto picks the degrees itself: drop --ulysses/--ring/--cfg/--dp")
            }
            Some(other) => bail!("--parallel {other}: the only value is `auto`"),
            None => LayoutChoice::Degrees(self.degrees),
        };
        let devices = match self.devices.as_deref() {
            Some(d) => Devices::parse(d)?,
            None if explicit || self.parallel.is_some() => bail!(
                "--ulysses/--ring/--cfg/--dp/--parallel need --devices cpu:N (N worker threads) or GPUs"
            ),
            None => Devices::single(device)?,
        };
        Ok(Placement { devices, layout })
    }
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub init: InitArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// Merge the LoRAs into the weights (W + B A) instead of running them beside each product:
    /// no cost a step, but a copy of every adapted weight in memory. FP8 products keep theirs
    /// beside.
    #[arg(long)]
    pub lora_merge: bool,
    /// Output image, .png, .jpg or .webp (default: parallax-<seed>.png); with several images,
    /// NAME-<seed>.EXT each.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Images to make, seeds --seed, --seed + 1, ... (default: the --dp degree, else 1); spread
    /// over the data-parallel groups.
    #[arg(long)]
    pub images: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Image-to-image or inpainting timings (`--image`, `--strength`, `--mask`, `--extend`).
    #[command(flatten)]
    pub init: InitArgs,
    /// Merge the LoRAs into the weights (W + B A) instead of running them beside each product:
    /// no cost a step, but a copy of every adapted weight in memory. FP8 products keep theirs
    /// beside.
    #[arg(long)]
    pub lora_merge: bool,
    /// Timed runs (after the warm-up).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// The machine's measured bf16 matrix-multiply ceiling in TFLOP/s, for the floor ratio
    /// (773: an H100 as measured in BENCHMARKS.md).
    #[arg(long, default_value_t = 773.0)]
    pub peak_tflops: f64,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
    /// First Block Cache thresholds to compare (the uncached reference, 0, is always run first).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.04,0.08,0.12,0.2",
        allow_negative_numbers = true
    )]
    pub thresholds: Vec<f64>,
    /// Cache policies to compare after the thresholds, separated by `;` (e.g.
    /// `dbcache:t=0.2,taylor=1;taylorseer:n=3;magcache:t=0.3`; see `generate --cache`).
    #[arg(long, value_delimiter = ';')]
    pub caches: Vec<crate::pipeline::cache::CacheSpec>,
    /// Time every cell this many times, in rounds that each start one cell further on; the
    /// speed-up is the median over the rounds of (the reference's time / the cell's), with the
    /// lowest and highest in `speedup_range`.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub repeats: u64,
    /// With one `--lora`: every cell at each of these LoRA strengths, separated by `,` (e.g.
    /// `0,0.5,1`); each strength's cells are measured against its own uncached image.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub lora_strengths: Vec<f64>,
    /// Save each image here as compare-<threshold or policy>.png (with its settings;
    /// compare-lora<strength>-... in a strength sweep).
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Print every runtime event as it arrives (to standard error).
    #[arg(long)]
    pub events: bool,
}

#[derive(Debug, Clone, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub parallel: ParallelArgs,
}

/// Entry point of the binary.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(dev_alias(std::env::args_os().collect()));
    init_logging(cli.verbose);
    out::on_interrupt();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let msg = one_message(&e);
            eprintln!("error: {msg}");
            if msg.contains("OUT_OF_MEMORY") {
                eprintln!("hint: the GPU ran out of memory; try a smaller image or a GPU with more memory (past 4096 px the autoencoder needs more than an 80 GB GPU; --devices cuda:0,1,... splits the decode in row bands across GPUs)");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// `e` and its causes in one line, each said once: a cause whose text its wrapper already
/// includes (the library's errors print their source) is not repeated.
fn one_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli
        .command
        .unwrap_or_else(|| Command::Studio(StudioArgs::default()))
    {
        Command::Studio(a) => studio(a),
        Command::Worker(a) => {
            let env = |k: &str| std::env::var(k).ok();
            let launch = launcher::resolve(a.rank, a.world, a.init.as_deref(), &env)?;
            let rank = launch.rank;
            worker(a, launch).with_context(|| format!("rank {rank}"))
        }
        Command::Generate(a) => generate(a),
        Command::Bench(a) => bench(a),
        Command::Compare(a) => compare(a),
        Command::Info(a) => info(a),
        Command::Memory(a) => memory::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Download(a) => download::run(a),
        Command::Dev(d) => dev(d.command),
    }
}

fn dev(c: DevCommand) -> anyhow::Result<()> {
    match c {
        DevCommand::BenchVae(a) => bench_vae::run(&a),
        DevCommand::DisplacedError(a) => displaced_error::run(a),
        DevCommand::ExportDemo(a) => export_demo(a),
        DevCommand::Dataset(a) => dataset::run(a),
        DevCommand::Score(a) => score::run(a),
        DevCommand::CalibrateMagcache(a) => calibrate::run(a),
        DevCommand::Fp8Error(a) => fp8_error::run(a),
        DevCommand::ExportGguf(a) => gguf::export(a),
        DevCommand::GgufError(a) => gguf::error(a),
        DevCommand::BenchKlein(a) => bench_klein::run(a),
        DevCommand::RandomLora(a) => random_lora::run(a),
        DevCommand::WriteCheckpoint(a) => write_checkpoint::run(a),
        DevCommand::Selfcheck(a) => crate::cli::selfcheck::run(&a.device),
        DevCommand::Profile(a) => crate::cli::profile::run(&a.device, a.width),
    }
}

#[cfg(feature = "studio")]
fn studio(a: StudioArgs) -> anyhow::Result<()> {
    crate::app::run(crate::app::StudioOptions {
        model: a.model,
        // --device alone sets the device and leaves the remembered layout alone.
        device: a.device.clone(),
        placement: if a.parallel.devices.is_some()
            || a.parallel.degrees.any()
            || a.parallel.parallel.is_some()
        {
            Some(a.parallel.placement(a.device.as_deref().unwrap_or("cpu"))?)
        } else {
            None
        },
        gallery_dir: a.gallery,
        auto_generate: a.auto_generate,
        compare: a.compare,
        screenshot: a.screenshot,
        quit_after_job: a.quit_after_job,
        ui_stats: a.ui_stats,
        fresh_settings: a.fresh,
        skip_hf_cache: false,
        steps: a.steps,
        size: match a.size.as_deref() {
            None => None,
            Some(v) => {
                let (w, h) = v
                    .split_once('x')
                    .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
                    .ok_or_else(|| anyhow::anyhow!("--size {v}: use WIDTHxHEIGHT, e.g. 512x512"))?;
                Some((w, h))
            }
        },
    })
}

#[cfg(not(feature = "studio"))]
fn studio(_: StudioArgs) -> anyhow::Result<()> {
    bail!("this build has no studio (built without the `studio` feature); use `parallax generate` or rebuild with default features")
}

/// Whether a resolved model is the demo (built in, or exported to files).
fn is_demo(resolved: &Resolved) -> bool {
    match &resolved.spec {
        ModelSpec::Demo | ModelSpec::Random(Variant::Demo) => true,
        ModelSpec::Files(f) => f.demo,
        ModelSpec::Random(_) => false,
        ModelSpec::RandomKlein(k) => *k == crate::model::klein::RandomKlein::Tiny,
        ModelSpec::Klein(f) => f.demo,
    }
}

/// Refuse an output path Parallax cannot write, before any work: a folder, a name whose
/// extension is not an image format Parallax writes (PNG, JPEG, WebP: each keeps the settings),
/// a folder that does not exist.
fn check_output(out: &std::path::Path) -> anyhow::Result<()> {
    if out.is_dir() {
        bail!("--out {} is a folder; give a file name", out.display());
    }
    let ext = crate::pipeline::metadata::extension(out).unwrap_or_default();
    if !image::is_known_extension(&ext) {
        bail!(
            "--out {}: Parallax writes {} files (each keeps the settings it was made with); give a name ending in one of them",
            out.display(),
            image::FORMATS
        );
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--out {}: the folder {} does not exist",
            out.display(),
            parent.display()
        );
    }
    check_writable(parent).with_context(|| {
        format!(
            "--out {}: the image could not be saved there",
            out.display()
        )
    })
}

/// Refuse a folder the images cannot be written to (read-only, not ours), before any work.
fn check_writable(dir: &std::path::Path) -> anyhow::Result<()> {
    crate::runtime::gallery::check_writable_dir(dir)?;
    Ok(())
}

/// [`request_for`] with `init`'s image-to-image, whose size defaults to the source's canvas
/// (an unreadable source is reported by the request's check).
fn request_with(demo: bool, s: &SampleArgs, init: &InitArgs) -> GenerateRequest {
    use crate::pipeline::img2img;
    let mut req = request_for(demo, s);
    req.init = init.image.as_ref().map(|image| img2img::InitImage {
        image: image.clone(),
        strength: init.strength.unwrap_or(0.6),
        mask: init.mask.clone(),
        soft_mask: init.soft_mask,
        extend: init.extend,
    });
    if let Some(Ok((w, h))) = req.init.as_ref().map(|i| i.canvas_size()) {
        let (w, h) = img2img::default_size(w, h);
        req.width = s.width.unwrap_or(w);
        req.height = s.height.unwrap_or(h);
    }
    req
}

fn request_for(demo: bool, s: &SampleArgs) -> GenerateRequest {
    let default_size = if demo { 256 } else { 1024 };
    GenerateRequest {
        prompt: s.prompt.clone(),
        negative_prompt: s.negative_prompt.clone(),
        true_cfg: s.true_cfg,
        width: s.width.unwrap_or(default_size),
        height: s.height.unwrap_or(default_size),
        steps: s.steps,
        seed: s.seed.unwrap_or_else(crate::model::rng::fresh_seed),
        guidance: s.guidance,
        cache_threshold: s.cache_threshold,
        cache: s.cache.clone(),
        loras: s.lora.clone(),
        init: None,
    }
}

fn worker(a: WorkerArgs, launch: launcher::Launch) -> anyhow::Result<()> {
    use crate::parallel::mesh::Mesh;
    use crate::parallel::ranks::denoise_rank;
    use crate::parallel::store::{Store, StoreComm};
    use std::sync::Arc;

    if a.degrees.dp.is_some_and(|d| d > 1) {
        bail!("--dp: worker processes make one image (data parallelism runs in `generate` and the studio)");
    }
    let mut a = a;
    let gpu = a.model.device.starts_with("cuda");
    tracing::info!(
        "rank {} of {} at {} (from {})",
        launch.rank,
        launch.world,
        launch.init,
        launch.by
    );
    (a.rank, a.world) = (Some(launch.rank), Some(launch.world));
    if a.model.device == "cuda" {
        // One GPU per process: the local rank's GPU (from the launcher), else rank R takes GPU
        // R (mod the GPUs of this machine).
        let n = crate::device::cuda_device_count().max(1);
        let gpu = launch.local_rank.unwrap_or(launch.rank % n);
        a.model.device = format!("cuda:{gpu}");
    }
    if gpu && !cfg!(feature = "cuda") {
        bail!(
            "--device {}: this build has no `cuda` feature",
            a.model.device
        );
    }
    if !gpu && a.model.device != "cpu" {
        bail!(
            "--device {}: a worker runs on `cpu` or one GPU (`cuda:N`)",
            a.model.device
        );
    }
    crate::parallel::comm::collective_timeout_from_env().map_err(anyhow::Error::msg)?;
    let (rank, world) = (launch.rank, launch.world);
    // Rank 0 writes the image: its output is checked before anything starts.
    if rank == 0 {
        match &a.out {
            Some(out) => check_output(out)?,
            None => check_writable(std::path::Path::new("."))
                .context("the image is saved in the current folder: give --out elsewhere")?,
        }
    }
    let timeout = std::time::Duration::from_secs(a.timeout);
    let store = Store::connect(
        &launch.init,
        rank,
        world,
        timeout,
        crate::parallel::store_auth::Token::from_env_or_file(a.token_file.as_deref())?,
    )?;
    // One job, agreed: every rank compares its settings with every other's before loading
    // anything; a rank given no seed takes rank 0's (rank 0 picks one when none is given).
    let spec = a.model.choice().resolve()?.spec;
    let seed = match a.sample.seed {
        Some(s) => Some(s),
        None if rank == 0 => Some(crate::model::rng::fresh_seed()),
        None => None,
    };
    let mine = worker_job::fingerprint(&a, &spec, seed);
    let all = store
        .exchange("job", &mine.to_bytes(), timeout)
        .context("agreeing on the job")?;
    // A barrier before judging: rank 0 (the store) must not leave before every rank has read
    // every fingerprint, so that a difference is reported by every rank, not only by some.
    let read = store.exchange("job-read", b"1", timeout);
    let mut seed = seed;
    for (r, b) in all.iter().enumerate() {
        let theirs = crate::parallel::fingerprint::Fingerprint::from_bytes(b, r)?;
        mine.agree(rank, &theirs, r)?;
        if r == 0 && seed.is_none() {
            seed = theirs.get("seed").and_then(|s| s.parse().ok());
        }
    }
    read.context("agreeing on the job")?;
    let seed = seed.ok_or_else(|| anyhow::anyhow!("rank 0 sent no seed"))?;
    let p = load_pipeline(&a.model.choice_at(&a.sample, &a.source)?, &a.model.device)
        .context("loading the model")?;
    p.flux1("`parallax worker` processes")?;
    let sample = SampleArgs {
        seed: Some(seed),
        ..a.sample.clone()
    };
    let req = request_with(p.is_demo(), &sample, &a.source);
    p.settings_for(&req)?;
    let heads = p.denoiser().num_heads();
    let (layout, _) = LayoutChoice::Degrees(a.degrees).resolve(
        world,
        heads,
        crate::engine::wants_true_cfg(&req),
    )?;
    let mesh = Mesh::new(layout, world, heads)?;
    // CPU ranks talk through the store; GPU ranks through NCCL, each group's id handed over
    // through the store.
    let dev = p.device().clone();
    let groups = crate::parallel::ranks::rank_groups(&mesh, &[rank], &mut |name, members, _| {
        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            let c = crate::parallel::nccl::NcclComm::from_store(&store, name, members, &dev)?;
            return Ok(vec![
                Arc::new(c) as Arc<dyn crate::parallel::comm::Communicator>
            ]);
        }
        let _ = &dev;
        Ok(vec![
            Arc::new(StoreComm::new(store.clone(), name, members.to_vec())?) as _,
        ])
    })?
    .pop()
    .ok_or_else(|| anyhow::anyhow!("rank {rank} is in no group"))?;
    if rank == 0 {
        eprintln!(
            "rank 0 of {world}: cfg {} x ring {} x ulysses {}, seed {seed}",
            layout.cfg, layout.ring, layout.ulysses
        );
    }
    let mut progress = |ev: Progress| -> crate::Result<()> {
        if let (0, Progress::Step(info)) = (rank, &ev) {
            eprintln!(
                "step {}/{} {:.0} ms",
                info.index + 1,
                info.total,
                info.elapsed.as_secs_f64() * 1e3
            );
        }
        Ok(())
    };
    let prep = p
        .prepare(&req, &mut progress)
        .context("encoding the prompt")?;
    if let Some(f) = crate::parallel::fault::Fault::from_env() {
        f.strike(rank, crate::parallel::fault::LOAD_STEP)?;
    }
    // Every rank has loaded and encoded before the first exchange (a rank stuck loading is
    // named after --load-timeout); from here every read is bounded by the collective timeout.
    let load_timeout = std::time::Duration::from_secs(a.load_timeout);
    store
        .exchange("loaded", b"1", load_timeout)
        .with_context(|| {
            format!(
                "waiting for every rank to load the model (at most {} s, --load-timeout)",
                a.load_timeout
            )
        })?;
    store.arm();
    let flux = p.flux_for(&req)?;
    let mut log = crate::pipeline::StepLog::default();
    let (x, stats) = denoise_rank(
        flux.as_ref(),
        &prep.job,
        &mesh,
        rank,
        &groups,
        &|| false,
        &mut |info| {
            log.record(info);
            progress(Progress::Step(info))
        },
    )?;
    // Row bands over every process (unequal when the rows do not divide); one process decodes
    // tiny latents whole.
    let decode = |vae: &dyn crate::model::family::BandDecoder, z: &candle_core::Tensor| {
        let w = groups.world.size();
        if w > 1 && z.dim(2)? >= w {
            Ok(crate::parallel::vae::decode(vae, z, groups.world.as_ref())?)
        } else {
            Ok(vae.decode_latent(z)?)
        }
    };
    let g = p.finish(prep, x, stats, log, &decode, &mut progress)?;
    if rank == 0 {
        let out = a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("parallax-{seed}.png")));
        image::save_image(&out, &g.image, &g.settings.png_text()?)
            .with_context(|| format!("saving {}", out.display()))?;
        println!(
            "{} ({}x{}, seed {seed}, {} processes) in {:.2}s",
            out.display(),
            g.image.width,
            g.image.height,
            world,
            g.timings.total_ms / 1e3
        );
    }
    // Rank 0 serves the store: it stays until every rank has read its last result.
    store.finish().context("finishing")?;
    Ok(())
}

/// A job's model, request and placement, checked before any weights load: the placement against
/// the model's heads (read from the file headers), the GPUs present and true CFG.
struct Checked {
    choice: ModelChoice,
    req: GenerateRequest,
    placement: Placement,
    plan: crate::engine::Plan,
}

/// `--cache` and a non-zero `--cache-threshold` together are refused: say which one is meant.
fn one_cache(sample: &SampleArgs) -> anyhow::Result<()> {
    if sample.cache.is_some() && sample.cache_threshold != 0.0 {
        bail!(
            "--cache and --cache-threshold both given: --cache names the policy (First Block \
             Cache is `--cache fbcache:t={}`)",
            sample.cache_threshold
        );
    }
    Ok(())
}

fn checked_job(
    model: &ModelArgs,
    sample: &SampleArgs,
    init: &InitArgs,
    parallel: &ParallelArgs,
) -> anyhow::Result<Checked> {
    one_cache(sample)?;
    // The values that need no model first: a bad size is reported as such, even beside a
    // damaged model.
    crate::pipeline::check_request(&request_with(false, sample, init))?;
    let mut choice = model.choice();
    let resolved = choice.resolve()?;
    let req = request_with(is_demo(&resolved), sample, init);
    plan_for(&mut choice, &req);
    let placement = parallel.placement(&model.device)?;
    let (heads, hints) = crate::engine::layout_facts(&resolved, &placement)?;
    let plan = placement.plan_with(
        heads,
        crate::engine::wants_true_cfg(&req),
        gpus_present(),
        hints.for_size(req.width, req.height),
    )?;
    Ok(Checked {
        choice,
        req,
        placement,
        plan,
    })
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    crate::parallel::comm::collective_timeout_from_env().map_err(anyhow::Error::msg)?;
    // Everything a user typed is checked before the weights load: the output (a writable
    // folder), the request and the placement (see `checked_job`).
    match &a.out {
        Some(out) => check_output(out)?,
        None => check_writable(std::path::Path::new("."))
            .context("the images are saved in the current folder: give --out elsewhere")?,
    }
    let Checked {
        choice, req, plan, ..
    } = checked_job(&a.model, &a.sample, &a.init, &a.parallel)?;
    let dp = plan.layout.dp;
    let images = a.images.unwrap_or(dp);
    if !(1..=MAX_IMAGES).contains(&images) {
        bail!("--images {images}: give 1 to {MAX_IMAGES}");
    }
    if plan.world() > 1 {
        eprintln!("{}", plan.describe());
    }
    // The prompt is encoded while the transformer loads (crate::engine::overlap).
    let ahead = crate::engine::overlap::prompts_for(&req);
    let mut engine = Engine::load_for_ahead(choice, &plan, &ahead)?;
    // The request is checked on the first copy, before the replicas load.
    let settings = engine.primary().settings_for(&req)?;
    engine.prepare(&plan, images, &mut |d| {
        eprintln!("loading the model on {d} too")
    })?;
    engine.set_lora_merge(a.lora_merge);
    let p = engine.primary();
    if p.model.as_flux1().is_none() {
        eprintln!(
            "DEMO model: {}'s structure with made-up weights; its images are noise.",
            p.label
        );
    } else if p.is_demo() {
        eprintln!("DEMO model: FLUX.1's structure at a tiny size, trained on coloured shapes; not FLUX.1. Point --model at real weights for real images.");
    }
    // Several images: consecutive seeds, each written as NAME-<seed>.png.
    let reqs: Vec<GenerateRequest> = (0..images as u64)
        .map(|i| GenerateRequest {
            seed: req.seed.wrapping_add(i),
            ..req.clone()
        })
        .collect();
    let outs: Vec<PathBuf> = match &a.out {
        Some(out) if images == 1 => vec![out.clone()],
        Some(out) => {
            let stem = out.file_stem().unwrap_or(std::ffi::OsStr::new("parallax"));
            reqs.iter()
                .map(|r| {
                    let mut name = stem.to_os_string();
                    name.push(format!("-{}.png", r.seed));
                    out.with_file_name(name)
                })
                .collect()
        }
        None => reqs
            .iter()
            .map(|r| PathBuf::from(format!("parallax-{}.png", r.seed)))
            .collect(),
    };
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else if dp > 1 {
        // Data-parallel groups report no steps: a spinner until every image is done.
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(format!("{images} images on {dp} data-parallel groups"));
        b.enable_steady_tick(std::time::Duration::from_millis(200));
        b
    } else {
        let b = indicatif::ProgressBar::new((settings.steps * images) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message("encoding prompt");
        b
    };
    let save = |g: &crate::pipeline::Generated, out: &std::path::Path| -> anyhow::Result<()> {
        bar.suspend(|| {
            for n in &g.notes {
                eprintln!("note: {n}");
            }
        });
        image::save_image(out, &g.image, &g.settings.png_text()?)
            .with_context(|| format!("saving {}", out.display()))?;
        bar.suspend(|| {
            println!(
                "{} ({}x{}, seed {}, {} steps: {}) in {:.2}s{}",
                out.display(),
                g.image.width,
                g.image.height,
                g.settings.seed,
                g.settings.steps,
                describe_cache(&g.stats),
                g.timings.total_ms / 1e3,
                if p.is_demo() { " [DEMO model]" } else { "" }
            )
        });
        Ok(())
    };
    if dp > 1 {
        let results = engine.generate_many(&plan, &reqs);
        bar.finish_and_clear();
        // Every image that was made is saved, then the first failure (if any) is reported.
        let mut first_err = None;
        for (g, out) in results.into_iter().zip(&outs) {
            if let Err(e) = g.map_err(anyhow::Error::from).and_then(|g| save(&g, out)) {
                eprintln!("error: {}: {e:#}", out.display());
                first_err.get_or_insert(e);
            }
        }
        return first_err.map_or(Ok(()), Err);
    }
    let result = (|| -> anyhow::Result<()> {
        for (i, (req, out)) in reqs.iter().zip(&outs).enumerate() {
            let base = (i * settings.steps) as u64;
            let mut on_event = |ev: Progress| -> crate::Result<()> {
                match ev {
                    Progress::TextEncoded { .. } => bar.set_message("denoising"),
                    Progress::Step(info) => {
                        bar.set_position(base + info.index as u64 + 1);
                        bar.set_message(format!(
                            "{:.0} ms{}",
                            info.elapsed.as_secs_f64() * 1e3,
                            if info.kind.is_reused() {
                                " (cached)"
                            } else {
                                ""
                            }
                        ));
                    }
                    Progress::Decoded { .. } => {}
                }
                Ok(())
            };
            let g = engine.generate(&plan, req, &mut on_event)?;
            save(&g, out)?;
        }
        Ok(())
    })();
    bar.finish_and_clear();
    result
}

/// The most images one `generate` makes.
const MAX_IMAGES: usize = 10_000;

pub(crate) use crate::runtime::repeats::median;

/// Peak resident memory of this process in MiB (Linux), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let load_start = Instant::now();
    // The first run's prompt is encoded while the transformer loads (crate::engine::overlap);
    // the prompts do not depend on the model.
    let ahead = crate::engine::overlap::prompts_for(&request_with(false, &a.sample, &a.init));
    let p = crate::engine::load::load_pipeline_ahead(
        &a.model.choice_at(&a.sample, &a.init)?,
        &a.model.device,
        None,
        &ahead,
    )?;
    let f1 = p.flux1("`parallax bench` (use `parallax dev bench-klein` for klein)")?;
    p.set_lora_merge(a.lora_merge);
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    one_cache(&a.sample)?;
    let mut req = request_with(p.is_demo(), &a.sample, &a.init);
    if a.sample.seed.is_none() {
        req.seed = 0;
    }
    let settings = p.settings_for(&req)?;
    let bar = indicatif::ProgressBar::new((a.warmup + a.runs) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("bench [{bar:30}] run {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let dev = p.device().clone();
    let mut gpu_peak: Option<u64> = crate::device::gpu_memory_used(&dev);
    let sample = |gpu_peak: &mut Option<u64>| {
        if let Some(used) = crate::device::gpu_memory_used(&dev) {
            *gpu_peak = Some(gpu_peak.map_or(used, |p| p.max(used)));
        }
    };
    // The first image's timings (a cold start: kernels compiled and tuned on first use), and
    // when its prompt was ready (encoded in the job, or while the model loaded).
    let text_ready = std::cell::Cell::new(None::<f64>);
    let note_text = |ev: &Progress| {
        if matches!(ev, Progress::TextEncoded { .. }) && text_ready.get().is_none() {
            text_ready.set(Some(load_start.elapsed().as_secs_f64() * 1e3));
        }
    };
    let mut first: Option<serde_json::Value> = None;
    let mut note_first = |g: &crate::pipeline::Generated| {
        if first.is_none() {
            first = Some(serde_json::json!({
                "text_encode_ms": g.timings.text_ms,
                "text_ready_from_load_start_ms": text_ready.get(),
                "first_step_ms": g.timings.steps_ms.first(),
                "image_ms": g.timings.total_ms,
                "from_load_start_ms": load_start.elapsed().as_secs_f64() * 1e3,
            }));
        }
    };
    for _ in 0..a.warmup {
        let g = p.generate(&req, &mut |ev| {
            sample(&mut gpu_peak);
            note_text(&ev);
            Ok(())
        })?;
        note_first(&g);
        bar.inc(1);
    }
    let mut totals = Vec::new();
    let mut all_steps = Vec::new();
    let mut all_queued = Vec::new();
    let mut loops = Vec::new();
    let mut text = Vec::new();
    let mut vae = Vec::new();
    let mut last = None;
    for _ in 0..a.runs {
        let g = p.generate(&req, &mut |ev| {
            sample(&mut gpu_peak);
            note_text(&ev);
            Ok(())
        })?;
        note_first(&g);
        totals.push(g.timings.total_ms);
        all_steps.extend(g.timings.steps_ms.iter().copied());
        all_queued.extend(g.timings.steps_queued_ms.iter().copied());
        loops.push(g.timings.steps_ms.iter().sum::<f64>());
        text.push(g.timings.text_ms);
        vae.push(g.timings.vae_ms);
        bar.inc(1);
        bar.set_message(format!("{:.0} ms", g.timings.total_ms));
        last = Some(g);
    }
    bar.finish_and_clear();
    // The allocator's high-water marks since the process started (load included).
    let pool_peak = crate::device::memory_peak(&dev)?;
    let stats = last.map(|g| g.stats).unwrap_or_default();
    let img_tokens = (settings.width / 16) * (settings.height / 16);
    let flops = f1
        .flux
        .config()
        .flops_per_step(f1.text.t5_max_len(), img_tokens);
    let step_median = median(&all_steps);
    let floor_ms = flops / (a.peak_tflops * 1e12) * 1e3;
    let report = serde_json::json!({
        "model": p.label,
        "variant": p.variant.name(),
        "demo": p.is_demo(),
        "device": crate::device::describe(&dev),
        "dtype": settings.dtype,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "width": settings.width,
        "height": settings.height,
        "steps": settings.steps,
        // Steps a run denoised (fewer than `steps` from an image at strength below 1).
        "steps_run": all_steps.len() / a.runs,
        "strength": req.init.as_ref().map(|i| i.strength),
        "cache_threshold": settings.cache_threshold,
        "cache": settings.cache_spec().to_string(),
        "warmup": a.warmup,
        "runs": a.runs,
        "load_ms": load_ms,
        "tokens": { "text": f1.text.t5_max_len(), "image": img_tokens },
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / (step_median * 1e-3) / 1e12,
        "floor": { "peak_tflops": a.peak_tflops, "floor_ms": floor_ms, "ratio": step_median / floor_ms },
        "attention": f1.flux.attention().name(),
        "fp8_attention": f1.flux.attention().fp8_scores(),
        "gpu_memory_used_max_mib": gpu_peak.map(|b| b as f64 / (1024.0 * 1024.0)),
        "gpu_pool_peak_mib": pool_peak.map(|p| serde_json::json!({
            "allocated": p.allocated as f64 / (1024.0 * 1024.0),
            "reserved": p.reserved as f64 / (1024.0 * 1024.0),
        })),
        "memory_budget_mib": a.model.choice().memory_budget_mib,
        "t5": format!("{:?}", f1.text.t5_residency()),
        "transformer_weights_mib": f1.flux.weight_bytes() as f64 / (1024.0 * 1024.0),
        // FP8 products: the cuBLASLt switches and each shape's algorithm (kernels::lt_algo).
        "gemm_tuning": crate::kernels::lt_algo::report(),
        "step_ms": {
            "median": step_median,
            "min": all_steps.iter().copied().fold(f64::INFINITY, f64::min),
            "max": all_steps.iter().copied().fold(0.0, f64::max),
            // Host time to queue a step's work before waiting for the device (median).
            "queued_median": median(&all_queued),
            // The denoising loop of a run, start to end (its steps' sum; median of the runs).
            "loop_median": median(&loops),
        },
        "total_ms": { "median": median(&totals), "all": totals },
        "text_encode_ms_median": median(&text),
        "vae_decode_ms_median": median(&vae),
        "cache_steps": { "computed": stats.computed, "reused": stats.reused, "pattern": step_pattern(&stats.steps) },
        "peak_rss_mib": peak_rss_mib(),
        "cold_start": cold_start_json(load_ms, first),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Where loading went (the phases summed by [`crate::model::load_clock`]) and the first image's
/// timings, for `bench`'s JSON.
fn cold_start_json(load_ms: f64, first: Option<serde_json::Value>) -> serde_json::Value {
    let (phases, bytes) = crate::model::load_clock::snapshot();
    let read_ms = phases
        .iter()
        .find(|(p, _)| *p == crate::model::load_clock::LoadPhase::Read)
        .map_or(0.0, |(_, ms)| *ms);
    serde_json::json!({
        "load_ms": load_ms,
        "load_phases_ms": phases
            .iter()
            .map(|(p, ms)| (p.name(), *ms))
            .collect::<std::collections::BTreeMap<_, _>>(),
        "bytes_read": bytes,
        "read_gb_per_s": if read_ms > 0.0 { bytes as f64 / 1e6 / read_ms } else { 0.0 },
        "first_image": first,
        // The first prompt encoded while the transformer loaded (crate::engine::overlap): the
        // encoding's time, the load's wait for it after the transformer, and so the time
        // hidden behind the reading. `null`: not overlapped (PARALLAX_NO_LOAD_OVERLAP=1, T5
        // built per prompt, or a model not read from files).
        "load_overlap": crate::model::load_clock::ahead_snapshot().map(|(prompts, enc, waited)| {
            serde_json::json!({
                "prompts": prompts,
                "text_encode_ms": enc,
                "waited_ms": waited,
                "hidden_ms": (enc - waited).max(0.0),
            })
        }),
    })
}

fn compare(a: CompareArgs) -> anyhow::Result<()> {
    use crate::runtime::{EngineSpec, Event, JobSpec, Runtime, RuntimeOptions};

    if let Some(bad) = a.thresholds.iter().find(|t| !(t.is_finite() && **t >= 0.0)) {
        bail!("--thresholds: {bad} is not a threshold (give numbers of 0 or more)");
    }
    if !a.lora_strengths.is_empty() && a.sample.lora.len() != 1 {
        bail!(
            "--lora-strengths sweeps one LoRA's strength: name it with one --lora FILE (given {})",
            a.sample.lora.len()
        );
    }
    if let Some(bad) = a.lora_strengths.iter().find(|s| !s.is_finite()) {
        bail!("--lora-strengths: {bad} is not a strength");
    }
    // The same checks as `generate`, before the weights load.
    let Checked {
        choice,
        req: mut base,
        placement,
        ..
    } = checked_job(&a.model, &a.sample, &InitArgs::default(), &a.parallel)?;
    if a.sample.seed.is_none() {
        base.seed = 0;
    }
    if let Some(dir) = &a.save {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let rt = Runtime::start(RuntimeOptions {
        engine: EngineSpec::new(choice, placement),
        gallery_dir: None,
        notify: None,
    })?;
    let job = rt.submit(JobSpec::Compare {
        base,
        thresholds: a.thresholds.clone(),
        caches: a.caches.clone(),
        repeats: a.repeats as usize,
        lora_strengths: a.lora_strengths.clone(),
    });
    // Prompts in the demo model's world are also scored (colours, shapes, places, background).
    let asked = crate::scenes::parse::parse(&a.sample.prompt);
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut rows = Vec::new();
    let mut layout = String::new();
    let mut last_step = (0, 0);
    let wall_ms = loop {
        let ev = rt
            .recv_timeout(std::time::Duration::from_secs(3600))
            .ok_or_else(|| anyhow::anyhow!("the runtime said nothing for an hour"))?;
        if a.events {
            bar.suspend(|| eprintln!("event: {}", describe_event(&ev)));
        }
        match ev {
            Event::ModelFailed { error, .. } => bail!("{error}"),
            Event::Started { layout: l, .. } => layout = l,
            Event::Step {
                image, step, total, ..
            } => {
                // Events of one job arrive in order; say so if they ever do not.
                if (image, step) <= last_step {
                    bail!("runtime events out of order: image {image} step {step} after {last_step:?}");
                }
                last_step = (image, step);
                bar.set_message(format!("image {} step {step}/{total}", image + 1));
            }
            Event::ImageDone { image, result, .. } => {
                let g = &result.generated;
                // In a strength sweep, the cell's strength (the one LoRA's).
                let strength = (!a.lora_strengths.is_empty())
                    .then(|| g.settings.loras.first().map(|l| l.strength))
                    .flatten();
                let saved = match &a.save {
                    Some(dir) => {
                        let lora = strength.map_or(String::new(), |s| format!("lora{s}-"));
                        let out = dir.join(format!(
                            "compare-{lora}{}.png",
                            g.settings.cache_spec().file_stem()
                        ));
                        image::save_image(&out, &g.image, &g.settings.png_text()?)
                            .with_context(|| format!("saving {}", out.display()))?;
                        Some(out)
                    }
                    None => None,
                };
                bar.set_message(format!("{} images done", image + 1));
                rows.push(serde_json::json!({
                    "lora_strength": strength,
                    "threshold": g.settings.cache_threshold,
                    "cache": g.settings.cache_spec().to_string(),
                    "steps_computed": g.stats.computed,
                    "steps_reused": g.stats.reused,
                    "pattern": step_pattern(&g.stats.steps),
                    "wall_ms": g.timings.total_ms,
                    "speedup": result.speedup,
                    "psnr_db": result.quality.map(|q| if q.psnr_db.is_finite() { serde_json::json!(q.psnr_db) } else { serde_json::json!("inf") }),
                    "ssim": result.quality.map(|q| q.ssim),
                    "prompt_score": asked.as_ref().map(|d| crate::scenes::score::score(&g.image, d).summary()),
                    "saved": saved,
                    "notes": result.notes,
                }));
            }
            Event::Timing {
                round,
                rounds,
                position,
                ..
            } => bar.set_message(format!(
                "timing round {round} of {rounds}: image {} of {}",
                position + 1,
                rows.len()
            )),
            Event::Timed { image, timing, .. } => {
                if let Some(row) = rows.get_mut(image) {
                    add_timing(row, &timing);
                }
            }
            Event::Failed { job: j, error } if j == job => bail!("{error}"),
            Event::Cancelled { job: j } if j == job => bail!("cancelled"),
            Event::Finished { job: j, wall_ms } if j == job => break wall_ms,
            _ => {}
        }
    };
    bar.finish_and_clear();
    let report = serde_json::json!({
        "model": a.model.model,
        "layout": layout,
        "prompt": a.sample.prompt,
        "wall_ms": wall_ms,
        "repeats": a.repeats,
        "timing_method": crate::runtime::repeats::METHOD,
        "images": rows,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A compare row's repeated timings: the median wall time and each round's, the speed-up's
/// median, range over the rounds and what the range says.
fn add_timing(row: &mut serde_json::Value, t: &crate::runtime::repeats::CellTiming) {
    row["wall_ms"] = serde_json::json!(t.median_ms());
    row["wall_ms_rounds"] = serde_json::json!(t.wall_ms);
    row["repeats_identical"] = serde_json::json!(t.identical);
    if let Some(s) = t.speedup() {
        row["speedup"] = serde_json::json!(s.median);
        row["speedup_rounds"] = serde_json::json!(t.speedups);
        row["speedup_range"] = serde_json::json!([s.min, s.max]);
        row["speedup_verdict"] = serde_json::json!(s.verdict().words());
        row["speedup_label"] = serde_json::json!(s.label());
    }
}

/// One line for an event (`compare --events`).
fn describe_event(ev: &crate::runtime::Event) -> String {
    use crate::runtime::Event;
    match ev {
        Event::Step {
            job,
            image,
            step,
            total,
            ms,
            reused,
            ..
        } => format!(
            "{job} image {image} step {step}/{total} {ms:.1} ms{}",
            if *reused { " (cached)" } else { "" }
        ),
        Event::ImageDone { job, image, result } => format!(
            "{job} image {image} done in {:.0} ms ({})",
            result.generated.timings.total_ms,
            describe_cache(&result.generated.stats)
        ),
        Event::PreviewFactors(f) => format!("preview map fitted (R² {:.3})", f.r2),
        other => format!("{other:?}"),
    }
}

fn export_demo(a: ExportDemoArgs) -> anyhow::Result<()> {
    use crate::model::export::{write_demo_model, DemoSource, ExportLayout};
    if a.dir.exists() && std::fs::read_dir(&a.dir)?.next().is_some() {
        bail!(
            "{} is not empty; give a new or empty folder",
            a.dir.display()
        );
    }
    let layout = match a.layout {
        LayoutArg::Bfl => ExportLayout::Bfl,
        LayoutArg::Diffusers => ExportLayout::Diffusers,
        LayoutArg::Comfyui => ExportLayout::ComfyUi { scaled_fp8: false },
    };
    write_demo_model(&a.dir, layout, DemoSource::Trained)?;
    println!(
        "wrote the demo model ({:?} layout) to {}; try: parallax generate --model {}",
        a.layout,
        a.dir.display(),
        a.dir.display()
    );
    Ok(())
}

/// "hidden 128, 2 heads of 64, 2 double + 6 single blocks"
fn describe_blocks(cfg: &crate::model::flux::FluxConfig) -> String {
    format!(
        "hidden {}, {} heads of {}, {} double + {} single blocks",
        cfg.hidden_size,
        cfg.num_heads,
        cfg.head_dim(),
        cfg.depth,
        cfg.depth_single_blocks
    )
}

fn info(a: InfoArgs) -> anyhow::Result<()> {
    let resolved: Resolved = a.model.choice().resolve()?;
    println!("model: {}", a.model.model);
    for r in &resolved.reasons {
        println!("  why: {r}");
    }
    match &resolved.spec {
        ModelSpec::Random(Variant::Demo) => {
            let cfg = crate::model::flux::FluxConfig::tiny();
            println!("  kind: made-up weights from fixed seeds, FLUX.1 structure at its smallest");
            println!("  transformer: {}", describe_blocks(&cfg));
        }
        ModelSpec::Random(v) => {
            let cfg = if *v == crate::model::layout::Variant::Schnell {
                crate::model::flux::FluxConfig::schnell()
            } else {
                crate::model::flux::FluxConfig::dev()
            };
            println!(
                "  kind: FLUX.1-{} sizes, random weights made on the device",
                v.name()
            );
            println!(
                "  transformer: {}; T5-XXL and CLIP-L",
                describe_blocks(&cfg)
            );
        }
        ModelSpec::RandomKlein(k) => {
            let c = k.config();
            println!("  kind: {}", k.describe());
            println!(
                "  transformer: FLUX.2, hidden {}, {} heads, {} double + {} single blocks, text width {}",
                c.hidden_size, c.num_heads, c.depth, c.depth_single_blocks, c.context_in_dim
            );
        }
        ModelSpec::Klein(f) => {
            let c = f.config()?;
            println!(
                "  kind: FLUX.2 klein, {}",
                if f.distilled { "distilled" } else { "Base" }
            );
            println!(
                "  transformer: {}; hidden {}, {} heads, {} double + {} single blocks, text width {}",
                f.transformer.display(),
                c.hidden_size,
                c.num_heads,
                c.depth,
                c.depth_single_blocks,
                c.context_in_dim
            );
            println!("  autoencoder: {}", f.vae.display());
            println!("  text encoder: Qwen3 at {}", f.text_encoder.display());
            println!("  tokenizer: {}", f.tokenizer.display());
        }
        ModelSpec::Demo => {
            let cfg = crate::model::flux::FluxConfig::demo();
            println!(
                "  kind: built-in demo (FLUX.1 structure at a tiny size, trained by Parallax on \
                 coloured shapes; not FLUX.1)"
            );
            println!("  transformer: {}", describe_blocks(&cfg));
        }
        ModelSpec::Files(f) => {
            let set = crate::model::weights::SafetensorsSet::open(&f.transformer)?;
            let cfg = model_config(&resolved)?;
            println!(
                "  transformer: {} ({:?} layout)",
                f.transformer.display(),
                f.transformer_layout
            );
            println!(
                "    {} tensors stored as {:?}; hidden {}, {} heads, {} double + {} single blocks, guidance embedding: {} -> {}",
                set.len(),
                set.storage_dtype(),
                cfg.hidden_size,
                cfg.num_heads,
                cfg.depth,
                cfg.depth_single_blocks,
                cfg.guidance_embed,
                if cfg.guidance_embed { "dev" } else { "schnell" }
            );
            if let Some(g) = set.gguf_summary() {
                println!("    GGUF: {g}; dequantised once at load to the run's dtype");
            }
            let (e4m3, e5m2, scales, marker) = set.fp8_summary();
            if e4m3 + e5m2 > 0 {
                println!(
                    "    FP8: {e4m3} tensors in E4M3, {e5m2} in E5M2, {scales} scale tensors{}; \
                     dequantised once at load to the run's dtype",
                    if marker {
                        " (ComfyUI scaled-fp8 file)"
                    } else {
                        ""
                    }
                );
            }
            println!(
                "  autoencoder: {} ({:?} layout)",
                f.vae.display(),
                f.vae_layout
            );
            println!("  text encoders:");
            let t = &f.text;
            for (part, p) in [
                ("CLIP", &t.clip),
                ("T5", &t.t5),
                ("CLIP tokenizer", &t.clip_tokenizer),
                ("T5 tokenizer", &t.t5_tokenizer),
            ] {
                let found = if p.exists() { "found" } else { "MISSING" };
                println!("    {part}: {} ({found})", p.display());
            }
        }
    }
    let heads = match &resolved.spec {
        ModelSpec::RandomKlein(k) => k.config().num_heads,
        ModelSpec::Klein(f) => f.config()?.num_heads,
        _ => model_config(&resolved)?.num_heads,
    };
    // A placement this machine cannot run is reported, and the rest still printed.
    match a
        .parallel
        .placement(&a.model.device)
        .and_then(|p| Ok(p.plan(heads, false, gpus_present())?))
    {
        Ok(plan) => println!("parallel layout: {}", plan.describe()),
        Err(e) => println!("parallel layout: refused: {e}"),
    }
    println!(
        "precision: {} products; attention {}",
        match a.model.precision {
            PrecisionArg::Native => "native",
            PrecisionArg::Fp8 => "FP8",
        },
        if a.model.fp8_attention {
            "with FP8 scores (E4M3 queries and keys, --fp8-attention)"
        } else {
            "exact"
        }
    );
    let gpus = crate::device::gpus();
    if gpus.is_empty() {
        println!("GPUs: none found (or this build has no `cuda` feature)");
    }
    for g in &gpus {
        println!(
            "GPU cuda:{}: {}, {:.0} GiB",
            g.index,
            g.name,
            g.memory as f64 / (1u64 << 30) as f64
        );
    }
    let cached = layout::list_hf_cache();
    match layout::hf_cache_dir() {
        Some(dir) => println!("Hugging Face cache: {}", dir.display()),
        None => println!("Hugging Face cache: none (HOME unset)"),
    }
    if cached.is_empty() {
        println!("  no FLUX repos cached");
    }
    for (repo, path) in cached {
        println!("  {repo}: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parallel(devices: Option<&str>, dp: Option<usize>, auto: bool) -> ParallelArgs {
        ParallelArgs {
            devices: devices.map(str::to_string),
            degrees: Degrees {
                dp,
                ..Degrees::default()
            },
            parallel: auto.then(|| "auto".to_string()),
        }
    }

    #[test]
    fn flags_translate_into_one_placement() -> anyhow::Result<()> {
        let p = parallel(Some("cuda:0,0"), Some(2), false).placement("cpu")?;
        assert_eq!(p.devices, Devices::Gpus(vec![0, 0]));
        assert_eq!(
            p.layout,
            LayoutChoice::Degrees(Degrees {
                dp: Some(2),
                ..Degrees::default()
            })
        );
        // Without --devices, --device names the one worker (`cuda` is GPU 0 there).
        let one = parallel(None, None, false).placement("cuda")?;
        assert_eq!(one.devices, Devices::Gpus(vec![0]));
        assert_eq!(
            parallel(Some("cpu:4"), None, true).placement("cpu")?.layout,
            LayoutChoice::Auto
        );
        for (args, needle) in [
            (parallel(None, Some(2), false), "need --devices"),
            (parallel(Some("cpu:2"), Some(2), true), "drop --ulysses"),
            (parallel(Some("tpu:1"), None, false), "cpu:N"),
        ] {
            let e = args.placement("cpu").expect_err(needle).to_string();
            assert!(e.contains(needle), "{e}");
        }
        Ok(())
    }

    /// A memory budget is planned for the size the command asks, not the default 1024 px.
    #[test]
    fn the_memory_plan_takes_the_requested_size() -> anyhow::Result<()> {
        let parse_model = |model: &str, args: &[&str]| -> anyhow::Result<GenerateArgs> {
            let mut all = vec!["parallax", "generate", "--model", model];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all)?.command {
                Some(Command::Generate(g)) => Ok(g),
                other => anyhow::bail!("parsed as {other:?}"),
            }
        };
        let parse = |args: &[&str]| parse_model("random:dev", args);
        let g = parse(&[
            "--width",
            "2048",
            "--height",
            "512",
            "--memory-budget",
            "24G",
        ])?;
        let checked = checked_job(&g.model, &g.sample, &g.init, &g.parallel)?;
        assert_eq!(checked.choice.plan_size, Some((2048, 512)));
        let at = |g: &GenerateArgs| -> anyhow::Result<_> {
            Ok(g.model.choice_at(&g.sample, &g.init)?.plan_size)
        };
        assert_eq!(at(&g)?, Some((2048, 512)));
        // The model's default size where none is named (the demo's is 256 px); no budget, no plan.
        let g = parse(&["--width", "768", "--memory-budget", "24"])?;
        assert_eq!(at(&g)?, Some((768, 1024)));
        let g = parse(&["--memory-budget", "24"])?;
        assert_eq!(at(&g)?, Some((1024, 1024)));
        assert_eq!(at(&parse(&["--width", "768"])?)?, None);
        assert_eq!(
            at(&parse_model("demo", &["--memory-budget", "2"])?)?,
            Some((256, 256))
        );
        Ok(())
    }
}
