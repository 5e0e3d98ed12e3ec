"""The packed row's one flash varlen call equals one SDPA call per document (outputs and Q/K/V gradients, causal and
windowed, Mistral-7B's heads). GPU only; ``python tests/gpu/packed_attention.py`` also times them."""

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("window", [None, 256])
def test_one_varlen_call_equals_one_call_per_document(window):
    from packed_attention import compare  # tests/gpu is on the path (conftest)

    compare(window)
