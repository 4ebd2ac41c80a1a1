"""How a DiT's inputs split over sequence-parallel ranks: the declaration a model makes, read by parallel/sequence.py.

A DiT's tokens come in segments (FLUX.1: "text" and "image"; Z-Image: "image" and "text"; Wan: "video"). Each
segment is split evenly over the sequence-parallel ranks, each input tensor that carries a segment along one of its
dimensions is split with it, and each rank runs the model on its shard of every segment. An attention module says
which segments its sequence consists of, in local order (`Attention(segments=("text", "image"))` for FLUX.1's joint
attention: each rank holds [its text shard | its image shard]); one with `segments=None` is a cross-attention whose
keys and values are not split (they need no exchange). The output is gathered along one dimension from one segment.

Plain data, no torch, so that a model file can declare its sharding without importing the parallel machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sharded:
    """A tensor's sequence dimension and the token segment it carries."""

    dim: int
    segment: str


@dataclass(frozen=True)
class SequenceSharding:
    """Which forward arguments split (by name) and how the output gathers.

    `key_masks` names, per segment, the input that marks its real tokens ([B, length] bool, True = real; the input
    may be None: all real), for models whose attentions take a `key_mask` (a padded text): the sequence-parallel
    attentions then mask the keys of the whole sequence from it."""

    inputs: dict[str, Sharded]
    output: Sharded
    key_masks: dict[str, str] = field(default_factory=dict)

    @property
    def segments(self) -> tuple[str, ...]:
        """Every segment the inputs carry, in first-seen order."""
        return tuple(dict.fromkeys(s.segment for s in self.inputs.values()))
