//! A step through the model's layers: the first step (each row's whole prefix), beam steps, and
//! whatever a whole step cannot hold; its pieces are graphed where graphs are on.

use tch::{Kind, Tensor};

use super::{DecodeBatch, LiveRows, Row};
use crate::models::{
    blip::{
        request::Decoded,
        slots::{LiveRow, SlotBuffers, StepSlots},
        CrossAttnCache, SelfAttnCache,
    },
    generation::logits,
    transfer::{self, Upload},
};

impl DecodeBatch<'_> {
    /// A step through the model's layers (piece by piece, some pieces graphed): the first step,
    /// beam steps, and whatever a whole step cannot hold. Returns every row's next token, the
    /// beam requests finished and their ids.
    pub(super) fn layered_step(&mut self) -> (Vec<i64>, Vec<Decoded>, Vec<u64>) {
        let n = self.rows.len() as i64;
        // The live rows' slots, when they are not simply slots `0..n` in order.
        let live: Option<Tensor>;
        let hidden = if self.steps == 0 {
            // The first step runs each row's whole prefix; rows are slots `0..n` and images
            // `0..images` in order, and the cache it fills becomes the batch's slots as is.
            let flat: Vec<i64> = self.rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
            let len = self.rows[0].tokens.len() as i64;
            let ids = Tensor::from_slice(&flat).view([n, len]).upload(self.device);
            let positions = Tensor::arange(len, (Kind::Int64, self.device)).unsqueeze(0).expand([n, len], false);
            let mut cache = SelfAttnCache::reserving(self.reserve);
            let groups = self.rows_per_image();
            let cross = CrossAttnCache::from_layers(self.cross.layers(), groups.len() as i64);
            let hidden = self.decoder.forward_at(&ids, &positions, &mut cache, &cross, &groups, None);
            self.cache = SlotBuffers::adopt(cache.into_layers());
            live = None;
            hidden
        } else {
            let rows: Vec<LiveRow> = self
                .rows
                .iter()
                .map(|r| LiveRow { slot: r.slot, len: r.tokens.len() as i64 - 1, image: r.image, index: r.candidate })
                .collect();
            let width = rows.iter().map(|r| r.len + 1).max().unwrap_or(1);
            let room = self.cache.size(2);
            if width > room {
                // Geometric growth: a history that outgrows its room copies the cache
                // O(log(max_length)) times, not once every few steps.
                self.cache.reserve(self.cache.slots(), 2, width.max(room + room / 2));
            }
            let slots =
                StepSlots::new(&rows, self.row_slots.used(), self.image_slots.used(), self.decoder.kind(), self.device);
            let last: Vec<i64> = self.rows.iter().map(|r| *r.tokens.last().expect("prefix")).collect();
            let pos: Vec<i64> = rows.iter().map(|r| r.len).collect();
            let ids = Tensor::from_slice(&last).view([n, 1]).upload(self.device);
            let positions = Tensor::from_slice(&pos).view([n, 1]).upload(self.device);
            let hidden = self.decoder.forward_slots(&ids, &positions, &mut self.cache, &self.cross, &slots);
            live = slots.row_slots;
            hidden
        };
        let scores = self.decoder.next_token_logits(&hidden).to_kind(Kind::Float);
        let (seen, params) = match &live {
            None => (self.seen.narrow(0, 0, n), self.row_params.narrow(n)),
            Some(idx) => (self.seen.index_select(0, idx), self.row_params.select(idx)),
        };
        let too_short: Vec<bool> = self.rows.iter().map(Row::too_short).collect();
        let rows = LiveRows { seen, params, too_short: Tensor::from_slice(&too_short).upload(self.device) };
        if self.recorded.is_some() {
            let processed = logits::suppress_eos(
                &logits::repetition_penalty(&scores, &rows.seen, &rows.params.repetition_penalty),
                &rows.too_short,
                self.special.eos,
            );
            self.record(processed, false);
        }
        // Every row's chosen token (greedy and sampled rows) and every beam request's best
        // continuations are computed on the device first and come back in one read: a step waits
        // on the device once, whatever mix of strategies its rows follow.
        let all_beams = self.rows.iter().all(|r| self.beams.contains_key(&r.request));
        let choice = (!all_beams).then(|| self.choose_tokens(&scores, &rows));
        let beam_query = (!self.beams.is_empty()).then(|| self.beam_candidates(&scores, &rows));
        let mut parts: Vec<Tensor> = Vec::new();
        if let Some(c) = &choice {
            parts.push(c.read.to_kind(Kind::Double));
        }
        if let Some((spans, t)) = &beam_query {
            if !spans.is_empty() {
                parts.push(t.shallow_clone());
            }
        }
        let read = if parts.is_empty() { Vec::new() } else { transfer::read::<f64>(&Tensor::cat(&parts, 0)) };
        let (chosen, beam_read) = read.split_at(choice.as_ref().map_or(0, |c| c.read.size()[0] as usize));
        let mut next = match choice {
            Some(c) => c.tokens(chosen, &rows.params),
            None => vec![0; self.rows.len()],
        };
        let mut done = Vec::new();
        let mut beam_finished: Vec<u64> = Vec::new();
        if let Some((spans, _)) = beam_query {
            let (src, tokens, finished) = self.advance_beams(spans, beam_read, scores.size()[1]);
            self.reorder_rows(&src);
            for (i, t) in tokens {
                next[i] = t;
            }
            for (id, mut hyps) in finished {
                let n =
                    self.rows.iter().find(|r| r.request == id).map_or(hyps.len(), |r| r.params.num_candidates as usize);
                hyps.truncate(n);
                done.push(Decoded { id, candidates: hyps });
                beam_finished.push(id);
            }
        }
        (next, done, beam_finished)
    }
}
