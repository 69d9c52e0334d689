//! How often a decode step waits on the device: every read back goes through
//! `models::transfer::read`, which counts per thread, so on the CPU a step can be shown to read
//! exactly once: greedy and sampled rows, image groups of different sizes, beam search with
//! two requests in one batch, and beam rows sharing a step with greedy or sampled rows.

mod common;

use std::path::Path;

use caption_cascade::{
    images::{decode_image, DecodeLimits},
    models::{
        blip::{Blip, DecodeBatch, DecodeRequest, SpecialTokens},
        generation::{GenerationParams, Strategy},
        preprocess, transfer,
    },
};
use common::scenes::draw_scene;
use rand::{rngs::StdRng, SeedableRng};
use tch::{Device, Tensor};

const BLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-blip");

fn embeds(blip: &Blip, seeds: &[u64]) -> Tensor {
    let px: Vec<Tensor> = seeds
        .iter()
        .map(|&seed| {
            let scene = draw_scene(&mut StdRng::seed_from_u64(seed));
            let img = decode_image(&scene.png(), &DecodeLimits::default()).unwrap();
            let p = preprocess::load(Path::new(BLIP)).unwrap().pixels(&img).unwrap();
            Tensor::from_slice(&p.data).view([3, i64::from(p.height), i64::from(p.width)])
        })
        .collect();
    blip.encode_image(&Tensor::stack(&px, 0))
}

/// Runs `params` (one request per image) to the end; returns the reads of each step.
fn reads_per_step(blip: &Blip, params: &[GenerationParams]) -> Vec<u64> {
    let _g = tch::no_grad_guard();
    let sp = SpecialTokens { bos: blip.config.text_config.bos_token_id, eos: blip.config.text_config.sep_token_id };
    let seeds: Vec<u64> = (1..=params.len() as u64).collect();
    let e = embeds(blip, &seeds);
    let requests: Vec<DecodeRequest> = params
        .iter()
        .enumerate()
        .map(|(i, p)| DecodeRequest { id: i as u64, params: p.clone(), prefix: vec![sp.bos] })
        .collect();
    let mut batch = DecodeBatch::new(&blip.text_decoder, sp, &e, &requests);
    let mut reads = Vec::new();
    while !batch.is_done() {
        let before = transfer::reads();
        batch.step();
        reads.push(transfer::reads() - before);
    }
    reads
}

fn model() -> Blip {
    Blip::load(Path::new(BLIP), Device::Cpu).unwrap()
}

#[test]
fn a_greedy_step_with_uneven_image_groups_reads_once() {
    let greedy = |n| GenerationParams { num_candidates: n, strategy: Strategy::Greedy, ..Default::default() };
    // One image with 1 row, one with 3: the groups differ in size from the first step.
    let reads = reads_per_step(&model(), &[greedy(1), greedy(3)]);
    assert!(reads.len() > 3, "{reads:?}");
    assert!(reads.iter().all(|&r| r == 1), "reads per step: {reads:?}");
}

#[test]
fn a_sampling_step_reads_once_as_candidates_finish_at_different_steps() {
    let sampled = |n, seed| GenerationParams {
        num_candidates: n,
        seed,
        temperature: 1.5,
        top_p: 0.95,
        max_length: 24,
        ..Default::default()
    };
    let reads = reads_per_step(&model(), &[sampled(5, 7), sampled(2, 8)]);
    assert!(reads.len() > 3, "{reads:?}");
    assert!(reads.iter().all(|&r| r == 1), "reads per step: {reads:?}");
}

#[test]
fn a_beam_step_reads_once_for_all_its_requests() {
    let beam = GenerationParams { strategy: Strategy::Beam, num_beams: 3, num_candidates: 3, ..Default::default() };
    let reads = reads_per_step(&model(), &[beam.clone(), GenerationParams { num_beams: 2, num_candidates: 2, ..beam }]);
    assert!(reads.len() > 3, "{reads:?}");
    assert!(reads.iter().all(|&r| r == 1), "reads per step: {reads:?}");
}

fn beam(n: u32) -> GenerationParams {
    GenerationParams { strategy: Strategy::Beam, num_beams: n, num_candidates: n, max_length: 24, ..Default::default() }
}

#[test]
fn a_step_of_beam_and_greedy_rows_reads_once() {
    let greedy = |n| GenerationParams { num_candidates: n, strategy: Strategy::Greedy, ..Default::default() };
    // Groups of 1, 3 and 2 rows: uneven from the first step, and beams and greedy rows end apart.
    let reads = reads_per_step(&model(), &[greedy(1), beam(3), greedy(2)]);
    assert!(reads.len() > 3, "{reads:?}");
    assert!(reads.iter().all(|&r| r == 1), "reads per step: {reads:?}");
}

#[test]
fn a_step_of_beam_and_sampled_rows_reads_once() {
    // Top-k 50 on a 20-odd token vocabulary of the shapes model would be no top-k at all; 3
    // takes the top-k window's path, whose tie flag travels in the same read.
    let sampled = |n, seed, top_k| GenerationParams {
        num_candidates: n,
        seed,
        top_k,
        temperature: 1.5,
        max_length: 24,
        ..Default::default()
    };
    for top_k in [3, 0] {
        let reads = reads_per_step(&model(), &[sampled(4, 5, top_k), beam(2), sampled(1, 6, top_k)]);
        assert!(reads.len() > 3, "top_k {top_k}: {reads:?}");
        assert!(reads.iter().all(|&r| r == 1), "top_k {top_k}: reads per step: {reads:?}");
    }
}
