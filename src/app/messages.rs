//! The message log at the bottom of the window: what the studio tells the user. A message that
//! repeats the one before it is counted ("x3") instead of added; long messages wrap; the panel
//! scrolls.

use std::collections::VecDeque;

use egui::{Color32, RichText};

/// How many messages are kept.
const KEEP: usize = 50;

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub text: String,
    pub error: bool,
    /// How many times in a row it was said.
    pub count: usize,
}

/// The messages, oldest first.
#[derive(Debug, Default)]
pub struct MessageLog {
    items: VecDeque<Message>,
}

impl MessageLog {
    /// Add a message, or count it again if it repeats the last one.
    pub fn push(&mut self, text: impl Into<String>, error: bool) {
        let text = text.into();
        if error {
            tracing::warn!("{text}");
        } else {
            tracing::info!("{text}");
        }
        if let Some(last) = self.items.back_mut() {
            if last.text == text && last.error == error {
                last.count += 1;
                return;
            }
        }
        self.items.push_back(Message {
            text,
            error,
            count: 1,
        });
        while self.items.len() > KEEP {
            self.items.pop_front();
        }
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Message> {
        self.items.iter()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn remove(&mut self, index: usize) {
        self.items.remove(index);
    }

    /// Draw the log, newest first, in a scrolling area; `×` dismisses a message.
    pub fn show(&mut self, ui: &mut egui::Ui) {
        if self.items.is_empty() {
            ui.label(RichText::new("no messages").small().weak());
            return;
        }
        let mut dismiss = None;
        egui::ScrollArea::vertical()
            .max_height(96.0)
            .auto_shrink([false, true])
            .show(ui, |ui| {
                for (i, m) in self.items.iter().enumerate().rev() {
                    ui.horizontal(|ui| {
                        if ui.small_button("×").on_hover_text("dismiss").clicked() {
                            dismiss = Some(i);
                        }
                        let text = if m.count > 1 {
                            format!("{} (x{})", m.text, m.count)
                        } else {
                            m.text.clone()
                        };
                        let text = if m.error {
                            RichText::new(text).color(Color32::LIGHT_RED)
                        } else {
                            RichText::new(text)
                        };
                        // Wraps at the panel's width instead of running off the window.
                        ui.add(egui::Label::new(text).wrap());
                    });
                }
            });
        if let Some(i) = dismiss {
            self.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_counted_not_added() {
        let mut log = MessageLog::default();
        for _ in 0..3 {
            log.push("cannot write /x", true);
        }
        log.push("cannot write /x", false);
        log.push("done", false);
        log.push("cannot write /x", true);
        let got: Vec<(&str, usize)> = log.iter().map(|m| (m.text.as_str(), m.count)).collect();
        assert_eq!(
            got,
            [
                ("cannot write /x", 3),
                ("cannot write /x", 1),
                ("done", 1),
                ("cannot write /x", 1)
            ]
        );
        for i in 0..100 {
            log.push(format!("m{i}"), false);
        }
        assert_eq!(log.len(), KEEP);
        assert_eq!(log.iter().last().map(|m| m.text.as_str()), Some("m99"));
    }
}
