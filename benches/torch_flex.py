"""Times PyTorch on programmable attention's cases for benches/compare.rs.

Usage: python torch_flex.py N THREADS HEADS DIM CASE MIN_SECONDS
CASE: "softcap_forward" / "softcap_backward" — Gemma 2's soft-capped causal
attention written out in eager PyTorch (scores, c·tanh(s/c), causal mask,
softmax, ·V; c = 20), the forward, or `out.backward(d_out)` alone (the forward
that builds the graph is not timed); "documents_forward" — 8 causal documents
packed in N, as `scaled_dot_product_attention` with the boolean mask.
Prints the best seconds per call and torch's version, or "absent: <reason>".
"""
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except Exception as e:
    print(f"absent: {type(e).__name__}: {e}")
    sys.exit(0)


def softcapped(q, k, v, causal):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = 20.0 * torch.tanh(s / 20.0)
    s = s.masked_fill(~causal, float("-inf"))
    return torch.softmax(s, -1) @ v


def best(f, min_seconds, setup=lambda: None):
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 4 or (spent < min_seconds and runs < 200):
        setup()
        t = time.perf_counter()
        f()
        dt = time.perf_counter() - t
        if runs > 0:  # the first call warms up
            best, spent = min(best, dt), spent + dt
        runs += 1
    return best


def main():
    n, threads, heads, dim = (int(x) for x in sys.argv[1:5])
    case, min_seconds = sys.argv[5], float(sys.argv[6])
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v, d_out = (torch.randn(1, heads, n, dim, generator=g) for _ in range(4))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    if case == "softcap_forward":
        with torch.inference_mode():
            seconds = best(lambda: softcapped(q, k, v, causal), min_seconds)
    elif case == "softcap_backward":
        for x in (q, k, v):
            x.requires_grad_(True)
        state = {}

        def setup():
            q.grad = k.grad = v.grad = None
            state["out"] = softcapped(q, k, v, causal)

        seconds = best(lambda: state["out"].backward(d_out), min_seconds, setup)
    elif case == "documents_forward":
        doc = torch.arange(n) // (n // 8)
        mask = causal & (doc[:, None] == doc[None, :])
        with torch.inference_mode():
            seconds = best(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), min_seconds)
    else:
        raise SystemExit(f"unknown case {case}")
    print(f"{seconds:.9f} torch {torch.__version__}")


main()
