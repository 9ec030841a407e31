"""Async scheduling (step N+1 scheduled and queued before step N's tokens are read back) produces
exactly what the synchronous engine produces: same tokens, same stops, same cache hits, no leaks.

On the CPU the steps do not overlap in time, but every piece of the async path runs: placeholders in
the scheduler, pending inputs read from the previous step's token tensor, one-step-late stop checks,
rows of finished requests thrown away, deferred prefix-cache hashing."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from test_scheduling import random_prompts, token_ids

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def engines(llama_dir, **kwargs):
    return (LLM(str(llama_dir), async_scheduling=False, **kwargs),
            LLM(str(llama_dir), async_scheduling=True, **kwargs))


def assert_no_leaks(llm):
    core = llm.llm_engine.core
    kv = core.scheduler.kv
    assert core._in_flight is None and not core.scheduler.running and not core.scheduler.waiting
    assert kv.allocator.num_free == kv.num_blocks and not kv.block_tables
    assert all(block.ref_cnt == 0 for block in kv.block_pool.blocks)


def test_async_engine_really_overlaps_steps(llama_dir):
    sync, async_ = engines(llama_dir, num_kv_blocks=256)
    assert not sync.llm_engine.core.async_scheduling and async_.llm_engine.core.async_scheduling
    engine = async_.llm_engine
    engine.add_request("a", [5, 6, 7, 8], GREEDY)
    engine.step()  # launches the prefill; its token is not read yet
    core = engine.core
    assert core._in_flight is not None and core.scheduler.running[0].num_pending_tokens == 1
    outputs = engine.step()  # launches the first decode (input: a placeholder), then reads the prefill's token
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1]
    assert core.scheduler.running[0].num_pending_tokens == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(async_)


def test_greedy_batch_with_chunked_prefill_matches_sync(llama_dir):
    prompts = random_prompts(17, seed=5)
    sync, async_ = engines(llama_dir, num_kv_blocks=256, max_num_batched_tokens=32)
    expected = token_ids(sync.generate(prompts, GREEDY))
    assert token_ids(async_.generate(prompts, GREEDY)) == expected
    assert all(len(t) == 24 for t in expected)
    assert_no_leaks(async_)


def test_stop_tokens_eos_and_max_tokens_stop_at_the_same_token(llama_dir):
    prompts = random_prompts(8, seed=6)
    sync, async_ = engines(llama_dir, num_kv_blocks=256)
    free = token_ids(sync.generate(prompts, GREEDY))
    # a token each request emits mid-way becomes a stop token: the async engine learns of it one
    # step late, with the next step already queued, and must still stop right there
    stops = sorted({t[len(t) // 2] for t in free})[:4]
    params = [SamplingParams(temperature=0, max_tokens=5 + i, stop_token_ids=stops, ignore_eos=i % 2 == 0)
              for i in range(len(prompts))]
    want, got = sync.generate(prompts, params), async_.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    assert {o.outputs[0].finish_reason for o in want} == {"stop", "length"}
    assert_no_leaks(async_)


def test_seeded_sampling_logprobs_and_min_tokens_match_sync(llama_dir):
    prompts = random_prompts(6, seed=7)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=3, max_tokens=16, min_tokens=4, logprobs=2)
    sync, async_ = engines(llama_dir, num_kv_blocks=256, max_num_batched_tokens=48)
    want, got = sync.generate(prompts, params), async_.generate(prompts, params)
    assert token_ids(got) == token_ids(want)
    for a, b in zip(got, want):
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-5)


def test_penalties_fall_back_to_synchronous_steps(llama_dir):
    prompts = random_prompts(5, seed=8)
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.3),
              *[GREEDY] * 4]
    sync, async_ = engines(llama_dir, num_kv_blocks=256)
    assert token_ids(async_.generate(prompts, params)) == token_ids(sync.generate(prompts, params))


def test_preemption_under_async_scheduling_keeps_outputs(llama_dir):
    prompts = random_prompts(12, seed=1)
    roomy = LLM(str(llama_dir), num_kv_blocks=256, async_scheduling=False)
    expected = token_ids(roomy.generate(prompts, GREEDY))
    tiny = LLM(str(llama_dir), num_kv_blocks=8, max_model_len=128, max_num_batched_tokens=64, async_scheduling=True)
    assert token_ids(tiny.generate(prompts, GREEDY)) == expected
    assert tiny.llm_engine.core.total_preemptions > 0
    assert_no_leaks(tiny)


def test_prefix_cache_hashes_generated_tokens_once_known(llama_dir):
    """Blocks holding tokens that were pending when scheduled are hashed with their real ids later:
    resending prompt + output hits every full block of it, as in the synchronous engine."""
    prompt = random_prompts(1, seed=9)[0] + [11] * 20
    hits = []
    for llm in engines(llama_dir, num_kv_blocks=256):
        first = llm.generate([prompt], GREEDY)[0]
        resend = prompt + first.outputs[0].token_ids + [12, 13]
        second = llm.generate([resend], GREEDY)[0]
        hits.append(second.num_cached_tokens)
        assert second.num_cached_tokens == (len(prompt) + 24) // 16 * 16
    assert hits[0] == hits[1]


def test_abort_while_a_step_is_in_flight(llama_dir):
    prompts = random_prompts(4, seed=10)
    sync, async_ = engines(llama_dir, num_kv_blocks=256)
    expected = token_ids(sync.generate(prompts, GREEDY))
    engine = async_.llm_engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    finished = {}
    for step in range(200):
        if step == 6:
            engine.abort_request("r1")   # r1 has a row in the step that is in flight
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    assert "r1" not in finished
    assert [finished[f"r{i}"] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert_no_leaks(async_)


def test_stop_strings_under_async_scheduling(llama_dir):
    sync, async_ = engines(llama_dir, num_kv_blocks=256)
    prompts = ["Hello world", "def f(x):"]
    free = sync.generate(prompts, SamplingParams(temperature=0, max_tokens=20))
    stops = [o.outputs[0].text[3:6] for o in free if len(o.outputs[0].text) > 6]
    params = SamplingParams(temperature=0, max_tokens=20, stop=stops or None)
    want, got = sync.generate(prompts, params), async_.generate(prompts, params)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    assert_no_leaks(async_)


def test_last_block_completed_by_the_final_decode_is_cached(llama_dir):
    """The block that the last decode's input completes is hashed once that token is known, even though
    no later step allocates for the request (it finishes): the next turn hits it, as with sync steps."""
    prompt = random_prompts(1, seed=11)[0][:15]
    assert len(prompt) == 15
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for llm in engines(llama_dir, num_kv_blocks=64):
        first = llm.generate([prompt], params)[0].outputs[0].token_ids
        second = llm.generate([prompt + first[:1] + [9] * 5], params)[0]
        assert second.num_cached_tokens == 16


def test_penalized_request_joining_a_decoding_batch(llama_dir):
    """A request with penalties admitted while others decode (their inputs are placeholders): its
    sampler reads only known output tokens, and the batch falls back to synchronous steps after it."""
    prompts = random_prompts(3, seed=12)
    penalized = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5,
                               frequency_penalty=0.5)
    results = []
    for llm in engines(llama_dir, num_kv_blocks=256):
        engine, finished = llm.llm_engine, {}
        engine.add_request("a", prompts[0], GREEDY)
        engine.add_request("b", prompts[1], GREEDY)
        for step in range(100):
            if step == 4:
                engine.add_request("p", prompts[2], penalized)
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.outputs[0].token_ids
            if not engine.has_unfinished_requests():
                break
        results.append(finished)
        assert_no_leaks(llm)
    assert results[0] == results[1] and len(results[0]["p"]) == 12
