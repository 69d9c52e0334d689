//! CUDA graphs for decode steps. A one-token step at a few hundred rows launches some 300 small
//! kernels, and on a GPU the launches, not the arithmetic, set its pace. The pieces between
//! attentions (projections, norms, the feed-forward block, the LM head) depend on nothing but
//! their rows, so each is captured once per row bucket and replayed; attention, whose shapes
//! change with the cache and the image groups, runs between them as usual. A whole step whose
//! shapes depend on its buckets alone (over a fixed-capacity arena, `blip::arena`) is captured
//! through the same [`run`], as one piece.
//!
//! A piece's inputs are copied into static buffers padded to the bucket, the graph replays on the
//! executor's stream, and its outputs are views of the graph's own memory, valid until the piece
//! replays again (the next step). Graphs live with the executor thread that captured them: a
//! replay writes the graph's memory, so two streams must never share one.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use tch::Tensor;

/// How a model runs the pieces of its decode steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraphMode {
    /// Every kernel launched as it comes.
    #[default]
    Off,
    /// Captured into CUDA graphs and replayed (a CUDA device, on an executor's own stream).
    Cuda,
    /// The same buckets, static buffers and copies as `Cuda`, with each replay run again eagerly:
    /// checks the graphed path's bookkeeping on any device.
    Emulated,
}

/// Identifies one piece of one model: graphs of different models never mix, even when a model is
/// dropped and another is loaded in its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner(u64);

impl Owner {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for Owner {
    fn default() -> Self {
        Self::new()
    }
}

/// What a decode step captured whole (`--cuda-graphs=whole`) must hold besides its rows (the
/// most rows a step may hold, as for the pieces): its fixed-capacity buffers are made for this
/// much once per executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WholeStep {
    /// Images a step may hold (`--generate-max-batch`).
    pub images: i64,
    /// Rows one image may have (`--max-candidates`).
    pub per_image: i64,
    /// The longest history (`--max-length`).
    pub positions: i64,
}

/// A piece's computation: outputs from inputs, row by row.
pub type Body<'a> = &'a dyn Fn(&[&Tensor]) -> Vec<Tensor>;

/// The most rows a piece is captured for; larger steps are long enough to launch eagerly.
pub const MAX_ROWS: i64 = 512;

/// The rows a step of `rows` is padded to: powers of two up to 64, then multiples of 64, so a few
/// graphs per piece cover every size with at most half the rows wasted (a third above 128).
pub fn bucket(rows: i64) -> Option<i64> {
    match rows {
        r if !(1..=MAX_ROWS).contains(&r) => None,
        r if r <= 64 => Some((r as u64).next_power_of_two() as i64),
        r => Some((r + 63) / 64 * 64),
    }
}

/// Every bucket a step of up to `rows` rows may be padded to, smallest first.
pub fn buckets_up_to(rows: i64) -> Vec<i64> {
    let mut buckets: Vec<i64> = (1..=rows.min(MAX_ROWS)).filter_map(bucket).collect();
    buckets.dedup();
    buckets
}

/// Runs piece `piece` of `owner`: `f` maps `inputs` (each `[rows, ...]`) to outputs (each
/// `[rows, ...]`) row by row, so row `i` of every output depends on row `i` of the inputs alone.
/// With `mode` off, rows outside the buckets, or graphs turned off on this executor after a
/// failed capture, `f` runs as is.
pub fn run(mode: GraphMode, owner: Owner, piece: u32, inputs: &[&Tensor], f: Body) -> Vec<Tensor> {
    let rows = inputs.first().map_or(0, |t| t.size()[0]);
    let Some(padded) = bucket(rows).filter(|_| mode != GraphMode::Off && !OFF.get()) else {
        return f(inputs);
    };
    let key = Key { owner, piece, rows: padded };
    let replayed = GRAPHS.with(|graphs| {
        let mut graphs = graphs.borrow_mut();
        let captured = match graphs.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Captured::capture(mode, padded, inputs, f)?),
        };
        Some(captured.replay(inputs, f).unwrap_or_else(|| {
            tracing::warn!(piece, rows = padded, "a CUDA graph failed to replay; this step runs eagerly");
            f(inputs)
        }))
    });
    replayed.unwrap_or_else(|| {
        // A capture that failed may have left its memory pool half set up: this executor's graphs
        // go (with them the pool they share) and it serves eagerly from now on.
        tracing::warn!(
            piece,
            rows = padded,
            "a decode-step piece could not be captured as a CUDA graph; this executor runs eagerly from now on"
        );
        OFF.set(true);
        GRAPHS.with(|graphs| graphs.borrow_mut().clear());
        f(inputs)
    })
}

/// Drops this executor's graphs of `owner` (whose buffers are going away).
pub fn forget(owner: Owner) {
    GRAPHS.with(|graphs| graphs.borrow_mut().retain(|k, _| k.owner != owner));
}

/// Whether graphs were turned off on this executor after a failed capture.
pub fn off_here() -> bool {
    OFF.get()
}

/// Graphs this executor thread holds, and whether a failed capture turned them off here.
pub fn on_this_executor() -> (usize, bool) {
    (GRAPHS.with(|g| g.borrow().len()), OFF.get())
}

/// Makes this thread's next emulated capture fail, as a CUDA capture can: the failure path on any
/// device.
#[doc(hidden)]
pub fn fail_next_emulated_capture() {
    FAIL_NEXT.set(true);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    owner: Owner,
    piece: u32,
    rows: i64,
}

thread_local! {
    static GRAPHS: RefCell<HashMap<Key, Captured>> = RefCell::new(HashMap::new());
    /// Set once a capture failed on this executor: no more captures or replays here.
    static OFF: Cell<bool> = const { Cell::new(false) };
    static FAIL_NEXT: Cell<bool> = const { Cell::new(false) };
}

struct Captured {
    graph: Option<Graph>,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

impl Captured {
    /// The piece's static buffers and its graph; `None` when the capture failed.
    fn capture(mode: GraphMode, rows: i64, inputs: &[&Tensor], f: Body) -> Option<Self> {
        let statics: Vec<Tensor> = inputs
            .iter()
            .map(|t| {
                let mut size = t.size();
                size[0] = rows;
                let buffer = Tensor::zeros(size.as_slice(), (t.kind(), t.device()));
                buffer.narrow(0, 0, t.size()[0]).copy_(t);
                buffer
            })
            .collect();
        // A first eager run makes libtorch's lazy set-up (library handles, workspaces) happen
        // outside the capture, where it is not allowed. It runs on the step's own inputs: a
        // piece that writes state (a whole step writes the cache) then writes what the step
        // itself will write, never zeros over a live row.
        let refs: Vec<&Tensor> = statics.iter().collect();
        let outputs = f(&refs);
        if mode == GraphMode::Emulated {
            return (!FAIL_NEXT.replace(false)).then_some(Captured { graph: None, inputs: statics, outputs });
        }
        let (graph, outputs) = Graph::record(|| f(&refs))?;
        Some(Captured { graph: Some(graph), inputs: statics, outputs })
    }
}

impl Captured {
    /// Copies `inputs` into the static buffers, replays, and returns the outputs' first rows.
    fn replay(&self, inputs: &[&Tensor], f: Body) -> Option<Vec<Tensor>> {
        let rows = inputs[0].size()[0];
        for (buffer, input) in self.inputs.iter().zip(inputs) {
            buffer.narrow(0, 0, rows).copy_(input);
        }
        match &self.graph {
            Some(graph) => graph.replay().then_some(())?,
            None => {
                for (out, fresh) in self.outputs.iter().zip(f(&self.inputs.iter().collect::<Vec<_>>())) {
                    out.shallow_clone().copy_(&fresh);
                }
            }
        }
        Some(self.outputs.iter().map(|o| o.narrow(0, 0, rows)).collect())
    }
}

/// An instantiated CUDA graph (libtorch's `at::cuda::CUDAGraph`, through the CUDA shim). A build
/// without the shim never makes one.
#[cfg_attr(not(cuda_streams), allow(dead_code))]
struct Graph(*mut std::ffi::c_void);

#[cfg(cuda_streams)]
extern "C" {
    fn caption_cascade_graph_new() -> *mut std::ffi::c_void;
    fn caption_cascade_graph_begin(graph: *mut std::ffi::c_void) -> i32;
    fn caption_cascade_graph_end(graph: *mut std::ffi::c_void) -> i32;
    fn caption_cascade_graph_replay(graph: *mut std::ffi::c_void) -> i32;
    fn caption_cascade_graph_free(graph: *mut std::ffi::c_void);
}

impl Graph {
    /// Captures what `body` launches on the current stream; `None` when this build has no CUDA
    /// shim, the thread is on the default stream, or anything in `body` cannot be captured.
    #[cfg(cuda_streams)]
    fn record(body: impl FnOnce() -> Vec<Tensor>) -> Option<(Self, Vec<Tensor>)> {
        // SAFETY: the shim owns the graph object; every call below passes the pointer it made,
        // and `Drop` frees it once.
        unsafe {
            let graph = Graph(caption_cascade_graph_new());
            if graph.0.is_null() || caption_cascade_graph_begin(graph.0) != 0 {
                return None;
            }
            // A panic inside the capture must still end it, or the stream stays in capture mode.
            let outputs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
            let ended = caption_cascade_graph_end(graph.0) == 0;
            let outputs = outputs.ok().filter(|_| ended)?;
            Some((graph, outputs))
        }
    }

    #[cfg(not(cuda_streams))]
    fn record(_body: impl FnOnce() -> Vec<Tensor>) -> Option<(Self, Vec<Tensor>)> {
        None
    }

    fn replay(&self) -> bool {
        #[cfg(cuda_streams)]
        // SAFETY: `self.0` is a graph the shim made and captured.
        return unsafe { caption_cascade_graph_replay(self.0) } == 0;
        #[cfg(not(cuda_streams))]
        false
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        #[cfg(cuda_streams)]
        // SAFETY: made by the shim, freed once here.
        unsafe {
            caption_cascade_graph_free(self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn buckets_cover_every_size_up_to_the_largest() {
        assert_eq!(bucket(0), None);
        assert_eq!(bucket(1), Some(1));
        assert_eq!(bucket(3), Some(4));
        assert_eq!(bucket(64), Some(64));
        assert_eq!(bucket(65), Some(128));
        assert_eq!(bucket(130), Some(192));
        assert_eq!(bucket(MAX_ROWS), Some(MAX_ROWS));
        assert_eq!(bucket(MAX_ROWS + 1), None);
        for rows in 1..=MAX_ROWS {
            let b = bucket(rows).unwrap();
            assert!(b >= rows && (b <= 2 * rows), "{rows} -> {b}");
        }
    }

    #[test]
    fn the_buckets_up_to_a_size_are_those_its_steps_use() {
        assert_eq!(buckets_up_to(0), Vec::<i64>::new());
        assert_eq!(buckets_up_to(5), [1, 2, 4, 8]);
        assert_eq!(buckets_up_to(130), [1, 2, 4, 8, 16, 32, 64, 128, 192]);
        assert_eq!(buckets_up_to(10_000).last(), Some(&MAX_ROWS));
    }

    #[test]
    fn emulated_pieces_return_what_the_eager_piece_returns() {
        let w = Tensor::randn([8, 5], (Kind::Float, Device::Cpu));
        let piece = |xs: &[&Tensor]| vec![xs[0].matmul(&w).relu(), xs[1] * 2.0];
        let owner = Owner::new();
        for rows in [3, 4, 1, 3] {
            let x = Tensor::randn([rows, 8], (Kind::Float, Device::Cpu));
            let y = Tensor::randn([rows, 2, 3], (Kind::Float, Device::Cpu));
            let want = piece(&[&x, &y]);
            let got = run(GraphMode::Emulated, owner, 0, &[&x, &y], &piece);
            assert_eq!(got.len(), 2);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.size(), w.size());
                assert!(g.allclose(w, 1e-6, 1e-6, false), "rows {rows}");
            }
        }
        let entries = GRAPHS.with(|g| g.borrow().keys().filter(|k| k.owner == owner).count());
        assert_eq!(entries, 2, "3 and 4 rows share the bucket of 4; 1 row has its own");
    }

    #[test]
    fn without_cuda_a_capture_fails_and_the_piece_runs_eagerly() {
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let got = run(GraphMode::Cuda, Owner::new(), 0, &[&x], &|xs| vec![xs[0].exp()]);
        assert!(got[0].allclose(&x.exp(), 1e-6, 1e-6, false));
    }

    #[test]
    fn a_failed_capture_turns_graphs_off_for_the_executor_which_keeps_serving() {
        let owner = Owner::new();
        let piece = |xs: &[&Tensor]| vec![xs[0].exp()];
        let x = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        run(GraphMode::Emulated, owner, 0, &[&x], &piece);
        assert_eq!(on_this_executor(), (1, false));
        fail_next_emulated_capture();
        let y = Tensor::randn([9, 4], (Kind::Float, Device::Cpu));
        let got = run(GraphMode::Emulated, owner, 1, &[&y], &piece);
        assert!(got[0].allclose(&y.exp(), 1e-6, 1e-6, false));
        assert_eq!(on_this_executor(), (0, true), "its graphs are freed and no more are made");
        for rows in [3, 9, 1] {
            let z = Tensor::randn([rows, 4], (Kind::Float, Device::Cpu));
            assert!(run(GraphMode::Emulated, owner, 0, &[&z], &piece)[0].allclose(&z.exp(), 1e-6, 1e-6, false));
        }
        assert_eq!(on_this_executor(), (0, true));
    }
}
