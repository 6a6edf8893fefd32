"""Small synthetic corpora and a rule-based spaCy NER pipeline for fast, deterministic data-pipeline tests.

The corpus has a few topics with their own vocabulary and entities, so retrieval quality can be measured (a
related passage should share the pivot's topic), and the NER is a real spaCy pipeline (``entity_ruler`` on a
blank English model) whose entities are known exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS: dict[str, dict[str, list]] = {
    "astronomy": {
        "words": ["orbit", "telescope", "planet", "comet", "nebula", "galaxy", "eclipse", "asteroid"],
        "ents": [
            ("Jupiter", "LOC"),
            ("Saturn", "LOC"),
            ("Galileo Galilei", "PERSON"),
            ("Hubble", "ORG"),
            ("Andromeda", "LOC"),
        ],
    },
    "music": {
        "words": ["symphony", "sonata", "orchestra", "melody", "harmony", "violin", "concerto", "opera"],
        "ents": [
            ("Mozart", "PERSON"),
            ("Vienna", "GPE"),
            ("Beethoven", "PERSON"),
            ("La Scala", "FAC"),
            ("Salzburg", "GPE"),
        ],
    },
    "cooking": {
        "words": ["recipe", "oven", "flour", "butter", "spice", "sauce", "pastry", "kitchen"],
        "ents": [
            ("Julia Child", "PERSON"),
            ("Lyon", "GPE"),
            ("Le Cordon Bleu", "ORG"),
            ("Naples", "GPE"),
            ("Escoffier", "PERSON"),
        ],
    },
    "sailing": {
        "words": ["harbour", "mast", "keel", "voyage", "anchor", "regatta", "hull", "tide"],
        "ents": [
            ("Magellan", "PERSON"),
            ("Lisbon", "GPE"),
            ("Cape Horn", "LOC"),
            ("Royal Navy", "ORG"),
            ("Plymouth", "GPE"),
        ],
    },
    "geology": {
        "words": ["basalt", "volcano", "sediment", "fossil", "mineral", "crust", "magma", "granite"],
        "ents": [
            ("Iceland", "GPE"),
            ("Charles Lyell", "PERSON"),
            ("Etna", "LOC"),
            ("Grand Canyon", "LOC"),
            ("Royal Society", "ORG"),
        ],
    },
    "chess": {
        "words": ["gambit", "bishop", "endgame", "opening", "rook", "checkmate", "pawn", "tournament"],
        "ents": [
            ("Kasparov", "PERSON"),
            ("Reykjavik", "GPE"),
            ("FIDE", "ORG"),
            ("Carlsen", "PERSON"),
            ("Hastings", "GPE"),
        ],
    },
}


def _sentence(rng: random.Random, topic: str, with_entities: bool) -> str:
    t = TOPICS[topic]
    w = rng.sample(t["words"], 3)
    if not with_entities:
        return f"The {w[0]} and the {w[1]} were often compared with every {w[2]}."
    e1, e2 = rng.sample([e for e, _ in t["ents"]], 2)
    year = rng.randint(1600, 1999)
    forms = [
        f"{e1} is closely linked to the {w[0]} and the {w[1]} of {e2}.",
        f"In {year}, a study of the {w[0]} near {e1} described a new {w[1]}.",
        f"The {w[0]} associated with {e1} was admired for its {w[1]} and {w[2]}.",
    ]
    return rng.choice(forms)


def make_articles(n_per_topic: int = 10, seed: int = 0, entity_free_every: int = 5) -> list[dict]:
    """Articles ``{title, text, topic}`` with two paragraphs each; every ``entity_free_every``-th article has
    no entity in its first paragraph (so pivots without usable entities occur and are counted)."""
    rng = random.Random(seed)
    out = []
    for topic in TOPICS:
        for i in range(n_per_topic):
            no_ents = entity_free_every > 0 and i % entity_free_every == 0
            p1 = " ".join(_sentence(rng, topic, not no_ents) for _ in range(3))
            p2 = " ".join(_sentence(rng, topic, True) for _ in range(3))
            out.append({"title": f"{topic.title()} {i}", "text": f"{p1}\n{p2}", "topic": topic})
    return out


def write_jsonl(path: Path, articles: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(a) + "\n" for a in articles), encoding="utf-8")
    return path


def build_ruler_ner(out_dir: Path) -> Path:
    """A real spaCy pipeline whose entities are exactly the topic entities (+ 4-digit years as DATE)."""
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    patterns = [{"label": label, "pattern": ent} for t in TOPICS.values() for ent, label in t["ents"]]
    patterns.append({"label": "DATE", "pattern": [{"SHAPE": "dddd"}]})
    ruler.add_patterns(patterns)
    nlp.to_disk(out_dir)
    return out_dir


def entity_labels() -> dict[str, str]:
    return {ent: label for t in TOPICS.values() for ent, label in t["ents"]}
