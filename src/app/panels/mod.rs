//! The panels around the tabs: [`settings`] on the left (model, prompt, sampling, Generate and
//! Compare) with [`devices`] (GPUs, device list, layout), [`loras`] (the LoRA list) and
//! [`source`] (start from an image), [`progress`] above the tabs. The message log at the bottom is
//! [`super::messages::MessageLog::show`]. Panels edit the settings and queue
//! [`super::action::Action`]s; they never act on the runtime.

pub mod devices;
pub mod loras;
pub mod progress;
pub mod settings;
pub mod source;
