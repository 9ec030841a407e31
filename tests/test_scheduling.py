"""Continuous batching, chunked prefill and preemption leave greedy outputs unchanged."""

from __future__ import annotations

import random

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import SampledToken, Scheduler, SchedulerConfig

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def random_prompts(count: int, seed: int = 0, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randrange(3, 70))] for _ in range(count)]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_invariance_with_chunked_prefill(llama_dir):
    prompts = random_prompts(17)
    alone_llm = LLM(str(llama_dir), num_kv_blocks=256, max_num_batched_tokens=2048)
    alone = [token_ids(alone_llm.generate([p], GREEDY))[0] for p in prompts]
    # 17 at once under a 32-token budget: prompts are chunked and mixed with other requests' decodes.
    batched_llm = LLM(str(llama_dir), num_kv_blocks=256, max_num_batched_tokens=32)
    assert token_ids(batched_llm.generate(prompts, GREEDY)) == alone


def test_requests_joining_between_steps_get_their_solo_output(llama_dir):
    """Continuous batching: requests added while others are mid-prefill or mid-decode join the next
    step, and every output equals the request's output alone."""
    prompts = random_prompts(9, seed=3)
    solo_llm = LLM(str(llama_dir), num_kv_blocks=256)
    solo = [token_ids(solo_llm.generate([p], GREEDY))[0] for p in prompts]
    engine = LLM(str(llama_dir), num_kv_blocks=256, max_num_batched_tokens=32).llm_engine
    finished, steps, batch_sizes = {}, 0, []
    waves = {0: range(0, 3), 2: range(3, 6), 9: range(6, 9)}   # step index -> requests arriving then
    while waves or engine.has_unfinished_requests():
        for i in waves.pop(steps, []):
            engine.add_request(f"r{i}", prompts[i], GREEDY)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        batch_sizes.append(len(engine.core.scheduler.running))
        steps += 1
    assert [finished[f"r{i}"] for i in range(len(prompts))] == solo
    assert max(batch_sizes) > 3   # the later waves really ran alongside the earlier requests


def test_preemption_keeps_outputs(llama_dir):
    prompts = random_prompts(12, seed=1)
    roomy = LLM(str(llama_dir), num_kv_blocks=256)
    expected = token_ids(roomy.generate(prompts, GREEDY))
    # 8 blocks x 16 tokens: far too few for 12 requests of up to ~94 tokens, so requests are
    # preempted and recomputed; max_model_len 128 keeps one request within the pool.
    tiny = LLM(str(llama_dir), num_kv_blocks=8, max_model_len=128, max_num_batched_tokens=64)
    assert token_ids(tiny.generate(prompts, GREEDY)) == expected
    assert tiny.llm_engine.core.total_preemptions > 0
    kv = tiny.llm_engine.core.scheduler.kv
    assert kv.allocator.num_free == kv.num_blocks and not kv.block_tables  # nothing leaked


def test_seeded_sampling_survives_preemption(llama_dir):
    prompts = random_prompts(10, seed=2)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=7, ignore_eos=True)
    roomy = LLM(str(llama_dir), num_kv_blocks=256)
    tiny = LLM(str(llama_dir), num_kv_blocks=8, max_model_len=128, max_num_batched_tokens=64)
    assert token_ids(tiny.generate(prompts, params)) == token_ids(roomy.generate(prompts, params))
    assert tiny.llm_engine.core.total_preemptions > 0


# ---- the scheduler alone, with a fake model -----------------------------------------------------

def make_scheduler(num_blocks=16, block_size=4, budget=8, max_seqs=4, max_len=64, chunked=True):
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                             enable_chunked_prefill=chunked)
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def request(rid, num_prompt, max_tokens=4):
    return Request(rid, list(range(10, 10 + num_prompt)), SamplingParams(temperature=0, max_tokens=max_tokens))


def run_step(scheduler):
    out = scheduler.schedule_step()
    scheduler.mark_launched(out)
    sampled = [SampledToken(1) if c.samples else None for c in out.chunks]
    return out, scheduler.update_from_output(out, sampled)


def test_budget_chunks_long_prompts_and_mixes_decodes():
    s = make_scheduler(budget=8)
    s.add_request(request("a", 3))
    s.add_request(request("b", 13))
    out, _ = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 0, 3), ("b", 0, 5)]
    out, _ = run_step(s)  # a decodes (1 token), b continues its prompt with the remaining 7
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 3, 1), ("b", 5, 7)]
    out, _ = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 4, 1), ("b", 12, 1)]
    assert out.chunks[1].samples  # the chunk that ends b's prompt yields its first token


def test_without_chunked_prefill_a_prompt_waits_for_a_full_budget():
    s = make_scheduler(budget=8, chunked=False)
    s.add_request(request("a", 3))
    s.add_request(request("b", 7))
    out, _ = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["a"]
    out, _ = run_step(s)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 7)]


def test_preempts_latest_arrival_and_resumes_it_first():
    s = make_scheduler(num_blocks=3, block_size=4, budget=16)
    s.add_request(request("a", 4, max_tokens=8))
    s.add_request(request("b", 4, max_tokens=8))
    run_step(s)  # both prefilled: one block each
    out, _ = run_step(s)  # both need a 2nd block for their 5th token; one is left -> b yields to a
    assert out.num_preemptions == 1
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert s.waiting[0].request_id == "b" and s.waiting[0].status == RequestStatus.PREEMPTED
    assert s.waiting[0].num_computed_tokens == 0 and s.waiting[0].num_output_tokens == 1


def test_max_num_seqs_and_finish_frees_blocks():
    s = make_scheduler(max_seqs=2, budget=64)
    for rid in "abc":
        s.add_request(request(rid, 2, max_tokens=2))
    out, _ = run_step(s)
    assert len(out.chunks) == 2  # c waits for a sequence slot
    _, outputs = run_step(s)  # a and b reach max_tokens
    assert [o.finish_reason for o in outputs] == ["length", "length"]
    out, _ = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["c"]
    assert out.finished_request_ids == {"a", "b"}


def test_abort_waiting_and_running():
    s = make_scheduler()
    s.add_request(request("a", 3))
    s.add_request(request("b", 30))
    run_step(s)
    s.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests()
    assert s.kv.allocator.num_free == s.kv.num_blocks
