"""Configuration of a Baichuan2-style causal LM (quantkit's own re-implementation).

Written the way hub remote code is (a plain `__init__` that stores its arguments), so a
folder using it loads exactly like a downloaded Baichuan2 checkpoint. The two layouts
differ only in their position encoding, and the config says which:

- 7B layout: rotary embeddings; the config has `max_position_embeddings`.
- 13B layout: ALiBi attention bias; the config has `model_max_length` and no
  `max_position_embeddings` (the same test quantkit.families.is_alibi_baichuan applies).
"""

from transformers import PretrainedConfig


class BaichuanConfig(PretrainedConfig):
    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=125696,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        hidden_act="silu",
        max_position_embeddings=None,
        model_max_length=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        # Only the rotary (7B) layout stores this key; its absence selects ALiBi.
        if max_position_embeddings is not None:
            self.max_position_embeddings = max_position_embeddings
        self.model_max_length = model_max_length
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def uses_alibi(self) -> bool:
        return getattr(self, "max_position_embeddings", None) is None
