"""Generation for every architecture: incremental decoding (nn/decode.py), constraints as logits processors,
per-token provenance traces, and self-speculative decoding with in-block MTP heads.

Prompts and outputs are token ids of a `Vocabulary` (soma_lightning/vocabulary.py): by default the V1 byte
contract, bytes 0-255 and EOS; for a model trained on a tokenizer file, the tokenizer's ids and its EOS. Only
those are ever emitted (PAD and unused ids are masked), and EOS ends a row. A model with a declared token
space (`vocab_ranges`) may emit every id of it but PAD. Constraints over bytes need the byte vocabulary.

Modules, from the entry point down:
- sampling.py: `generate`, which picks the decoding path, and the sampling loop;
- constraints.py: the logits processors (token sets, repetition penalty, fact vocabulary, regex) and
  regex.py, the byte-level regex automaton behind `RegexConstraint`;
- trace.py: per-token trace records and `write_trace`;
- decoders.py: next-token logits by full recompute (the reference), growing caches, or static caches, and
  greedy speculative decoding;
- cuda_graph.py: static decoding, its one-token step captured as a CUDA graph, and which models support it.
"""

from soma_lightning.generation.cuda_graph import static_blocker
from soma_lightning.generation.decoders import Generation, dropless
from soma_lightning.generation.sampling import generate
from soma_lightning.generation.trace import write_trace

__all__ = ["Generation", "dropless", "generate", "static_blocker", "write_trace"]
