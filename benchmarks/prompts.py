"""A fixed set of short, varied prompts for greedy-agreement checks (a quantized mode against the
unquantized one): the same list for benchmarks/kv_int8.py and tests/test_kv_int8.py, so their figures
compare."""

AGREEMENT_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
    "The three laws of thermodynamics are", "Here is a recipe for banana bread:", "import numpy as np\n",
    "The history of the Roman Empire", "Q: What is the boiling point of water?\nA:", "Dear hiring manager,",
    "The best way to learn a new language is", "In machine learning, overfitting means",
    "1, 1, 2, 3, 5, 8,", "The mitochondria is", "SELECT name FROM users WHERE",
    "A haiku about autumn:\n", "The main causes of the First World War were",
]
