//! Prompt tokenizers for FLUX's two text encoders.
//!
//! FLUX reads a prompt twice: T5-XXL sees up to 512 (dev) or 256 (schnell) tokens, CLIP-L sees 77.
//! Both sequences are always padded to their full length, because the transformer was trained on
//! fixed-length T5 sequences and CLIP's pooled output is read at its end-of-text token.
//!
//! A [`PromptTokenizer`] wraps a `tokenizers::Tokenizer` and turns a prompt into exactly
//! `max_len` ids ([`Tokens`]). Prompts that are too long are cut the way the reference pipelines
//! cut them: the prompt's own tokens are shortened and the special tokens that frame them
//! (CLIP's start/end of text, T5's `</s>`) are kept, so the sequence still ends with its
//! end-of-sequence token.
//!
//! Three sources are supported:
//! - a `tokenizer.json` (T5's `tokenizer_2/` folder in a diffusers checkout),
//! - CLIP's `vocab.json` + `merges.txt` (FLUX's `tokenizer/` folder has no `tokenizer.json`), for
//!   which the byte-level BPE tokenizer is assembled here,
//! - a built-in byte tokenizer for the demo model that needs no files at all.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::strip::Strip;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::{Lowercase, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// CLIP's start-of-text token.
pub const CLIP_BOS: &str = "<|startoftext|>";
/// CLIP's end-of-text token (also what FLUX pads CLIP's sequence with).
pub const CLIP_EOS: &str = "<|endoftext|>";
/// The suffix CLIP's BPE vocabulary puts on the last piece of every word.
pub const CLIP_END_OF_WORD: &str = "</w>";
/// The text CLIP splits into words before BPE: its two special tokens, English contractions,
/// runs of letters, single digits, and runs of anything else that is not white space.
pub const CLIP_WORD_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// T5's padding token.
pub const T5_PAD: &str = "<pad>";
/// T5's end-of-sequence token.
pub const T5_EOS: &str = "</s>";

/// The file [`PromptTokenizer::from_folder`] prefers: a complete `tokenizers` definition.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// CLIP's BPE vocabulary (token -> id), read when a folder has no `tokenizer.json`.
pub const VOCAB_JSON: &str = "vocab.json";
/// CLIP's BPE merges, in rank order, read together with [`VOCAB_JSON`].
pub const MERGES_TXT: &str = "merges.txt";
/// Where ComfyUI keeps CLIP's tokenizer (`vocab.json`, `merges.txt`), under its install.
pub const CLIP_TOKENIZER_DIR: &str = "comfy/sd1_tokenizer";
/// Where ComfyUI keeps T5's tokenizer (`tokenizer.json`), under its install.
pub const T5_TOKENIZER_DIR: &str = "comfy/text_encoders/t5_tokenizer";

/// The files to get, and from where, for the tokenizer `which` (`clip` or `t5`) when none is
/// found.
pub fn what_to_get(which: &str) -> Option<String> {
    match which {
        "clip" => Some(format!(
            "CLIP-L's {VOCAB_JSON} and {MERGES_TXT} (or its {TOKENIZER_JSON}): from the \
             `tokenizer/` folder of black-forest-labs/FLUX.1-schnell on Hugging Face, or \
             ComfyUI's `{CLIP_TOKENIZER_DIR}/`"
        )),
        "t5" => Some(format!(
            "T5's {TOKENIZER_JSON}: from the `tokenizer_2/` folder of \
             black-forest-labs/FLUX.1-schnell on Hugging Face, or ComfyUI's \
             `{T5_TOKENIZER_DIR}/`"
        )),
        _ => None,
    }
}

/// A prompt as token ids, ready for an encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly `max_len` ids: the prompt's tokens (with the tokenizer's special tokens), then
    /// padding.
    pub ids: Vec<u32>,
    /// How many of `ids` are real tokens (special tokens included); the rest is padding.
    pub used: usize,
    /// When the prompt did not fit: how many tokens (special tokens included) it had before it
    /// was cut to `max_len`.
    pub truncated_from: Option<usize>,
}

/// A tokenizer that always yields `max_len` ids, cutting long prompts and padding short ones.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    max_len: usize,
    pad_id: u32,
    eos_id: Option<u32>,
    vocab_size: usize,
    name: String,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("name", &self.name)
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .field("eos_id", &self.eos_id)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

fn tok_err(name: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{name} tokenizer: {what}: {e}"))
}

impl PromptTokenizer {
    /// Wrap a ready `tokenizers::Tokenizer`. Any truncation or padding configured inside it is
    /// switched off: this type does both itself. `pad_id` fills short sequences; `eos_id` is the
    /// end-of-sequence token, if the tokenizer has one (CLIP's pooling looks for it).
    pub fn new(
        mut tokenizer: Tokenizer,
        max_len: usize,
        pad_id: u32,
        eos_id: Option<u32>,
        name: &str,
    ) -> Result<Self> {
        if max_len == 0 {
            return Err(Error::setting(
                &format!("{name} max_len"),
                max_len,
                "a token sequence must hold at least one token",
            ));
        }
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err(name, "cannot switch off truncation", e))?;
        tokenizer.with_padding(None);
        let vocab_size = tokenizer
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map(|m| m as usize + 1)
            .unwrap_or(0)
            .max(tokenizer.get_vocab_size(true));
        Ok(Self {
            tokenizer,
            max_len,
            pad_id,
            eos_id,
            vocab_size,
            name: name.to_string(),
        })
    }

    /// Load a `tokenizer.json` (e.g. T5's `tokenizer_2/tokenizer.json`).
    ///
    /// The padding id is that of `<pad>` (T5: 0), or for `name == "clip"` that of
    /// `<|endoftext|>` (FLUX pads CLIP with it); failing those, the one the file's own padding
    /// settings name.
    pub fn from_tokenizer_json(path: &Path, max_len: usize, name: &str) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| Error::BadConfig {
            path: path.to_path_buf(),
            reason: format!("not a tokenizers `tokenizer.json`: {e}"),
        })?;
        let preferred: &[&str] = if name == "clip" {
            &[CLIP_EOS, T5_PAD]
        } else {
            &[T5_PAD, CLIP_EOS]
        };
        let pad_id = preferred
            .iter()
            .find_map(|t| tokenizer.token_to_id(t))
            .or_else(|| tokenizer.get_padding().map(|p| p.pad_id))
            .ok_or_else(|| Error::BadConfig {
                path: path.to_path_buf(),
                reason: format!(
                    "the tokenizer has no padding token (looked for {} and for padding settings)",
                    preferred.join(", ")
                ),
            })?;
        let eos_id = [T5_EOS, CLIP_EOS]
            .iter()
            .find_map(|t| tokenizer.token_to_id(t));
        Self::new(tokenizer, max_len, pad_id, eos_id, name)
    }

    /// Build CLIP's tokenizer from its `vocab.json` and `merges.txt` (the files in FLUX's
    /// diffusers `tokenizer/` folder). `max_len` is 77 for CLIP-L.
    ///
    /// Text is NFC-normalised, white space runs are collapsed to one space and trimmed, and
    /// everything is lowercased; words are split with [`CLIP_WORD_PATTERN`], mapped to
    /// byte-level characters and merged with BPE (the last piece of a word carries `</w>`).
    /// `<|startoftext|>` and `<|endoftext|>` frame the result, and `<|endoftext|>` pads it.
    pub fn clip_from_vocab_merges(
        vocab_json: &Path,
        merges_txt: &Path,
        max_len: usize,
    ) -> Result<Self> {
        let vocab = read_vocab(vocab_json)?;
        let merges = read_merges(merges_txt)?;
        let special = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| Error::BadConfig {
                path: vocab_json.to_path_buf(),
                reason: format!("CLIP's vocabulary has no `{token}` token"),
            })
        };
        let bos = special(CLIP_BOS)?;
        let eos = special(CLIP_EOS)?;

        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .end_of_word_suffix(CLIP_END_OF_WORD.to_string())
            .unk_token(CLIP_EOS.to_string())
            .build()
            .map_err(|e| Error::BadConfig {
                path: merges_txt.to_path_buf(),
                reason: format!("{e} (merges must name tokens of {})", vocab_json.display()),
            })?;

        let internal = |what: &str, e: &dyn std::fmt::Display| tok_err("clip", what, e);
        let collapse = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| internal("white space rule", &e))?;
        let words = Split::new(
            SplitPattern::Regex(CLIP_WORD_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| internal("word pattern", &e))?;
        let post = TemplateProcessing::builder()
            .try_single(format!("{CLIP_BOS} $A {CLIP_EOS}"))
            .map_err(|e| internal("template", &e))?
            .special_tokens(vec![(CLIP_BOS, bos), (CLIP_EOS, eos)])
            .build()
            .map_err(|e| internal("template", &e))?;
        let end_of_word =
            Replace::new(CLIP_END_OF_WORD, " ").map_err(|e| internal("decoder", &e))?;

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            collapse.into(),
            Strip::new(true, true).into(),
            Lowercase.into(),
        ])));
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            words.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
        tokenizer.with_post_processor(Some(post));
        // Decoding: byte-level characters back to bytes, each `</w>` back to a space, and the
        // space after the last word dropped.
        tokenizer.with_decoder(Some(DecoderSequence::new(vec![
            ByteLevel::new(false, true, false).into(),
            end_of_word.into(),
            DecoderStrip::new(' ', 0, 1).into(),
        ])));
        tokenizer.add_special_tokens(&[
            AddedToken::from(CLIP_BOS, true),
            AddedToken::from(CLIP_EOS, true),
        ]);
        Self::new(tokenizer, max_len, eos, Some(eos), "clip")
    }

    /// Load the tokenizer in `dir`: its `tokenizer.json` if there is one, else CLIP's
    /// `vocab.json` + `merges.txt`. `which` names the encoder ("t5" or "clip") in messages and
    /// picks the padding token (see [`PromptTokenizer::from_tokenizer_json`]).
    pub fn from_folder(dir: &Path, which: &str, max_len: usize) -> Result<Self> {
        let json = dir.join(TOKENIZER_JSON);
        if json.is_file() {
            return Self::from_tokenizer_json(&json, max_len, which);
        }
        let vocab = dir.join(VOCAB_JSON);
        let merges = dir.join(MERGES_TXT);
        if vocab.is_file() && merges.is_file() {
            return Self::clip_from_vocab_merges(&vocab, &merges, max_len).map(|mut t| {
                t.name = which.to_string();
                t
            });
        }
        let mut reason = if dir.is_dir() {
            format!(
                "{} has neither {TOKENIZER_JSON} nor both {VOCAB_JSON} and {MERGES_TXT}",
                dir.display()
            )
        } else {
            format!(
                "{} is not a folder (looked for {TOKENIZER_JSON}, or {VOCAB_JSON} + {MERGES_TXT}, in it)",
                dir.display()
            )
        };
        if vocab.is_file() != merges.is_file() {
            let (have, lack) = if vocab.is_file() {
                (VOCAB_JSON, MERGES_TXT)
            } else {
                (MERGES_TXT, VOCAB_JSON)
            };
            reason.push_str(&format!(" ({have} is there but {lack} is not)"));
        }
        if dir.join("spiece.model").is_file() {
            reason.push_str(
                "; it has a SentencePiece spiece.model, which Parallax cannot read: \
                 add the model's tokenizer.json",
            );
        }
        if let Some(get) = what_to_get(which) {
            reason.push_str(&format!("; get {get} and put it in {}", dir.display()));
        }
        Err(Error::MissingTokenizer {
            which: which.to_string(),
            reason,
        })
    }

    /// A small byte tokenizer for the demo model, built in code: every UTF-8 byte of the
    /// lower-cased prompt is one token (ids 1 to 256), `0` is padding, and the two specials are
    /// 257 (start) and 258 (end). The end id is the largest in the vocabulary, so CLIP's "pool at
    /// the largest id" rule finds it.
    ///
    /// `name == "clip"` gives the CLIP flavour: `<|startoftext|> … <|endoftext|>`, padded with
    /// `<|endoftext|>`. Any other name gives the T5 flavour: `… </s>`, padded with `<pad>`.
    pub fn demo(max_len: usize, name: &str) -> Result<Self> {
        let clip = name == "clip";
        let (bos, eos) = if clip {
            (CLIP_BOS, CLIP_EOS)
        } else {
            ("<s>", T5_EOS)
        };
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(259);
        vocab.insert(T5_PAD.to_string(), 0);
        for (byte, ch) in byte_alphabet().iter().enumerate() {
            vocab.insert(ch.to_string(), byte as u32 + 1);
        }
        let bos_id = 257;
        let eos_id = 258;
        vocab.insert(bos.to_string(), bos_id);
        vocab.insert(eos.to_string(), eos_id);

        let internal = |what: &str, e: &dyn std::fmt::Display| tok_err(name, what, e);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), Vec::new())
            .build()
            .map_err(|e| internal("byte vocabulary", &e))?;
        let post = if clip {
            TemplateProcessing::builder()
                .try_single(format!("{bos} $A {eos}"))
                .map_err(|e| internal("template", &e))?
                .special_tokens(vec![(bos, bos_id), (eos, eos_id)])
                .build()
        } else {
            TemplateProcessing::builder()
                .try_single(format!("$A {eos}"))
                .map_err(|e| internal("template", &e))?
                .special_tokens(vec![(eos, eos_id)])
                .build()
        }
        .map_err(|e| internal("template", &e))?;

        let mut tokenizer = Tokenizer::new(bpe);
        // Lower case first: the demo model learnt its captions in lower case.
        tokenizer.with_normalizer(Some(Lowercase));
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
        tokenizer.with_post_processor(Some(post));
        tokenizer.add_special_tokens(&[
            AddedToken::from(T5_PAD, true),
            AddedToken::from(bos, true),
            AddedToken::from(eos, true),
        ]);
        let pad_id = if clip { eos_id } else { 0 };
        Self::new(tokenizer, max_len, pad_id, Some(eos_id), name)
    }

    /// A byte tokenizer built in code for a chat-template model with made-up weights (a
    /// `random:` model): every UTF-8 byte of the prompt is one token (ids 0 to 255, byte order),
    /// `specials` follow from 256 on and are matched whole in the text, nothing is added around
    /// the prompt, and `specials[pad]` pads.
    pub fn byte_level_chat(
        max_len: usize,
        name: &str,
        specials: &[&str],
        pad: usize,
    ) -> Result<Self> {
        let internal = |what: &str, e: &dyn std::fmt::Display| tok_err(name, what, e);
        let pad_token = specials
            .get(pad)
            .ok_or_else(|| internal("padding token", &"not among the special tokens"))?;
        let vocab: Vocab = byte_alphabet()
            .iter()
            .enumerate()
            .map(|(byte, ch)| (ch.to_string(), byte as u32))
            .chain(
                specials
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.to_string(), 256 + i as u32)),
            )
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .map_err(|e| internal("byte vocabulary", &e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
        tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
        tokenizer.add_special_tokens(
            &specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect::<Vec<_>>(),
        );
        let pad_id = 256 + pad as u32;
        debug_assert_eq!(tokenizer.token_to_id(pad_token), Some(pad_id));
        Self::new(tokenizer, max_len, pad_id, None, name)
    }

    /// Tokenize `prompt` into exactly `max_len` ids (see [`Tokens`]).
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let full = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| tok_err(&self.name, "cannot tokenize the prompt", e))?;
        let full = full.get_ids();
        let mut ids = if full.len() <= self.max_len {
            full.to_vec()
        } else {
            self.cut(prompt, full)?
        };
        let used = ids.len();
        ids.resize(self.max_len, self.pad_id);
        Ok(Tokens {
            ids,
            used,
            truncated_from: (full.len() > self.max_len).then_some(full.len()),
        })
    }

    /// Shorten a too-long sequence to `max_len`, keeping the special tokens the post-processor
    /// put around the prompt's own tokens.
    fn cut(&self, prompt: &str, full: &[u32]) -> Result<Vec<u32>> {
        let bare = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| tok_err(&self.name, "cannot tokenize the prompt", e))?;
        let bare = bare.get_ids();
        // Where the prompt's own tokens sit inside the framed sequence.
        let start = (bare.len() <= full.len())
            .then(|| (0..=full.len() - bare.len()).find(|&p| &full[p..p + bare.len()] == bare))
            .flatten();
        let Some(start) = start else {
            // A post-processor that rewrites the tokens themselves: keep the last token (the
            // end-of-sequence one) after as many leading tokens as fit.
            let mut ids = full[..self.max_len - 1].to_vec();
            ids.extend(full.last());
            return Ok(ids);
        };
        let prefix = &full[..start];
        let suffix = &full[start + bare.len()..];
        let room = self
            .max_len
            .checked_sub(prefix.len() + suffix.len())
            .ok_or_else(|| {
                Error::setting(
                    &format!("{} max_len", self.name),
                    self.max_len,
                    format!(
                        "the tokenizer adds {} special tokens, so sequences must be longer",
                        prefix.len() + suffix.len()
                    ),
                )
            })?;
        let mut ids = Vec::with_capacity(self.max_len);
        ids.extend_from_slice(prefix);
        ids.extend_from_slice(&bare[..room]);
        ids.extend_from_slice(suffix);
        Ok(ids)
    }

    /// Turn ids back into text, leaving out special tokens and padding.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| tok_err(&self.name, "cannot decode", e))
    }

    /// How many ids the tokenizer can produce (one more than its largest id).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The length every [`Tokens::ids`] has.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The id that fills the sequence after the prompt.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The end-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The encoder this tokenizer feeds ("t5", "clip"), for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The wrapped `tokenizers` tokenizer (e.g. to save it as a `tokenizer.json`).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Write the wrapped tokenizer as a `tokenizer.json` at `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self
            .tokenizer
            .to_string(true)
            .map_err(|e| tok_err(&self.name, "cannot serialise", e))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

/// The 256 characters byte-level BPE uses for the 256 byte values: printable Latin-1 bytes stand
/// for themselves, the others (controls, space, soft hyphen) get the code points from U+0100 on,
/// in byte order. Index `b` holds the character for byte `b`.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut next_extra = 0x100u32;
    (0u32..256)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next_extra += 1;
                next_extra - 1
            };
            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect()
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        reason: format!("expected a JSON object of token -> id: {e}"),
    })
}

fn read_merges(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(Error::BadConfig {
                    path: path.to_path_buf(),
                    reason: format!(
                        "line {} is not two tokens separated by a space: {line:?}",
                        i + 1
                    ),
                })
            }
        }
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let a = byte_alphabet();
        assert_eq!(a.len(), 256);
        let set: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(a[b'a' as usize], 'a');
        assert_eq!(a[b' ' as usize], '\u{120}');
        assert_eq!(a[0], '\u{100}');
    }

    #[test]
    fn demo_round_trip_and_padding() -> Result<()> {
        let t = PromptTokenizer::demo(16, "t5")?;
        assert_eq!(t.vocab_size(), 259);
        let toks = t.encode("hi é")?;
        // h, i, space, two bytes of é, </s>
        assert_eq!(toks.used, 6);
        assert_eq!(toks.ids.len(), 16);
        assert_eq!(
            &toks.ids[..3],
            &[b'h' as u32 + 1, b'i' as u32 + 1, b' ' as u32 + 1]
        );
        assert_eq!(toks.ids[5], 258);
        assert!(toks.ids[6..].iter().all(|&i| i == 0));
        assert_eq!(toks.truncated_from, None);
        assert_eq!(t.decode(&toks.ids)?, "hi é");
        Ok(())
    }

    #[test]
    fn demo_clip_frames_and_pads_with_eos() -> Result<()> {
        let t = PromptTokenizer::demo(8, "clip")?;
        let toks = t.encode("ab")?;
        assert_eq!(toks.ids, vec![257, 98, 99, 258, 258, 258, 258, 258]);
        assert_eq!(toks.used, 4);
        Ok(())
    }

    #[test]
    fn cut_keeps_the_frame() -> Result<()> {
        let t = PromptTokenizer::demo(5, "clip")?;
        let toks = t.encode("abcdefg")?;
        assert_eq!(toks.ids, vec![257, 98, 99, 100, 258]);
        assert_eq!(toks.used, 5);
        assert_eq!(toks.truncated_from, Some(9));
        let t = PromptTokenizer::demo(4, "t5")?;
        let toks = t.encode("abcdefg")?;
        assert_eq!(toks.ids, vec![98, 99, 100, 258]);
        assert_eq!(toks.truncated_from, Some(8));
        Ok(())
    }

    #[test]
    fn max_len_too_small_for_specials() -> Result<()> {
        let t = PromptTokenizer::demo(1, "clip")?;
        assert!(matches!(t.encode("abc"), Err(Error::InvalidSetting { .. })));
        assert!(matches!(
            PromptTokenizer::demo(0, "t5"),
            Err(Error::InvalidSetting { .. })
        ));
        Ok(())
    }

    #[test]
    fn bad_merges_line() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let m = dir.path().join("merges.txt");
        let v = dir.path().join("vocab.json");
        std::fs::write(&m, "#version: 0.2\na b c\n")?;
        std::fs::write(&v, r#"{"<|startoftext|>": 0, "<|endoftext|>": 1}"#)?;
        let err = PromptTokenizer::clip_from_vocab_merges(&v, &m, 77);
        assert!(matches!(err, Err(Error::BadConfig { .. })), "{err:?}");
        Ok(())
    }
}
