//! Beam search bookkeeping for one request, with the reference's semantics: each step keeps the
//! 2·k best continuations of the k running beams; continuations that end (end token or length
//! limit) among the top k become finished hypotheses scored `sum / generated_len^length_penalty`;
//! the next running beams are the k best that did not end. Decoding stops when k hypotheses are
//! finished and `early_stopping` is set, when no running beam can beat the worst finished one
//! (judged at the current length), or when every continuation has ended.

/// Score that marks an empty or excluded slot, as the reference uses.
const EXCLUDED: f32 = -1.0e9;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamParams {
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: bool,
    pub max_length: usize,
    pub eos: i64,
}

#[derive(Debug, Clone)]
pub struct BeamState {
    params: BeamParams,
    prompt_len: usize,
    /// Running beams' scores (sum of log-probabilities), best first.
    running_scores: Vec<f32>,
    /// Finished hypotheses: (tokens, length-penalised score, is a real hypothesis), best first.
    finished: Vec<(Vec<i64>, f32, bool)>,
    improvable: bool,
}

/// What one step decided for the request's k rows.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamStep {
    /// For each next running beam: the index (0..k) of the beam it continues, and its new token.
    pub next: Vec<(usize, i64)>,
    /// Set when the search is over: the finished hypotheses, best first.
    pub done: Option<Vec<Vec<i64>>>,
}

impl BeamState {
    pub fn new(params: BeamParams, prompt_len: usize) -> Self {
        let k = params.num_beams;
        // Only the first of the k identical initial beams may expand, or the first step would
        // return k copies of the same continuation.
        let mut running_scores = vec![EXCLUDED; k];
        running_scores[0] = 0.0;
        Self { params, prompt_len, running_scores, finished: vec![(Vec::new(), EXCLUDED, false); k], improvable: true }
    }

    pub fn num_beams(&self) -> usize {
        self.params.num_beams
    }

    /// Scores each beam's next-token log-probabilities are added to.
    pub fn running_scores(&self) -> &[f32] {
        &self.running_scores
    }

    /// Consumes the top `2k` (score, flat index over `k × vocab`) continuations, best first, where
    /// each score already includes its beam's running score. `running` holds each beam's tokens.
    pub fn step(&mut self, top: &[(f32, i64)], vocab: i64, running: &[Vec<i64>]) -> BeamStep {
        let k = self.params.num_beams;
        let cur_len = running[0].len();
        let candidates: Vec<(usize, i64, f32, bool)> = top
            .iter()
            .map(|&(score, flat)| {
                let (beam, token) = ((flat / vocab) as usize, flat % vocab);
                let ends = token == self.params.eos || cur_len + 1 >= self.params.max_length;
                (beam, token, score, ends)
            })
            .collect();

        // Next running beams: the best continuations that did not end.
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        let running_score = |i: usize| candidates[i].2 + if candidates[i].3 { EXCLUDED } else { 0.0 };
        order.sort_by(|&a, &b| running_score(b).total_cmp(&running_score(a)));
        let chosen: Vec<usize> = order.into_iter().take(k).collect();
        let next: Vec<(usize, i64)> = chosen.iter().map(|&i| (candidates[i].0, candidates[i].1)).collect();
        let next_scores: Vec<f32> = chosen.iter().map(|&i| running_score(i)).collect();

        // Finished hypotheses: ended continuations among the top k join the k best so far.
        let all_finished = self.finished.iter().all(|f| f.2);
        let blocked = (all_finished && self.params.early_stopping) || !self.improvable;
        let generated = (cur_len + 1 - self.prompt_len) as f32;
        let mut merged = std::mem::take(&mut self.finished);
        for (j, &(beam, token, score, ends)) in candidates.iter().enumerate() {
            let qualifies = ends && j < k;
            let mut s = score / generated.powf(self.params.length_penalty);
            if blocked {
                s += EXCLUDED;
            }
            if !qualifies {
                s += EXCLUDED;
            }
            let mut tokens = running[beam].clone();
            tokens.push(token);
            merged.push((tokens, s, qualifies));
        }
        // Stable: earlier (older) entries win ties, as the reference's top-k over the merged list.
        merged.sort_by(|a, b| b.1.total_cmp(&a.1));
        merged.truncate(k);
        self.finished = merged;
        self.running_scores = next_scores;

        // Can a running beam still beat the worst finished hypothesis?
        let cur_len = cur_len + 1;
        if self.finished.iter().all(|f| f.2) {
            let best_running =
                self.running_scores[0] / ((cur_len - self.prompt_len) as f32).powf(self.params.length_penalty);
            let worst = self.finished.iter().map(|f| f.1).fold(f32::INFINITY, f32::min);
            self.improvable &= best_running > worst;
        }
        let all_finished = self.finished.iter().all(|f| f.2);
        let all_ended = candidates.iter().all(|c| c.3);
        let over = !self.improvable || (all_finished && self.params.early_stopping) || all_ended;
        let done = over.then(|| self.finished.iter().map(|f| f.0.clone()).collect());
        BeamStep { next, done }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(k: usize, early_stopping: bool) -> BeamParams {
        BeamParams { num_beams: k, length_penalty: 1.0, early_stopping, max_length: 10, eos: 9 }
    }

    #[test]
    fn first_step_expands_only_the_first_beam_and_an_early_eos_finishes() {
        let mut s = BeamState::new(params(2, true), 1);
        assert_eq!(s.running_scores(), [0.0, EXCLUDED]);
        // vocab 10; candidates best first: eos from beam 0, token 3 from beam 0, token 4, token 5.
        let top = [(-0.1, 9), (-0.5, 3), (-0.7, 4), (-2.0, 5)];
        let step = s.step(&top, 10, &[vec![0], vec![0]]);
        assert_eq!(step.next, [(0, 3), (0, 4)]);
        assert!(step.done.is_none());
        assert_eq!(s.finished[0], (vec![0, 9], -0.1, true));
        // Second step: both continuations end; with early stopping the search is over.
        let top = [(-0.6, 9), (-0.8, 19), (-3.0, 1), (-3.5, 2)];
        let step = s.step(&top, 10, &[vec![0, 3], vec![0, 4]]);
        let done = step.done.expect("two finished hypotheses and early stopping");
        assert_eq!(done, [vec![0, 9], vec![0, 3, 9]]);
    }

    #[test]
    fn without_early_stopping_it_stops_only_when_no_running_beam_can_win() {
        let mut s = BeamState::new(params(1, false), 1);
        let step = s.step(&[(-0.2, 9), (-0.3, 4)], 10, &[vec![0]]);
        // One finished hypothesis at -0.2/1; the running beam at -0.3/1 cannot beat it.
        assert_eq!(step.done, Some(vec![vec![0, 9]]));
        let mut s = BeamState::new(params(1, false), 1);
        let step = s.step(&[(-0.3, 4), (-0.2, 9)], 10, &[vec![0]]);
        // eos is outside the top k = 1: it does not count as a hypothesis.
        assert!(step.done.is_none());
        assert_eq!(step.next, [(0, 4)]);
    }

    #[test]
    fn the_length_limit_ends_every_continuation() {
        let mut s = BeamState::new(BeamParams { max_length: 2, ..params(2, false) }, 1);
        let step = s.step(&[(-0.1, 3), (-0.2, 4), (-0.3, 5), (-0.4, 6)], 10, &[vec![0], vec![0]]);
        assert_eq!(step.done, Some(vec![vec![0, 3], vec![0, 4]]));
    }
}
