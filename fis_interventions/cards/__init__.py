"""Feature cards: top contexts, activation histogram, logit lens and driving latent pairs of a feature.

API: :func:`features` (``fis features``), :func:`build_cards` (several points in one pass; used by reports
and ``fis screen --cards``), :func:`write_cards`, :func:`card_markdown`.
"""

from .build import FeatureKey, build_cards, features, parse_ids, write_cards
from .render import card_doc, card_markdown

__all__ = ["FeatureKey", "build_cards", "card_doc", "card_markdown", "features", "parse_ids", "write_cards"]
