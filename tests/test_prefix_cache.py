"""Automatic prefix caching: same greedy outputs, hits where expected, salts isolate, nothing leaks."""

from __future__ import annotations

import random

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.kv_cache_manager import KVCacheManager, hash_block_tokens, NONE_HASH
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import SampledToken, Scheduler, SchedulerConfig

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def check_no_leaks(llm: LLM) -> None:
    """Every block unreferenced and free (or cached and evictable); no per-request state left."""
    core = llm.llm_engine.core
    kv = core.scheduler.kv
    pool = kv.block_pool
    assert not core.has_unfinished_requests()
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert pool.num_free == kv.num_blocks and kv.usage == 0.0
    assert not kv.block_tables and not kv._num_cached_blocks
    for block_hash, block in pool.cached.items():  # the map and the blocks agree
        assert block.block_hash == block_hash
    assert sum(1 for b in pool.blocks if b.block_hash is not None) == len(pool.cached)


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts over two shared prefixes (block size 16): hits ending on a block boundary, mid-block,
    exact repeats (all of the prompt cached: the last block is recomputed), and misses."""
    rng = random.Random(seed)
    base = [rng.randrange(5, 500) for _ in range(70)]
    other = [rng.randrange(5, 500) for _ in range(40)]

    def tail(n):
        return [rng.randrange(5, 500) for _ in range(n)]

    return [
        base[:40],                  # prefix ends mid-block (2 full blocks + 8)
        base[:40] + tail(5),        # hits 2 blocks, its own prefix ends mid-block
        base[:32],                  # exactly 2 blocks: at most 1 may hit (the last token is computed)
        base[:32],                  # repeat of a block-aligned prompt
        base[:40],                  # exact repeat, not block-aligned: 2 blocks hit
        base[:16] + tail(20),       # diverges right at a block boundary
        base[:20] + tail(30),       # diverges mid-block: only block 0 can hit
        other,                      # unrelated
        base[:70],                  # longest: hits what the others left
        base[:70] + tail(1),
        other[:17],                 # 1 block + 1 token
        base[:5],                   # shorter than a block: nothing to hit
        other[:16] + base[16:40],   # block 1 holds cached tokens, but after another prefix: no hit
    ]


def cache_counters(llm: LLM) -> tuple[int, int]:
    s = llm.llm_engine.core.scheduler
    return s.prefix_cache_queries, s.prefix_cache_hits


@pytest.fixture(scope="module")
def reference_outputs(llama_dir):
    prompts = shared_prefix_prompts()
    llm = LLM(str(llama_dir), num_kv_blocks=256, enable_prefix_caching=False)
    one_by_one = [token_ids(llm.generate([p], GREEDY))[0] for p in prompts]
    assert cache_counters(llm) == (0, 0)
    return prompts, one_by_one


def test_greedy_outputs_identical_with_caching_one_by_one(llama_dir, reference_outputs):
    prompts, expected = reference_outputs
    llm = LLM(str(llama_dir), num_kv_blocks=256)
    outs = [llm.generate([p], GREEDY)[0] for p in prompts]
    assert token_ids(outs) == expected
    # What each request found cached, given everything before it (prompt + generated blocks):
    # e.g. the exact repeat of the 32-token prompt recomputes its last block (16 cached, not 32).
    assert [o.num_cached_tokens for o in outs] == [0, 32, 16, 16, 32, 16, 16, 0, 32, 64, 16, 0, 16]
    queries, hits = cache_counters(llm)
    assert queries == sum(map(len, prompts)) and hits == sum(o.num_cached_tokens for o in outs)
    check_no_leaks(llm)


def test_greedy_outputs_identical_with_caching_batched(llama_dir, reference_outputs):
    prompts, expected = reference_outputs
    # All at once under a small budget: hits on blocks registered earlier in the same step, chunked
    # prefills after a hit, decodes mixed in.
    llm = LLM(str(llama_dir), num_kv_blocks=256, max_num_batched_tokens=48)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert cache_counters(llm)[1] > 0
    check_no_leaks(llm)


def test_hits_after_eviction_pressure(llama_dir, reference_outputs):
    prompts, expected = reference_outputs
    # 10 blocks (160 tokens): every request evicts cached blocks of earlier ones, yet hits remain.
    llm = LLM(str(llama_dir), num_kv_blocks=10, max_model_len=160)
    got = []
    for p in prompts + prompts[::-1]:
        got.append(token_ids(llm.generate([p], GREEDY))[0])
    assert got == expected + expected[::-1]
    pool = llm.llm_engine.core.scheduler.kv.block_pool
    assert pool.num_evictions > 0 and cache_counters(llm)[1] > 0
    check_no_leaks(llm)


def test_preemption_with_caching_keeps_outputs(llama_dir, reference_outputs):
    prompts, expected = reference_outputs
    # 7 blocks for 12 concurrent requests of up to 83 tokens: preemptions, and resumed requests
    # find (some of) their own freed blocks still cached.
    llm = LLM(str(llama_dir), num_kv_blocks=7, max_model_len=112, max_num_batched_tokens=64)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert llm.llm_engine.core.total_preemptions > 0
    assert cache_counters(llm)[1] > 0
    check_no_leaks(llm)


def test_seeded_sampling_unchanged_by_caching(llama_dir):
    prompts = shared_prefix_prompts(seed=3)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=11, ignore_eos=True)
    plain = LLM(str(llama_dir), num_kv_blocks=256, enable_prefix_caching=False)
    cached = LLM(str(llama_dir), num_kv_blocks=256)
    expected = token_ids(plain.generate(prompts, params))
    assert token_ids(cached.generate(prompts, params)) == expected
    assert token_ids(cached.generate(prompts, params)) == expected  # second round: mostly hits
    assert cache_counters(cached)[1] > 0


def test_load_leaves_no_references(llama_dir):
    """Many requests, shared prefixes, n > 1, stop strings, aborts, a small pool: afterwards every
    block is unreferenced and free/evictable."""
    rng = random.Random(5)
    llm = LLM(str(llama_dir), num_kv_blocks=12, max_model_len=128, max_num_batched_tokens=40)
    engine = llm.llm_engine
    prefixes = [[rng.randrange(5, 500) for _ in range(rng.randrange(10, 50))] for _ in range(4)]
    submitted = 0
    for round_ in range(6):
        for _ in range(8):
            prompt = rng.choice(prefixes) + [rng.randrange(5, 500) for _ in range(rng.randrange(0, 20))]
            params = SamplingParams(temperature=rng.choice([0, 0.8]), max_tokens=rng.randrange(1, 20),
                                    n=rng.choice([1, 1, 2]), seed=rng.randrange(100),
                                    stop=["e"] if rng.random() < 0.2 else None)
            engine.add_request(f"r{submitted}", prompt, params, cache_salt=rng.choice([None, None, "t1"]))
            submitted += 1
        for _ in range(rng.randrange(1, 6)):
            engine.step()
        engine.abort_request(f"r{submitted - 1}")  # one per round, wherever it is
        while engine.has_unfinished_requests():
            engine.step()
    queries, hits = cache_counters(llm)
    assert hits > 0 and queries > hits
    check_no_leaks(llm)


def run_engine(engine, request_id, prompt, params=GREEDY, cache_salt=None):
    engine.add_request(request_id, prompt, params, cache_salt=cache_salt)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    return final


def test_salts_isolate_tenants(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=256)
    engine = llm.llm_engine
    prompt = list(range(100, 150))  # 3 full blocks + 2
    first = run_engine(engine, "a1", prompt, cache_salt="tenant-a")
    assert first.num_cached_tokens == 0
    assert run_engine(engine, "b1", prompt, cache_salt="tenant-b").num_cached_tokens == 0
    assert run_engine(engine, "n1", prompt).num_cached_tokens == 0  # unsalted is its own tenant
    again = run_engine(engine, "a2", prompt, cache_salt="tenant-a")
    assert again.num_cached_tokens == 48
    assert run_engine(engine, "b2", prompt, cache_salt="tenant-b").num_cached_tokens == 48
    assert run_engine(engine, "n2", prompt).num_cached_tokens == 48
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    # Salted blocks are distinct blocks, not the same blocks shared.
    kv = engine.core.scheduler.kv
    assert len(kv.block_pool.cached) >= 3 * 3
    check_no_leaks(llm)


def test_caching_off_by_flag(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64, enable_prefix_caching=False)
    prompt = list(range(100, 150))
    outs = [llm.generate([prompt], GREEDY)[0] for _ in range(2)]
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert cache_counters(llm) == (0, 0)
    assert not llm.llm_engine.core.scheduler.kv.block_pool.cached


def test_n_siblings_share_the_prompt_and_stats(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=64)
    prompt = list(range(200, 240))  # 2 full blocks + 8
    params = SamplingParams(temperature=0.9, seed=1, max_tokens=5, n=3, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert len(out.outputs) == 3 and out.num_cached_tokens == 0  # sequence 0 came first
    # Siblings 1 and 2 were admitted in the same step and hit sequence 0's 2 blocks.
    stats = llm.llm_engine.core.scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (3 * 40, 2 * 32)
    assert stats.prefill_cached_tokens == 64 and stats.prefill_computed_tokens == 3 * 40 - 64
    check_no_leaks(llm)


# ---- the scheduler and the KV-cache manager alone, with a fake model ------------------------------

def make_scheduler(num_blocks=32, block_size=4, budget=64, max_seqs=8):
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=256)
    return Scheduler(config, KVCacheManager(num_blocks, block_size))


def run_to_end(s: Scheduler, request: Request, token: int = 7):
    """Run one request alone to its end; returns its outputs."""
    s.add_request(request)
    outputs = []
    while s.has_unfinished_requests():
        out = s.schedule_step()
        s.mark_launched(out)
        outputs += s.update_from_output(out, [SampledToken(token) if c.samples else None for c in out.chunks])
    return outputs


def req(rid, prompt, max_tokens=1, salt=None):
    return Request(rid, list(prompt), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                   cache_salt=salt)


def test_counters_on_a_scripted_sequence():
    s = make_scheduler(block_size=4)
    p = list(range(10, 20))  # 10 tokens: blocks [10..13] [14..17] + 2
    script = [
        # (request, expected cached tokens) with block size 4:
        (req("r1", p, max_tokens=3), 0),        # cold. Computes 10 + 2 decoded = 12 tokens: 3 full blocks
        (req("r2", p), 8),                      # 2 of its 2 full blocks ((10 - 1) // 4 = 2)
        (req("r3", p[:8]), 4),                  # 8 tokens = 2 blocks, last token computed: 1 block
        (req("r4", p[:6] + [99] * 6), 4),       # diverges inside block 1
        (req("r5", p, salt="x"), 0),            # another tenant
        (req("r6", p + [7, 7, 5]), 12),         # r1's prompt + its output + 1: 3 blocks incl. generated
        (req("r7", p, salt="x"), 8),            # r5's blocks
        (req("r8", [1, 2, 3]), 0),              # shorter than a block
    ]
    queries = hits = 0
    for request, cached in script:
        outputs = run_to_end(s, request)
        assert request.num_cached_tokens == cached, request.request_id
        assert all(o.num_cached_tokens == cached for o in outputs)
        queries += request.num_prompt_tokens
        hits += cached
        stats = s.stats()
        assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (queries, hits)
        assert stats.prefill_cached_tokens == hits
        assert stats.prefill_computed_tokens == queries - hits
    assert (queries, hits) == (10 + 10 + 8 + 12 + 10 + 13 + 10 + 3, 36)
    assert all(b.ref_cnt == 0 for b in s.kv.block_pool.blocks)


def test_resumed_request_hits_its_own_blocks_and_counts_as_a_query():
    s = make_scheduler(num_blocks=4, block_size=4, budget=64)
    # Each needs 3 blocks (6 + 4 - 1 tokens computed), 4 exist: at its 9th token a preempts b,
    # taking b's tail block; b's head block stays cached until b comes back.
    a, b = req("a", range(10, 16), max_tokens=4), req("b", range(30, 36), max_tokens=4)
    s.add_request(a)
    s.add_request(b)
    preempted = False
    while s.has_unfinished_requests():
        out = s.schedule_step()
        preempted |= out.num_preemptions > 0
        s.mark_launched(out)
        s.update_from_output(out, [SampledToken(7) if c.samples else None for c in out.chunks])
    assert preempted and b.num_preemptions == 1  # b (latest) yielded its blocks
    # b was resumed with prompt + outputs; what it found cached counts as a hit, but its
    # num_cached_tokens (the API's cached prompt tokens) stays the first admission's 0.
    assert b.num_cached_tokens == 0
    stats = s.stats()
    assert b.num_prefill_tokens == 9  # prompt + 3 outputs
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (6 + 6 + 9, 4)
    assert stats.prefill_cached_tokens + stats.prefill_computed_tokens == stats.prefix_cache_queries
    assert all(blk.ref_cnt == 0 for blk in s.kv.block_pool.blocks)


def test_block_hash_is_chained_and_salted():
    h0 = hash_block_tokens(NONE_HASH, [1, 2, 3, 4])
    assert h0 == hash_block_tokens(NONE_HASH, [1, 2, 3, 4])  # deterministic
    assert h0 != hash_block_tokens(NONE_HASH, [1, 2, 3, 5])
    assert h0 != hash_block_tokens(NONE_HASH, [1, 2, 3, 4], ("salt", "a"))
    assert hash_block_tokens(h0, [5, 6, 7, 8]) != hash_block_tokens(NONE_HASH, [5, 6, 7, 8])
    kv = KVCacheManager(8, 4)
    a, b = req("a", range(9)), req("b", range(9), salt="s")
    assert kv.block_hashes(a)[1] != kv.block_hashes(b)[1]  # the salt of block 0 carries on


def test_free_queue_order_and_eviction():
    kv = KVCacheManager(6, 4)
    pool = kv.block_pool
    a = req("a", range(100, 110))  # 10 tokens: 2 full blocks + 2
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    assert kv.block_tables["a"] == [0, 1, 2] and len(pool.cached) == 2
    kv.free(a)
    # The partial block 2 holds no hash: it goes to the head. Then the tail of the sequence first.
    assert list(pool.free_queue) == [2, 3, 4, 5, 1, 0]
    # A new unrelated request takes 2, 3, 4, 5 (never used) before any cached block...
    b = req("b", range(200, 216))
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.allocate_slots(b, 16) and kv.block_tables["b"] == [2, 3, 4, 5]
    assert pool.num_evictions == 0
    # ...and only then evicts, tail block 1 first; its hash leaves the map.
    c = req("c", range(300, 304))
    assert kv.allocate_slots(c, 4) and kv.block_tables["c"] == [1]
    assert pool.num_evictions == 1 and len(pool.cached) == 1 + 4 + 1  # a's block 0, b's 4, c's 1
    # a's first block still hits; its second is gone, so the hit stops there.
    assert kv.get_computed_blocks(req("a2", range(100, 110))) == ([0], 4)


def test_hit_on_a_free_block_takes_it_out_of_the_queue():
    kv = KVCacheManager(4, 4)
    a = req("a", range(9))
    assert kv.allocate_slots(a, 9)
    kv.free(a)
    b = req("b", range(9))
    blocks, num = kv.get_computed_blocks(b)
    assert (blocks, num) == ([0, 1], 8)
    # 4 free, 2 of them the hits: 1 more block for the 9th token leaves 1 free.
    assert kv.allocate_slots(b, 1, blocks)
    assert kv.block_tables["b"][:2] == [0, 1] and kv.block_pool.num_free == 1
    assert [blk.ref_cnt for blk in kv.block_pool.blocks] == [1, 1, 1, 0]
    # A second request sharing the blocks raises their count; not enough room fails cleanly.
    c = req("c", list(range(9)) + [50] * 4)  # 13 tokens: 4 blocks, 2 of them hits
    blocks, num = kv.get_computed_blocks(c)
    assert num == 8 and not kv.allocate_slots(c, 5, blocks)
    assert [blk.ref_cnt for blk in kv.block_pool.blocks] == [1, 1, 1, 0] and "c" not in kv.block_tables
    kv.free(b)
    assert kv.allocate_slots(c, 5, blocks) and [blk.ref_cnt for blk in kv.block_pool.blocks[:2]] == [1, 1]
    kv.free(c)
    assert all(blk.ref_cnt == 0 for blk in kv.block_pool.blocks) and kv.block_pool.num_free == 4


def test_duplicate_blocks_computed_concurrently_stay_unhashed():
    kv = KVCacheManager(8, 4)
    a, b = req("a", range(9)), req("b", range(9))
    assert kv.allocate_slots(a, 9)
    assert kv.allocate_slots(b, 9)  # no lookup: computed twice, as without caching
    assert len(kv.block_pool.cached) == 2
    assert all(kv.block_pool.blocks[i].block_hash is None for i in kv.block_tables["b"])
    kv.free(b)
    assert list(kv.block_pool.free_queue)[:4] == [3, 4, 5, 6]  # worthless blocks reused first
    kv.free(a)
    assert kv.reset_prefix_cache() and not kv.block_pool.cached


def test_draft_tokens_do_not_make_a_block_full():
    kv = KVCacheManager(8, 4)
    a = req("a", range(6))
    a.spec_token_ids = [1, 2]
    assert kv.allocate_slots(a, 8)  # 6 real + 2 draft tokens fill 2 blocks of slots
    assert len(kv.block_pool.cached) == 1  # only block 0 holds real tokens throughout


def test_abort_of_waiting_and_running_with_hits():
    s = make_scheduler(block_size=4)
    run_to_end(s, req("warm", range(12), max_tokens=1))
    s.add_request(req("a", range(12), max_tokens=5))
    s.add_request(req("b", range(12), max_tokens=5))
    s.schedule_step()  # both admitted, both hitting the warm blocks
    s.add_request(req("c", range(12)))
    s.finish_requests(["a", "b", "c"], RequestStatus.FINISHED_ABORTED)
    assert all(blk.ref_cnt == 0 for blk in s.kv.block_pool.blocks)
    assert s.kv.block_pool.num_free == s.kv.num_blocks
