//! What the window shows, apart from the saved [`super::Settings`], in one [`View`]: the tab, the
//! model's status, the job in progress (and how its progress reads), the queue, the finished images
//! with their textures, the compare and gallery views' own state, the message log and what was
//! found on this machine. Plain data; the runtime and channels stay in [`super::StudioApp`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use egui::{TextureHandle, TextureOptions};

use super::state::{format_caches, format_thresholds, parse_caches, parse_thresholds};
use crate::pipeline::cache::CacheSpec;
use crate::pipeline::image::RgbImage;
use crate::runtime::gallery::Entry;
use crate::runtime::{ImageResult, JobId};

/// Everything on screen that is not a saved setting.
pub struct View {
    pub tab: Tab,
    pub model: ModelStatus,
    /// The loaded model's heads and blocks (what a layout must divide, PipeFusion's most stages).
    pub model_shape: super::state::ModelShape,
    pub job: Option<JobView>,
    /// Jobs waiting behind the running one, in the order they will run.
    pub queue: Vec<QueuedJob>,
    pub result: Option<Shown>,
    pub compare: Vec<Shown>,
    pub compare_view: CompareView,
    pub gallery: GalleryView,
    pub messages: super::messages::MessageLog,
    /// The in-window path field, when the desktop has no file dialog.
    pub path_prompt: Option<super::dialogs::PathPrompt>,
    /// Why images will not be kept in the gallery (checked when a job starts).
    pub gallery_warning: Option<String>,
    /// FLUX repos found in the Hugging Face cache at start-up (and after a download).
    pub hf_models: Vec<(String, PathBuf)>,
    /// FLUX transformers in the ComfyUI installs found.
    pub comfy_models: Vec<PathBuf>,
    /// The GPUs found at start-up (name, memory), for the devices panel.
    pub gpus: Vec<crate::device::GpuInfo>,
    /// The source image's mask painter (image-to-image, inpainting).
    pub edit: EditView,
}

/// The source image's mask painter and the textures it draws with ([`super::tabs::edit`] draws
/// them; the state and its logic are [`super::mask`]'s).
#[derive(Default)]
pub struct EditView {
    pub mask: super::mask::MaskEditor,
    /// The source's texture, or why it has none, for the file named.
    pub source: Option<(PathBuf, Result<TextureHandle, String>)>,
    /// The overlay's texture and the mask version it shows.
    pub overlay: Option<(u64, TextureHandle)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Image,
    Compare,
    Gallery,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelStatus {
    NotLoaded,
    Loading(String),
    Ready(String),
    /// `model` (as typed) did not load.
    Failed {
        model: String,
        error: String,
    },
}

impl ModelStatus {
    /// Why Generate is refused with `model` in the model field: the same model failed to load
    /// (another name is tried when the job starts, so it is not refused).
    pub fn refusal(&self, model: &str) -> Option<String> {
        match self {
            ModelStatus::Failed { model: m, .. } if m == model.trim() => Some(format!(
                "the model `{m}` did not load: choose another model (or fix it and press Load)"
            )),
            _ => None,
        }
    }
}

/// The job on screen.
#[derive(Debug, Clone)]
pub struct JobView {
    pub id: JobId,
    pub compare: bool,
    pub images: usize,
    /// 0-based image of the job being made.
    pub image: usize,
    /// 1-based step of that image just finished (0: none yet).
    pub step: usize,
    pub total: usize,
    pub step_ms: Vec<f64>,
    pub reused: usize,
    pub layout: String,
    /// What it makes ("256x256, 4 steps, seed 42"), the caption while it runs.
    pub summary: String,
    /// The start of its prompt (for the queue's list).
    pub prompt: String,
    pub started: Instant,
    /// A compare sweep's timing rounds (1 for other jobs), and the one running (1-based).
    pub rounds: usize,
    pub round: usize,
}

impl JobView {
    pub fn new(id: JobId, compare: bool, images: usize, steps: usize) -> Self {
        Self {
            id,
            compare,
            images,
            image: 0,
            step: 0,
            total: steps,
            step_ms: Vec::new(),
            reused: 0,
            layout: String::new(),
            summary: String::new(),
            prompt: String::new(),
            started: Instant::now(),
            rounds: 1,
            round: 1,
        }
    }

    /// This job as a waiting one again (shown as next, but the runtime started another).
    pub fn waiting(&self) -> QueuedJob {
        QueuedJob {
            id: self.id,
            compare: self.compare,
            images: self.images,
            steps: self.total,
            summary: self.summary.clone(),
            prompt: self.prompt.clone(),
        }
    }

    /// Every step of the current image is done: its autoencoder decode is running.
    pub fn decoding(&self) -> bool {
        self.total > 0 && self.step >= self.total
    }

    /// Estimated time left for the remaining steps in seconds, from the median step time
    /// (`None` before the first step, or when no step is left: the decode's time is unknown).
    pub fn eta_s(&self) -> Option<f64> {
        if self.step_ms.is_empty() || self.total == 0 {
            return None;
        }
        let left_steps = self.total.saturating_sub(self.step)
            + self.images.saturating_sub(self.image + 1) * self.total
            + self.rounds.saturating_sub(self.round) * self.images * self.total;
        if left_steps == 0 {
            return None;
        }
        let mut v = self.step_ms.clone();
        v.sort_by(f64::total_cmp);
        let med = v[v.len() / 2];
        Some(med * left_steps as f64 / 1e3)
    }

    /// The share of the job's steps done, 0..=1.
    pub fn fraction(&self) -> f32 {
        let done = (self.round.max(1) - 1) * self.images * self.total;
        (done + self.image * self.total + self.step) as f32
            / (self.rounds.max(1) * self.images * self.total).max(1) as f32
    }

    /// The progress bar's text.
    pub fn progress_text(&self) -> String {
        let what = if self.compare {
            "compare"
        } else {
            "generation"
        };
        let image = if self.images > 1 {
            format!("image {}/{}: ", self.image + 1, self.images)
        } else {
            String::new()
        };
        let eta = self
            .eta_s()
            .map_or(String::new(), |s| format!(", about {s:.1} s left"));
        let reused = if self.reused > 0 {
            format!(", {} reused", self.reused)
        } else {
            String::new()
        };
        if self.round > 1 {
            // The later timing rounds make no previews: no step to show.
            return format!(
                "timing round {} of {}: image {}/{}{eta}",
                self.round,
                self.rounds,
                self.image + 1,
                self.images
            );
        }
        if self.step == 0 {
            if self.image == 0 {
                format!("starting {what} (encoding the prompt)…")
            } else {
                format!("{image}encoding the prompt…{eta}")
            }
        } else if self.decoding() {
            // The steps are over; the decode has no step events to time it by.
            format!("{image}decoding…{eta}{reused}")
        } else {
            let last = self.step_ms.last().copied().unwrap_or(0.0);
            format!(
                "{image}step {}/{} — {last:.0} ms/step{eta}{reused}",
                self.step, self.total
            )
        }
    }

    /// An image of the job is done: the next one starts at step 0.
    pub fn image_done(&mut self, index: usize) {
        if index + 1 < self.images {
            self.image = index + 1;
            self.step = 0;
        }
    }
}

/// A job waiting behind the running one.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub id: JobId,
    pub compare: bool,
    pub images: usize,
    pub steps: usize,
    /// What it makes ("256x256, 12 steps, seed 43"), and the start of its prompt.
    pub summary: String,
    pub prompt: String,
}

impl QueuedJob {
    /// The job on screen once this one starts.
    pub fn view(&self) -> JobView {
        let mut j = JobView::new(self.id, self.compare, self.images, self.steps);
        j.summary = self.summary.clone();
        j.prompt = self.prompt.clone();
        j
    }
}

/// One finished image with its texture.
pub struct Shown {
    pub result: Arc<ImageResult>,
    pub image: Arc<RgbImage>,
    /// Unique per image (heatmap and texture cache keys).
    pub id: u64,
    pub tex: TextureHandle,
    /// The share of the prompt's checks the image passes, for prompts in the demo model's world
    /// (colours, shapes, places, backgrounds: [`crate::scenes::score`]); none for other prompts.
    pub prompt_score: Option<f64>,
    /// A compare cell's timings over every round, once the sweep's last round is done.
    pub timing: Option<crate::runtime::repeats::CellTiming>,
}

impl Shown {
    pub fn new(ctx: &egui::Context, id: u64, result: Arc<ImageResult>) -> Self {
        let image = Arc::new(result.generated.image.clone());
        let tex = ctx.load_texture(
            format!("image-{id}"),
            color_image(&image),
            TextureOptions::NEAREST,
        );
        let prompt_score = crate::scenes::parse::parse(&result.generated.settings.prompt)
            .map(|d| crate::scenes::score::score(&image, &d).accuracy());
        Self {
            result,
            image,
            id,
            tex,
            prompt_score,
            timing: None,
        }
    }

    /// The caption under the image.
    pub fn caption(&self) -> String {
        let g = &self.result.generated;
        format!(
            "{}x{}, {} steps ({} computed, {} reused), seed {}, {:.2} s",
            g.settings.width,
            g.settings.height,
            g.settings.steps,
            g.stats.computed,
            g.stats.reused,
            g.settings.seed,
            g.timings.total_ms / 1e3
        )
    }
}

/// A list typed as text in one field (the compare sweep's thresholds, its cache policies): the
/// text as typed (never reformatted while typed) and what is wrong with it. The list it parses
/// to lives in the settings (`compare_thresholds`, `compare_caches`).
#[derive(Debug, Clone)]
pub struct ListField<T> {
    pub text: String,
    pub error: Option<String>,
    /// The list the text was last made from or parsed to; when the settings' list changes
    /// elsewhere (restore, a test), the text is rewritten from it.
    synced: Vec<T>,
}

/// What a [`ListField`] holds: how its list is written and read back.
pub trait ListItem: Clone + PartialEq + Sized {
    fn format(list: &[Self]) -> String;
    fn parse(text: &str) -> Result<Vec<Self>, String>;
}

impl ListItem for f64 {
    fn format(list: &[Self]) -> String {
        format_thresholds(list)
    }
    fn parse(text: &str) -> Result<Vec<Self>, String> {
        parse_thresholds(text)
    }
}

impl ListItem for CacheSpec {
    fn format(list: &[Self]) -> String {
        format_caches(list)
    }
    fn parse(text: &str) -> Result<Vec<Self>, String> {
        parse_caches(text)
    }
}

impl ListItem for super::state::Strength {
    fn format(list: &[Self]) -> String {
        super::state::format_strengths(list)
    }
    fn parse(text: &str) -> Result<Vec<Self>, String> {
        super::state::parse_strengths(text)
    }
}

/// The compare sweep's threshold field.
pub type ThresholdField = ListField<f64>;
/// The compare sweep's policy field.
pub type CacheListField = ListField<CacheSpec>;

impl<T> Default for ListField<T> {
    fn default() -> Self {
        Self {
            text: String::new(),
            error: None,
            synced: Vec::new(),
        }
    }
}

impl<T: ListItem> ListField<T> {
    /// Keep the text in step with `list` when something other than the field changed it.
    pub fn sync(&mut self, list: &[T]) {
        if self.synced != list {
            self.text = T::format(list);
            self.error = None;
            self.synced = list.to_vec();
        }
    }

    /// The text was edited: parse it; a good list goes to `list`, a bad one leaves `list` as it
    /// was and sets the error.
    pub fn edited(&mut self, list: &mut Vec<T>) {
        match T::parse(&self.text) {
            Ok(v) => {
                self.error = None;
                *list = v.clone();
                self.synced = v;
            }
            Err(e) => self.error = Some(e),
        }
    }
}

/// State of the compare tab.
#[derive(Debug, Clone)]
pub struct CompareView {
    /// The result on the right of the wipe (and the heatmap's candidate).
    pub selected: usize,
    /// The result on the left (0: the uncached reference): any two cells can be compared.
    pub left: usize,
    pub wipe: f32,
    pub show_heatmap: bool,
    pub thresholds: ThresholdField,
    pub caches: CacheListField,
    /// The LoRA strengths the sweep crosses with its cells.
    pub lora_strengths: ListField<super::state::Strength>,
}

impl Default for CompareView {
    fn default() -> Self {
        Self {
            selected: 1,
            left: 0,
            wipe: 0.5,
            show_heatmap: false,
            thresholds: ThresholdField::default(),
            caches: CacheListField::default(),
            lora_strengths: ListField::default(),
        }
    }
}

/// A gallery image opened large.
pub struct Opened {
    pub entry: Entry,
    pub tex: TextureHandle,
}

/// State of the gallery tab.
#[derive(Default)]
pub struct GalleryView {
    /// Every image in the folder, newest first.
    pub entries: Vec<Entry>,
    /// The listing is stale (an image was added or deleted).
    pub dirty: bool,
    /// Asked to delete this file; waiting for the user to confirm.
    pub confirm_delete: Option<PathBuf>,
    pub opened: Option<Opened>,
    /// Files the listing skipped (not readable Parallax PNGs), each mentioned once.
    pub skipped: std::collections::HashSet<PathBuf>,
}

pub fn color_image(img: &RgbImage) -> egui::ColorImage {
    egui::ColorImage::from_rgb([img.width, img.height], &img.data)
}

pub fn full_uv() -> egui::Rect {
    egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(images: usize, total: usize) -> JobView {
        JobView::new(JobId(1), images > 1, images, total)
    }

    #[test]
    fn progress_says_decoding_after_the_last_step_not_zero_seconds_left() {
        let mut j = job(1, 4);
        assert!(j.progress_text().starts_with("starting generation"));
        for s in 1..=3 {
            j.step = s;
            j.step_ms.push(100.0);
        }
        assert_eq!(j.eta_s(), Some(0.1));
        assert!(
            j.progress_text().contains("step 3/4"),
            "{}",
            j.progress_text()
        );
        j.step = 4;
        j.step_ms.push(100.0);
        assert_eq!(j.eta_s(), None);
        let t = j.progress_text();
        assert!(t.contains("decoding…"), "{t}");
        assert!(!t.contains("s left"), "{t}");
    }

    #[test]
    fn a_sweep_counts_the_images_still_to_come() {
        let mut j = job(3, 4);
        j.step = 4;
        j.step_ms = vec![50.0; 4];
        // Image 1 of 3 decodes; two images of four steps remain.
        assert_eq!(j.eta_s(), Some(0.4));
        assert!(j.progress_text().starts_with("image 1/3: decoding…"));
        j.image_done(0);
        assert_eq!((j.image, j.step), (1, 0));
        assert!(j.progress_text().contains("encoding the prompt"));
        j.image_done(2);
        assert_eq!(j.image, 1, "the last image leaves the counter alone");
    }

    #[test]
    fn timing_rounds_count_in_the_progress() {
        let mut j = job(2, 4);
        j.rounds = 3;
        j.step = 4;
        j.step_ms = vec![50.0; 4];
        // Image 1 of 2 in round 1: one more image, then two rounds of two images.
        assert_eq!(j.eta_s(), Some(1.0));
        assert!((j.fraction() - 4.0 / 24.0).abs() < 1e-6);
        (j.round, j.image, j.step) = (3, 1, 0);
        assert_eq!(
            j.progress_text(),
            "timing round 3 of 3: image 2/2, about 0.2 s left"
        );
        assert!((j.fraction() - 20.0 / 24.0).abs() < 1e-6);
    }

    #[test]
    fn threshold_text_is_kept_as_typed() {
        let mut list = vec![0.0, 0.06];
        let mut f = ThresholdField::default();
        f.sync(&list);
        assert_eq!(f.text, "0, 0.06");
        // Typing "0.2,3" one key at a time: the text is never rewritten.
        f.text.clear();
        for c in "0.2,3".chars() {
            f.text.push(c);
            f.edited(&mut list);
            f.sync(&list);
        }
        assert_eq!(f.text, "0.2,3");
        assert_eq!(f.error.as_deref(), Some("3 is outside 0..=1"));
        assert_eq!(list, vec![0.2], "the last good list stays");
        f.text.push('5');
        f.edited(&mut list);
        f.text = "0.2, 0.35".into();
        f.edited(&mut list);
        assert_eq!((f.error.as_ref(), &list), (None, &vec![0.2, 0.35]));
        // Changed elsewhere (restore): the text follows.
        list = vec![0.1];
        f.sync(&list);
        assert_eq!(f.text, "0.1");
    }

    #[test]
    fn a_failed_model_refuses_only_itself() {
        let s = ModelStatus::Failed {
            model: "/gone.safetensors".into(),
            error: "no such file".into(),
        };
        assert!(s.refusal("/gone.safetensors ").is_some());
        assert!(s.refusal("demo").is_none());
        assert!(ModelStatus::NotLoaded.refusal("demo").is_none());
    }
}
