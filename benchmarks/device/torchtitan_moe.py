"""torchtitan 0.2.2's qwen3 model in the shapes of examples/moe-1b-7b.yaml and its dense twin, to time torchtitan on
the same mixture of experts as `benchmarks/gpu_backends.py --model examples/moe-1b-7b.yaml`.

Put this file on torchtitan's PYTHONPATH and pass `--experimental.custom_import torchtitan_moe --model.name qwen3
--model.flavor bench_moe --parallelism.expert_parallel_degree 2` (the dense twin: `--model.flavor bench_dense_twin`).
When a `ttbench` module is importable (a metrics wrapper that prints each logged window's tokens, seconds and peak
memory), it is imported too, since torchtitan takes one custom import.

bench_moe: dim 2048, 16 layers, 16 heads, 8 KV heads, head_dim 128, per-head q/k norms, vocab 50,304, every layer
routing each token to 8 of 64 experts of hidden 1024 (softmax scores renormalised over the chosen, no shared expert,
the aux-loss-free bias at 1e-3), as the example's `model` section.
"""
import contextlib

from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3 import qwen3_args
from torchtitan.models.qwen3.model.args import Qwen3ModelArgs

with contextlib.suppress(ImportError):
    import ttbench  # noqa: F401

SHAPE = dict(vocab_size=50304, max_seq_len=4096, head_dim=128, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8,
             qk_norm=True, hidden_dim=8192, norm_eps=1e-6, rope_theta=1000000)
qwen3_args["bench_moe"] = Qwen3ModelArgs(
    **SHAPE, moe_enabled=True, moe_inter_dim=1024,
    moe_args=MoEArgs(num_experts=64, num_shared_experts=0, top_k=8, score_func="softmax", route_norm=True,
                     route_scale=1.0, score_before_experts=False, load_balance_coeff=1e-3))
qwen3_args["bench_dense_twin"] = Qwen3ModelArgs(**SHAPE)
