"""Workload files and archetypes; prompts of exact token lengths; multi-turn conversations."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from tokenmill.bench.client import Reply, Target
from tokenmill.bench.prompts import LocalTokenizer, PromptFactory, RequestSource, ServerTokenizer
from tokenmill.bench.workload import ARCHETYPES, LengthDist, PrefixSpec, Workload, archetype, dump_workload, \
    load_workload
from tokenmill.testing.scripted_server import ScriptedServer


def test_archetypes_follow_the_seed():
    chat, agent, data = archetype("chatbot"), archetype("agent"), archetype("data-processor")
    assert chat.api == "chat" and chat.prefix.shared_tokens > 0 and chat.prefix.multi_turn
    assert chat.figure_of_merit == ["tokens_per_s_per_user", "ttft"] and chat.slo.ttft_ms and chat.slo.tpot_ms
    assert agent.prefix.shared_tokens >= 2000 and agent.prefix.multi_turn and agent.slo.ttlt_ms
    assert agent.output_tokens.expected() > chat.output_tokens.expected()
    assert data.arrival.process == "onoff" and data.figure_of_merit == ["mtok_per_dollar"]
    assert data.input_tokens.expected() > 10 * data.output_tokens.expected() and not data.prefix.multi_turn
    assert set(ARCHETYPES) == {"chatbot", "agent", "data-processor"}


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "w.yaml").write_text("""
archetype: chatbot
name: support-bot
num_requests: 50
arrival: {process: gamma, rate: 3, burstiness: 0.5}
output_tokens: {dist: uniform, min: 10, max: 20}
slo: {percentile: 99, ttft_ms: 300}
cost: {gpu_dollars_per_hour: 4.0, gpus_per_replica: 2}
sampling: {temperature: 0.7}
""")
    w = load_workload(str(tmp_path / "w.yaml"))
    assert (w.name, w.api, w.num_requests, w.temperature) == ("support-bot", "chat", 50, 0.7)
    assert w.arrival.burstiness == 0.5 and w.output_tokens.max == 20 and w.prefix.shared_tokens == 1024
    assert w.slo.limits() == {"ttft": 0.3} and w.cost.replica_dollars_per_hour == 8.0
    (tmp_path / "w.json").write_text(json.dumps({"api": "completions", "input_tokens": 64, "output_tokens": 8}))
    j = load_workload(str(tmp_path / "w.json"))
    assert j.name == "w" and j.prompt_source == "ids" and j.input_tokens.value == 64
    again = tmp_path / "again.yaml"
    again.write_text(dump_workload(w))
    assert load_workload(str(again)).to_dict() == w.to_dict()
    (tmp_path / "bad.yaml").write_text("arrivals: {rate: 1}\n")
    with pytest.raises(ValueError, match="unknown workload fields"):
        load_workload(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="neither an archetype"):
        load_workload("nope")


def test_scaled_workload():
    w = archetype("agent").scaled(0.1)
    assert w.prefix.shared_tokens == 300 and w.input_tokens.median == pytest.approx(40)


def test_token_id_prompts_are_exact_and_do_not_share_prefixes():
    factory = PromptFactory()
    factory.pool = list(range(100, 400))
    rng = np.random.default_rng(0)
    prompts = [factory.ids(n, rng) for n in (1, 5, 300, 1000)]
    assert [len(p) for p in prompts] == [1, 5, 300, 1000]
    starts = {tuple(factory.ids(64, rng)[:4]) for _ in range(200)}
    assert len(starts) == 200


def test_text_prompts_exact_via_tokenize_endpoints():
    with ScriptedServer() as server:
        async def go():
            import httpx
            async with httpx.AsyncClient() as http:
                target = Target(server.url, model="scripted")
                factory = PromptFactory(ServerTokenizer(http, target))
                await factory.setup()
                rng = np.random.default_rng(0)
                pieces = [await factory.text(n, rng) for n in (3, 17, 200)]
                return [len(await factory.tokenizer.encode(p.text)) for p in pieces], pieces
        counts, pieces = asyncio.run(go())
    assert counts == [3, 17, 200] and [p.n for p in pieces] == [3, 17, 200]


def test_text_prompts_exact_for_a_real_tokenizer(llama_dir):
    tok = LocalTokenizer(str(llama_dir))
    factory = PromptFactory(tok)

    async def go():
        await factory.setup()
        rng = np.random.default_rng(1)
        return [(n, await factory.text(n, rng)) for n in (1, 9, 50, 333)]
    for n, piece in asyncio.run(go()):
        assert len(tok.tok.encode(piece.text, add_special_tokens=False)) == n == piece.n


class WordIds:
    """A stand-in tokenizer: token ids 1000.. for the corpus."""

    async def encode(self, text):
        return list(range(1000, 1000 + len(text.split())))


def make_source(**kw) -> RequestSource:
    w = Workload(name="t", num_requests=kw.pop("n", 6), input_tokens=LengthDist("fixed", value=10),
                 output_tokens=LengthDist("fixed", value=5),
                 prefix=PrefixSpec(shared_tokens=20, groups=1, turns=LengthDist("fixed", value=kw.pop("turns", 3))))
    factory = PromptFactory(WordIds())
    source = RequestSource(w, factory, w.num_requests, seed=0, max_model_len=kw.pop("max_model_len", None))
    asyncio.run(source.prepare())
    return source


def test_multi_turn_resends_prefix_history_and_exact_output_ids():
    source = make_source()
    first = source.next()
    assert first.turn == 0 and len(first.prompt_ids) == 30 and first.input_tokens == 30
    other = source.next()          # the first conversation is busy: a new one starts, same shared prefix
    assert other.conversation == 1 and other.prompt_ids[:20] == first.prompt_ids[:20]
    assert other.prompt_ids[20:] != first.prompt_ids[20:]
    asyncio.run(source.complete(first, True, Reply(token_ids=[7, 7, 7, 7, 7]), 5))
    second = source.next()
    assert second.conversation == 0 and second.turn == 1
    assert second.prompt_ids[:30] == first.prompt_ids and second.prompt_ids[30:35] == [7] * 5
    assert len(second.prompt_ids) == 45 and source.stand_in_outputs == 0
    asyncio.run(source.complete(second, True, Reply(), 5))   # no token ids from the target: stand-in ids of that length
    third = source.next()
    assert len(third.prompt_ids) == 60 and source.stand_in_outputs == 1
    asyncio.run(source.complete(third, True, Reply(token_ids=[1] * 5), 5))
    assert source.next().conversation == 2          # conversation 0 is done after 3 turns


def test_conversations_that_outgrow_the_context_start_over_and_long_requests_are_clipped():
    source = make_source(max_model_len=50)
    first = source.next()
    asyncio.run(source.complete(first, True, Reply(token_ids=[3] * 5), 5))
    again = source.next()          # 30 + 5 + 10 + 5 output = 50 fits
    assert again.conversation == 0
    asyncio.run(source.complete(again, True, Reply(token_ids=[3] * 5), 5))
    restart = source.next()        # 45 + 10 + 5 = 60 > 50: the user starts a new conversation
    assert restart.conversation == 1 and restart.turn == 0
    tiny = make_source(max_model_len=25, n=1)
    clipped = tiny.next()
    assert len(clipped.prompt_ids) + clipped.max_tokens <= 25 and tiny.clipped == 1
