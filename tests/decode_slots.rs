//! A running decode batch keeps its rows and images in fixed slots: rows that join take free
//! slots and rows that finish leave dead ones, without copying the cross-attention keys and
//! values of the images that stay (the buffers keep their address); slots are compacted only when
//! occupancy falls below the threshold; and every request still gets what it gets alone.

mod common;

use std::path::Path;

use caption_cascade::models::{
    blip::{Blip, DecodeBatch, DecodeRequest, Decoded},
    generation::{GenerationParams, Strategy},
};
use common::decode::{embeds, special, BLIP};
use tch::Device;

/// `n` candidates of exactly `len` tokens (greedy, or sampled with `seed`).
fn fixed(id: u64, n: u32, len: u32, sampled: Option<u64>) -> DecodeRequest {
    let strategy = if sampled.is_some() { Strategy::Sample } else { Strategy::Greedy };
    let params = GenerationParams {
        num_candidates: n,
        strategy,
        seed: sampled.unwrap_or(0),
        temperature: 1.3,
        min_length: len,
        max_length: len,
        ..Default::default()
    };
    DecodeRequest { id, params, prefix: vec![0] }
}

fn with_bos(blip: &Blip, mut r: DecodeRequest) -> DecodeRequest {
    r.prefix = vec![special(blip).bos];
    r
}

fn alone(blip: &Blip, seed: u64, req: &DecodeRequest) -> Decoded {
    let e = embeds(blip, &[seed]);
    let (mut done, _) = DecodeBatch::new(&blip.text_decoder, special(blip), &e, std::slice::from_ref(req)).run_to_end();
    done.remove(0)
}

/// Steps `batch` until request `id` is done; returns what finished meanwhile.
fn until_done(batch: &mut DecodeBatch, id: u64) -> Vec<Decoded> {
    let mut done = Vec::new();
    while !done.iter().any(|d: &Decoded| d.id == id) {
        assert!(!batch.is_done(), "request {id} never finished");
        done.extend(batch.step());
    }
    done
}

#[test]
fn rows_join_and_leave_through_free_slots_without_copying_the_images_that_stay() {
    let _g = tch::no_grad_guard();
    let blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let sp = special(&blip);
    let a = with_bos(&blip, fixed(1, 2, 6, None));
    let b = with_bos(&blip, fixed(2, 3, 24, Some(5)));
    let c = with_bos(&blip, fixed(3, 2, 9, Some(6)));
    let expected = [alone(&blip, 1, &a), alone(&blip, 2, &b), alone(&blip, 3, &c)];

    let e = embeds(&blip, &[1, 2]);
    let mut running = DecodeBatch::new(&blip.text_decoder, sp, &e, &[a, b]);
    let mut done = running.step();
    let start = running.slot_stats();
    assert_eq!((start.row_slots, start.image_slots), (5, 2), "room for exactly the rows there are");
    assert!(start.positions < 24, "a CPU's cache is not made for max_length up front: {start:?}");

    // a's 2 rows leave: their slots die, nothing moves (3 of 5 live is above the threshold).
    done.extend(until_done(&mut running, 1));
    let after_leave = running.slot_stats();
    assert_eq!(after_leave.compactions, 0);
    assert_eq!(after_leave.rows_used, 5, "b's rows stay in their slots");

    // c (2 rows, 1 image) takes the free slots: the buffers are not made anew.
    let ec = embeds(&blip, &[3]);
    let mut joiner = DecodeBatch::new(&blip.text_decoder, sp, &ec, &[c]);
    done.extend(joiner.step());
    running.join(joiner);
    let after_join = running.slot_stats();
    assert_eq!((after_join.row_slots, after_join.image_slots), (5, 2));
    assert_eq!(after_join.cross_ptr, start.cross_ptr, "the cross-attention keys and values did not move");
    assert_eq!(after_join.cross_reallocations, start.cross_reallocations);
    assert_eq!(after_join.cache_ptr, after_leave.cache_ptr, "neither did the self-attention cache");
    assert_eq!(after_join.cache_reallocations, after_leave.cache_reallocations);

    while !running.is_done() {
        done.extend(running.step());
    }
    assert_eq!(running.slot_stats().cross_ptr, start.cross_ptr);
    done.sort_by_key(|d| d.id);
    assert_eq!(done, expected);
}

#[test]
fn a_join_beyond_the_free_slots_grows_the_buffers_geometrically() {
    let _g = tch::no_grad_guard();
    let blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let sp = special(&blip);
    let e = embeds(&blip, &[1]);
    let mut running = DecodeBatch::new(&blip.text_decoder, sp, &e, &[with_bos(&blip, fixed(1, 2, 12, None))]);
    running.step();
    let before = running.slot_stats();
    let mut joiner = DecodeBatch::new(&blip.text_decoder, sp, &e, &[with_bos(&blip, fixed(2, 1, 12, None))]);
    joiner.step();
    running.join(joiner);
    let after = running.slot_stats();
    assert_eq!((before.row_slots, after.row_slots), (2, 3), "grown by half, at least what is needed");
    assert_eq!((before.image_slots, after.image_slots), (1, 2));
    assert_eq!(after.cross_reallocations, before.cross_reallocations + 1);
}

#[test]
fn slots_are_compacted_below_the_threshold_and_results_stay_the_same() {
    let _g = tch::no_grad_guard();
    let blip = Blip::load(Path::new(BLIP), Device::Cpu).unwrap();
    let sp = special(&blip);
    // Two short requests of 2 rows each and a long one of 1 row, last: once the short ones end,
    // 1 row of 5 and 1 image of 3 are live, both below half.
    let reqs = [
        with_bos(&blip, fixed(1, 2, 5, Some(1))),
        with_bos(&blip, fixed(2, 2, 5, None)),
        with_bos(&blip, fixed(3, 1, 20, Some(3))),
    ];
    let expected: Vec<Decoded> = reqs.iter().zip(1..).map(|(r, seed)| alone(&blip, seed, r)).collect();
    let e = embeds(&blip, &[1, 2, 3]);
    let mut running = DecodeBatch::new(&blip.text_decoder, sp, &e, &reqs);
    let mut done = until_done(&mut running, 2);
    let stats = running.slot_stats();
    assert_eq!(stats.compactions, 2, "rows and images compacted: {stats:?}");
    assert_eq!((stats.rows_used, stats.images_used), (1, 1));
    assert_eq!((stats.row_slots, stats.image_slots), (5, 3), "compaction keeps the high-water mark");
    while !running.is_done() {
        done.extend(running.step());
    }
    done.sort_by_key(|d| d.id);
    assert_eq!(done, expected);
}
