"""Pre- and post-processing for the UniModel predict API (value items), by `config.processing.kind`.

A processor turns each item's JSON value into engine input arrays (`prepare`, a whole batch at once)
and the engine's output rows back into a JSON value (`finish`). A bad input fails that item alone
with InvalidArgument. Plain logic: no transport, no engine; assets (tokenizer.json, labels.txt) are
read when the processor is built, at model load.

One module per kind (passthrough.py for "none", text_embedding.py, image_classification.py, tabular.py),
each on the base class in processor.py; `PROCESSORS` maps each kind to its class.

kinds:
  none                  {"<input>": nested list, ...} (or a bare nested list for a one-input model)
                        -> {"<output>": nested list, ...}; a value without the batch dimension is one row
  text-embedding        "text" | ["text", ...] -> {"embedding": [...], "tokens": n}
                        | {"embeddings": [[...], ...], "tokens": [n, ...]}
  image-classification  "<base64 JPEG/PNG>" | {"image": "<base64>", "top_k": k}
                        -> {"labels": [{"label", "index", "score"}, ...]}
  tabular               [f1, .., fn] | [[f1, .., fn], ...]
                        -> {"label", "index", "scores": {label: p}} (a list of them for a list of rows)
"""

from __future__ import annotations

from unimodel.core import errors
from unimodel.v1 import model_pb2
from unimodel.worker.processors.image_classification import ImageClassification
from unimodel.worker.processors.passthrough import PassThrough
from unimodel.worker.processors.processor import Processor
from unimodel.worker.processors.tabular import Tabular
from unimodel.worker.processors.text_embedding import TextEmbedding
from unimodel.worker.tensor_batches import Layout

__all__ = ["PROCESSORS", "Processor", "make_processor"]

PROCESSORS: dict[str, type[Processor]] = {
    "none": PassThrough,
    "text-embedding": TextEmbedding,
    "image-classification": ImageClassification,
    "tabular": Tabular,
}


def make_processor(config: model_pb2.ModelConfig, layout: Layout | None = None) -> Processor:
    """The processor of `config` with its assets read (call off the event loop: it reads files)."""
    kind = config.processing.kind or "none"
    cls = PROCESSORS.get(kind)
    if cls is None:
        raise errors.FailedPrecondition(f"model {config.name!r}: unknown processing kind {kind!r}")
    return cls(config, layout or Layout.of(config))
