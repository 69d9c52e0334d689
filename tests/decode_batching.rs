//! Decoding on the embedded BLIP: requests that join a running batch get exactly what they get
//! alone, cross-attention shared per image equals the per-row computation, decode steps through
//! (emulated) graphs compute what eager ones do, and each image is encoded once however many
//! candidates it asks for.

mod common;

use std::path::Path;

use caption_cascade::{
    backend::{BlipRunner, GenerateInput},
    engine::{RunningBatch, StepWise},
    images::{decode_image, DecodeLimits},
    models::{
        blip::{Blip, DecodeBatch, DecodeRequest, Decoded, SelfAttnCache, SpecialTokens},
        generation::{GenerationParams, Strategy},
        graphs::GraphMode,
        preprocess,
    },
    validate::{CaptionLimits, GenerationLimits, SeedOrigin, ValidParams, Validator},
};
use common::scenes::draw_scene;
use rand::{rngs::StdRng, SeedableRng};
use tch::{Device, Kind, Tensor};

const BLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-blip");

fn pixels(seed: u64) -> Tensor {
    let scene = draw_scene(&mut StdRng::seed_from_u64(seed));
    let img = decode_image(&scene.png(), &DecodeLimits::default()).unwrap();
    let p = preprocess::load(Path::new(BLIP)).unwrap().pixels(&img).unwrap();
    Tensor::from_slice(&p.data).view([1, 3, i64::from(p.height), i64::from(p.width)])
}

/// `params`, checked as a server checks a request.
fn valid(params: GenerationParams) -> ValidParams {
    let limits = GenerationLimits { max_candidates: 64, max_length: 512 };
    let captions = CaptionLimits { max_captions: 64, max_caption_bytes: 1024 };
    Validator::new(limits, captions).params(params, SeedOrigin::Caller).unwrap()
}

fn special(blip: &Blip) -> SpecialTokens {
    SpecialTokens { bos: blip.config.text_config.bos_token_id, eos: blip.config.text_config.sep_token_id }
}

fn request(blip: &Blip, id: u64, params: GenerationParams) -> DecodeRequest {
    DecodeRequest { id, params, prefix: vec![special(blip).bos] }
}

fn alone(blip: &Blip, embeds: &Tensor, req: DecodeRequest) -> Decoded {
    let (mut done, _) = DecodeBatch::new(&blip.text_decoder, special(blip), embeds, &[req]).run_to_end();
    done.remove(0)
}

fn sampled(seed: u64, n: u32) -> GenerationParams {
    GenerationParams { num_candidates: n, seed, temperature: 1.3, top_p: 0.95, max_length: 30, ..Default::default() }
}

/// Three requests, two of which join a running batch later: (what each gets alone, what each gets
/// in the shared batch).
fn alone_and_joined(blip: &Blip) -> (Vec<Decoded>, Vec<Decoded>) {
    let (ea, eb, ec) = (blip.encode_image(&pixels(1)), blip.encode_image(&pixels(2)), blip.encode_image(&pixels(3)));
    let greedy = GenerationParams { num_candidates: 2, strategy: Strategy::Greedy, ..Default::default() };
    // a ends first (at 10 tokens), so the padding b and c got on joining is trimmed while they run.
    let a = request(blip, 1, GenerationParams { max_length: 10, ..sampled(11, 4) });
    let b = request(blip, 2, greedy);
    let c = request(blip, 3, GenerationParams { repetition_penalty: 1.5, ..sampled(33, 3) });
    let expected = vec![alone(blip, &ea, a.clone()), alone(blip, &eb, b.clone()), alone(blip, &ec, c.clone())];

    let sp = special(blip);
    let mut running = DecodeBatch::new(&blip.text_decoder, sp, &ea, &[a]);
    let mut done: Vec<Decoded> = Vec::new();
    for _ in 0..3 {
        done.extend(running.step());
    }
    // b joins after 3 steps, c after 5: their caches are shorter and get left-padded.
    let mut joiner = DecodeBatch::new(&blip.text_decoder, sp, &eb, &[b]);
    done.extend(joiner.step());
    running.join(joiner);
    for _ in 0..2 {
        done.extend(running.step());
    }
    let mut joiner = DecodeBatch::new(&blip.text_decoder, sp, &ec, &[c]);
    done.extend(joiner.step());
    running.join(joiner);
    while !running.is_done() {
        done.extend(running.step());
    }
    done.sort_by_key(|d| d.id);
    (expected, done)
}

#[test]
fn joining_a_running_batch_changes_no_result() {
    let _g = tch::no_grad_guard();
    let blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let (alone, joined) = alone_and_joined(&blip);
    assert_eq!(joined, alone);
}

#[test]
fn a_reserved_cache_never_grows_and_changes_no_result() {
    let _g = tch::no_grad_guard();
    let blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let dec = &blip.text_decoder;
    let cross = dec.cross_attn_cache(&blip.encode_image(&pixels(4)));
    let ids = Tensor::from_slice(&[5i64, 6, 7, 5, 6, 8]).view([2, 3]);
    let (mut grown, mut reserved) = (SelfAttnCache::default(), SelfAttnCache::reserving(40));
    let mut capacities = Vec::new();
    let mut step = |ids: &Tensor| {
        let a = dec.next_token_logits(&dec.forward(ids, &mut grown, &cross, &[2], None));
        let b = dec.next_token_logits(&dec.forward(ids, &mut reserved, &cross, &[2], None));
        capacities.push((grown.capacity(), reserved.capacity()));
        assert_eq!(a, b);
        a.argmax(-1, true)
    };
    let mut next = step(&ids);
    for _ in 0..30 {
        next = step(&next);
    }
    assert_eq!(reserved.past_len(), 33);
    assert!(capacities.iter().all(|&(_, r)| r == 40), "{capacities:?}");
    assert!(capacities.windows(2).any(|w| w[0].0 < w[1].0), "the default cache grows: {capacities:?}");
}

fn one_step_logits(blip: &Blip) -> Tensor {
    let dec = &blip.text_decoder;
    let cross = dec.cross_attn_cache(&blip.encode_image(&pixels(4)));
    let mut cache = SelfAttnCache::default();
    let prefix = Tensor::from_slice(&[5i64, 6, 7, 5, 6, 8, 5, 7, 7, 5, 6, 6, 5, 8, 6]).view([5, 3]);
    let _ = dec.forward(&prefix, &mut cache, &cross, &[5], None);
    let next = Tensor::from_slice(&[7i64, 8, 6, 5, 7]).view([5, 1]);
    dec.next_token_logits(&dec.forward(&next, &mut cache, &cross, &[5], None))
}

#[test]
fn graphed_decode_steps_compute_what_eager_steps_compute() {
    let _g = tch::no_grad_guard();
    let mut blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let (eager, _) = alone_and_joined(&blip);
    // Emulated graphs pad every one-token step to its row bucket, copy it through static
    // buffers and narrow the results back, as CUDA graphs do, on any device.
    blip.text_decoder.set_graph_mode(GraphMode::Emulated);
    let (graphed_alone, graphed_joined) = alone_and_joined(&blip);
    assert_eq!(graphed_alone, eager);
    assert_eq!(graphed_joined, eager);

    // One step's logits, 5 rows padded to 8, against eager.
    let graphed = one_step_logits(&blip);
    blip.text_decoder.set_graph_mode(GraphMode::Off);
    let diff = (one_step_logits(&blip) - graphed).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "logits max |Δ| = {diff}");
}

#[test]
fn cross_attention_shared_per_image_equals_the_repeated_computation() {
    let _g = tch::no_grad_guard();
    let blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let embeds = Tensor::cat(&[blip.encode_image(&pixels(4)), blip.encode_image(&pixels(5))], 0);
    let dec = &blip.text_decoder;
    let ids = Tensor::from_slice(&[5i64, 6, 7, 5, 6, 8, 5, 7, 7, 5, 6, 6, 5, 8, 6]).view([5, 3]);
    // Shared: 3 rows read image 0's keys/values and 2 rows image 1's, each computed once.
    let shared = dec.cross_attn_cache(&embeds);
    let hidden_shared = dec.forward(&ids, &mut SelfAttnCache::default(), &shared, &[3, 2], None);
    // Repeated: every row gets its own copy of its image, as a per-sequence implementation does.
    let repeated_embeds = embeds.index_select(0, &Tensor::from_slice(&[0i64, 0, 0, 1, 1]));
    let repeated = dec.cross_attn_cache(&repeated_embeds);
    let hidden_repeated = dec.forward(&ids, &mut SelfAttnCache::default(), &repeated, &[1, 1, 1, 1, 1], None);
    let diff = (&hidden_shared - &hidden_repeated).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |Δ| = {diff}");
    // Uneven groups take the general path; they must agree too.
    assert_eq!(shared.images(), 2);
    assert_eq!(repeated.images(), 5);
    let logits = |h: &Tensor| dec.next_token_logits(h).to_kind(Kind::Float);
    let diff = (logits(&hidden_shared) - logits(&hidden_repeated)).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "logits max |Δ| = {diff}");
}

#[test]
fn the_vision_encoder_runs_once_per_image() {
    let runner = BlipRunner::load(Path::new(BLIP), Device::Cpu).unwrap();
    let scene = draw_scene(&mut StdRng::seed_from_u64(6));
    let img = decode_image(&scene.png(), &DecodeLimits::default()).unwrap();
    let px = runner.processor().pixels(&img).unwrap();
    let params = GenerationParams { num_candidates: 10, seed: 1, ..Default::default() };
    let prompt = runner.prompt(&params).unwrap();
    let inputs = (0..3)
        .map(|id| (id, GenerateInput { pixels: px.clone(), params: valid(params.clone()), prompt: prompt.clone() }))
        .collect::<Vec<_>>();
    let (mut batch, mut done) = runner.prefill(inputs);
    while batch.requests() > 0 {
        done.extend(batch.decode());
    }
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|(_, r)| r.as_ref().unwrap().candidates.len() == 10));
    assert_eq!(runner.images_encoded(), 3, "3 images for 30 candidates");
}

#[test]
fn requests_with_prompts_of_different_lengths_start_together() {
    let runner = BlipRunner::load(Path::new(BLIP), Device::Cpu).unwrap();
    let scene = draw_scene(&mut StdRng::seed_from_u64(7));
    let px = runner.processor().pixels(&decode_image(&scene.png(), &DecodeLimits::default()).unwrap()).unwrap();
    let params = |prompt: Option<&str>| GenerationParams {
        num_candidates: 2,
        seed: 9,
        prompt: prompt.map(str::to_string),
        ..Default::default()
    };
    let prompts = [None, Some("a large"), Some("a small red")];
    let run = |ids: &[usize]| {
        let inputs = ids
            .iter()
            .map(|&i| {
                let params = params(prompts[i]);
                let prompt = runner.prompt(&params).unwrap();
                (i as u64, GenerateInput { pixels: px.clone(), params: valid(params), prompt })
            })
            .collect::<Vec<_>>();
        let (mut batch, mut done) = runner.prefill(inputs);
        while batch.requests() > 0 {
            done.extend(batch.decode());
        }
        done.sort_by_key(|(id, _)| *id);
        done.into_iter().map(|(id, r)| (id, r.unwrap().candidates)).collect::<Vec<_>>()
    };
    let together = run(&[0, 1, 2]);
    let alone: Vec<_> = (0..3).flat_map(|i| run(&[i])).collect();
    assert_eq!(together, alone);
}
