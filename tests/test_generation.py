"""End-to-end generation semantics: seeds, stops, min_tokens, penalties, n, logprobs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import SamplingParams

PROMPT = "Once upon a time there was"


def greedy(llm, prompt=PROMPT, **kwargs):
    params = SamplingParams(temperature=0, **{"max_tokens": 24, "ignore_eos": True, **kwargs})
    return llm.generate(prompt, params)[0].outputs[0]


def test_same_seed_same_output_different_seed_differs(llama_llm):
    params = [SamplingParams(temperature=1.0, max_tokens=24, seed=s, ignore_eos=True) for s in (11, 11, 12)]
    outs = llama_llm.generate([PROMPT] * 3, params)
    a, b, c = (o.outputs[0].token_ids for o in outs)
    assert a == b and a != c
    # and the same again in a later call, among other requests
    again = llama_llm.generate(["other prompt", PROMPT], [params[2], params[0]])[1].outputs[0].token_ids
    assert again == a


def test_stop_string_truncates_text(llama_llm):
    full = greedy(llama_llm)
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    index = text.find(stop)
    out = greedy(llama_llm, stop=[stop, "\x00never"])
    assert out.text == text[:index] and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids)
    out = greedy(llama_llm, stop=stop, include_stop_str_in_output=True)
    assert out.text == text[:index + len(stop)]


def test_stop_token_ids_and_min_tokens(llama_llm):
    full = greedy(llama_llm).token_ids
    stop_id = full[2]
    first = full.index(stop_id)
    out = greedy(llama_llm, stop_token_ids=[stop_id])
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    out = greedy(llama_llm, stop_token_ids=[stop_id], min_tokens=6)
    assert len(out.token_ids) >= 6 and stop_id not in out.token_ids[:6]
    assert out.token_ids[:first] == full[:first]  # identical until the first banned position


def test_eos_stops_unless_ignored(llama_llm):
    config = llama_llm.llm_engine.model_config
    assert config.eos_token_ids == [1, 4]  # generation_config.json's list, not just config.json's single id
    full = greedy(llama_llm, ignore_eos=False).token_ids
    assert not set(full) & {1, 4}
    saved = config.eos_token_ids
    config.eos_token_ids = [full[3]]  # pretend the model's 4th greedy token is an EOS id
    try:
        out = greedy(llama_llm, ignore_eos=False)
        first = full.index(full[3])
        assert out.token_ids == full[:first + 1] and out.finish_reason == "stop" and out.stop_reason is None
        assert greedy(llama_llm, ignore_eos=True).token_ids == full
        out = greedy(llama_llm, ignore_eos=False, min_tokens=first + 2)
        assert len(out.token_ids) > first + 1 and full[3] not in out.token_ids[:first + 2]
    finally:
        config.eos_token_ids = saved


def test_max_tokens_and_length(llama_llm):
    out = greedy(llama_llm, max_tokens=5)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def hf_reference_with_penalties(model_dir, prompt_ids, steps, rep=1.0, freq=0.0, pres=0.0):
    """Greedy over HF logits with the penalties applied by hand (OpenAI/HF formulas)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            for token in set(ids):
                if rep != 1.0:
                    logits[token] = logits[token] / rep if logits[token] > 0 else logits[token] * rep
            for token in set(out):
                logits[token] -= freq * out.count(token) + pres
            token = int(logits.argmax())
            ids.append(token)
            out.append(token)
    return out


@pytest.mark.parametrize("penalties", [dict(rep=1.5), dict(freq=0.8), dict(pres=1.2), dict(rep=1.3, freq=0.3, pres=0.3)])
def test_penalties_match_hand_computed_reference(llama_llm, llama_dir, penalties):
    names = dict(rep="repetition_penalty", freq="frequency_penalty", pres="presence_penalty")
    out = greedy(llama_llm, max_tokens=20, **{names[k]: v for k, v in penalties.items()})
    prompt_ids = llama_llm.get_tokenizer().encode(PROMPT)
    assert out.token_ids == hf_reference_with_penalties(llama_dir, prompt_ids, 20, **penalties)
    assert out.token_ids != greedy(llama_llm, max_tokens=20).token_ids  # the penalty changed something


def test_n_sequences_with_seed(llama_llm):
    out = llama_llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    singles = [llama_llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12,
                                                         ignore_eos=True))[0].outputs[0].token_ids for i in range(3)]
    assert [c.token_ids for c in out.outputs] == singles
    assert len({tuple(s) for s in singles}) > 1


def test_top_logprobs(llama_llm):
    out = greedy(llama_llm, max_tokens=6, logprobs=3)
    assert len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry[token].rank == 1  # greedy picks the most likely
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3]
        values = [lp.logprob for lp in sorted(entry.values(), key=lambda lp: lp.rank)]
        assert values == sorted(values, reverse=True)
        assert all(isinstance(lp.decoded_token, str) for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_prompt_forms(llama_llm):
    tokenizer = llama_llm.get_tokenizer()
    ids = tokenizer.encode(PROMPT)
    by_text = greedy(llama_llm)
    assert llama_llm.generate(ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0] \
        .outputs[0].token_ids == by_text.token_ids
    out = llama_llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.prompt is None and out.prompt_token_ids == ids and out.num_prompt_tokens == len(ids)


def test_chat_uses_template(llama_llm):
    out = llama_llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4))[0]
    tokenizer = llama_llm.get_tokenizer()
    assert tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_output_kind_final_only(llama_llm):
    """FINAL_ONLY: the engine's step returns a request once, finished, with what CUMULATIVE ends with;
    CUMULATIVE: one output per step, growing by one token. The first-token time rides on the output."""
    import time

    from tokenmill.sampling_params import RequestOutputKind

    engine = llama_llm.llm_engine
    before = time.monotonic()
    seen = {"final": [], "cumulative": []}
    for name, kind in (("final", RequestOutputKind.FINAL_ONLY), ("cumulative", RequestOutputKind.CUMULATIVE)):
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, output_kind=kind)
        engine.add_request(f"kind-{name}", PROMPT, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen["final" if out.request_id == "kind-final" else "cumulative"].append(out)
    assert len(seen["final"]) == 1 and seen["final"][0].finished
    assert [len(o.outputs[0].token_ids) for o in seen["cumulative"]] == [1, 2, 3, 4, 5]
    final, last = seen["final"][0], seen["cumulative"][-1]
    assert final.outputs[0].token_ids == last.outputs[0].token_ids and final.outputs[0].text == last.outputs[0].text
    assert before <= final.metrics["first_token_time"] <= time.monotonic()
    # LLM.generate takes FINAL_ONLY for itself without changing the caller's params.
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    assert llama_llm.generate(PROMPT, params)[0].outputs[0].token_ids == last.outputs[0].token_ids
    assert params.output_kind is RequestOutputKind.CUMULATIVE


def test_plain_greedy_argmax_in_model_dtype_matches_sampler(llama_dir):
    """Plain greedy takes the argmax of bf16 logits (no float32 copy); the sampler's float32 greedy
    (asked for here through logprobs) picks the same tokens: the cast is exact."""
    from tokenmill import LLM

    llm = LLM(str(llama_dir), dtype="bfloat16", num_kv_blocks=64)
    plain = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    prompts = [PROMPT, "def f(x):", "1, 2, 3,"]
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, plain)]
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, with_logprobs)]
    assert got == ref
