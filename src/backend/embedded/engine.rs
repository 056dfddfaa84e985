//! The engine thread: owns the llama.cpp context and decodes every active
//! sequence together, one batch per step. Requests join between steps and
//! leave as soon as they finish or their client goes away, which frees their
//! slot at once.
//!
//! Each slot's KV cache is kept after its request ends, as a prefix cache: a
//! new prompt starts from the longest prefix any slot already holds (copied
//! within llama.cpp when it is another slot's), so the fixed system prompt and
//! worked example of EnhanceTask/DecomposeTask, or the earlier turns of a
//! conversation, are not read again.
//!
//! A sequence whose client has not read its last chunks (its relay is full)
//! sits out the steps until the client catches up; when no sequence can go
//! on, the thread parks until a client reads, a job arrives or the engine
//! stops (each unparks it).

use std::{
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, Sender, SyncSender, TryRecvError, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{NAME, sampler::Sampler, text::TextAssembler};
use crate::backend::{
    BackendError, Chunk, Completion, EngineTimings, FinishReason, relay::RelaySender,
};
use llama_cpp_2::{
    context::{LlamaContext, params::LlamaContextParams},
    llama_backend::LlamaBackend,
    llama_batch::LlamaBatch,
    model::LlamaModel,
    token::LlamaToken,
};
use llguidance::Matcher;

/// Prompts are read in chunks of this many tokens at fixed positions (0, 32,
/// 64, ...). llama.cpp's CPU kernels give a row results that depend on the
/// shape of the batch it is in, so an answer is reproducible only if its
/// prompt is always read in the same chunks, whether a cached prefix covered
/// its start or not, and whoever else is being served. 32 kept prefill as fast
/// as llama.cpp's server here and left at most 31 cached tokens unused
/// (`make bench`).
const PREFILL_CHUNK: usize = 32;

/// Shape of the llama.cpp context.
#[derive(Clone, Copy, Debug)]
pub struct EngineShape {
    pub parallel: u32,
    pub ctx_per_sequence: u32,
    pub batch_tokens: u32,
    pub threads: i32,
    pub flash_attention: bool,
}

/// One admitted generation, prepared by the async side.
pub(super) struct Job {
    pub prompt: Vec<LlamaToken>,
    pub max_tokens: u32,
    pub sampler: Sampler,
    pub matcher: Option<Matcher>,
    pub text: TextAssembler,
    pub model: String,
    pub output: RelaySender,
}

struct Sequence {
    id: i32,
    job: Job,
    /// Tokens of this sequence not yet decoded: the prompt, then each sampled token.
    pending: Vec<LlamaToken>,
    /// Position of the next token to decode.
    position: i32,
    /// Prompt tokens taken from the prefix cache instead of decoded.
    reused: usize,
    generated: u32,
    started: Instant,
    first_logits: Option<Instant>,
}

impl Sequence {
    fn prompt_tokens(&self) -> u32 {
        self.job.prompt.len() as u32
    }
}

fn context_params(shape: EngineShape) -> LlamaContextParams {
    let flash = if shape.flash_attention {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO
    } else {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
    };
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(shape.ctx_per_sequence * shape.parallel))
        .with_n_batch(shape.batch_tokens)
        .with_n_ubatch(shape.batch_tokens)
        .with_n_seq_max(shape.parallel)
        // One KV cache per sequence: with llama.cpp's unified cache, greedy
        // output changes with what else is in the batch.
        .with_kv_unified(false)
        .with_flash_attention_policy(flash)
        .with_n_threads(shape.threads)
        .with_n_threads_batch(shape.threads)
}

/// Why a job was not taken.
pub(super) enum Refused {
    /// Every sequence is busy and the queue is full.
    Full,
    Stopped,
}

/// The running engine thread. Dropping it ends the engine after its current
/// step and waits for it: a process that exits while llama.cpp is in the
/// middle of a decode crashes in llama.cpp's exit handlers.
pub(super) struct EngineThread {
    jobs: Option<SyncSender<Job>>,
    stop: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EngineThread {
    /// Starts the engine with room for `queue` waiting jobs, and waits for
    /// its context and warm-up; returns how long the warm-up took.
    pub(super) fn start(
        model: Arc<LlamaModel>,
        llama: &'static LlamaBackend,
        shape: EngineShape,
        queue: usize,
    ) -> Result<(Self, Duration), String> {
        let (jobs, waiting) = sync_channel(queue);
        let (ready, warmed) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let thread = {
            let (stop, alive) = (stop.clone(), alive.clone());
            std::thread::Builder::new()
                .name("rigger-engine".into())
                .spawn(move || {
                    serve_jobs(&model, llama, shape, &waiting, &stop, &ready);
                    alive.store(false, Ordering::SeqCst);
                })
                .map_err(|error| format!("engine thread: {error}"))?
        };
        let engine = Self {
            jobs: Some(jobs),
            stop,
            alive,
            thread: Some(thread),
        };
        let warm_up = warmed
            .recv()
            .map_err(|_| "the engine thread stopped during start-up".to_owned())??;
        Ok((engine, warm_up))
    }

    pub(super) fn submit(&self, job: Job) -> Result<(), Refused> {
        let jobs = self.jobs.as_ref().ok_or(Refused::Stopped)?;
        jobs.try_send(job).map_err(|error| match error {
            TrySendError::Full(_) => Refused::Full,
            TrySendError::Disconnected(_) => Refused::Stopped,
        })?;
        // An engine whose sequences all wait for their clients is parked.
        self.wake();
        Ok(())
    }

    /// Unparks the engine thread, which then looks again at what it can do.
    /// Cheap when it is not parked.
    pub(super) fn waker(&self) -> impl Fn() + Send + Sync + 'static {
        let thread = self.thread.as_ref().map(|thread| thread.thread().clone());
        move || {
            if let Some(thread) = &thread {
                thread.unpark();
            }
        }
    }

    fn wake(&self) {
        if let Some(thread) = &self.thread {
            thread.thread().unpark();
        }
    }

    pub(super) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes an idle engine waiting for a job, and a parked one.
        self.jobs.take();
        self.wake();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

/// Body of the engine thread: creates the context, warms it up, reports
/// the outcome on `ready`, then serves jobs until `stop` or until every job
/// sender is gone.
fn serve_jobs(
    model: &LlamaModel,
    llama: &LlamaBackend,
    shape: EngineShape,
    jobs: &Receiver<Job>,
    stop: &AtomicBool,
    ready: &Sender<Result<Duration, String>>,
) {
    let mut context = match warm_context(model, llama, shape) {
        Ok((context, warm_up)) => {
            let _ = ready.send(Ok(warm_up));
            context
        }
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    run(model, &mut context, shape, jobs, stop);
}

fn warm_context<'m>(
    model: &'m LlamaModel,
    llama: &LlamaBackend,
    shape: EngineShape,
) -> Result<(LlamaContext<'m>, Duration), String> {
    let mut context = model
        .new_context(llama, context_params(shape))
        .map_err(|error| format!("llama.cpp context: {error}"))?;
    let warm_up = warm_up(model, &mut context)?;
    Ok((context, warm_up))
}

fn run(
    model: &LlamaModel,
    context: &mut LlamaContext<'_>,
    shape: EngineShape,
    jobs: &Receiver<Job>,
    stop: &AtomicBool,
) {
    let mut engine = Engine {
        model,
        batch: LlamaBatch::new(shape.batch_tokens as usize, shape.parallel as i32),
        slots: (0..shape.parallel).map(|_| None).collect(),
        cached: (0..shape.parallel).map(|_| Vec::new()).collect(),
        shape,
    };
    while !stop.load(Ordering::SeqCst) && engine.admit(jobs, context) {
        engine.drop_abandoned();
        match engine.step(context) {
            Ok(Progress::Decoded) => {}
            // Every sequence waits for its client: whatever changes that
            // (a read, a dropped call, a new job, stop) unparks the thread.
            Ok(Progress::Waiting) => std::thread::park(),
            Err(error) => engine.fail_all(context, &error),
        }
    }
}

/// What a step did.
enum Progress {
    Decoded,
    /// Nothing to decode: every active sequence's client has chunks to read.
    Waiting,
}

struct Engine<'m> {
    model: &'m LlamaModel,
    batch: LlamaBatch<'static>,
    slots: Vec<Option<Sequence>>,
    /// Per slot, the tokens whose keys and values its KV cache holds, in order.
    cached: Vec<Vec<LlamaToken>>,
    shape: EngineShape,
}

impl Engine<'_> {
    /// Takes queued jobs into free slots; waits for one when idle. False
    /// when the engine should stop.
    fn admit(&mut self, jobs: &Receiver<Job>, context: &mut LlamaContext<'_>) -> bool {
        let idle = self.slots.iter().all(Option::is_none);
        if idle {
            match jobs.recv() {
                Ok(job) => self.place(job, context),
                Err(_) => return false,
            }
        }
        while self.slots.iter().any(Option::is_none) {
            match jobs.try_recv() {
                Ok(job) => self.place(job, context),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    return self.slots.iter().any(Option::is_some);
                }
            }
        }
        true
    }

    /// Puts a job in the free slot whose cache shares most of its prompt,
    /// and starts it from the longest cached prefix held by any slot.
    fn place(&mut self, job: Job, context: &mut LlamaContext<'_>) {
        // At least the last prompt token is decoded: its logits start the
        // answer. Reuse stops at a chunk boundary, so what is left is read in
        // the same chunks as without the cache (see PREFILL_CHUNK).
        let reusable = job.prompt.len().saturating_sub(1);
        let shared = |cached: &[LlamaToken]| {
            let common = cached
                .iter()
                .zip(&job.prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(reusable);
            common - common % PREFILL_CHUNK
        };
        // Which free slot to use: one whose whole cache this prompt extends
        // (a conversation going on), else an empty one, else the one that
        // shares most; so caches other prompts may want survive longest.
        let free: Vec<usize> = (0..self.slots.len())
            .filter(|&slot| self.slots[slot].is_none())
            .collect();
        let extends = |slot: &usize| {
            let cached = self.cached[*slot].len();
            cached > 0 && shared(&self.cached[*slot]) == cached
        };
        let Some(slot) = free
            .iter()
            .copied()
            .find(extends)
            .or_else(|| {
                free.iter()
                    .copied()
                    .find(|&slot| self.cached[slot].is_empty())
            })
            .or_else(|| {
                free.iter()
                    .copied()
                    .max_by_key(|&slot| shared(&self.cached[slot]))
            })
        else {
            return;
        };
        let (source, common) = (0..self.cached.len())
            .map(|candidate| (candidate, shared(&self.cached[candidate])))
            .max_by_key(|&(candidate, common)| (common, candidate == slot))
            .unwrap_or((slot, 0));
        let id = slot as i32;
        let reused = if source == slot {
            self.truncate(context, slot, common)
        } else {
            self.truncate(context, slot, 0);
            // With one KV buffer per sequence llama.cpp copies whole
            // sequences only: copy it all, then cut it to the shared prefix.
            match context.copy_kv_cache_seq(source as i32, id, None, None) {
                Ok(()) => {
                    self.cached[slot] = self.cached[source].clone();
                    self.truncate(context, slot, common)
                }
                Err(error) => {
                    tracing::warn!(%error, "prefix copy failed; reading the whole prompt");
                    0
                }
            }
        };
        self.slots[slot] = Some(Sequence {
            id,
            pending: job.prompt[reused..].to_vec(),
            job,
            position: reused as i32,
            reused,
            generated: 0,
            started: Instant::now(),
            first_logits: None,
        });
    }

    /// Keeps the first `keep` cached tokens of a slot; returns how many it kept.
    fn truncate(&mut self, context: &mut LlamaContext<'_>, slot: usize, keep: usize) -> usize {
        if keep == self.cached[slot].len() {
            return keep;
        }
        let kept = match context.kv_cache_seq_rm(slot as i32, Some(keep as u32), None) {
            Ok(()) => keep,
            Err(_) => {
                free_sequence(context, slot as i32);
                0
            }
        };
        self.cached[slot].truncate(kept);
        kept
    }

    /// Ends sequences whose client went away; their slot is free at once
    /// and their KV cache stays as prefix cache.
    fn drop_abandoned(&mut self) {
        for slot in &mut self.slots {
            if slot
                .as_ref()
                .is_some_and(|sequence| sequence.job.output.is_closed())
            {
                *slot = None;
            }
        }
    }

    /// Decodes one batch: prompt chunks of joining sequences and the last
    /// sampled token of running ones whose clients keep up; then samples
    /// where logits are ready.
    fn step(&mut self, context: &mut LlamaContext<'_>) -> Result<Progress, String> {
        self.batch.clear();
        let mut budget = self.shape.batch_tokens as usize;
        // (slot, index in batch) of sequences whose last pending token gets logits.
        let mut sampling: Vec<(usize, i32)> = Vec::new();
        // A joining sequence's prompt is decoded in a batch of its own: the
        // rows of a batch are not bit-for-bit independent in llama.cpp's CPU
        // kernels, and an answer must not depend on who else was prefilling.
        let prefilling = self.slots.iter().position(|slot| {
            slot.as_ref()
                .is_some_and(|sequence| sequence.pending.len() > 1)
        });
        for (slot, sequence) in self.slots.iter_mut().enumerate() {
            let Some(sequence) = sequence else { continue };
            if budget == 0
                || prefilling.is_some_and(|prefilling| prefilling != slot)
                || !sequence.job.output.has_room()
            {
                continue;
            }
            let to_chunk_end = PREFILL_CHUNK - sequence.position as usize % PREFILL_CHUNK;
            let take = sequence.pending.len().min(budget).min(to_chunk_end);
            let completes = take == sequence.pending.len();
            for (offset, &token) in sequence.pending[..take].iter().enumerate() {
                let last = completes && offset + 1 == take;
                if last {
                    sampling.push((slot, self.batch.n_tokens()));
                }
                self.batch
                    .add(token, sequence.position, &[sequence.id], last)
                    .map_err(|error| format!("batch: {error}"))?;
                self.cached[slot].push(token);
                sequence.position += 1;
            }
            sequence.pending.drain(..take);
            budget -= take;
        }
        if self.batch.n_tokens() == 0 {
            return Ok(Progress::Waiting);
        }
        context
            .decode(&mut self.batch)
            .map_err(|error| format!("llama.cpp decode failed: {error}"))?;
        for (slot, index) in sampling {
            let logits = context.get_logits_ith(index);
            if let Some(ending) = self.advance(slot, logits)
                && let Some(sequence) = self.slots[slot].take()
            {
                finish_sequence(sequence, ending);
            }
        }
        Ok(Progress::Decoded)
    }

    /// Samples the next token of the sequence in `slot`; returns how it
    /// ends when it does.
    fn advance(&mut self, slot: usize, logits: &[f32]) -> Option<Ending> {
        let model = self.model;
        let ctx_per_sequence = self.shape.ctx_per_sequence as i32;
        let sequence = self.slots[slot].as_mut()?;
        sequence.first_logits.get_or_insert_with(Instant::now);
        let job = &mut sequence.job;
        let mask = match job.matcher.as_mut().map(Matcher::compute_mask).transpose() {
            Ok(mask) => mask,
            Err(error) => return Some(Ending::Failed(format!("constrained decoding: {error}"))),
        };
        let sampled = job.sampler.sample(logits, |token| {
            mask.as_ref().is_none_or(|mask| mask.is_allowed(token))
        });
        let Some(token) = sampled else {
            return Some(Ending::Failed(
                "no token is allowed by the schema".to_owned(),
            ));
        };
        let token = LlamaToken(token as i32);
        if model.vocab().is_eog(token) {
            return Some(Ending::Finished(FinishReason::Stop));
        }
        sequence.generated += 1;
        if let Some(matcher) = job.matcher.as_mut()
            && let Err(error) = matcher.consume_token(token.0 as u32)
        {
            return Some(Ending::Failed(format!("constrained decoding: {error}")));
        }
        let piece = model.vocab().token_to_piece(token, false, None);
        let released = job.text.push(&piece);
        if !released.text.is_empty() && job.output.send(Ok(Chunk::Text(released.text))).is_err() {
            return Some(Ending::Abandoned);
        }
        if released.stopped || job.matcher.as_ref().is_some_and(Matcher::is_stopped) {
            return Some(Ending::Finished(FinishReason::Stop));
        }
        if sequence.generated >= job.max_tokens || sequence.position >= ctx_per_sequence {
            return Some(Ending::Finished(FinishReason::Length));
        }
        sequence.pending.push(token);
        None
    }

    fn fail_all(&mut self, context: &mut LlamaContext<'_>, error: &str) {
        tracing::error!(%error, "engine step failed; ending every active sequence");
        for (slot, cached) in self.slots.iter_mut().zip(&mut self.cached) {
            if let Some(sequence) = slot.take() {
                let id = sequence.id;
                finish_sequence(sequence, Ending::Failed(error.to_owned()));
                free_sequence(context, id);
                cached.clear();
            }
        }
    }
}

enum Ending {
    Finished(FinishReason),
    Failed(String),
    Abandoned,
}

fn finish_sequence(mut sequence: Sequence, ending: Ending) {
    let output = &sequence.job.output;
    match ending {
        Ending::Finished(finish_reason) => {
            let rest = sequence.job.text.finish();
            if !rest.is_empty() {
                let _ = output.send(Ok(Chunk::Text(rest)));
            }
            let first = sequence.first_logits.unwrap_or(sequence.started);
            let _ = output.send(Ok(Chunk::Done(Completion {
                backend: NAME,
                model: sequence.job.model.clone(),
                finish_reason,
                prompt_tokens: sequence.prompt_tokens(),
                completion_tokens: sequence.generated,
                cached_prompt_tokens: sequence.reused as u32,
                engine_timings: Some(EngineTimings {
                    prompt: first - sequence.started,
                    generation: first.elapsed(),
                }),
            })));
        }
        Ending::Failed(reason) => {
            let _ = output.send(Err(BackendError::Failed {
                backend: NAME,
                reason,
            }));
        }
        Ending::Abandoned => {}
    }
}

fn free_sequence(context: &mut LlamaContext<'_>, id: i32) {
    if let Err(error) = context.clear_kv_cache_seq(Some(id as u32), None, None) {
        tracing::warn!(sequence = id, %error, "could not free a sequence's KV cache");
    }
}

/// Decodes one token once so the first request does not pay for lazy
/// initialization; returns how long it took.
fn warm_up(model: &LlamaModel, context: &mut LlamaContext<'_>) -> Result<Duration, String> {
    let started = Instant::now();
    let token = model.vocab().bos();
    let mut batch = LlamaBatch::new(1, 1);
    batch
        .add(token, 0, &[0], true)
        .map_err(|error| format!("warm-up batch: {error}"))?;
    context
        .decode(&mut batch)
        .map_err(|error| format!("warm-up decode: {error}"))?;
    free_sequence(context, 0);
    Ok(started.elapsed())
}
