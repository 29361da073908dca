"""Times PyTorch's scaled_dot_product_attention for benches/compare.rs.

Usage: python torch_sdpa.py N THREADS HEADS DIM DTYPE CAUSAL MIN_SECONDS [L [backward]]
N keys and values; L queries (default N; L = 1 with CAUSAL "none" is a decoding
step, which sees every key). With "backward", times `out.backward(d_out)` alone:
the forward that builds the graph runs before each timed call.
Prints one line: the best seconds per call, or "absent: <reason>" when torch
cannot be imported. Never a dependency of the crate; only the comparison runs it.
"""
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # torch not installed: the table says so
    print(f"absent: {type(e).__name__}: {e}")
    sys.exit(0)


def main():
    n, threads, heads, dim = (int(x) for x in sys.argv[1:5])
    dtype = {
        "f32": torch.float32,
        "f64": torch.float64,
        "bf16": torch.bfloat16,
        "f16": torch.float16,
    }[sys.argv[5]]
    causal = sys.argv[6] == "causal"
    min_seconds = float(sys.argv[7])
    queries = int(sys.argv[8]) if len(sys.argv) > 8 else n
    backward = len(sys.argv) > 9 and sys.argv[9] == "backward"
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, queries, dim, generator=g, dtype=dtype)
    k = torch.randn(1, heads, n, dim, generator=g, dtype=dtype)
    v = torch.randn(1, heads, n, dim, generator=g, dtype=dtype)
    if backward:
        d_out = torch.randn(1, heads, queries, dim, generator=g, dtype=dtype)
        for x in (q, k, v):
            x.requires_grad_(True)
        best, spent, runs = float("inf"), 0.0, 0
        while runs < 4 or (spent < min_seconds and runs < 200):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            t = time.perf_counter()
            out.backward(d_out)
            dt = time.perf_counter() - t
            q.grad = k.grad = v.grad = None
            if runs > 0:  # the first call warms up
                best, spent = min(best, dt), spent + dt
            runs += 1
        print(f"{best:.9f} torch {torch.__version__}")
        return
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        best, spent, runs = float("inf"), 0.0, 0
        while runs < 3 or (spent < min_seconds and runs < 200):
            t = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            dt = time.perf_counter() - t
            best, spent, runs = min(best, dt), spent + dt, runs + 1
    print(f"{best:.9f} torch {torch.__version__}")


main()
