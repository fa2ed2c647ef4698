"""rlmeta.testing.bench: the model-FLOP formula on a hand-computed tiny config, and the GEMM peak."""
import math

import pytest

from rlmeta.testing.bench import flops_per_token, gemm_peak_gflops, matmul_params, rl_step_flops, tokens_flops

# vocab 10, d_model 4, 2 layers, 2 heads of dim 2, 1 kv head, SwiGLU width 8
TINY = {"vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 2, "intermediate_size": 8, "tie_word_embeddings": True}


def test_flop_formula_by_hand():
    # per layer: q 4*4=16, k and v 2*(4*2)=16, o 4*4=16, MLP 3*4*8=96 -> 144; 2 layers 288; unembedding 40
    assert matmul_params(TINY) == 328
    # forward at ctx 3: 2*328 + 2*2 layers*3*4 (d_attn = 2 heads * 2) = 656 + 48
    assert flops_per_token(TINY, 3) == 704
    assert flops_per_token(TINY, 3, train=True) == 3 * 704
    # 2 prompt tokens (mean ctx 1) then 2 new ones (mean ctx 3): 2*(656+16) + 2*704
    assert tokens_flops(TINY, 2, 2) == 2 * 672 + 2 * 704
    # one prompt of 2, a group of 3 completions of 2: the prompt once, then 3 x the new tokens;
    # generation forward-only, training 3 x forward
    once, new = 2 * 672, 2 * 704
    assert rl_step_flops(TINY, [2], 3, 2) == (once + 3 * new) * (1 + 3)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_gemm_peak_positive(backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    g = gemm_peak_gflops(backend, n=256, repeats=2)
    assert math.isfinite(g) and g > 0
