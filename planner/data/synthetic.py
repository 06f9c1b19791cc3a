"""A small synthetic topic-classification task for the tiny adapter (tests, quick demos).

Texts mix 1–3 topic words with filler; the label is the topic.  It exercises the whole loop
(heads, exits, quantization, search) in seconds; it says nothing about real accuracy.
"""

from __future__ import annotations

import random

from planner.data.dataset import TextDataset

__all__ = ["synthetic_topics"]

_TOPICS = {
    "animals": ["cat", "dog", "horse", "bird", "fish", "cow", "sheep", "goat", "mouse", "lion"],
    "weather": ["rain", "snow", "wind", "storm", "sun", "cloud", "fog", "hail", "thunder", "frost"],
    "food": ["bread", "cheese", "apple", "rice", "soup", "cake", "pasta", "salad", "butter", "honey"],
}
_FILLER = ["the", "a", "of", "and", "is", "very", "some", "with", "on", "in", "today", "we", "saw"]


def synthetic_topics(n_per_class: int = 40, seed: int = 0) -> TextDataset:
    """Three topics, `n_per_class` texts each, split 60/20/20 per class (deterministic)."""
    rng = random.Random(seed)
    records = []
    for label, words in _TOPICS.items():
        for i in range(n_per_class):
            tokens = rng.sample(words, rng.randint(1, 3)) + rng.sample(_FILLER, rng.randint(2, 8))
            rng.shuffle(tokens)
            split = "train" if i < 0.6 * n_per_class else "calibration" if i < 0.8 * n_per_class else "test"
            records.append({"text": " ".join(tokens), "label": label, "split": split})
    return TextDataset.from_records(f"synthetic-topics-{n_per_class}-s{seed}", records)
