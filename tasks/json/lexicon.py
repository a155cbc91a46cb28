"""The words a generated example shows: property names and string values. `builtin` takes them from the
vocabulary (`vocabulary`); `train` and `heldout` invent them, so that an evaluation set can use names and values
never seen in training.

An invented word is 2-4 consonant-vowel syllables ("kelu", "mobari"), drawn with the example's rng; it belongs to
the heldout half when the CRC-32 of its lowercase letters is odd, and draws are repeated until one lands in the
wanted half (and is not a word of the builtin vocabulary). Every invented name or value is made of words (or, for
codes, an uppercase prefix) of one half only, so a `train` and a `heldout` example never share a property name or
a string value. Numbers, booleans and dates are drawn as in `builtin`: they cannot be held out.

Within one example (one schema draw) a builtin property maps to one invented name, and distinct properties map to
distinct names; an enum property keeps one list of options, and a code property one prefix."""

from __future__ import annotations

import random
import re
import zlib

from dgemma_ft.tasks.json.vocabulary import DOMAINS, FIRST, LAST, POOLS, PROPERTIES

VOCABULARIES = ("builtin", "train", "heldout")
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = (2, 2, 2, 2, 3, 3, 3, 4)  # syllables of an invented word, drawn uniformly from this
LETTERS = "ABCDEFGHIJKLMNOPRSTVZ"  # code prefixes
TLDS = ("com", "io", "org", "net")  # email domains end in a real top-level domain (format, not vocabulary)
TWO_WORD_NAMES = 0.15  # share of one-word builtin names that become two invented words joined by "_"


def _builtin_words() -> frozenset[str]:
    texts = [*PROPERTIES, *FIRST, *LAST, *DOMAINS, *(w for pool in POOLS.values() for w in pool)]
    texts += [prefix for kind in PROPERTIES.values() if kind[0] == "code" for prefix in kind[1:]]
    texts += [option for kind in PROPERTIES.values() if kind[0] == "enum" for option in kind[1]]
    return frozenset(part for text in texts for part in re.split(r"[^a-z0-9]+", text.lower()) if part)


BUILTIN_WORDS = _builtin_words()


def is_heldout(word: str) -> bool:
    """Whether an invented word (or code prefix) belongs to the heldout half: a stable hash of its letters."""
    return zlib.crc32(word.lower().encode()) & 1 == 1


class BuiltinLexicon:
    """Names and values from the builtin vocabulary (the rng draws of the original generator, unchanged)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def name(self, name: str) -> str:
        return name

    def person(self) -> str:
        return f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"

    def pick(self, pool: str) -> str:
        return self.rng.choice(POOLS[pool])

    def prefix(self, prefix: str) -> str:
        return prefix

    def options(self, options: list[str]) -> list[str]:
        return list(options)

    def email(self) -> str:
        rng = self.rng
        first, last = rng.choice(FIRST).lower(), rng.choice(LAST).lower()
        user = f"{first}.{last}" if rng.random() < 0.5 else f"{first}{rng.randint(1, 99)}"
        return f"{user}@{rng.choice(DOMAINS)}"


class InventedLexicon(BuiltinLexicon):
    """Invented names and values from one half of the invented words (`heldout` true or false)."""

    def __init__(self, rng: random.Random, heldout: bool):
        super().__init__(rng)
        self.heldout = heldout
        self._names: dict[str, str] = {}
        self._prefixes: dict[str, str] = {}
        self._options: dict[tuple[str, ...], list[str]] = {}

    def word(self) -> str:
        rng = self.rng
        while True:
            word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.choice(SYLLABLES)))
            if is_heldout(word) == self.heldout and word not in BUILTIN_WORDS:
                return word

    def name(self, name: str) -> str:
        if name not in self._names:
            used = set(self._names.values())
            two = "_" in name or self.rng.random() < TWO_WORD_NAMES
            while True:
                invented = f"{self.word()}_{self.word()}" if two else self.word()
                if invented not in used:
                    break
            self._names[name] = invented
        return self._names[name]

    def person(self) -> str:
        return f"{self.word().capitalize()} {self.word().capitalize()}"

    def pick(self, pool: str) -> str:
        rng = self.rng
        if pool in ("words", "skills"):
            return self.word()
        if pool == "titles" and rng.random() < 0.5:
            return f"{self.word().capitalize()} {self.word().capitalize()}"
        if pool == "models" and rng.random() < 0.5:
            return f"{self.word().capitalize()} {rng.randint(2, 99)}"
        return self.word().capitalize()

    def prefix(self, prefix: str) -> str:
        if prefix not in self._prefixes:
            rng, used = self.rng, set(self._prefixes.values())
            while True:
                invented = "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 3)))
                if (is_heldout(invented) == self.heldout and invented.lower() not in BUILTIN_WORDS
                        and invented not in used):
                    break
            self._prefixes[prefix] = invented
        return self._prefixes[prefix]

    def options(self, options: list[str]) -> list[str]:
        key = tuple(options)
        if key not in self._options:
            invented: list[str] = []
            count = self.rng.randint(2, 4)
            while len(invented) < count:
                word = self.word()
                if word not in invented:
                    invented.append(word)
            self._options[key] = invented
        return list(self._options[key])

    def email(self) -> str:
        rng = self.rng
        user = f"{self.word()}.{self.word()}" if rng.random() < 0.5 else f"{self.word()}{rng.randint(1, 99)}"
        return f"{user}@{self.word()}.{rng.choice(TLDS)}"


def lexicon(vocabulary: str, rng: random.Random) -> BuiltinLexicon:
    """A fresh lexicon (new invented names) for one schema draw."""
    if vocabulary == "builtin":
        return BuiltinLexicon(rng)
    return InventedLexicon(rng, heldout=vocabulary == "heldout")
