//! Parity with the Python reference (transformers 5 + Pillow 12), on the fixtures written by
//! `tests/parity/make_fixtures.py` (see `tests/parity/README.md`).
//!
//! Each stage is checked from the reference's own input, so a failure points at one stage:
//! decoding against Pillow, resizing from Pillow's decoded pixels, normalising, the towers from the
//! reference's `pixel_values`, the decoder from the reference's token ids, the logits processors
//! from the reference's raw logits. End-to-end checks (from the encoded files) come on top.
//! Every assertion message names the case and the worst difference found.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use caption_cascade::{
    images::{decode_image, resize::resize_bicubic_rgb8, DecodeLimits, RgbImage},
    models::{
        blip::{Blip, DecodeBatch, DecodeRequest, SelfAttnCache, SpecialTokens},
        clip::Clip,
        generation::{
            logits::{repetition_penalty, suppress_eos, top_k, top_p, warp, RowParams},
            GenerationParams, Strategy,
        },
        preprocess::{ImageProcessor, ResizeTo},
        tokenizer::{CaptionTokenizer, RankTokenizer},
    },
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

/// Pixel values: the same float32 operations in the same order give the same bits.
const PIXEL_TOL: f64 = 1e-6;
/// Tower outputs and logits: float32 matmuls summed in a different order than PyTorch's kernels.
const LOGIT_TOL: f64 = 1e-4;
/// Finite processed scores (penalty, temperature) of the sampling processors.
const SCORE_TOL: f64 = 1e-5;
/// A greedy step whose two best logits are this close may flip within `LOGIT_TOL`; such
/// sequences are reported, not asserted (the generator re-draws random models until none is).
const MIN_MARGIN: f64 = 1e-3;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifest() -> &'static Value {
    static M: OnceLock<Value> = OnceLock::new();
    M.get_or_init(|| {
        let path = root().join("tests/parity/fixtures/manifest.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run tests/parity/make_fixtures.py", path.display()));
        serde_json::from_str(&text).expect("manifest is JSON")
    })
}

fn models(kind: &'static str) -> impl Iterator<Item = &'static Value> {
    manifest()["models"].as_array().unwrap().iter().filter(move |m| m["kind"] == kind)
}

fn images() -> &'static [Value] {
    manifest()["images"].as_array().unwrap()
}

/// Inputs whose decoding alone is checked: the JPEG variants and 16-bit PNGs.
fn decode_images() -> &'static [Value] {
    manifest()["decode_images"].as_array().unwrap()
}

fn image_entry(name: &str) -> &'static Value {
    images().iter().chain(decode_images()).find(|i| i["name"] == name).unwrap()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("{v} is not a string"))
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// Named tensors of one safetensors fixture file.
struct Arrays(HashMap<String, Tensor>);

impl Arrays {
    fn load(rel: &str) -> Self {
        let named = Tensor::read_safetensors(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        Self(named.into_iter().collect())
    }

    fn get(&self, key: &str) -> &Tensor {
        self.0.get(key).unwrap_or_else(|| panic!("fixture has no array {key}"))
    }

    fn bytes(&self, key: &str) -> Vec<u8> {
        Vec::<u8>::try_from(self.get(key).flatten(0, -1)).unwrap()
    }

    /// The reference's decoded image (HWC uint8), as an `RgbImage`.
    fn image(&self, name: &str) -> RgbImage {
        let t = self.get(&format!("decoded.{name}"));
        let (h, w, _) = t.size3().unwrap();
        RgbImage { width: w as u32, height: h as u32, pixels: self.bytes(&format!("decoded.{name}")) }
    }
}

fn pixel_arrays() -> Arrays {
    Arrays::load(s(&manifest()["pixels"]))
}

/// Largest |a - b| (shapes must agree).
fn worst(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// Processed scores: the same entries must be -inf, and the finite ones agree within `SCORE_TOL`.
/// Returns (entries whose -inf status differs, worst finite difference).
fn compare_scores(rust: &Tensor, reference: &Tensor) -> (i64, f64) {
    assert_eq!(rust.size(), reference.size());
    let (ri, fi) = (rust.isinf(), reference.isinf());
    let pattern = ri.logical_xor(&fi).sum(Kind::Int64).int64_value(&[]);
    let both = ri.logical_or(&fi).logical_not();
    let diff = (rust.to_kind(Kind::Double) - reference.to_kind(Kind::Double)).abs();
    let finite = diff.masked_select(&both);
    let w = if finite.numel() == 0 { 0.0 } else { finite.max().double_value(&[]) };
    (pattern, w)
}

fn processor(name: &str) -> ImageProcessor {
    let cfg = &manifest()["processors"][name];
    ImageProcessor::from_json(&cfg.to_string()).unwrap_or_else(|e| panic!("processor {name}: {e}"))
}

fn processor_names() -> Vec<&'static str> {
    manifest()["processors"].as_object().unwrap().keys().map(String::as_str).collect()
}

/// CHW float pixels of images as a `[n, 3, h, w]` tensor.
fn batch(p: &ImageProcessor, imgs: &[RgbImage]) -> Tensor {
    let (h, w) = p.output_size(imgs[0].height, imgs[0].width);
    let data: Vec<f32> = imgs.iter().flat_map(|i| p.pixels(i).unwrap().data).collect();
    Tensor::from_slice(&data).view([imgs.len() as i64, 3, h as i64, w as i64])
}

fn decode_file(name: &str) -> RgbImage {
    let file = root().join(s(&image_entry(name)["file"]));
    decode_image(&std::fs::read(&file).unwrap(), &DecodeLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The model's folder, after checking that its files are the ones the fixtures were made from.
fn model_folder(m: &Value) -> PathBuf {
    let folder = root().join(s(&m["folder"]));
    for (file, hash) in m["sha256"].as_object().unwrap() {
        let bytes = std::fs::read(folder.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", folder.display()));
        assert_eq!(
            format!("{:x}", Sha256::digest(&bytes)),
            s(hash),
            "{}/{file} changed since the fixtures were made: rerun tests/parity/make_fixtures.py",
            folder.display()
        );
    }
    folder
}

// ---------------------------------------------------------------------------------------------
// Images

#[test]
fn decoded_pixels_match_pillow() {
    let px = pixel_arrays();
    let mut report = Vec::new();
    // Every input file: the model inputs and the decode-only variants.
    assert!(decode_images().len() >= 30, "decode-only inputs missing from the manifest");
    for im in images().iter().chain(decode_images()) {
        let name = s(&im["name"]);
        let ours = decode_file(name);
        let theirs = px.image(name);
        assert_eq!(
            (ours.width, ours.height),
            (theirs.width, theirs.height),
            "{name}: decoded size (EXIF orientation applied?)"
        );
        let diffs: Vec<u8> = ours.pixels.iter().zip(&theirs.pixels).map(|(a, b)| a.abs_diff(*b)).collect();
        let max = diffs.iter().copied().max().unwrap_or(0);
        let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
        report.push(format!("{name}: max {max}, mean {mean:.3}"));
        assert_eq!(max, 0, "{name}: decode differs from Pillow by up to {max} (mean {mean:.3})");
    }
    eprintln!("decoded |Δ| vs Pillow per image:\n  {}", report.join("\n  "));
}

/// The reference's resize target for a processor (before any centre crop).
fn resized_size(p: &ImageProcessor, h: u32, w: u32) -> (u32, u32) {
    match p.resize.clone().expect("every fixture processor resizes") {
        ResizeTo::Exact { height, width } => (height, width),
        ResizeTo::ShortestEdge(e) => {
            // transformers: int(e * long / short) for the long side.
            let (short, long) = (h.min(w) as u64, h.max(w) as u64);
            let long = (e as u64 * long / short) as u32;
            if h <= w {
                (e, long)
            } else {
                (long, e)
            }
        }
    }
}

#[test]
fn resize_is_bit_identical_to_pillow() {
    let px = pixel_arrays();
    for pname in processor_names() {
        let p = processor(pname);
        for im in images() {
            let name = s(&im["name"]);
            // From Pillow's decoded pixels, so decoder differences cannot leak in.
            let src = px.image(name);
            let (h, w) = resized_size(&p, src.height, src.width);
            let resized = resize_bicubic_rgb8(&src.pixels, src.width, src.height, w, h);
            let (ch, cw) = p.center_crop.unwrap_or((h, w));
            // The fixtures keep the crop only; a crop never exceeds the resized image here.
            let (top, left) = ((h - ch) / 2, (w - cw) / 2);
            let mut cropped = Vec::with_capacity((ch * cw * 3) as usize);
            for y in top..top + ch {
                let row = ((y * w + left) * 3) as usize;
                cropped.extend_from_slice(&resized[row..row + (cw * 3) as usize]);
            }
            let expect = px.bytes(&format!("{pname}.resized.{name}"));
            let (n, max) = cropped
                .iter()
                .zip(&expect)
                .filter(|(a, b)| a != b)
                .fold((0, 0), |(n, m), (a, b)| (n + 1, m.max(a.abs_diff(*b))));
            assert_eq!(cropped.len(), expect.len(), "{pname} {name}: size");
            // The windowed path (only the kept pixels computed) must give the same bytes.
            assert_eq!(p.prepare(&src).unwrap().pixels, expect, "{pname} {name}: prepare() differs from Pillow");
            assert_eq!(
                n, 0,
                "{pname} {name} ({}x{} -> {w}x{h}): {n} bytes differ, worst by {max}",
                src.width, src.height
            );
        }
    }
}

#[test]
fn pixel_values_match_reference() {
    let px = pixel_arrays();
    let mut overall: f64 = 0.0;
    for pname in processor_names() {
        let p = processor(pname);
        // The reference normalises each level the same way wherever it occurs (checked by the
        // generator), so its pixel_values are this table indexed by its resized pixels.
        let levels = px.get(&format!("{pname}.levels"));
        for im in images() {
            let name = s(&im["name"]);
            let src = px.image(name);
            let ours = Tensor::from_slice(&p.pixels(&src).unwrap().data);
            let resized = px.get(&format!("{pname}.resized.{name}")).permute([2, 0, 1]).to_kind(Kind::Int64);
            let channel = Tensor::arange(3, (Kind::Int64, Device::Cpu)).view([3, 1, 1]).expand_as(&resized);
            let theirs = levels.index(&[Some(channel), Some(resized)]).flatten(0, -1);
            let w = worst(&ours, &theirs);
            overall = overall.max(w);
            assert!(w <= PIXEL_TOL, "{pname} {name}: pixel_values |Δ| {w:e}");
        }
    }
    // And against the stored tensors themselves, for the images the models see.
    for m in manifest()["models"].as_array().unwrap() {
        let arrays = Arrays::load(s(&m["fixture"]));
        let p = processor(s(&m["processor"]));
        let imgs: Vec<RgbImage> = m["images"].as_array().unwrap().iter().map(|n| px.image(s(n))).collect();
        let w = worst(&batch(&p, &imgs), arrays.get("pixel_values"));
        overall = overall.max(w);
        assert!(w <= PIXEL_TOL, "{}: pixel_values |Δ| {w:e}", s(&m["name"]));
    }
    eprintln!("pixel_values: worst |Δ| {overall:e}");
}

// ---------------------------------------------------------------------------------------------
// CLIP

fn clip_logits(clip: &Clip, pixels: &Tensor, ids: &Tensor, mask: &Tensor) -> Tensor {
    let img = clip.image_features(pixels);
    let txt = clip.text_features(ids, mask);
    let img = &img / img.norm_scalaropt_dim(2, [-1], true);
    let txt = &txt / txt.norm_scalaropt_dim(2, [-1], true);
    img.matmul(&txt.tr()) * clip.logit_scale()
}

/// The model's captions through the Rust tokenizer, padded with the config's pad id as the
/// service does; checked against the reference's ids wherever its mask is 1.
fn clip_text(m: &Value) -> (Tensor, Tensor) {
    let name = s(&m["name"]);
    let tok = RankTokenizer::load(&model_folder(m), m["max_positions"].as_u64().unwrap() as usize).unwrap();
    let captions: Vec<String> = m["captions"].as_array().unwrap().iter().map(|c| s(c).to_string()).collect();
    let enc = tok.encode_batch(&captions, m["pad_token_id"].as_i64().unwrap()).unwrap();
    for (row, (ref_ids, ref_mask)) in
        m["input_ids"].as_array().unwrap().iter().zip(m["attention_mask"].as_array().unwrap()).enumerate()
    {
        let (ref_ids, ref_mask) = (ids(ref_ids), ids(ref_mask));
        let n = ref_mask.iter().sum::<i64>() as usize;
        let ours = &enc.ids[row * enc.len..(row + 1) * enc.len];
        let mask = &enc.mask[row * enc.len..(row + 1) * enc.len];
        assert_eq!(&ours[..n], &ref_ids[..n], "{name}: token ids of {:?}", captions[row]);
        assert_eq!(mask.iter().sum::<i64>() as usize, n, "{name}: length of {:?}", captions[row]);
    }
    let shape = [enc.rows as i64, enc.len as i64];
    (Tensor::from_slice(&enc.ids).view(shape), Tensor::from_slice(&enc.mask).view(shape))
}

#[test]
fn clip_logits_match_reference() {
    for m in models("clip") {
        let name = s(&m["name"]);
        let arrays = Arrays::load(s(&m["fixture"]));
        let clip = Clip::load(&model_folder(m), Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (ids, mask) = clip_text(m);
        let logits = clip_logits(&clip, arrays.get("pixel_values"), &ids, &mask);
        let w = worst(&logits, arrays.get("logits_per_image"));
        eprintln!("{name}: logits_per_image worst |Δ| {w:e}");
        assert!(w <= LOGIT_TOL, "{name}: logits_per_image |Δ| {w:e}");
    }
}

/// Every input file through the whole Rust path (decode, preprocess, both towers), against the
/// reference from the same file; and the same from Pillow's decoded pixels, which separates what
/// the JPEG decoder contributes.
#[test]
fn clip_end_to_end_from_files() {
    let px = pixel_arrays();
    for m in models("clip") {
        let name = s(&m["name"]);
        let arrays = Arrays::load(s(&m["fixture"]));
        let clip = Clip::load(&model_folder(m), Device::Cpu).unwrap();
        let p = processor(s(&m["processor"]));
        let (ids, mask) = clip_text(m);
        let names: Vec<&str> = m["all_images"].as_array().unwrap().iter().map(s).collect();
        let reference = arrays.get("logits_per_image_all");
        let ref_probs = reference.softmax(-1, Kind::Float);
        let mut from_files: f64 = 0.0;
        for (i, &img) in names.iter().enumerate() {
            let theirs = reference.get(i as i64);
            let from_pillow = clip_logits(&clip, &batch(&p, &[px.image(img)]), &ids, &mask).get(0);
            let w = worst(&from_pillow, &theirs);
            assert!(w <= LOGIT_TOL, "{name} {img}: logits from Pillow's pixels |Δ| {w:e}");

            let ours = clip_logits(&clip, &batch(&p, &[decode_file(img)]), &ids, &mask).get(0);
            let w = worst(&ours, &theirs);
            let wp = worst(&ours.softmax(-1, Kind::Float), &ref_probs.get(i as i64));
            assert!(w <= LOGIT_TOL, "{name} {img}: logits from the file |Δ| {w:e} (probabilities {wp:e})");
            from_files = from_files.max(w);
        }
        eprintln!("{name}: logits from every file (JPEG included) worst |Δ| {from_files:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// BLIP

/// Plain greedy decoding, as the reference's `generate(do_sample=False, num_beams=1)`; the prompt
/// travels as the decode prefix, so the remaining fields keep their defaults.
fn greedy_params(max_length: u32) -> GenerationParams {
    GenerationParams {
        num_candidates: 1,
        max_length,
        min_length: 0,
        strategy: Strategy::Greedy,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        ..GenerationParams::default()
    }
}

fn special(m: &Value) -> SpecialTokens {
    SpecialTokens { bos: m["bos"].as_i64().unwrap(), eos: m["sep"].as_i64().unwrap() }
}

/// A greedy decode batch of every image of `embeds`, request ids counting from `first_id`.
fn greedy_batch<'m>(blip: &'m Blip, m: &Value, embeds: &Tensor, prefix: &[i64], first_id: u64) -> DecodeBatch<'m> {
    let params = greedy_params(m["max_length"].as_u64().unwrap() as u32);
    let requests: Vec<DecodeRequest> = (0..embeds.size()[0] as u64)
        .map(|i| DecodeRequest { id: first_id + i, params: params.clone(), prefix: prefix.to_vec() })
        .collect();
    DecodeBatch::new(&blip.text_decoder, special(m), embeds, &requests)
}

/// Each request's single candidate, in request id order.
fn finish(batch: DecodeBatch) -> Vec<Vec<i64>> {
    let (mut done, _) = batch.run_to_end();
    done.sort_by_key(|d| d.id);
    done.into_iter().map(|d| d.candidates.into_iter().next().unwrap()).collect()
}

fn load_blip(m: &Value) -> Blip {
    Blip::load(&model_folder(m), Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", s(&m["name"])))
}

#[test]
fn blip_image_embeds_match_reference() {
    for m in models("blip") {
        let name = s(&m["name"]);
        let arrays = Arrays::load(s(&m["fixture"]));
        let blip = load_blip(m);
        let embeds = blip.encode_image(arrays.get("pixel_values"));
        let tokens = m["embeds_tokens"].as_i64().unwrap();
        let w = worst(&embeds.narrow(1, 0, tokens), arrays.get("image_embeds"));
        eprintln!("{name}: image embeds worst |Δ| {w:e}");
        assert!(w <= LOGIT_TOL, "{name}: image embeds |Δ| {w:e}");
    }
}

/// Teacher-forced logits of the reference's greedy sequences, both incrementally (one token per
/// step against the cache, as generation runs) and in one causal pass over the whole sequence.
#[test]
fn blip_step_logits_match_reference() {
    for m in models("blip") {
        let name = s(&m["name"]);
        let arrays = Arrays::load(s(&m["fixture"]));
        let blip = load_blip(m);
        let dec = &blip.text_decoder;
        let embeds = blip.encode_image(arrays.get("pixel_values"));
        let runs = m["greedy"].as_array().unwrap().iter().chain(m["prompt"]["runs"].as_array().unwrap());
        let mut overall: f64 = 0.0;
        for (r, run) in runs.enumerate() {
            let i = r % embeds.size()[0] as usize;
            let seq = ids(&run["ids"]);
            let expect = arrays.get(s(&run["logits"]));
            let steps = expect.size()[0];
            let prefix = seq.len() - steps as usize;
            let cross = dec.cross_attn_cache(&embeds.narrow(0, i as i64, 1));
            let row = |ids: &[i64]| Tensor::from_slice(ids).view([1, -1]);

            let mut cache = SelfAttnCache::default();
            let mut incremental =
                vec![dec.next_token_logits(&dec.forward(&row(&seq[..prefix]), &mut cache, &cross, &[1], None))];
            for t in prefix..seq.len() - 1 {
                let hidden = dec.forward(&row(&seq[t..t + 1]), &mut cache, &cross, &[1], None);
                incremental.push(dec.next_token_logits(&hidden));
            }
            let w = worst(&Tensor::cat(&incremental, 0), expect);
            overall = overall.max(w);
            assert!(w <= LOGIT_TOL, "{name} {}: incremental step logits |Δ| {w:e}", s(&run["image"]));

            let hidden = dec.forward(&row(&seq[..seq.len() - 1]), &mut SelfAttnCache::default(), &cross, &[1], None);
            let one_pass: Vec<Tensor> =
                (prefix - 1..seq.len() - 1).map(|t| dec.next_token_logits(&hidden.narrow(1, t as i64, 1))).collect();
            let w = worst(&Tensor::cat(&one_pass, 0), expect);
            overall = overall.max(w);
            assert!(w <= LOGIT_TOL, "{name} {}: one-pass step logits |Δ| {w:e}", s(&run["image"]));
        }
        eprintln!("{name}: step logits worst |Δ| {overall:e}");
    }
}

#[test]
fn blip_greedy_ids_match_reference() {
    for m in models("blip") {
        let name = s(&m["name"]);
        let arrays = Arrays::load(s(&m["fixture"]));
        let blip = load_blip(m);
        let embeds = blip.encode_image(arrays.get("pixel_values"));

        // The prompt as the service builds it: [CLS] prompt [SEP] → bos prompt.
        let prompt = &m["prompt"];
        let tok = CaptionTokenizer::load(&model_folder(m)).unwrap();
        let encoded: Vec<i64> = tok.encode(s(&prompt["text"])).unwrap().into_iter().map(i64::from).collect();
        assert_eq!(encoded, ids(&prompt["tokenizer_ids"]), "{name}: prompt token ids");
        let mut prefix = vec![m["bos"].as_i64().unwrap()];
        prefix.extend_from_slice(&encoded[1..encoded.len() - 1]);
        assert_eq!(prefix, ids(&prompt["prefix"]), "{name}: prompt prefix");

        for (runs, prefix) in [(&m["greedy"], vec![m["bos"].as_i64().unwrap()]), (&prompt["runs"], prefix)] {
            let ours = finish(greedy_batch(&blip, m, &embeds, &prefix, 0));
            for (run, got) in runs.as_array().unwrap().iter().zip(ours) {
                let img = s(&run["image"]);
                assert_eq!(
                    got,
                    ids(&run["ids"]),
                    "{name} {img} (prefix {prefix:?}): greedy ids; reference margin {:.2e}",
                    run["min_margin"].as_f64().unwrap()
                );
                // decode(skip_special_tokens=True): bos and sep go, the prompt's words stay.
                let text = tok.decode(&got.iter().map(|&t| t as u32).collect::<Vec<_>>()).unwrap();
                assert_eq!(text, s(&run["text"]), "{name} {img}: decoded caption");
            }
        }
    }
}

/// Continuous batching: prompt rows that join unconditional rows already two steps in (left-padded
/// shorter history, own positions) must still decode exactly what the reference decodes alone.
#[test]
fn blip_greedy_ids_match_reference_after_join() {
    for m in models("blip") {
        let name = s(&m["name"]);
        let arrays = Arrays::load(s(&m["fixture"]));
        let blip = load_blip(m);
        let embeds = blip.encode_image(arrays.get("pixel_values"));
        let n = embeds.size()[0] as u64;
        let mut running = greedy_batch(&blip, m, &embeds, &[m["bos"].as_i64().unwrap()], 0);
        let mut finished = Vec::new();
        for _ in 0..2 {
            finished.extend(running.step());
        }
        let mut joining = greedy_batch(&blip, m, &embeds, &ids(&m["prompt"]["prefix"]), n);
        finished.extend(joining.step());
        running.join(joining);
        let (rest, _) = running.run_to_end();
        finished.extend(rest);
        finished.sort_by_key(|d| d.id);
        let expect = m["greedy"].as_array().unwrap().iter().chain(m["prompt"]["runs"].as_array().unwrap());
        assert_eq!(finished.len(), expect.clone().count(), "{name}: every request completes once");
        for (d, run) in finished.iter().zip(expect) {
            assert_eq!(d.candidates[0], ids(&run["ids"]), "{name} request {}: greedy ids after join", d.id);
        }
    }
}

/// Greedy captions of every input file, decoded and preprocessed by the Rust side, in one batch.
#[test]
fn blip_greedy_end_to_end_from_files() {
    for m in models("blip") {
        let name = s(&m["name"]);
        let blip = load_blip(m);
        let p = processor(s(&m["processor"]));
        let runs = m["greedy_all"].as_array().unwrap();
        let imgs: Vec<RgbImage> = runs.iter().map(|r| decode_file(s(&r["image"]))).collect();
        let embeds = blip.encode_image(&batch(&p, &imgs));
        let ours = finish(greedy_batch(&blip, m, &embeds, &[m["bos"].as_i64().unwrap()], 0));
        for (run, got) in runs.iter().zip(ours) {
            let img = s(&run["image"]);
            let margin = run["min_margin"].as_f64().unwrap();
            let expect = ids(&run["ids"]);
            if got == expect {
                continue;
            }
            if margin >= MIN_MARGIN {
                panic!("{name} {img}: greedy ids {got:?}, reference {expect:?} (margin {margin:.2e})");
            }
            eprintln!("{name} {img}: greedy ids differ (margin {margin:.2e}): {got:?} vs {expect:?}");
        }
    }
}

/// The sampling processors, stage by stage, on the reference's recorded logits and histories;
/// each stage takes the previous Rust stage's output.
#[test]
fn sampling_processors_match_reference() {
    for m in models("blip") {
        let name = s(&m["name"]);
        let arrays = Arrays::load(s(&m["fixture"]));
        let sp = &m["sampling"];
        let params = &sp["params"];
        let f = |k: &str| params[k].as_f64().unwrap();
        let raw = arrays.get(s(&sp["raw"]));
        let (rows, vocab) = raw.size2().unwrap();
        let histories: Vec<Vec<i64>> = sp["histories"].as_array().unwrap().iter().map(ids).collect();
        let mut seen = Tensor::zeros([rows, vocab], (Kind::Bool, Device::Cpu));
        for (r, h) in histories.iter().enumerate() {
            seen = seen.index_put_(
                &[Some(Tensor::from_slice(&[r as i64])), Some(Tensor::from_slice(h))],
                &Tensor::from(true),
                false,
            );
        }
        let col = |v: f64| Tensor::full([rows, 1], v, (Kind::Float, Device::Cpu));
        let min_length = params["min_length"].as_i64().unwrap();
        let too_short: Vec<bool> = histories.iter().map(|h| (h.len() as i64) < min_length).collect();
        let only_temperature = RowParams {
            repetition_penalty: col(1.0),
            temperature: col(f("temperature")),
            top_k: Tensor::full([rows], vocab, (Kind::Int64, Device::Cpu)),
            top_p: col(1.0),
        };
        let k = Tensor::full([rows], params["top_k"].as_i64().unwrap(), (Kind::Int64, Device::Cpu));

        let penalised = repetition_penalty(raw, &seen, &col(f("repetition_penalty")));
        let suppressed = suppress_eos(&penalised, &Tensor::from_slice(&too_short), m["sep"].as_i64().unwrap());
        let tempered = warp(&suppressed, &only_temperature);
        let top_ked = top_k(&tempered, &k);
        let top_ped = top_p(&top_ked, &col(f("top_p")));
        let all_at_once = warp(
            &suppressed,
            &RowParams {
                repetition_penalty: col(1.0),
                temperature: col(f("temperature")),
                top_k: k,
                top_p: col(f("top_p")),
            },
        );
        let ours: HashMap<&str, &Tensor> = HashMap::from([
            ("repetition_penalty", &penalised),
            ("min_length", &suppressed),
            ("temperature", &tempered),
            ("top_k", &top_ked),
            ("top_p", &top_ped),
        ]);
        let mut worst_all: f64 = 0.0;
        for stage in sp["stages"].as_array().unwrap() {
            let (stage, key) = (s(&stage[0]), s(&stage[1]));
            let (pattern, w) = compare_scores(ours[stage], arrays.get(key));
            worst_all = worst_all.max(w);
            assert!(
                pattern == 0 && w <= SCORE_TOL,
                "{name} after {stage}: {pattern} entries differ in -inf, finite |Δ| {w:e}"
            );
            if stage == "top_p" {
                let (pattern, w) = compare_scores(&all_at_once, arrays.get(key));
                assert!(
                    pattern == 0 && w <= SCORE_TOL,
                    "{name} warp(): {pattern} entries differ in -inf, finite |Δ| {w:e}"
                );
            }
        }
        eprintln!("{name}: processed scores worst finite |Δ| {worst_all:e}");
    }
}

/// Beam search (3 beams, length_penalty 1.0 / 0.6, early_stopping off / on): the reference's
/// returned sequences, best first, token for token.
#[test]
fn blip_beam_search_matches_reference() {
    for m in models("blip") {
        let name = s(&m["name"]);
        let arrays = Arrays::load(s(&m["fixture"]));
        let blip = load_blip(m);
        let embeds = blip.encode_image(arrays.get("pixel_values"));
        let order: Vec<&str> = m["greedy"].as_array().unwrap().iter().map(|r| s(&r["image"])).collect();
        let sp = special(m);
        for run in m["beam"].as_array().unwrap() {
            let img = s(&run["image"]);
            let i = order.iter().position(|n| *n == img).expect("image of a greedy run") as i64;
            let params = GenerationParams {
                strategy: Strategy::Beam,
                num_beams: run["num_beams"].as_u64().unwrap() as u32,
                num_candidates: run["num_beams"].as_u64().unwrap() as u32,
                length_penalty: run["length_penalty"].as_f64().unwrap() as f32,
                early_stopping: run["early_stopping"].as_bool().unwrap(),
                ..greedy_params(m["max_length"].as_u64().unwrap() as u32)
            };
            let req = DecodeRequest { id: 0, params: params.clone(), prefix: vec![sp.bos] };
            let batch = DecodeBatch::new(&blip.text_decoder, sp, &embeds.narrow(0, i, 1), &[req]);
            let (done, _) = batch.run_to_end();
            // The reference pads finished beams to a common length; compare up to each end token.
            let expected: Vec<Vec<i64>> = run["sequences"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    let row = ids(row);
                    match row.iter().position(|&t| t == sp.eos) {
                        Some(end) => row[..=end].to_vec(),
                        None => row,
                    }
                })
                .collect();
            assert_eq!(
                done[0].candidates, expected,
                "{name} {img}: beams (length_penalty {}, early_stopping {})",
                params.length_penalty, params.early_stopping
            );
        }
    }
}
