//! The devices panel: the GPUs found (name, memory) to tick, CPU worker threads when there are
//! none (or by choice), the device list as text for what ticks cannot say (`cuda:0,0`), the
//! layout (auto or degrees by hand), and the plan that will run and why — the engine's own
//! [`crate::engine::Placement::plan`] text, the same the CLI prints and `info` shows.

use egui::RichText;

use crate::app::state::{ModelShape, Settings};
use crate::device::GpuInfo;
use crate::engine::placement::MAX_CPU_WORKERS;
use crate::engine::Devices;
use crate::parallel::layout::Stale;
use crate::parallel::pipefusion::StageBalance;

/// What the devices panel draws from and edits.
pub struct DevicesPanel<'a> {
    /// Edited in place (`device` holds the device list, `workers` the CPU threads when it says
    /// `cpu`).
    pub settings: &'a mut Settings,
    pub gpus: &'a [GpuInfo],
    /// The loaded model's heads and blocks.
    pub model: ModelShape,
}

/// Show the panel; edits go straight into the settings.
pub fn show(ui: &mut egui::Ui, p: DevicesPanel<'_>) {
    let DevicesPanel {
        settings,
        gpus,
        model,
    } = p;
    ui.label("Devices and layout");
    let parsed = Devices::parse(&settings.device);
    let on_gpus = matches!(parsed, Ok(Devices::AllGpus | Devices::Gpus(_)));
    if gpus.is_empty() {
        ui.add(
            egui::Label::new(
                "No GPUs found (CPU build or no CUDA device): CPU worker threads stand in.",
            )
            .wrap(),
        );
    } else {
        let mut use_gpus = on_gpus;
        ui.horizontal(|ui| {
            if ui.radio_value(&mut use_gpus, false, "CPU").clicked() {
                settings.device = "cpu".into();
            }
            if ui.radio_value(&mut use_gpus, true, "GPUs").clicked() && !on_gpus {
                settings.device = "cuda:0".into();
            }
        });
        if use_gpus {
            gpu_ticks(ui, settings, gpus);
        }
    }
    egui::Grid::new("devices").num_columns(2).show(ui, |ui| {
        let l = ui.label("Device list");
        ui.add(
            egui::TextEdit::singleline(&mut settings.device)
                .desired_width(110.0)
                .hint_text("cpu, cuda:0,1, cuda:0,0"),
        )
        .labelled_by(l.id)
        .on_hover_text(
            "cpu, cpu:N (N worker threads), cuda (every GPU), cuda:0,1 (those GPUs, one rank each), \
             cuda:0,0 (one GPU twice: data-parallel groups of one GPU each)",
        );
        ui.end_row();
        if matches!(Devices::parse(&settings.device), Ok(Devices::Cpu(1))) {
            let l = ui.label("CPU workers");
            ui.add(egui::DragValue::new(&mut settings.workers).range(1..=MAX_CPU_WORKERS))
                .labelled_by(l.id);
            ui.end_row();
        }
    });
    if ui
        .checkbox(&mut settings.layout_auto, "auto layout")
        .changed()
        && !settings.layout_auto
    {
        // By hand from what auto chose, not from whatever degrees were typed last time.
        settings.layout_by_hand(model);
    }
    if !settings.layout_auto {
        ui.horizontal_wrapped(|ui| {
            for (label, v) in [
                ("ulysses", &mut settings.layout.ulysses),
                ("ring", &mut settings.layout.ring),
                ("cfg", &mut settings.layout.cfg),
                ("dp", &mut settings.layout.dp),
            ] {
                let l = ui.label(label);
                let r = ui
                    .add(egui::DragValue::new(v).range(1..=64))
                    .labelled_by(l.id);
                if label == "dp" {
                    r.on_hover_text(
                        "data-parallel groups: a Generate makes this many images at once, seeds \
                         s, s + 1, ... (no live preview then)",
                    );
                }
            }
        });
        ui.horizontal_wrapped(|ui| {
            let mut on = settings.layout.is_displaced();
            if ui
                .checkbox(&mut on, "displaced patches")
                .on_hover_text(
                    "Over the ring degree: each worker computes its patch and attends to the \
                     others' keys and values from the previous step (gathered in the \
                     background); exact for the warm-up steps, approximate after. Ulysses 1.",
                )
                .changed()
            {
                settings.layout.stale = if on { Stale::displaced() } else { Stale::Exact };
            }
            if let Stale::Displaced { warmup, rotate } = &mut settings.layout.stale {
                let l = ui.label("warm-up");
                ui.add(egui::DragValue::new(warmup).range(0..=64))
                    .labelled_by(l.id);
                ui.checkbox(rotate, "rotate").on_hover_text(
                    "piflux: each step every worker computes the next patch round, and no \
                         keys or values are exchanged after the warm-up",
                );
            }
        });
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("pipefusion");
            let mut stages = settings.layout.pipeline();
            ui.add(egui::DragValue::new(&mut stages).range(1..=64))
                .labelled_by(l.id)
                .on_hover_text(
                    "PipeFusion stages: the blocks split over that many workers (each holds only \
                     its share), each step's patches pipelined through them; a patch reads the \
                     patches not yet computed this step from the previous step. 1: off. Ring 1 \
                     (Ulysses runs inside each stage); no cache policy.",
                );
            settings.layout.stale = match settings.layout.stale {
                // The patches, warm-up and balance stay as set when the stages change.
                Stale::PipeFusion { .. } if stages < 2 => Stale::Exact,
                Stale::PipeFusion {
                    patches,
                    warmup,
                    balance,
                    ..
                } => Stale::PipeFusion {
                    stages,
                    patches,
                    warmup,
                    balance,
                },
                other if stages < 2 => other,
                _ => Stale::pipefusion(stages),
            };
            if let Stale::PipeFusion {
                patches,
                warmup,
                balance,
                ..
            } = &mut settings.layout.stale
            {
                for (label, v, min) in [("patches", patches, 1), ("warm-up", warmup, 1)] {
                    let l = ui.label(label);
                    ui.add(egui::DragValue::new(v).range(min..=64))
                        .labelled_by(l.id);
                }
                let mut by_memory = *balance == StageBalance::Memory;
                ui.checkbox(&mut by_memory, "by memory").on_hover_text(
                    "Split the blocks by weight bytes (a double block holds 2.4 times a \
                         single one's) rather than by work: for a model no single GPU holds",
                );
                *balance = if by_memory {
                    StageBalance::Memory
                } else {
                    StageBalance::Work
                };
            }
        });
    }
    // A refusal is shown once, with the other blockers under the panel.
    if let Ok(s) = settings.layout_check(model) {
        ui.add(egui::Label::new(RichText::new(format!("Will run: {s}"))).wrap());
    }
}

/// A tick box per GPU; the ticked ones become the device list (`cuda:0,2`).
fn gpu_ticks(ui: &mut egui::Ui, settings: &mut Settings, gpus: &[GpuInfo]) {
    let chosen: Vec<usize> = match Devices::parse(&settings.device) {
        Ok(Devices::AllGpus) => gpus.iter().map(|g| g.index).collect(),
        Ok(Devices::Gpus(list)) => list,
        _ => Vec::new(),
    };
    let mut ticked: Vec<bool> = gpus.iter().map(|g| chosen.contains(&g.index)).collect();
    let mut changed = false;
    for (g, tick) in gpus.iter().zip(ticked.iter_mut()) {
        let text = format!(
            "cuda:{}  {}  {:.0} GiB",
            g.index,
            g.name,
            g.memory as f64 / (1u64 << 30) as f64
        );
        changed |= ui.checkbox(tick, text).changed();
    }
    if changed {
        let list: Vec<String> = gpus
            .iter()
            .zip(&ticked)
            .filter(|(_, t)| **t)
            .map(|(g, _)| g.index.to_string())
            .collect();
        settings.device = if list.is_empty() {
            "cpu".into()
        } else {
            format!("cuda:{}", list.join(","))
        };
    }
}
