//! A CUDA graph capture that fails (emulated here) turns graphs off for its executor, which keeps
//! serving: the decode batch it was in, and the ones after, caption exactly as eager decoding does.
//! Graphs captured for every bucket up front (as a CUDA executor does at start) leave serving
//! nothing to capture.

use std::path::Path;

use caption_cascade::models::{
    blip::{Blip, DecodeBatch, DecodeRequest, Decoded, SpecialTokens},
    generation::{GenerationParams, Strategy},
    graphs::{self, GraphMode, WholeStep},
};
use tch::{Device, Kind, Tensor};

const BLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-blip");

fn decode(blip: &Blip, embeds: &Tensor) -> Vec<Decoded> {
    let sp = SpecialTokens { bos: blip.config.text_config.bos_token_id, eos: blip.config.text_config.sep_token_id };
    let params = |id, n| DecodeRequest {
        id,
        params: GenerationParams { num_candidates: n, strategy: Strategy::Greedy, ..Default::default() },
        prefix: vec![sp.bos],
    };
    let (mut done, _) = DecodeBatch::new(&blip.text_decoder, sp, embeds, &[params(0, 2), params(1, 3)]).run_to_end();
    done.sort_by_key(|d| d.id);
    done
}

#[test]
fn a_failed_capture_leaves_the_executor_serving_eagerly() {
    let _g = tch::no_grad_guard();
    let mut blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    tch::manual_seed(3);
    let size = blip.config.vision_config.image_size;
    let embeds = blip.encode_image(&Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu)));
    let eager = decode(&blip, &embeds);

    blip.text_decoder.set_graph_mode(GraphMode::Emulated);
    assert_eq!(decode(&blip, &embeds), eager, "emulated graphs decode as eager steps do");
    let (captured, off) = graphs::on_this_executor();
    assert!(captured > 0 && !off);

    // A fresh model: its pieces are captured anew, and the first capture fails.
    let mut fresh = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    fresh.text_decoder.set_graph_mode(GraphMode::Emulated);
    graphs::fail_next_emulated_capture();
    assert_eq!(decode(&fresh, &embeds), eager, "the batch whose capture failed");
    assert_eq!(graphs::on_this_executor(), (0, true), "the executor's graphs are gone, none made since");
    assert_eq!(decode(&blip, &embeds), eager, "later batches, of either model");
    assert_eq!(graphs::on_this_executor(), (0, true));
}

#[test]
fn graphs_captured_up_front_cover_every_step_that_follows() {
    let _g = tch::no_grad_guard();
    let mut blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    tch::manual_seed(4);
    let size = blip.config.vision_config.image_size;
    let embeds = blip.encode_image(&Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu)));
    let eager = decode(&blip, &embeds);

    blip.text_decoder.set_graph_mode(GraphMode::Emulated);
    // Two requests of 2 and 3 candidates: steps of 5, then fewer rows as candidates finish.
    blip.text_decoder.set_graph_rows(5);
    assert_eq!(graphs::on_this_executor(), (0, false));
    assert_eq!(blip.text_decoder.capture_graphs(), 4, "buckets 1, 2, 4 and 8");
    let (captured, off) = graphs::on_this_executor();
    let layers = blip.config.text_config.num_hidden_layers as usize;
    assert_eq!((captured, off), (4 * (2 + 3 * layers), false), "every piece at every bucket");
    assert_eq!(decode(&blip, &embeds), eager);
    assert_eq!(graphs::on_this_executor(), (captured, false), "serving captured nothing new");
}

#[test]
fn a_failed_whole_step_capture_leaves_the_batch_decoding_through_the_layers() {
    let _g = tch::no_grad_guard();
    let mut blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    tch::manual_seed(5);
    let size = blip.config.vision_config.image_size;
    let embeds = blip.encode_image(&Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu)));
    let eager = decode(&blip, &embeds);

    blip.text_decoder.set_graph_mode(GraphMode::Emulated);
    let v = &blip.config.vision_config;
    let limits = WholeStep { images: 2, per_image: 4, positions: 40 };
    blip.text_decoder.set_graph_rows(8);
    blip.text_decoder.set_whole_step(Some(limits), (v.image_size / v.patch_size).pow(2) + 1);
    // The first step runs through the layers (its pieces captured); the second is the first whole
    // step, and its capture fails.
    let sp = SpecialTokens { bos: blip.config.text_config.bos_token_id, eos: blip.config.text_config.sep_token_id };
    let reqs = |n: u32, id| DecodeRequest {
        id,
        params: GenerationParams { num_candidates: n, strategy: Strategy::Greedy, ..Default::default() },
        prefix: vec![sp.bos],
    };
    let mut batch = DecodeBatch::new(&blip.text_decoder, sp, &embeds, &[reqs(2, 0), reqs(3, 1)]);
    let mut done = batch.step();
    graphs::fail_next_emulated_capture();
    while !batch.is_done() {
        done.extend(batch.step());
    }
    done.sort_by_key(|d| d.id);
    assert_eq!(done, eager, "the step whose capture failed, and the steps after it");
    assert_eq!(graphs::on_this_executor(), (0, true));
}
