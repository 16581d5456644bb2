//! Pixels in memory or decoded on demand, and the feed that turns a list of batches into ready
//! batches: gathered in place from memory, or decoded by a pool of threads into a bounded queue
//! of ready batches, delivered in order. The bytes of a sample are the same either way (the
//! same decode function fills both), so a run from the cache and a streamed run see the same
//! numbers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::data::{Dataset, InputNorm};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A split whose samples are read and decoded on demand (an image folder or tar shards).
pub trait SampleReader: Send + Sync {
    /// Decodes sample `i` into `dst` ([C, H, W] bytes of the split's shape).
    fn read(&self, i: usize, dst: &mut [u8]) -> Result<()>;
    /// Where sample `i` comes from, for error messages.
    fn name(&self, i: usize) -> String;
}

/// A split's pixels: decoded once and held ([N, C, H, W] bytes), or read on demand.
#[derive(Clone)]
pub enum Pixels {
    Memory(Vec<u8>),
    Stream(Arc<dyn SampleReader>),
}

impl std::fmt::Debug for Pixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pixels::Memory(v) => write!(f, "Pixels::Memory({} bytes)", v.len()),
            Pixels::Stream(_) => write!(f, "Pixels::Stream"),
        }
    }
}

/// How a streamed split is fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedOptions {
    /// Decode threads (separate from the training threads, so decoding overlaps the step).
    pub threads: usize,
    /// Ready batches queued ahead of the step that takes them (decoded, not yet used).
    pub depth: usize,
    /// Count and leave out an image that does not decode, instead of stopping.
    pub skip_bad: bool,
}

/// Default queue depth: two batches per decode thread, so every thread can finish one batch
/// while the step holds another.
pub const DEFAULT_DEPTH_PER_THREAD: usize = 2;

impl FeedOptions {
    pub fn new(threads: usize, skip_bad: bool) -> Self {
        let threads = threads.max(1);
        FeedOptions {
            threads,
            depth: threads * DEFAULT_DEPTH_PER_THREAD,
            skip_bad,
        }
    }
}

/// One batch ready for the step: [B, C, H, W] bytes and B labels (B is smaller than asked
/// when bad images were skipped), and the names of the images skipped.
#[derive(Debug, Default)]
pub struct RawBatch {
    pub bytes: Vec<u8>,
    pub labels: Vec<u8>,
    pub skipped: Vec<String>,
}

/// What a feed did over its batches: images decoded, the decoding threads' busy seconds, and
/// how long the consumer waited for a batch that was not ready.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FeedStats {
    pub images: usize,
    pub waited: Duration,
    /// Seconds the decode threads spent decoding, summed over the threads.
    pub decoding: Duration,
    pub threads: usize,
}

impl FeedStats {
    /// What the decode threads can deliver: images per second of decoding, times the threads.
    pub fn capacity(&self) -> f64 {
        let busy = self.decoding.as_secs_f64();
        if busy > 0.0 {
            self.images as f64 / busy * self.threads as f64
        } else {
            0.0
        }
    }
}

struct Shared {
    reader: Arc<dyn SampleReader>,
    labels: Arc<Vec<u8>>,
    batches: Vec<Vec<usize>>,
    shape: [usize; 3],
    sample_len: usize,
    skip_bad: bool,
    next: AtomicUsize,
    stop: AtomicBool,
    busy_nanos: std::sync::atomic::AtomicU64,
}

/// Decodes `batches` of a streamed split in the background, `opts.depth` batches ahead at
/// most, and hands them out in order. Dropping it stops the threads.
pub struct Feed {
    shared: Arc<Shared>,
    ready: Receiver<(usize, Result<RawBatch>)>,
    /// One token per batch that may be decoded ahead; the consumer returns one per batch taken.
    tokens: Option<SyncSender<()>>,
    parked: BTreeMap<usize, Result<RawBatch>>,
    taken: usize,
    threads: Vec<JoinHandle<()>>,
    pub stats: FeedStats,
}

impl Feed {
    pub fn start(
        reader: Arc<dyn SampleReader>,
        labels: Arc<Vec<u8>>,
        shape: [usize; 3],
        batches: Vec<Vec<usize>>,
        opts: FeedOptions,
    ) -> Result<Feed> {
        let depth = opts.depth.max(1);
        let (token_tx, token_rx) = sync_channel::<()>(depth);
        for _ in 0..depth {
            token_tx.send(()).expect("the channel holds depth tokens");
        }
        let token_rx = Arc::new(Mutex::new(token_rx));
        let (ready_tx, ready_rx) = sync_channel(depth);
        let shared = Arc::new(Shared {
            reader,
            labels,
            batches,
            shape,
            sample_len: shape.iter().product(),
            skip_bad: opts.skip_bad,
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            busy_nanos: Default::default(),
        });
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for t in 0..opts.threads.max(1) {
            let (shared, tokens, ready) = (Arc::clone(&shared), Arc::clone(&token_rx), ready_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("normlab-decode-{t}"))
                .spawn(move || decode_worker(&shared, &tokens, &ready));
            match spawned {
                Ok(h) => threads.push(h),
                // Fewer threads than asked still deliver every batch; none cannot.
                Err(e) if threads.is_empty() => {
                    return Err(Error::invalid(format!(
                        "cannot start a decode thread ({e}); lower --decode-threads or free some memory"
                    )))
                }
                Err(_) => break,
            }
        }
        Ok(Feed {
            shared,
            ready: ready_rx,
            tokens: Some(token_tx),
            parked: BTreeMap::new(),
            taken: 0,
            stats: FeedStats {
                threads: threads.len(),
                ..FeedStats::default()
            },
            threads,
        })
    }

    /// The [C, H, W] shape of one sample.
    pub fn shape(&self) -> [usize; 3] {
        self.shared.shape
    }

    /// The next batch in order, None after the last.
    pub fn next_batch(&mut self) -> Option<Result<RawBatch>> {
        if self.taken == self.shared.batches.len() {
            return None;
        }
        let t0 = Instant::now();
        let got = loop {
            if let Some(b) = self.parked.remove(&self.taken) {
                break b;
            }
            match self.ready.recv() {
                Ok((k, b)) => {
                    self.parked.insert(k, b);
                }
                // Every thread ended without this batch: only a panic in one does that.
                Err(_) => break Err(Error::invalid("the decode threads stopped unexpectedly")),
            }
        };
        self.stats.waited += t0.elapsed();
        self.taken += 1;
        // The batch is out of the queue: one more may be decoded ahead.
        if let Some(t) = &self.tokens {
            let _ = t.try_send(());
        }
        if let Ok(b) = &got {
            self.stats.images += b.labels.len() + b.skipped.len();
        }
        self.stats.decoding = Duration::from_nanos(self.shared.busy_nanos.load(Ordering::Relaxed));
        Some(got)
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Without the token sender every thread waiting for a token wakes with an error; the
        // queue always has room for the batches in flight (tokens bound them), so none blocks.
        self.tokens = None;
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

fn decode_worker(shared: &Shared, tokens: &Mutex<Receiver<()>>, ready: &SyncSender<(usize, Result<RawBatch>)>) {
    loop {
        // A token first (bounded look-ahead), then the next batch number. The sender gone (the
        // feed dropped) or a poisoned lock ends the thread.
        let got = match tokens.lock() {
            Ok(t) => t.recv().is_ok(),
            Err(_) => false,
        };
        if !got || shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let k = shared.next.fetch_add(1, Ordering::SeqCst);
        let Some(idx) = shared.batches.get(k) else {
            return;
        };
        let t0 = Instant::now();
        let batch = decode_batch(shared, idx);
        shared
            .busy_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if shared.stop.load(Ordering::SeqCst) || ready.send((k, batch)).is_err() {
            return;
        }
    }
}

fn decode_batch(shared: &Shared, idx: &[usize]) -> Result<RawBatch> {
    let s = shared.sample_len;
    let mut out = RawBatch {
        bytes: vec![0; idx.len() * s],
        labels: Vec::with_capacity(idx.len()),
        skipped: Vec::new(),
    };
    let mut kept = 0;
    for &i in idx {
        match shared.reader.read(i, &mut out.bytes[kept * s..(kept + 1) * s]) {
            Ok(()) => {
                out.labels.push(shared.labels[i]);
                kept += 1;
            }
            Err(_) if shared.skip_bad => out.skipped.push(shared.reader.name(i)),
            Err(e) => return Err(e),
        }
    }
    out.bytes.truncate(kept * s);
    Ok(out)
}

/// A split's batches in order (`Dataset::feed`).
pub enum Batches<'a> {
    Memory {
        set: &'a Dataset,
        batches: Vec<Vec<usize>>,
        next: usize,
    },
    Stream(Feed),
}

/// One batch put into the model's input: how many samples it holds and the images skipped.
#[derive(Debug, Default)]
pub struct Fed {
    pub samples: usize,
    pub skipped: Vec<String>,
}

impl Batches<'_> {
    /// Normalizes the next batch into `x` and its labels into `y`; None after the last.
    pub fn next_into(&mut self, norm: InputNorm, x: &mut Tensor, y: &mut Vec<u8>) -> Option<Result<Fed>> {
        match self {
            Batches::Memory { set, batches, next } => {
                let idx = batches.get(*next)?;
                *next += 1;
                Some(set.batch(idx, norm, x, y).map(|()| Fed {
                    samples: idx.len(),
                    skipped: Vec::new(),
                }))
            }
            Batches::Stream(feed) => {
                let shape = feed.shape();
                Some(feed.next_batch()?.and_then(|RawBatch { bytes, labels, skipped }| {
                    let s: usize = shape.iter().product();
                    normalize_batch(bytes.chunks(s), labels.len(), shape, norm, x)?;
                    y.clear();
                    y.extend_from_slice(&labels);
                    Ok(Fed {
                        samples: labels.len(),
                        skipped,
                    })
                }))
            }
        }
    }

    /// Images decoded so far and the time spent waiting for a batch that was not ready
    /// (nothing for a split in memory).
    pub fn stats(&self) -> FeedStats {
        match self {
            Batches::Memory { .. } => Default::default(),
            Batches::Stream(feed) => feed.stats,
        }
    }
}

/// x ↦ x/255·(1/std_c) − mean_c/std_c per channel: `n` samples of [C, H, W] bytes into the
/// [n, C, H, W] tensor `x` (one multiply-add per value, no allocation per batch).
pub fn normalize_batch<'s>(
    samples: impl Iterator<Item = &'s [u8]>,
    n: usize,
    shape: [usize; 3],
    norm: InputNorm,
    x: &mut Tensor,
) -> Result<()> {
    let [c, h, w] = shape;
    x.resize_to(&[n, c, h, w])?;
    let affine = |ch: usize| {
        let k = ch.min(norm.channels - 1);
        (1.0 / (255.0 * norm.std[k]), norm.mean[k] / norm.std[k])
    };
    for (dst, src) in x.data.chunks_mut(c * h * w).zip(samples) {
        for (ch, (dp, sp)) in dst.chunks_mut(h * w).zip(src.chunks(h * w)).enumerate() {
            let (scale, shift) = affine(ch);
            for (o, &b) in dp.iter_mut().zip(sp) {
                *o = b as f32 * scale - shift;
            }
        }
    }
    Ok(())
}
