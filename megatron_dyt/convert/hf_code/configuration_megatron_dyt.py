"""Configuration of a LLaMA whose norms are DyT or Derf (exported by megatron-dyt).

Self-contained: needs only `transformers`. It is the stock `LlamaConfig` plus the norm settings
and the learned embedding scale; `model_type` is its own, so a loader that does not run this code
(no `trust_remote_code=True`) refuses the checkpoint instead of building a plain LLaMA from it.
"""

from __future__ import annotations

from transformers import LlamaConfig


class MegatronDytLlamaConfig(LlamaConfig):
    """`LlamaConfig` plus: which norm every site uses, its α₀, β and shift, the embedding scale.

    norm_type: "dyt" (γ·f(α·x)+β, f = `dyt_squash`), "derf" (γ·erf(α·x+s)+β), "layernorm" or
    "rmsnorm". The α₀ values and `derf_shift` are only initial values (the checkpoint holds the
    learned ones); `embedding_scale` adds a learned scalar multiplied into the token embeddings.
    """

    model_type = "megatron_dyt_llama"

    def __init__(
        self,
        norm_type: str = "dyt",
        norm_beta: bool = False,
        dyt_squash: str = "tanh",
        norm_alpha_attn: float = 0.5,
        norm_alpha_mlp: float = 0.5,
        norm_alpha_final: float = 0.5,
        derf_shift: float = 0.0,
        embedding_scale: bool = True,
        **kwargs,
    ):
        self.norm_type = norm_type
        self.norm_beta = norm_beta
        self.dyt_squash = dyt_squash
        self.norm_alpha_attn = norm_alpha_attn
        self.norm_alpha_mlp = norm_alpha_mlp
        self.norm_alpha_final = norm_alpha_final
        self.derf_shift = derf_shift
        self.embedding_scale = embedding_scale
        super().__init__(**kwargs)


__all__ = ["MegatronDytLlamaConfig"]
