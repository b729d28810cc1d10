"""The vLLM engine's tests: `make test-vllm` runs them in .venv-vllm. Elsewhere vLLM is missing and
they are skipped (the main suite deselects the `vllm` marker anyway)."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `make install-vllm`, then `make test-vllm`")
