//! Text encoders and their tokenizers, through the public API: the demo byte tokenizer, CLIP's
//! tokenizer built from `vocab.json` + `merges.txt`, T5's `tokenizer.json`, the demo encoders, and
//! a small diffusers checkout written here that must load and encode exactly like the demo.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use parallax::model::demo_weights::DemoWeights;
use parallax::model::text::{self, TextEncoders, DEMO_CLIP_DIM, DEMO_T5_DIM, DEMO_T5_MAX_LEN};
use parallax::model::tokenizer::PromptTokenizer;
use parallax::model::weights::{save_safetensors, Recorder};
use parallax::Error;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

// ---------------------------------------------------------------------------------------------
// Tokenizers
// ---------------------------------------------------------------------------------------------

#[test]
fn demo_tokenizer_round_trip() -> TestResult {
    let t = PromptTokenizer::demo(64, "t5")?;
    let prompt = "A café at dusk, 35mm ☕";
    let toks = t.encode(prompt)?;
    assert_eq!(toks.ids.len(), 64);
    // One token per UTF-8 byte, then </s>.
    assert_eq!(toks.used, prompt.len() + 1);
    assert_eq!(toks.truncated_from, None);
    assert_eq!(Some(toks.ids[toks.used - 1]), t.eos_id());
    assert!(toks.ids[toks.used..].iter().all(|&id| id == t.pad_id()));
    // The demo tokenizer lower-cases first (the demo model learnt lower-case captions).
    assert_eq!(t.decode(&toks.ids)?, prompt.to_lowercase());
    Ok(())
}

#[test]
fn demo_tokenizer_truncates_keeping_eos() -> TestResult {
    let t = PromptTokenizer::demo(64, "t5")?;
    let prompt: String = "abcdefghij".repeat(20);
    assert_eq!(prompt.len(), 200);
    let toks = t.encode(&prompt)?;
    assert_eq!(toks.ids.len(), 64);
    assert_eq!(toks.used, 64);
    assert_eq!(toks.truncated_from, Some(201));
    assert_eq!(Some(toks.ids[63]), t.eos_id());
    assert_eq!(t.decode(&toks.ids)?, &prompt[..63]);

    // CLIP flavour: start token kept in front, end token at the back.
    let c = PromptTokenizer::demo(77, "clip")?;
    let toks = c.encode(&prompt)?;
    assert_eq!(toks.ids.len(), 77);
    assert_eq!(toks.truncated_from, Some(202));
    assert_eq!(toks.ids[0], 257);
    assert_eq!(Some(toks.ids[76]), c.eos_id());
    assert_eq!(c.decode(&toks.ids)?, &prompt[..75]);
    Ok(())
}

#[test]
fn demo_eos_is_the_largest_id() -> TestResult {
    for name in ["t5", "clip"] {
        let t = PromptTokenizer::demo(8, name)?;
        assert_eq!(t.eos_id(), Some(t.vocab_size() as u32 - 1), "{name}");
    }
    Ok(())
}

/// A tiny CLIP vocabulary: the letters of "a photo of a cat" (plain and word-final), the merges
/// that build its words, and the two specials.
fn write_small_clip(dir: &Path) -> TestResult {
    let tokens = [
        "a",
        "c",
        "f",
        "h",
        "o",
        "p",
        "t",
        "a</w>",
        "f</w>",
        "o</w>",
        "t</w>",
        "ph",
        "pho",
        "phot",
        "photo</w>",
        "of</w>",
        "ca",
        "cat</w>",
        "<|startoftext|>",
        "<|endoftext|>",
    ];
    let vocab: BTreeMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&vocab)?)?;
    std::fs::write(
        dir.join("merges.txt"),
        "#version: 0.2\np h\nph o\npho t\nphot o</w>\no f</w>\nc a\nca t</w>\n",
    )?;
    Ok(())
}

#[test]
fn clip_tokenizer_from_vocab_and_merges() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_small_clip(dir.path())?;
    let t = PromptTokenizer::clip_from_vocab_merges(
        &dir.path().join("vocab.json"),
        &dir.path().join("merges.txt"),
        77,
    )?;
    assert_eq!(t.vocab_size(), 20);
    assert_eq!(t.pad_id(), 19);
    assert_eq!(t.eos_id(), Some(19));

    let toks = t.encode("a photo of a cat")?;
    assert_eq!(toks.ids.len(), 77);
    assert_eq!(&toks.ids[..7], &[18, 7, 14, 15, 7, 17, 19]);
    assert_eq!(toks.used, 7);
    assert!(
        toks.ids[7..].iter().all(|&id| id == 19),
        "padded with <|endoftext|>"
    );
    assert_eq!(t.decode(&toks.ids)?, "a photo of a cat");

    // Lowercased, white space collapsed and trimmed.
    let again = t.encode("  A   PHOTO\tof a\n Cat ")?;
    assert_eq!(again, toks);

    // Through the folder loader (no tokenizer.json there).
    let f = PromptTokenizer::from_folder(dir.path(), "clip", 77)?;
    assert_eq!(f.encode("a photo of a cat")?, toks);

    // Truncation keeps both frame tokens.
    let short = PromptTokenizer::clip_from_vocab_merges(
        &dir.path().join("vocab.json"),
        &dir.path().join("merges.txt"),
        4,
    )?;
    let cut = short.encode("a photo of a cat")?;
    assert_eq!(cut.ids, vec![18, 7, 14, 19]);
    assert_eq!(cut.truncated_from, Some(7));
    Ok(())
}

#[test]
fn clip_vocab_without_specials_is_a_bad_config() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0, "a</w>": 1}"#)?;
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\n")?;
    let err = PromptTokenizer::from_folder(dir.path(), "clip", 77);
    assert!(
        matches!(&err, Err(Error::BadConfig { reason, .. }) if reason.contains("<|startoftext|>")),
        "{err:?}"
    );
    Ok(())
}

/// A T5-like tokenizer (unigram pieces, `▁` for spaces, `</s>` appended) built in code.
fn small_t5_tokenizer(
) -> std::result::Result<tokenizers::Tokenizer, Box<dyn std::error::Error + Send + Sync>> {
    use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
    use tokenizers::models::unigram::Unigram;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::processors::template::TemplateProcessing;

    let pieces = [
        ("<pad>", 0.0),
        ("</s>", 0.0),
        ("<unk>", 0.0),
        ("▁a", -2.0),
        ("▁photo", -3.0),
        ("▁of", -2.5),
        ("▁cat", -3.0),
        ("▁", -4.0),
        ("c", -5.0),
        ("a", -5.0),
        ("t", -5.0),
    ];
    let vocab = pieces.iter().map(|(p, s)| (p.to_string(), *s)).collect();
    let model = Unigram::from(vocab, Some(2), false)?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    tok.with_decoder(Some(MetaspaceDecoder::new(
        '▁',
        PrependScheme::Always,
        true,
    )));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("$A </s>")?
            .special_tokens(vec![("</s>", 1)])
            .build()?,
    ));
    tok.add_special_tokens(&[
        tokenizers::AddedToken::from("<pad>", true),
        tokenizers::AddedToken::from("</s>", true),
        tokenizers::AddedToken::from("<unk>", true),
    ]);
    Ok(tok)
}

#[test]
fn t5_tokenizer_json_round_trip() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tokenizer.json");
    small_t5_tokenizer()?.save(&path, false)?;

    let t = PromptTokenizer::from_tokenizer_json(&path, 8, "t5")?;
    assert_eq!(t.pad_id(), 0);
    assert_eq!(t.eos_id(), Some(1));
    assert_eq!(t.vocab_size(), 11);
    let toks = t.encode("a photo of a cat")?;
    assert_eq!(toks.ids, vec![3, 4, 5, 3, 6, 1, 0, 0]);
    assert_eq!(toks.used, 6);
    assert_eq!(t.decode(&toks.ids)?, "a photo of a cat");

    let cut = t.encode("a photo of a cat a cat a cat")?;
    assert_eq!(cut.ids, vec![3, 4, 5, 3, 6, 3, 6, 1]);
    assert_eq!(cut.truncated_from, Some(10));

    // The folder loader prefers tokenizer.json.
    let f = PromptTokenizer::from_folder(dir.path(), "t5", 8)?;
    assert_eq!(f.encode("a photo of a cat")?, toks);
    Ok(())
}

#[test]
fn missing_tokenizer_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    let err = PromptTokenizer::from_folder(dir.path(), "t5", 512);
    match err {
        Err(Error::MissingTokenizer { which, reason }) => {
            assert_eq!(which, "t5");
            assert!(
                reason.contains(&dir.path().display().to_string()),
                "{reason}"
            );
            assert!(reason.contains("tokenizer.json"), "{reason}");
            assert!(reason.contains("merges.txt"), "{reason}");
        }
        other => panic!("expected MissingTokenizer, got {other:?}"),
    }

    std::fs::write(dir.path().join("vocab.json"), "{}")?;
    let err = PromptTokenizer::from_folder(dir.path(), "clip", 77);
    assert!(
        matches!(&err, Err(Error::MissingTokenizer { reason, .. }) if reason.contains("merges.txt is not")),
        "{err:?}"
    );

    let err = PromptTokenizer::from_folder(&dir.path().join("nowhere"), "clip", 77);
    assert!(
        matches!(err, Err(Error::MissingTokenizer { .. })),
        "{err:?}"
    );
    Ok(())
}

/// Opt-in check against CLIP's real vocabulary: set `PARALLAX_CLIP_TOKENIZER_DIR` to a folder
/// with CLIP-L's `vocab.json` and `merges.txt` (e.g. FLUX's `tokenizer/`) and run
/// `cargo test -- --ignored real_clip`. Ignored by default: CI has no CLIP vocabulary.
#[test]
#[ignore = "needs PARALLAX_CLIP_TOKENIZER_DIR pointing at CLIP-L's tokenizer files"]
fn real_clip_vocabulary_if_available() -> TestResult {
    let dir = std::env::var_os("PARALLAX_CLIP_TOKENIZER_DIR")
        .ok_or("set PARALLAX_CLIP_TOKENIZER_DIR to CLIP-L's tokenizer folder")?;
    let t = PromptTokenizer::from_folder(Path::new(&dir), "clip", 77)?;
    let toks = t.encode("a photo of a cat")?;
    assert_eq!(&toks.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(toks.ids[76], 49407);
    let toks = t.encode("A photo of an astronaut riding a horse on Mars, 4K!")?;
    assert_eq!(
        &toks.ids[..toks.used],
        &[
            49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 267, 275, 330, 256,
            49407
        ]
    );
    // CLIP marks the end of every piece, punctuation included, so decoding spaces it out.
    assert_eq!(
        t.decode(&toks.ids)?,
        "a photo of an astronaut riding a horse on mars , 4 k !"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------------------------

#[test]
fn demo_encoders_shapes_and_determinism() -> TestResult {
    let enc = TextEncoders::demo(7, &Device::Cpu)?;
    assert_eq!(enc.t5_max_len(), DEMO_T5_MAX_LEN);
    assert_eq!(enc.t5_dim(), DEMO_T5_DIM);
    assert_eq!(enc.clip_dim(), DEMO_CLIP_DIM);
    assert_eq!(enc.dtype(), DType::F32);

    let a = enc.encode("a lighthouse in a storm")?;
    assert_eq!(a.txt.dims(), &[1, DEMO_T5_MAX_LEN, DEMO_T5_DIM]);
    assert_eq!(a.vec.dims(), &[1, DEMO_CLIP_DIM]);
    assert!(a.notes.is_empty());

    let b = enc.encode("a lighthouse in a storm")?;
    assert_eq!(max_abs_diff(&a.txt, &b.txt)?, 0.0);
    assert_eq!(max_abs_diff(&a.vec, &b.vec)?, 0.0);

    let c = enc.encode("a lighthouse in the fog")?;
    assert!(max_abs_diff(&a.txt, &c.txt)? > 1e-4);
    assert!(max_abs_diff(&a.vec, &c.vec)? > 1e-4);

    // A second encoder from the same seed gives the same tensors; another seed does not.
    let again = TextEncoders::demo(7, &Device::Cpu)?.encode("a lighthouse in a storm")?;
    assert_eq!(max_abs_diff(&a.txt, &again.txt)?, 0.0);
    let other = TextEncoders::demo(8, &Device::Cpu)?.encode("a lighthouse in a storm")?;
    assert!(max_abs_diff(&a.vec, &other.vec)? > 1e-4);

    let f16 = enc.encode_as("a lighthouse in a storm", DType::F16)?;
    assert_eq!(f16.txt.dtype(), DType::F16);
    assert_eq!(f16.vec.dtype(), DType::F16);
    Ok(())
}

#[test]
fn long_prompt_is_noted() -> TestResult {
    let enc = TextEncoders::demo(1, &Device::Cpu)?;
    let e = enc.encode(&"y".repeat(DEMO_T5_MAX_LEN + 20))?;
    assert_eq!(e.txt.dims(), &[1, DEMO_T5_MAX_LEN, DEMO_T5_DIM]);
    let (got, takes) = (
        format!("{} T5 tokens", DEMO_T5_MAX_LEN + 21),
        format!("takes {DEMO_T5_MAX_LEN}"),
    );
    assert!(
        e.notes
            .iter()
            .any(|n| n.contains(&got) && n.contains(&takes)),
        "{:?}",
        e.notes
    );
    assert!(e.notes.iter().any(|n| n.contains("CLIP")), "{:?}", e.notes);
    Ok(())
}

/// The demo encoders' tensors, captured while building them: (T5's, CLIP's).
type Captured = (Vec<(String, Tensor)>, Vec<(String, Tensor)>);

fn capture_demo(
    seed: u64,
) -> std::result::Result<Captured, Box<dyn std::error::Error + Send + Sync>> {
    let (t5_rec, t5_seen) = Recorder::new(DemoWeights::new(seed));
    let (clip_rec, clip_seen) = Recorder::new(DemoWeights::new(seed));
    let t5_vb = VarBuilder::from_backend(Box::new(t5_rec), DType::F32, Device::Cpu);
    let clip_vb = VarBuilder::from_backend(Box::new(clip_rec), DType::F32, Device::Cpu);
    TextEncoders::new(
        t5_vb,
        &text::t5_demo_config(),
        clip_vb.pp("text_model"),
        &text::clip_demo_config(),
        PromptTokenizer::demo(DEMO_T5_MAX_LEN, "t5")?,
        PromptTokenizer::demo(77, "clip")?,
    )?;
    let dedup = |v: Vec<(String, Tensor)>| -> Vec<(String, Tensor)> {
        let m: BTreeMap<String, Tensor> = v.into_iter().collect();
        m.into_iter().collect()
    };
    let t5 = dedup(t5_seen.lock().map_err(|e| e.to_string())?.clone());
    let clip = dedup(clip_seen.lock().map_err(|e| e.to_string())?.clone());
    Ok((t5, clip))
}

fn t5_config_json() -> serde_json::Value {
    let c = text::t5_demo_config();
    serde_json::json!({
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.d_kv,
        "d_ff": c.d_ff,
        "num_layers": c.num_layers,
        "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_attention_num_buckets,
        "relative_attention_max_distance": c.relative_attention_max_distance,
        "dropout_rate": c.dropout_rate,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "initializer_factor": c.initializer_factor,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": true,
        "tie_word_embeddings": c.tie_word_embeddings,
        "is_encoder_decoder": c.is_encoder_decoder,
        "use_cache": c.use_cache,
        "pad_token_id": c.pad_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": "float32"
    })
}

fn clip_config_json(hidden_act: &str) -> serde_json::Value {
    let c = text::clip_demo_config();
    serde_json::json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": c.embed_dim,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "vocab_size": c.vocab_size,
        "projection_dim": c.projection_dim,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1
    })
}

/// Write a diffusers-style checkout of the demo encoders under `root` (the library's exporter:
/// CLIP in `text_encoder/`, T5 in two shards with an index in `text_encoder_2/`, tokenizer.json
/// files in `tokenizer/` and `tokenizer_2/`).
fn write_demo_checkout(root: &Path, seed: u64) -> TestResult {
    use parallax::model::export::{write_demo_text_encoders, DemoSeeds, DemoSource};
    write_demo_text_encoders(
        root,
        DemoSource::Seeded(DemoSeeds {
            text: seed,
            ..DemoSeeds::BUILTIN
        }),
    )?;
    Ok(())
}

#[test]
fn diffusers_checkout_matches_demo() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_demo_checkout(dir.path(), 11)?;
    assert!(dir
        .path()
        .join("text_encoder_2/model-00002-of-00002.safetensors")
        .is_file());

    let loaded =
        TextEncoders::load_diffusers(dir.path(), DEMO_T5_MAX_LEN, DType::F32, &Device::Cpu)?;
    let demo = TextEncoders::demo(11, &Device::Cpu)?;
    assert_eq!(loaded.t5_max_len(), demo.t5_max_len());
    assert_eq!(loaded.t5_dim(), demo.t5_dim());
    assert_eq!(loaded.clip_dim(), demo.clip_dim());
    assert_eq!(
        loaded.clip_tokenizer().pad_id(),
        demo.clip_tokenizer().pad_id()
    );
    assert_eq!(loaded.t5_tokenizer().pad_id(), 0);

    for prompt in ["a red bicycle leaning on a wall", "Ünïcödé, émoji 🚲!"] {
        let a = loaded.encode(prompt)?;
        let b = demo.encode(prompt)?;
        assert_eq!(a.txt.dims(), b.txt.dims());
        assert_eq!(a.vec.dims(), b.vec.dims());
        assert_eq!(max_abs_diff(&a.txt, &b.txt)?, 0.0, "{prompt}");
        assert_eq!(max_abs_diff(&a.vec, &b.vec)?, 0.0, "{prompt}");
    }

    // T5 built for each prompt and freed after it (a memory budget): the same encodings, twice.
    let on_demand = TextEncoders::load_diffusers_with(
        dir.path(),
        DEMO_T5_MAX_LEN,
        DType::F32,
        &Device::Cpu,
        text::T5Residency::OnDemand,
    )?;
    assert_eq!(on_demand.t5_residency(), text::T5Residency::OnDemand);
    assert_eq!(loaded.t5_residency(), text::T5Residency::Resident);
    for prompt in [
        "a red bicycle leaning on a wall",
        "a red bicycle leaning on a wall",
        "",
    ] {
        let a = on_demand.encode(prompt)?;
        let b = demo.encode(prompt)?;
        assert_eq!(max_abs_diff(&a.txt, &b.txt)?, 0.0, "{prompt}");
        assert_eq!(max_abs_diff(&a.vec, &b.vec)?, 0.0, "{prompt}");
    }

    // Single-folder parts through load_parts, with a shorter T5 sequence.
    let paths = text::TextEncoderPaths::diffusers(dir.path());
    let short = TextEncoders::load_parts(&paths, 16, DType::F32, &Device::Cpu)?;
    assert_eq!(short.encode("x")?.txt.dims(), &[1, 16, DEMO_T5_DIM]);
    Ok(())
}

#[test]
fn bad_clip_activation_is_a_bad_config() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_demo_checkout(dir.path(), 2)?;
    let cfg = dir.path().join("text_encoder/config.json");
    std::fs::write(&cfg, serde_json::to_string(&clip_config_json("gelu"))?)?;
    let err = TextEncoders::load_diffusers(dir.path(), DEMO_T5_MAX_LEN, DType::F32, &Device::Cpu);
    match err {
        Err(Error::BadConfig { path, reason }) => {
            assert_eq!(path, cfg);
            assert!(reason.contains("hidden_act"), "{reason}");
        }
        other => panic!("expected BadConfig, got {other:?}"),
    }
    Ok(())
}

#[test]
fn missing_clip_tensor_is_named() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_demo_checkout(dir.path(), 3)?;
    let (_, clip) = capture_demo(3)?;
    let kept: Vec<(String, Tensor)> = clip
        .into_iter()
        .filter(|(n, _)| n != "text_model.final_layer_norm.weight")
        .collect();
    let file = dir.path().join("text_encoder/model.safetensors");
    save_safetensors(&kept, &file)?;
    let err = TextEncoders::load_diffusers(dir.path(), DEMO_T5_MAX_LEN, DType::F32, &Device::Cpu);
    match err {
        Err(Error::MissingTensor { tensor, location }) => {
            assert!(
                tensor.contains("text_model.final_layer_norm.weight"),
                "{tensor}"
            );
            assert!(location.contains("model.safetensors"), "{location}");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    Ok(())
}

#[test]
fn t5_config_missing_field_is_a_bad_config() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_demo_checkout(dir.path(), 4)?;
    let cfg = dir.path().join("text_encoder_2/config.json");
    let mut json = t5_config_json();
    if let Some(obj) = json.as_object_mut() {
        obj.remove("d_model");
    }
    std::fs::write(&cfg, serde_json::to_string(&json)?)?;
    let err = TextEncoders::load_diffusers(dir.path(), DEMO_T5_MAX_LEN, DType::F32, &Device::Cpu);
    assert!(
        matches!(&err, Err(Error::BadConfig { path, reason }) if path == &cfg && reason.contains("d_model")),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn not_a_checkout() -> TestResult {
    let dir = tempfile::tempdir()?;
    let err = TextEncoders::load_diffusers(dir.path(), 512, DType::F32, &Device::Cpu);
    assert!(
        matches!(&err, Err(Error::UnknownLayout { reason, .. }) if reason.contains("text_encoder")),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn tokenizer_larger_than_model_vocab_is_a_bad_config() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_demo_checkout(dir.path(), 5)?;
    let cfg = dir.path().join("text_encoder_2/config.json");
    let mut json = t5_config_json();
    json["vocab_size"] = serde_json::json!(100);
    std::fs::write(&cfg, serde_json::to_string(&json)?)?;
    let err = TextEncoders::load_diffusers(dir.path(), DEMO_T5_MAX_LEN, DType::F32, &Device::Cpu);
    assert!(
        matches!(&err, Err(Error::BadConfig { path, reason }) if path == &cfg && reason.contains("259 tokens")),
        "{err:?}"
    );
    Ok(())
}
