"""Published architectures as the memory estimator sees them (their config.json values: no network here, so
the shapes are given, not read from the hub). Shared by the estimator, routing and cost tests."""

from leantune.probe import ModelShape

LLAMA2_7B = ModelShape(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                       intermediate_size=11008, head_dim=128, tied_embeddings=False)
# Llama 3 8B and Llama 3.1 8B have the same shape.
LLAMA3_8B = ModelShape(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       intermediate_size=14336, head_dim=128, tied_embeddings=False)
MISTRAL_7B = ModelShape(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, head_dim=128, tied_embeddings=False)
QWEN25_05B = ModelShape(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                        intermediate_size=4864, head_dim=64, tied_embeddings=True)
QWEN25_15B = ModelShape(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                        intermediate_size=8960, head_dim=128, tied_embeddings=True)
PHI3_MINI = ModelShape(vocab_size=32064, hidden_size=3072, num_layers=32, num_heads=32, num_kv_heads=32,
                       intermediate_size=8192, head_dim=96, tied_embeddings=False)
