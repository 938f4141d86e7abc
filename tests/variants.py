"""Tiny HF-style configs covering every supported model variant."""

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
            tie_word_embeddings=False, model_type="llama",
            architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "mha": dict(BASE),
    "gqa_tied": dict(BASE, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_bias": dict(BASE, model_type="qwen2", num_key_value_heads=2,
                       architectures=["Qwen2ForCausalLM"], rope_theta=1e6),
    "llama3_scaling": dict(
        BASE, num_key_value_heads=1, rope_theta=10000.0,
        max_position_embeddings=512,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0,
                          original_max_position_embeddings=32)),
    "mistral_headdim": dict(BASE, model_type="mistral", num_key_value_heads=2,
                            head_dim=32, architectures=["MistralForCausalLM"]),
}
