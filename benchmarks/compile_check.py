"""Compile every Triton kernel of tokenmill for Hopper (sm_90) on a machine without a GPU.

Triton's interpreter (the CPU tests) runs kernels as Python, so it cannot see what only the
compiler checks: one type per variable across a runtime `if`, constexpr misuse, shapes tl.dot
refuses, register spills. This script drives the real host wrappers (tokenmill.kernels.*) with
CPU tensors at a model's shapes; each `kernel[grid](...)` launch is caught before it runs and
compiled instead (frontend, PTX and cubin, with the divisibility-by-16 specialisation a launch
would get), and the cubin's registers, local memory (spills) and shared memory are reported.

    python benchmarks/compile_check.py                 # the 8B shape, batch 1 and 16, prefill
    python benchmarks/compile_check.py --shape tiny    # seconds; what tests/test_kernels.py runs

Exit status 1 if any kernel fails to compile. Needs triton's NVIDIA backend (bundled with the
wheel); must run without TRITON_INTERPRET (it is removed here before triton is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import tokenmill.kernels as K  # noqa: E402
from tokenmill.kernels import fused_ops, gemv, kv_cache, pdl  # noqa: E402
from tokenmill.kernels import paged_attention as _pa_dispatch  # noqa: E402, F401  (the dispatch function)
from tokenmill.layers.attention import AttentionMetadata  # noqa: E402

PA = sys.modules["tokenmill.kernels.paged_attention"]
TARGET = GPUTarget("cuda", 90, 32)
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
          torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}
SHAPES = {
    "8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, blocks=64, block_size=16),
    "tiny": dict(hidden=64, heads=4, kv_heads=2, head_dim=32, inter=128, blocks=16, block_size=16),
}


def _signature(fn: JITFunction, args: tuple, kwargs: dict):
    """Triton signature, constexprs and divisibility attributes for a launch of fn with these arguments."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    sig, constexprs, attrs = {}, {}, {}
    no_spec = set(fn.do_not_specialize)
    for i, name in enumerate(fn.arg_names):
        value = bound[name]
        if i in fn.constexprs:
            sig[name] = "constexpr"
            constexprs[(i,)] = value
            continue
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            sig[name] = "i1"
            aligned = False
        elif isinstance(value, int):
            sig[name] = "i64" if abs(value) >= 2**31 else "i32"
            aligned = value % 16 == 0  # as triton specialises a launch (0 included)
        elif isinstance(value, float):
            sig[name] = "fp32"
            aligned = False
        else:
            raise TypeError(f"{fn.fn.__name__}: argument {name} of type {type(value).__name__}")
        if aligned and i not in no_spec and name not in no_spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion", "launch_pdl")}
    return sig, constexprs, attrs, options


def _pdl_prologue(ptx: str) -> dict:
    """Whether the kernel waits for its predecessor (griddepcontrol.wait), and the global loads and
    stores its PTX issues before the first wait: PDL allows loads of weights there, nothing else."""
    lines = ptx.splitlines()
    wait = next((i for i, line in enumerate(lines) if "griddepcontrol.wait" in line), None)
    before = lines[:wait] if wait is not None else []
    return {"pdl_wait": wait is not None,
            "pre_wait_loads": sum(("ld.global" in line or "cp.async" in line) and "commit" not in line
                                  and "wait" not in line for line in before),
            "pre_wait_stores": sum(any(op in line for op in ("st.global", "atom.", "red.")) for line in before)}


def _resources(cubin: bytes) -> dict:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"registers": int(found.get("REG", -1)), "local_bytes": int(found.get("LOCAL", -1)),
            "shared_bytes": int(found.get("SHARED", -1))}


class Catcher:
    """Replaces `run` of every JITFunction in tokenmill.kernels: a launch compiles instead of running."""

    def __init__(self):
        self.results: list[dict] = []
        self.label = ""
        self.kernels = [obj for mod in (gemv, fused_ops, kv_cache, PA) for obj in vars(mod).values()
                        if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__]

    def __enter__(self):
        for fn in self.kernels:
            fn.run = self._compiler(fn)
        for mod in (gemv, fused_ops, kv_cache, PA):
            mod.check_launchable = lambda *tensors: None  # CPU tensors stand in for CUDA ones
        PA._sm_count = lambda device: 132  # an H100/H200's: the decode split-K grid as on the device
        self._supports_pdl = pdl.supports_pdl
        pdl.supports_pdl = lambda device: True  # an sm_90 device's launches: PDL variants
        return self

    def __exit__(self, *exc):
        for fn in self.kernels:
            del fn.run  # back to the class's method
        pdl.supports_pdl = self._supports_pdl

    def _compiler(self, fn: JITFunction):
        def run(*args, grid, warmup, **kwargs):
            record = {"case": self.label, "kernel": fn.fn.__name__,
                      "constexprs": {n: kwargs[n] for n in kwargs if n.isupper()}}
            try:
                sig, constexprs, attrs, options = _signature(fn, args, kwargs)
                compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                          target=TARGET, options=options)
                record.update(ok=True, **_resources(compiled.asm["cubin"]), **options)
                record["shared_bytes"] = compiled.metadata.shared  # dynamic (tl.dot stages) and static
                record.update(_pdl_prologue(compiled.asm["ptx"]))
            except Exception as e:  # the finding this script exists for
                record.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
            self.results.append(record)
        return run


def _meta(seq_lens: list[int], query_lens: list[int], block_size: int, max_decode_seq_len=None) -> AttentionMetadata:
    blocks = max(-(-s // block_size) for s in seq_lens)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    n = sum(query_lens)
    return AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64), block_tables=torch.zeros(len(seq_lens), blocks, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens_cpu=seq_lens, query_lens_cpu=query_lens, num_decodes=sum(1 for q in query_lens if q == 1),
        max_decode_seq_len=max_decode_seq_len)


def drive(s: dict, catcher: Catcher) -> None:
    """Call every kernel wrapper the way the model does, at shape s."""
    dt = torch.bfloat16
    h, hq, hkv, d, inter = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["inter"]
    cache = torch.zeros(2, s["blocks"], s["block_size"], hkv, d, dtype=dt)
    cos = sin = torch.zeros(4096, d)
    w_qkv, w_o = torch.zeros((hq + 2 * hkv) * d, h, dtype=dt), torch.zeros(h, hq * d, dtype=dt)
    w_gu, w_down = torch.zeros(2 * inter, h, dtype=dt), torch.zeros(h, inter, dtype=dt)
    nw = torch.ones(h, dtype=dt)
    for m in (1, 16, 64):
        x = torch.zeros(m, h, dtype=dt)
        pos, slots = torch.zeros(m, dtype=torch.int64), torch.zeros(m, dtype=torch.int64)
        configs = [("", None)] + ([(" mma", {"mma": True})] if m == 1 else [])
        for tag, cfg in configs:
            catcher.label = f"fused layer, {m} row(s){tag}"
            gemv.gemv_norm_rope_kv(x, nw, 1e-5, w_qkv, None, pos, cos, sin, cache, slots, hq, config=cfg)
            gemv.gemv_linear(torch.zeros(m, hq * d, dtype=dt), w_o, residual=x, config=cfg)
            gemv.gemv_linear(x, w_qkv, None, norm_weight=nw, eps=1e-5, config=cfg)
            gemv.gemv_norm_silu(x, nw, 1e-5, w_gu, None, config=cfg)
            gemv.gemv_linear(torch.zeros(m, inter, dtype=dt), w_down, residual=x, config=cfg)
    for t in (16, 4096):
        catcher.label = f"general path, {t} tokens"
        x = torch.zeros(t, h, dtype=dt)
        K.rms_norm_triton(x, nw, 1e-5, x)
        K.silu_and_mul_triton(torch.zeros(t, 2 * inter, dtype=dt))
        qkv = torch.zeros(t, (hq + 2 * hkv) * d, dtype=dt)
        q = qkv[:, :hq * d].view(t, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
        pos, slots = torch.zeros(t, dtype=torch.int64), torch.zeros(t, dtype=torch.int64)
        K.rotary_triton(pos, q, k, cos, sin)
        K.rotary_write_kv_triton(pos, q, k, v, cos, sin, cache, slots)
        K.rotary_write_kv_triton(pos, q, k, v, cos, sin, cache, slots, q_norm_weight=torch.ones(d, dtype=dt),
                                 k_norm_weight=torch.ones(d, dtype=dt), eps=1e-6)
        K.rms_norm_triton(q, torch.ones(d, dtype=dt), 1e-6)  # per-head (q/k norm) view
        K.write_kv_triton(cache, k, v, slots)
    catcher.label = "attention, decode batch 1 at 8k (split-K)"
    q = torch.zeros(1, hq, d, dtype=dt)
    PA.paged_attention_triton(q, cache, _meta([8192], [1], s["block_size"]), d ** -0.5)
    catcher.label = "attention, decode batch 1 in a graph-sized grid, dynamic partitions"
    PA.paged_attention_triton(q, cache, _meta([600], [1], s["block_size"]), d ** -0.5, max_decode_seq_len=8192,
                              partitions="dynamic")
    catcher.label = "attention, mixed prefill"
    q = torch.zeros(4 + 512, hq, d, dtype=dt)
    PA.paged_attention_triton(q, cache, _meta([700] * 4 + [1024], [1] * 4 + [512], s["block_size"]), d ** -0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--out", default=None, help="write compile_check.json here")
    args = parser.parse_args()
    with Catcher() as catcher:
        drive(SHAPES[args.shape], catcher)
    failed = [r for r in catcher.results if not r["ok"]]
    print(f"triton {triton.__version__}, target sm_90, shape {args.shape}: {len(catcher.results)} launches compiled, "
          f"{len(failed)} failed")
    for r in catcher.results:
        if r["ok"]:
            pdl = f"  pdl ({r['pre_wait_loads']} ld, {r['pre_wait_stores']} st before the wait)" if r["pdl_wait"] else ""
            print(f"  ok   {r['kernel']:24} regs {r['registers']:3}  spill {r['local_bytes']:4} B  shared "
                  f"{r['shared_bytes']:6} B  warps {r.get('num_warps', '-')}{pdl}  {r['case']}")
        else:
            print(f"  FAIL {r['kernel']:24} {r['case']}: {r['error']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "compile_check.json").write_text(json.dumps(catcher.results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
