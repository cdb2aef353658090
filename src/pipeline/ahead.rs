//! Prompts encoded ahead of their job, and a model from files loaded in two halves so they can
//! be ([`TextFirst`]): the text encoder first, the transformer and autoencoder after (FLUX.1:
//! [`Flux1TextFirst`]; FLUX.2 klein: [`KleinTextFirst`]). The engine
//! ([`crate::engine::load`], which may run threads) encodes the first job's prompt between the
//! two, on a thread of its own while the transformer's file is read. The encodings wait in the
//! pipeline's [`AheadPrompts`] until [`super::Pipeline::prepare`] takes them in place of encoding
//! again: the same encoder, prompt and dtype, so the same tensors.

use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::family::TextEncoder;
use crate::model::flux::{Flux, FluxConfig};
use crate::model::klein::files::{self as klein_files, KleinFiles};
use crate::model::klein::text::KleinTextEncoder;
use crate::model::klein::{Klein, KleinVae};
use crate::model::layout::{ModelFiles, Variant};
use crate::model::load_clock::{time, LoadPhase};
use crate::model::text::{T5Residency, TextEncoders};
use crate::model::vae::AutoEncoder;
use crate::model::weights::SafetensorsSet;

use super::sampler::Conditioning;
use super::{GenerateRequest, LoadOptions, Pipeline};

/// One prompt encoded: the conditioning the transformer takes, what the user should know, and
/// the encoding's wall time.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    pub prompt: String,
    /// The dtype the conditioning was converted to (the transformer's).
    pub dtype: DType,
    pub cond: Conditioning,
    pub notes: Vec<String>,
    pub ms: f64,
}

/// `prompt` as a transformer in `dtype` on `device` takes it: `text`'s hidden states and pooled
/// vector, or a (1, 0) tensor for a family without one. What [`super::Pipeline::prepare`] runs,
/// here or ahead of the job.
pub fn encode_prompt(
    text: &dyn TextEncoder,
    prompt: &str,
    dtype: DType,
    device: &Device,
) -> Result<EncodedPrompt> {
    let t0 = Instant::now();
    let e = text.encode_prompt(prompt, dtype)?;
    let y = match e.pooled {
        Some(y) => y,
        None => Tensor::zeros((1, 0), dtype, device)?,
    };
    Ok(EncodedPrompt {
        prompt: prompt.to_string(),
        dtype,
        cond: Conditioning { txt: e.txt, y },
        notes: e.notes,
        ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// The prompts the first generation of `req` encodes, in order: its prompt, and its negative
/// prompt (empty when none) when true CFG is on.
pub fn prompts_of(req: &GenerateRequest) -> Vec<String> {
    let mut out = vec![req.prompt.clone()];
    if req.true_cfg.unwrap_or(1.0) > 1.0 {
        out.push(req.negative_prompt.clone().unwrap_or_default());
    }
    out
}

/// Encodings made ahead of the job that uses them (at most a job's prompts; emptied by the
/// first [`super::Pipeline::prepare`], used or not).
#[derive(Default)]
pub struct AheadPrompts(Mutex<Vec<EncodedPrompt>>);

impl AheadPrompts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<EncodedPrompt>> {
        // A panic while holding the lock leaves a plain list behind: still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep `e` for the job to come.
    pub fn put(&self, e: EncodedPrompt) {
        self.lock().push(e);
    }

    /// The encoding of `prompt` in `dtype`, if one waits here (taken out).
    pub fn take(&self, prompt: &str, dtype: DType) -> Option<EncodedPrompt> {
        let mut list = self.lock();
        let i = list
            .iter()
            .position(|e| e.prompt == prompt && e.dtype == dtype)?;
        Some(list.remove(i))
    }

    /// Drop whatever waits (the first job used what it could).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many encodings wait.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A model from files loaded in two halves, its text encoder first: the engine encodes a prompt
/// with [`TextFirst::text`] while [`TextFirst::rest`] reads the transformer and the autoencoder
/// (both borrow `self`, from two threads), then [`TextFirst::assemble`] makes the pipeline;
/// [`TextFirst::finish`] runs the second half alone, as a load without the overlap does.
pub trait TextFirst: Sync + Sized {
    /// The second half: the transformer and the autoencoder.
    type Rest;

    /// The text encoder, built.
    fn text(&self) -> &dyn TextEncoder;

    /// Where the text encoder's large part (T5, Qwen3) stays between prompts: a prompt is
    /// encoded ahead only while it stays loaded.
    fn text_residency(&self) -> T5Residency;

    /// The dtype the transformer runs in (what a prompt is encoded to).
    fn dtype(&self) -> DType;

    /// Read the transformer (its share of blocks, FP8 groups converted block by block as the
    /// load options say) and the autoencoder. Runs no matrix products: reads, host-to-device
    /// copies, conversions.
    fn rest(&self) -> Result<Self::Rest>;

    /// The pipeline of the second half read and this text encoder.
    fn assemble(self, rest: Self::Rest) -> Pipeline;

    /// The second half read, then the pipeline assembled.
    fn finish(self) -> Result<Pipeline> {
        let rest = self.rest()?;
        Ok(self.assemble(rest))
    }
}

/// FLUX.1 from files, half loaded: the transformer's config read from its file's header, the
/// text encoders built; [`Pipeline::load_files_with`] runs the halves one after the other.
pub struct Flux1TextFirst<'a> {
    files: &'a ModelFiles,
    label: String,
    dtype: DType,
    device: Device,
    opts: LoadOptions,
    set: std::sync::Arc<SafetensorsSet>,
    cfg: FluxConfig,
    variant: Variant,
    text: TextEncoders,
}

impl<'a> Flux1TextFirst<'a> {
    /// Read the transformer's header (its config, whether it is FLUX.1's) and build the text
    /// encoders (from their files, or drawn at random beside a transformer file loaded with
    /// `--text-encoders random`), checked against the transformer's widths.
    pub fn load(
        files: &'a ModelFiles,
        label: &str,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        let (set, cfg) = super::transformer_header(files)?;
        let variant = if files.demo {
            Variant::Demo
        } else if cfg.guidance_embed {
            Variant::Dev
        } else {
            Variant::Schnell
        };
        let text = if files.random_parts() {
            super::random_text(&cfg, variant, dtype, device, opts)?
        } else {
            time(LoadPhase::TextEncoders, || {
                TextEncoders::load_parts_with(
                    &files.text,
                    variant.t5_max_len(),
                    dtype,
                    device,
                    opts.t5,
                )
            })?
        };
        if text.t5_dim() != cfg.context_in_dim || text.clip_dim() != cfg.vec_in_dim {
            return Err(Error::UnknownLayout {
                path: files.text.t5.clone(),
                reason: format!(
                    "text encoders give {} (T5) and {} (CLIP) wide embeddings; the transformer takes {} and {}",
                    text.t5_dim(),
                    text.clip_dim(),
                    cfg.context_in_dim,
                    cfg.vec_in_dim
                ),
            });
        }
        Ok(Self {
            files,
            label: label.to_string(),
            dtype,
            device: device.clone(),
            opts,
            set,
            cfg,
            variant,
            text,
        })
    }
}

impl TextFirst for Flux1TextFirst<'_> {
    type Rest = (Flux, AutoEncoder);

    fn text(&self) -> &dyn TextEncoder {
        &self.text
    }

    fn text_residency(&self) -> T5Residency {
        self.text.t5_residency()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn rest(&self) -> Result<Self::Rest> {
        let flux = super::build_transformer(
            self.files,
            self.set.clone(),
            &self.cfg,
            self.dtype,
            &self.device,
            self.opts,
        )?;
        // The autoencoder, read or drawn.
        let vae = if self.files.random_parts() {
            super::random_vae(&self.cfg, self.dtype, &self.device)?
        } else {
            time(LoadPhase::Autoencoder, || {
                super::load_vae(self.files, self.dtype, &self.device)
            })?
        };
        Ok((flux, vae))
    }

    fn assemble(self, (flux, vae): Self::Rest) -> Pipeline {
        let synthetic = self.files.demo || self.files.random_parts();
        Pipeline::of_flux1(flux, vae, self.text, self.variant, &self.label, synthetic)
    }
}

/// FLUX.2 klein from files, half loaded: Qwen3 and its tokenizer built (kept, or built for each
/// prompt as the load options say) and checked against the transformer's text width
/// ([`klein_files::load_text`]); [`Pipeline::load_klein`] runs the halves one after the other.
pub struct KleinTextFirst<'a> {
    files: &'a KleinFiles,
    label: String,
    dtype: DType,
    device: Device,
    opts: LoadOptions,
    text: KleinTextEncoder,
}

impl<'a> KleinTextFirst<'a> {
    /// Build Qwen3 (in `dtype`, Qwen3 on demand where `opts.t5` says) from `files`.
    pub fn load(
        files: &'a KleinFiles,
        label: &str,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        let text = klein_files::load_text(files, (dtype, device), opts.t5)?;
        Ok(Self {
            files,
            label: label.to_string(),
            dtype,
            device: device.clone(),
            opts,
            text,
        })
    }
}

impl TextFirst for KleinTextFirst<'_> {
    type Rest = (Klein, KleinVae);

    fn text(&self) -> &dyn TextEncoder {
        &self.text
    }

    fn text_residency(&self) -> T5Residency {
        self.text.residency()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn rest(&self) -> Result<Self::Rest> {
        let how = klein_files::LoadAs {
            fp8: self.opts.fp8,
            lean: self.opts.lean,
        };
        klein_files::load_rest(
            self.files,
            self.dtype,
            super::autoencoder_dtype(self.dtype, &self.device),
            &self.device,
            self.opts.blocks.map(|(a, b)| a..b),
            how,
        )
    }

    fn assemble(self, (transformer, vae): Self::Rest) -> Pipeline {
        Pipeline::of_klein(self.files, transformer, vae, self.text, &self.label)
    }
}
