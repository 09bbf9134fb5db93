"""Speculative decoding (survey §2.2): a proposer drafts tokens, the target verifies them in one pass.

config.py     `SpeculativeConfig` (vLLM's speculative_config dict), validated without torch
base.py       `Proposer`, the interface a draft method implements, and its registry
ngram.py      prompt lookup: the last n tokens matched earlier in the prompt and output
draft_model.py  a smaller (or quantized) model with the target's vocabulary, its own paged KV cache indexed
              by the target's block tables
layer_skip.py self-speculation: the target's first layers, its norm and its head (early exit)
rejection.py  verification: rejection sampling that keeps the target's distribution exactly
adaptive.py   how many tokens each request drafts, from its measured acceptance and the step-time model
"""
