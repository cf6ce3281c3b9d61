"""What the load generator sends: realistic chat messages and image prompts.

Classify traffic is the project's own labeled chat messages (data/classifier/), so text lengths and
tokenization cost are those of real traffic; a short built-in list stands in when the data is absent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

FALLBACK_TEXTS: tuple[str, ...] = (
    "can I see you in the kitchen?",
    "see you tomorrow",
    "make an image of you in Paris at night, wearing a red coat",
    "lol",
    "I took a nice picture yesterday of the sunset over the lake near my house",
    "send me a selfie from bed, messy hair and all",
    "how was your day?",
    "draw yourself wearing my hoodie",
)

GENERATE_PROMPTS: tuple[str, ...] = (
    "a portrait of a woman in a cafe, soft window light",
    "a red fox in the snow at dawn",
    "an old fisherman on a dock at sunrise",
    "a neon-lit street in Tokyo in the rain",
)


def chat_texts() -> list[str]:
    """Every labeled chat message, in a fixed order (stable across runs)."""
    try:
        from training.classifier_data import load_examples

        texts = [e.text for e in load_examples()]
    except (ImportError, OSError, ValueError) as e:
        log.warning("chat messages unavailable (%s); using %d built-in texts", e, len(FALLBACK_TEXTS))
        texts = []
    return texts or list(FALLBACK_TEXTS)


@dataclass(frozen=True)
class GenerateWorkload:
    """One generate request's knobs (the small local FLUX: keep it cheap enough to measure)."""

    width: int = 256
    height: int = 256
    steps: int = 4
    guidance: float = 3.5
