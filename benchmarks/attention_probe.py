"""Probe: FlexAttention under the prefix-tree BlockMask against FlashAttention-2 varlen calls.

Attention alone (random bf16 q/k/v, 28 query heads, 4 key/value heads, head dim 128: the 7B
shape), 28 layers' worth over the packs of two synthetic workloads whose lengths approximate
``extract_gpu.py``'s (built-in: prefixes of 18-32 tokens and suffixes of 10-26; long: prefixes of
~180-660 tokens and suffixes of ~16-175), with prefix sharing ("shared") and without ("full"):

- ``flex``: ``torch.compile(flex_attention)`` with ``persona_geometry.packing.block_mask``;
- ``cascade`` (shared): one causal varlen call over every prefix and suffix as its own sequence,
  one non-causal call of each group's tokens over its prefix (``seqused_k``), merged by their
  log-sum-exp in eager PyTorch; ``two_calls_no_merge``: the two calls alone;
- ``cascade`` (full): one causal varlen call, nothing to merge.

The packs are padded to 128-token tiles (``pad_to=128``, the default when this ran). Results:
``benchmarks/results/attention_probe.json`` (the run's code; since then only lint edits). Usage (CUDA
only)::

    python benchmarks/attention_probe.py benchmarks/results/attention_probe.json
"""
import inspect
import json
import random
import sys
import time

import torch
from torch.nn.attention.flex_attention import flex_attention

from persona_geometry.packing import block_mask, build_pack, plan_packs

out = {"torch": torch.__version__}
try:
    from torch.nn.attention import varlen as V

    out["varlen_sig"] = str(inspect.signature(V.varlen_attn))
except Exception as e:  # noqa: BLE001
    out["varlen_err"] = repr(e)
out["flash_schema"] = str(torch.ops.aten._flash_attention_forward.default._schema)
print(json.dumps(out, indent=1), flush=True)

H, HKV, D = 28, 4, 128
dev = "cuda"
flex = torch.compile(flex_attention, dynamic=True)


def workload(kind, share=True, seed=0):
    rng = random.Random(seed)
    ids, groups = [], []
    if kind == "builtin":
        n_p, n_q = 12, 20
        plens = [rng.randint(18, 32) for _ in range(n_p)]
        slens = [rng.randint(10, 26) for _ in range(n_q)]
    else:
        n_p, n_q = 75, 20
        plens = [int(rng.randint(120, 480) * 1.35) + 15 for _ in range(n_p)]
        slens = [int(rng.choice([3, 6, 10, 20, 40, 80, 120]) * 1.35) + 12 for _ in range(n_q)]
    tok = 1000
    for p, pl in enumerate(plens):
        prefix = [tok + p] * pl
        g = []
        for q, sl in enumerate(slens):
            g.append(len(ids))
            ids.append(prefix + [5000 + q] * sl)
        groups.append(g)
    from persona_geometry.packing import group_prefix_lengths

    pls = group_prefix_lengths(ids, groups) if share else [0] * len(groups)
    plans = plan_packs(ids, groups, pls, 9344)
    return ids, plans


def segments(plan):
    """cu over segments (prefix, each suffix), group boundaries, prefix lens, suffix flag."""
    seg = [0]
    grp = [0]
    used = []
    suffix_flag = []
    pos = 0
    for s in plan.segments:
        if s.prefix_len:
            pos += s.prefix_len
            seg.append(pos)
            suffix_flag += [False] * s.prefix_len
        for i in s.prompts:
            n = len(IDS[i]) - s.prefix_len
            pos += n
            seg.append(pos)
            suffix_flag += [s.prefix_len > 0] * n
        grp.append(pos)
        used.append(s.prefix_len)
    return seg, grp, used, suffix_flag, pos


REPEAT = [False]


def fa(q, k, v, cu, mx, causal, used=None):
    if REPEAT[0]:
        k = k.repeat_interleave(H // HKV, dim=1)
        v = v.repeat_interleave(H // HKV, dim=1)
    o, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, causal, False, scale=D**-0.5, seqused_k=used)[:2]
    return o, lse


def cascade(q, k, v, meta):
    cu_seg, max_seg, cu_grp, max_grp, used, is_suf = meta
    o1, l1 = fa(q, k, v, cu_seg, max_seg, True)
    o2, l2 = fa(q, k, v, cu_grp, max_grp, False, used)
    w = torch.sigmoid(l1 - l2).transpose(0, 1).unsqueeze(-1)
    return torch.where(is_suf[:, None, None], o2 + (o1 - o2) * w, o1), (l1, l2)


def causal_only(q, k, v, meta):
    cu_seg, max_seg = meta[0], meta[1]
    return fa(q, k, v, cu_seg, max_seg, True)[0]


def bench(fn, reps=5):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


res = {}
T0 = time.time()
for kind in ("builtin", "long"):
    for share in (True, False):
        IDS, plans = workload(kind, share)
        packs = []
        for plan in plans:
            pk = build_pack(IDS, plan, pad_id=0, pad_to=128).to(dev)
            T = pk.length
            seg, grp, used, suf, n_real = segments(plan)
            # pad region as one causal segment; for groups: trailing pad as a group with 0 prefix
            if T > n_real:
                seg.append(T)
                grp.append(T)
                used.append(0)
                suf += [False] * (T - n_real)
            mx = lambda c: max(b - a for a, b in zip(c, c[1:], strict=False))  # noqa: E731
            meta = (
                torch.tensor(seg, dtype=torch.int32, device=dev), mx(seg),
                torch.tensor(grp, dtype=torch.int32, device=dev), mx(grp),
                torch.tensor(used, dtype=torch.int32, device=dev),
                torch.tensor(suf, dtype=torch.bool, device=dev),
            )
            q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(T, HKV, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(T, HKV, D, device=dev, dtype=torch.bfloat16)
            packs.append((pk, block_mask(pk), meta, q, k, v))
        key = f"{kind}_{'shared' if share else 'full'}"
        r = {"packs": len(packs), "tokens": sum(p[0].n_real for p in packs)}
        # correctness on the first pack
        pk, bm, meta, q, k, v = packs[0]
        ref = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=bm, enable_gqa=True)[0].transpose(0, 1)
        try:
            got = cascade(q, k, v, meta)[0] if share else causal_only(q, k, v, meta)
        except Exception as e:  # noqa: BLE001
            print(key, "FAILED", repr(e)[:2000], flush=True)
            REPEAT[0] = True
            out["gqa_failed"] = repr(e)[:500]
            got = cascade(q, k, v, meta)[0] if share else causal_only(q, k, v, meta)
        n = pk.n_real
        r["max_abs_diff_vs_flex"] = float((ref[:n].float() - got[:n].float()).abs().max())
        r["max_abs_ref"] = float(ref[:n].float().abs().max())

        def run_flex(packs=packs):
            for _ in range(28):
                for _pk, bm, _meta, q, k, v in packs:
                    flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=bm, enable_gqa=True)

        def run_cascade(packs=packs, method=cascade if share else causal_only):
            for _ in range(28):
                for _pk, _bm, meta, q, k, v in packs:
                    method(q, k, v, meta)

        print(key, "checked", r, round(time.time() - T0, 1), flush=True)
        r["flex_28_layers_ms"] = 1e3 * bench(run_flex)
        print(key, "flex", r["flex_28_layers_ms"], round(time.time() - T0, 1), flush=True)
        r["cascade_28_layers_ms"] = 1e3 * bench(run_cascade)
        if share:
            def run_calls_only(packs=packs):
                for _ in range(28):
                    for _pk, _bm, meta, q, k, v in packs:
                        cu_seg, max_seg, cu_grp, max_grp, used, _is_suf = meta
                        fa(q, k, v, cu_seg, max_seg, True)
                        fa(q, k, v, cu_grp, max_grp, False, used)
            r["two_calls_no_merge_ms"] = 1e3 * bench(run_calls_only)
        res[key] = r
        print(key, round(time.time() - T0, 1), json.dumps(r), flush=True)
        json.dump({"info": out, "results": res}, open(sys.argv[1], "w"), indent=1)

