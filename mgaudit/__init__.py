"""mgaudit: audit and fix batch-dependent nondeterminism in greedy LLM decoding."""

__version__ = "0.1.0"
