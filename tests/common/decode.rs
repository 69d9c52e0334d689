//! What decode tests feed BLIP's text decoder: scene images encoded one at a time (so a request
//! reads the same numbers alone or batched) and the model's special tokens.

use std::path::Path;

use caption_cascade::{
    images::{decode_image, DecodeLimits},
    models::{
        blip::{Blip, SpecialTokens},
        preprocess,
    },
};
use rand::{rngs::StdRng, SeedableRng};
use tch::Tensor;

use super::scenes::draw_scene;

pub const BLIP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-blip");

/// Image embeddings of the scenes of `seeds`, each encoded on its own.
pub fn embeds(blip: &Blip, seeds: &[u64]) -> Tensor {
    let each: Vec<Tensor> = seeds
        .iter()
        .map(|&seed| {
            let scene = draw_scene(&mut StdRng::seed_from_u64(seed));
            let img = decode_image(&scene.png(), &DecodeLimits::default()).unwrap();
            let p = preprocess::load(Path::new(BLIP)).unwrap().pixels(&img).unwrap();
            blip.encode_image(&Tensor::from_slice(&p.data).view([1, 3, i64::from(p.height), i64::from(p.width)]))
        })
        .collect();
    Tensor::cat(&each, 0)
}

pub fn special(blip: &Blip) -> SpecialTokens {
    SpecialTokens { bos: blip.config.text_config.bos_token_id, eos: blip.config.text_config.sep_token_id }
}
