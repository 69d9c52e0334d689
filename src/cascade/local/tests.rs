//! The captioner on fake models: merging and ranking, what is refused before the models are
//! reached, the key a failure carries, and that validated requests are never refused later.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use super::*;
use crate::{
    backend::{GenerateOutput, GeneratedCaption, RankOutput, RankScore},
    images::FetchLimits,
    models::generation::GenerationParams,
    validate::{InvalidParam, SeedOrigin},
};

/// Models that generate fixed candidates and score a caption by its length, counting calls.
struct FakeModels {
    processor: ImageProcessor,
    candidates: Vec<&'static str>,
    calls: AtomicUsize,
}

impl Models for FakeModels {
    fn generator_processor(&self) -> Option<&ImageProcessor> {
        Some(&self.processor)
    }
    fn ranker_processor(&self) -> Option<&ImageProcessor> {
        Some(&self.processor)
    }
    fn max_positions(&self) -> u32 {
        20
    }
    fn prompt(&self, params: &ValidParams) -> Result<Prompt, InvalidParam> {
        match params.prompt.as_deref() {
            Some("bad") => Err(InvalidParam::new("prompt", "refused")),
            _ => Ok(Prompt { prefix: vec![1], strip: None }),
        }
    }
    fn tokenize(&self, captions: &[String]) -> Result<Vec<Vec<i64>>, InvalidParam> {
        Ok(captions.iter().map(|c| vec![c.len() as i64]).collect())
    }
    async fn generate_candidates(&self, _: GenerateInput, _: Admission) -> Result<GenerateOutput, EngineError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let caption = |t: &&str| GeneratedCaption { text: t.to_string(), token_ids: vec![] };
        Ok(GenerateOutput { candidates: self.candidates.iter().map(caption).collect() })
    }
    async fn score_captions(&self, input: RankInput, _: Admission) -> Result<RankOutput, EngineError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let total: i64 = input.captions.iter().map(|t| t[0]).sum();
        let score = |t: &Vec<i64>| RankScore {
            probability: t[0] as f32 / total as f32,
            cosine: 0.0,
            logit: (t[0] as f32).ln(),
        };
        Ok(RankOutput { scores: input.captions.iter().map(score).collect() })
    }
}

fn captioner(candidates: Vec<&'static str>) -> Captioner<FakeModels> {
    let processor = ImageProcessor::from_json(
        r#"{"size": {"height": 8, "width": 8}, "image_mean": [0.5,0.5,0.5], "image_std": [0.5,0.5,0.5]}"#,
    )
    .unwrap();
    let limits = RequestLimits {
        generation: GenerationLimits { max_candidates: 16, max_length: 40 },
        captions: CaptionLimits { max_captions: 8, max_caption_bytes: 64 },
        max_inflight: 4,
        decode: DecodeLimits::default(),
        max_concurrent_decodes: 1,
    };
    let models = FakeModels { processor, candidates, calls: AtomicUsize::new(0) };
    Captioner::new(models, Fetcher::new(FetchLimits::default()).unwrap(), ImageCache::new(1 << 20), limits)
}

fn png() -> ImageSource {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(5, 4).write_to(&mut out, image::ImageFormat::Png).unwrap();
    ImageSource::Bytes(Arc::new(out.into_inner()))
}

fn defaults(c: &Captioner<FakeModels>) -> ValidParams {
    c.validator().params(c.validator().defaults().clone(), SeedOrigin::Caller).unwrap()
}

#[tokio::test]
async fn caption_merges_duplicates_ranks_them_and_keeps_the_top_k() {
    let c = captioner(vec!["a cat", "a dog sits", "a cat", "a"]);
    // The position limit of the models caps the request limit.
    assert_eq!(c.validator().generation_limits().max_length, 20);
    let out = c.caption(png(), defaults(&c), Listing::merged(2), Admission::default()).await.unwrap();
    assert_eq!(out.candidates, ["a cat", "a dog sits", "a cat", "a"]);
    // Logits ln(len): over all four candidates, "a cat" has 5+5 of 5+10+5+1.
    let got: Vec<_> = out.captions.iter().map(|r| (r.text.as_str(), r.count, r.index)).collect();
    assert_eq!(got, [("a cat", 2, 0), ("a dog sits", 1, 1)]);
    assert!((out.captions[0].probability - 10.0 / 21.0).abs() < 1e-6);
    let each = Listing { top_k: 3, each_candidate: true };
    let out = c.caption(png(), defaults(&c), each, Admission::default()).await.unwrap();
    let got: Vec<_> = out.captions.iter().map(|r| (r.text.as_str(), r.count, r.index)).collect();
    assert_eq!(got, [("a dog sits", 1, 1), ("a cat", 1, 0), ("a cat", 1, 2)]);
    assert!(out.key.starts_with("sha256:"));
}

#[tokio::test]
async fn a_refused_prompt_never_reaches_the_models_and_the_failure_carries_the_key() {
    let c = captioner(vec!["x"]);
    let bad = c
        .validator()
        .params(GenerationParams { prompt: Some("bad".into()), ..c.validator().defaults().clone() }, SeedOrigin::Caller)
        .unwrap();
    let failed = c.generate(png(), bad, Admission::default()).await.unwrap_err();
    assert!(matches!(failed.error, CascadeError::Invalid(_)));
    assert!(failed.key.is_some_and(|k| k.starts_with("sha256:")), "the image was named before the prompt was refused");
    assert_eq!(c.models().calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_url_is_named_once_and_an_unfetchable_one_fails_with_its_key() {
    let c = captioner(vec!["x"]);
    let url = "http://127.0.0.1:9/missing.png".to_string();
    let failed = c
        .caption(ImageSource::Url(url.clone()), defaults(&c), Listing::merged(1), Admission::default())
        .await
        .unwrap_err();
    assert_eq!(failed.key.as_deref(), Some(url.as_str()));
    let refused = c
        .rank(
            ImageSource::Url("ftp://x/y.png".into()),
            c.validator().captions(vec!["a".into()]).unwrap(),
            Admission::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(refused.error, CascadeError::Image(_)));
    assert_eq!(refused.key, None, "a URL that is not fetchable names no image");
    assert_eq!(c.models().calls.load(Ordering::SeqCst), 0);
}

/// What passed validation is never refused later for its parameters: only the prompt's tokens,
/// which need the tokenizer, are checked after it.
#[tokio::test]
async fn a_validated_request_is_never_refused_later_for_its_parameters() {
    use rand::{rngs::StdRng, SeedableRng};
    let c = captioner(vec!["a cat", "a dog"]);
    let mut rng = StdRng::seed_from_u64(26);
    let mut accepted = 0;
    for _ in 0..3000 {
        let request = crate::validate::tests::any_request(&mut rng);
        let Ok(params) = c.validator().request(Some(request.clone())) else { continue };
        accepted += 1;
        let listing = c.validator().listing(Some(2), false).unwrap();
        match c.caption(png(), params, listing, Admission::default()).await {
            Ok(_) => {}
            Err(Failed { error: CascadeError::Invalid(e), .. }) => panic!("{e} for the validated {request:?}"),
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(accepted > 50, "only {accepted} requests validated");
}
