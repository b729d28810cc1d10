"""sapo-bench: a reproducible benchmark for RL training of search agents (SAPO vs GRPO and friends)."""

__version__ = "0.1.0"
