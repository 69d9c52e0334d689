//! Greedy and sampled one-token steps run whole (`--cuda-graphs=whole`; emulated here: the same
//! arena, row and positions buckets, masks, dead slots and static buffers as on CUDA, each replay
//! run again eagerly) compute what layered steps compute: the same processed scores to 1e-5 at
//! every step and the same candidates, with requests joining, finishing at different lengths and
//! being cancelled mid-run. The arena outlives its batches, so graphs captured at start serve
//! every later batch; beam steps, and batches the arena cannot hold, take the layered path.

mod common;

use std::path::Path;

use caption_cascade::{
    backend::{BlipRunner, GenerateInput, GenerateOutput},
    engine::{EngineError, RunningBatch, StepWise},
    images::{decode_image, DecodeLimits},
    models::{
        blip::{decode::capture_whole_steps, Blip, DecodeBatch, DecodeRequest, Decoded},
        generation::{GenerationParams, Strategy},
        graphs::{self, GraphMode, WholeStep},
        timing, transfer, Numerics,
    },
    validate::{CaptionLimits, GenerationLimits, SeedOrigin, Validator},
};
use common::{
    decode::{embeds, special, BLIP},
    scenes::draw_scene,
};
use rand::{rngs::StdRng, SeedableRng};
use tch::{Device, Kind, Tensor};

fn request(blip: &Blip, id: u64, params: GenerationParams) -> DecodeRequest {
    DecodeRequest { id, params, prefix: vec![special(blip).bos] }
}

fn two(bos: i64, base: u64) -> [DecodeRequest; 2] {
    [
        DecodeRequest { id: base, params: greedy(2, 10), prefix: vec![bos] },
        DecodeRequest { id: base + 1, params: sampled(3, 50, 14, base), prefix: vec![bos] },
    ]
}

fn sampled(n: u32, top_k: u32, max_length: u32, seed: u64) -> GenerationParams {
    GenerationParams {
        num_candidates: n,
        strategy: Strategy::Sample,
        seed,
        temperature: 1.4,
        top_k,
        top_p: 0.95,
        min_length: 3,
        max_length,
        ..Default::default()
    }
}

fn greedy(n: u32, max_length: u32) -> GenerationParams {
    GenerationParams { num_candidates: n, strategy: Strategy::Greedy, max_length, ..Default::default() }
}

fn limits() -> WholeStep {
    WholeStep { images: 4, per_image: 4, positions: 40 }
}

/// Whole steps (emulated) of up to `rows` rows within `limits`.
fn whole(blip: &mut Blip, rows: i64, limits: WholeStep) {
    let v = &blip.config.vision_config;
    let patches = (v.image_size / v.patch_size).pow(2) + 1;
    blip.text_decoder.set_graph_mode(GraphMode::Emulated);
    blip.text_decoder.set_graph_rows(rows);
    blip.text_decoder.set_whole_step(Some(limits), patches);
}

/// Steps `batch` `n` times (or until it is done), collecting what finishes.
fn steps(batch: &mut DecodeBatch, n: usize, done: &mut Vec<Decoded>) {
    for _ in 0..n {
        done.extend(batch.step());
    }
}

/// A batch that starts with two requests, takes a third after 4 steps (top-k off: the whole
/// vocabulary), loses one to a cancel, takes a fourth (top-k 3) and a fifth (greedy, with a
/// prompt), and runs to its end. Returns the candidates, the running batch's recorded steps,
/// and whether it held the arena at the end.
fn scenario(blip: &Blip) -> (Vec<Decoded>, Vec<caption_cascade::models::blip::decode::StepScores>, bool) {
    let sp = special(blip);
    let dec = &blip.text_decoder;
    let first = [request(blip, 1, greedy(3, 12)), request(blip, 2, sampled(4, 50, 20, 7))];
    let mut running = DecodeBatch::new(dec, sp, &embeds(blip, &[1, 2]), &first);
    running.record_scores();
    let mut done = Vec::new();
    steps(&mut running, 4, &mut done);
    let mut joiner = DecodeBatch::new(dec, sp, &embeds(blip, &[3]), &[request(blip, 3, sampled(2, 0, 15, 9))]);
    done.extend(joiner.step());
    running.join(joiner);
    steps(&mut running, 3, &mut done);
    assert!(running.cancel(2), "request 2 is still decoding");
    let mut joiner = DecodeBatch::new(dec, sp, &embeds(blip, &[4]), &[request(blip, 4, sampled(3, 3, 18, 4))]);
    done.extend(joiner.step());
    running.join(joiner);
    // A prompt: its rows start three positions in, among rows one position in.
    let prompted = DecodeRequest { prefix: vec![sp.bos, 7, 9], ..request(blip, 5, greedy(2, 12)) };
    let mut late = DecodeBatch::new(dec, sp, &embeds(blip, &[5]), &[prompted]);
    done.extend(late.step());
    running.join(late);
    while !running.is_done() {
        done.extend(running.step());
    }
    let held = running.slot_stats().whole_step_arena;
    done.sort_by_key(|d| d.id);
    (done, running.take_recorded(), held)
}

/// Largest difference between two steps' scores, after checking they forbid the same tokens.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (ia, ib) = (a.isinf(), b.isinf());
    assert!(ia.equal(&ib), "the same tokens forbidden");
    let zero = Tensor::zeros([], (Kind::Float, Device::Cpu));
    (a.where_self(&ia.logical_not(), &zero) - b.where_self(&ib.logical_not(), &zero)).abs().max().double_value(&[])
}

#[test]
fn whole_steps_compute_what_layered_steps_compute_as_requests_come_and_go() {
    let _g = tch::no_grad_guard();
    compare_paths(Blip::load(Path::new(BLIP), Device::Cpu).unwrap());
}

/// The shapes model's cross-attention reads its image nearly evenly whatever the query, so a
/// query placed in the wrong row of the grid would go unnoticed there: random weights of the
/// same shapes attend sharply.
#[test]
fn whole_steps_compute_what_layered_steps_compute_with_random_weights() {
    let _g = tch::no_grad_guard();
    tch::manual_seed(11);
    compare_paths(Blip::random_as(Path::new(BLIP), Device::Cpu, Kind::Float).unwrap());
}

fn compare_paths(mut blip: Blip) {
    let (eager, eager_steps, _) = scenario(&blip);
    assert_eq!(eager.iter().map(|d| d.id).collect::<Vec<_>>(), [1, 3, 4, 5], "request 2 was cancelled");

    whole(&mut blip, 16, limits());
    let (got, got_steps, held) = scenario(&blip);
    assert_eq!(got, eager, "the same candidates");
    assert!(held, "the batch ran in the arena");
    assert_eq!(got_steps.len(), eager_steps.len());
    assert!(!got_steps[0].whole, "a first step runs its prefix through the layers");
    assert!(got_steps[1..].iter().all(|s| s.whole), "every later step ran whole");
    for (i, (g, e)) in got_steps.iter().zip(&eager_steps).enumerate() {
        assert_eq!(g.rows, e.rows, "step {i}: the same rows in the same order");
        let diff = max_diff(&g.scores, &e.scores);
        assert!(diff < 1e-5, "step {i}: scores max |Δ| = {diff}");
    }
}

#[test]
fn graphs_captured_at_start_serve_every_later_batch_in_the_same_arena() {
    let _g = tch::no_grad_guard();
    let mut blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let sp = special(&blip);
    let eos = sp.eos;
    let reqs = |base: u64| two(sp.bos, base);
    let expected: Vec<Vec<Decoded>> = [10, 20]
        .iter()
        .map(|&base| {
            let mut done =
                DecodeBatch::new(&blip.text_decoder, sp, &embeds(&blip, &[1, 2]), &reqs(base)).run_to_end().0;
            done.sort_by_key(|d| d.id);
            done
        })
        .collect();

    whole(&mut blip, 16, limits());
    // As an executor does when it starts: the pieces (for first steps and beam steps), then the
    // whole steps. 16 rows: buckets 1, 2, 4, 8, 16; 40 positions: 16, 32, 40; one choice graph
    // per bucket.
    blip.text_decoder.capture_graphs();
    assert_eq!(capture_whole_steps(&blip.text_decoder, eos), 5 * (3 + 1));
    let captured = graphs::on_this_executor().0;
    let mut arenas = Vec::new();
    for (base, want) in [10, 20].into_iter().zip(&expected) {
        let mut batch = DecodeBatch::new(&blip.text_decoder, sp, &embeds(&blip, &[1, 2]), &reqs(base));
        let mut done = batch.step();
        done.extend(batch.step());
        let stats = batch.slot_stats();
        assert!(stats.whole_step_arena);
        arenas.push((stats.cache_ptr, stats.cross_ptr));
        while !batch.is_done() {
            done.extend(batch.step());
        }
        done.sort_by_key(|d| d.id);
        assert_eq!(&done, want);
    }
    assert_eq!(arenas[0], arenas[1], "the second batch decoded in the first one's buffers");
    assert_eq!(graphs::on_this_executor(), (captured, false), "serving captured nothing new");
}

#[test]
fn beam_steps_and_batches_beyond_the_arena_take_the_layered_path() {
    let _g = tch::no_grad_guard();
    let mut blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let sp = special(&blip);
    let beam = GenerationParams {
        strategy: Strategy::Beam,
        num_beams: 3,
        num_candidates: 2,
        max_length: 12,
        ..Default::default()
    };
    let run = |blip: &Blip, reqs: &[DecodeRequest], seeds: &[u64]| {
        let mut batch = DecodeBatch::new(&blip.text_decoder, sp, &embeds(blip, seeds), reqs);
        batch.record_scores();
        let mut done = Vec::new();
        while !batch.is_done() {
            done.extend(batch.step());
        }
        done.sort_by_key(|d| d.id);
        (done, batch.take_recorded().iter().any(|s| s.whole))
    };
    let with_beams = [request(&blip, 1, beam), request(&blip, 2, greedy(2, 12))];
    // Six candidates of one image: more than the arena's four query slots per image.
    let too_wide = [request(&blip, 3, sampled(6, 50, 12, 2))];
    let eager = (run(&blip, &with_beams, &[1, 2]), run(&blip, &too_wide, &[3]));

    whole(&mut blip, 16, limits());
    let (beams, wide) = (run(&blip, &with_beams, &[1, 2]), run(&blip, &too_wide, &[3]));
    assert_eq!(beams.0, eager.0 .0);
    assert!(!beams.1, "a batch with beam rows steps through the layers");
    assert_eq!(wide.0, eager.1 .0);
    assert!(!wide.1, "a batch the arena cannot hold steps through the layers");
}

#[test]
fn a_batch_that_outgrows_the_arena_lets_it_go_and_later_batches_get_another() {
    let _g = tch::no_grad_guard();
    let mut blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let sp = special(&blip);
    let dec_run = |blip: &Blip| {
        let dec = &blip.text_decoder;
        let mut running = DecodeBatch::new(dec, sp, &embeds(blip, &[1]), &[request(blip, 1, greedy(3, 14))]);
        let mut done = running.step();
        done.extend(running.step());
        let before = running.slot_stats();
        // 3 + 3 rows: past the arena's 4 row slots.
        let mut joiner = DecodeBatch::new(dec, sp, &embeds(blip, &[2]), &[request(blip, 2, sampled(3, 50, 14, 3))]);
        done.extend(joiner.step());
        running.join(joiner);
        running.record_scores();
        while !running.is_done() {
            done.extend(running.step());
        }
        done.sort_by_key(|d| d.id);
        let kinds: Vec<bool> = running.take_recorded().iter().map(|s| s.whole).collect();
        (done, before.whole_step_arena, kinds)
    };
    let (eager, ..) = dec_run(&blip);
    whole(&mut blip, 4, limits());
    let (got, held, kinds) = dec_run(&blip);
    assert_eq!(got, eager);
    assert!(held, "3 rows fit the arena");
    assert!(!kinds[0], "6 rows do not: the buffers grew and the batch stepped through the layers");
    if let Some(back) = kinds.iter().position(|&w| w) {
        assert!(kinds[back..].iter().all(|&w| w), "once rows fit again, the batch settles in a new arena: {kinds:?}");
    }
    let (again, held_again, _) = dec_run(&blip);
    assert_eq!(again, eager);
    assert!(held_again, "the next batch got an arena: the old one went with the batch that grew it");
}

#[test]
fn a_whole_step_waits_on_the_device_once() {
    let _g = tch::no_grad_guard();
    let mut blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    whole(&mut blip, 16, limits());
    let sp = special(&blip);
    for reqs in [
        vec![request(&blip, 1, greedy(3, 12)), request(&blip, 2, greedy(1, 9))],
        vec![request(&blip, 1, sampled(3, 50, 12, 1)), request(&blip, 2, greedy(2, 9))],
        vec![request(&blip, 1, sampled(2, 0, 12, 2)), request(&blip, 2, sampled(2, 3, 9, 3))],
    ] {
        let mut batch = DecodeBatch::new(&blip.text_decoder, sp, &embeds(&blip, &[1, 2]), &reqs);
        batch.record_scores();
        let mut reads = Vec::new();
        while !batch.is_done() {
            let before = transfer::reads();
            batch.step();
            reads.push(transfer::reads() - before);
        }
        assert!(batch.take_recorded()[1..].iter().all(|s| s.whole));
        assert!(reads.iter().all(|&r| r == 1), "{reads:?}");
    }
}

/// Through the engine's verbs, as the scheduler drives them: a batch prefilled, stepped, joined
/// by another, one request filtered out, run to its end and dropped; then a new batch.
fn through_the_verbs(runner: &BlipRunner) -> Vec<(u64, Vec<String>)> {
    let limits = GenerationLimits { max_candidates: 8, max_length: 40 };
    let validator = Validator::new(limits, CaptionLimits { max_captions: 8, max_caption_bytes: 256 });
    let input = |seed: u64, params: GenerationParams| {
        let scene = draw_scene(&mut StdRng::seed_from_u64(seed));
        let img = decode_image(&scene.png(), &DecodeLimits::default()).unwrap();
        let params = validator.params(params, SeedOrigin::Caller).unwrap();
        let prompt = runner.prompt(params.get()).unwrap();
        GenerateInput { pixels: runner.processor().pixels(&img).unwrap(), params, prompt }
    };
    let mut done: Vec<(u64, Result<GenerateOutput, EngineError>)> = Vec::new();
    let (mut running, finished) =
        runner.prefill(vec![(1, input(1, sampled(4, 50, 20, 1))), (2, input(2, greedy(2, 14)))]);
    done.extend(finished);
    for _ in 0..3 {
        done.extend(running.decode());
    }
    let (joiner, finished) = runner.prefill(vec![(3, input(3, sampled(3, 0, 16, 3)))]);
    done.extend(finished);
    running.concatenate(joiner);
    done.extend(running.decode());
    running.filter(1);
    while running.requests() > 0 {
        done.extend(running.decode());
    }
    drop(running);
    let (mut next, finished) = runner.prefill(vec![(4, input(4, sampled(3, 50, 18, 4)))]);
    done.extend(finished);
    while next.requests() > 0 {
        done.extend(next.decode());
    }
    let mut out: Vec<(u64, Vec<String>)> =
        done.into_iter().map(|(id, r)| (id, r.unwrap().candidates.into_iter().map(|c| c.text).collect())).collect();
    out.sort();
    out
}

#[test]
fn the_engine_serves_whole_steps_as_it_serves_layered_ones() {
    let before = timing::whole_steps_here();
    let eager = through_the_verbs(&BlipRunner::load(Path::new(BLIP), Device::Cpu).unwrap());
    assert_eq!(timing::whole_steps_here(), before, "without --cuda-graphs=whole no step runs whole");
    assert_eq!(eager.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [2, 3, 4], "request 1 was filtered out");
    let numerics = Numerics {
        graphs: GraphMode::Emulated,
        graph_rows: 16,
        whole_step: Some(WholeStep { images: 4, per_image: 8, positions: 40 }),
        ..Kind::Float.into()
    };
    let runner = BlipRunner::load_as(Path::new(BLIP), Device::Cpu, numerics).unwrap();
    let before = timing::whole_steps_here();
    assert_eq!(through_the_verbs(&runner), eager);
    assert!(timing::whole_steps_here() - before >= 10, "its later steps ran whole");
}
