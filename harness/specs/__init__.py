"""Op specs: one module per op family, each defining its ``OpSpec`` values.

``SPECS`` is the explicit list the registry serves, in this order. Adding an
op: a spec here, a kernel file per framework (``bi_torch/ops``,
``bi_jax/ops``), and tests only for properties that belong to that op alone.
"""

from harness.specs import activation, attention, embedding, matmul, rms_norm, rows

SPECS = (
    rms_norm.SPEC,
    matmul.MATMUL,
    matmul.LINEAR,
    matmul.BMM,
    rows.SUM,
    rows.MEAN,
    rows.SOFTMAX,
    rows.LOG_SOFTMAX,
    attention.ATTENTION,
    attention.ATTENTION_DECODE,
    embedding.SPEC,
    activation.SPEC,
)
