"""sapo-world: a seeded fictional world that mirrors the seven QA benchmarks (DESIGN §8).

    sapo-world --out DIR [--seed 0] [--scale 1.0]

Writes DIR/corpus.jsonl ({id, contents: "title\\ntext"}), DIR/<dataset>/<split>.jsonl in FlashRAG
format ({id, question, golden_answers, metadata}) and DIR/world.json (config and file hashes).

How the world is built, and why:
1. Entities are invented (people, cities, countries, organisations, films, books), so no model
   can answer from pre-training; every fact sits in exactly one passage, its subject's.
2. Distractors are built in: surnames are shared by whole families, and some people have a
   near-namesake (one vowel apart, same surname) with different facts.
3. Nationality differs from the birthplace's country for some people, so "which country was X
   born in" needs the city passage, not a shortcut through the demonym.
4. Question subjects are split into a train pool and an eval pool: dev and test questions never
   ask about an entity that a training question starts from.
5. metadata records hops, type, template, the chain of passage ids a searcher must read (their
   titles are the ideal queries) and evidence: (passage id, string) pairs that must appear.
6. Same seed → byte-identical files (no set iteration, no hash-order dependence).
7. It is an instrument (DESIGN §8a), so it refuses to be gamed: no alias word is shared by
   hundreds of golds (no "X City", no "Ltd."), yes/no answers alternate by construction, and
   `shortcut_report` measures the most common answer and the best constant string of every split
   before anything is written; a world that breaks a bound is an error, never a file.
8. Every column is learnable: the NQ mirror asks every single-hop relation, the HotpotQA mirror
   every two-hop path and comparison that any test mirror asks (TEMPLATES, `taught`); the other
   mirrors change the wording, the entities (PopQA's long tail) or both (Bamboogle's forms).
9. One fact a sentence, so a small reader finds each answer next to the word that asks for it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sapo_bench.io import atomic_write_json, atomic_write_text

# Written into world.json; a cached world made by another generator version is made again.
# 3: the NQ mirror's second wordings.
GENERATOR = "sapo-world/3"
SPLITS = {  # split sizes at scale 1; which splits exist mirrors the real datasets
    "nq": {"train": 6000, "dev": 300, "test": 500},
    "triviaqa": {"train": 3000, "dev": 300, "test": 500},
    "popqa": {"test": 500},
    "hotpotqa": {"train": 6000, "dev": 500},
    "2wikimultihopqa": {"train": 2000, "dev": 500},
    "musique": {"train": 2000, "dev": 500},
    "bamboogle": {"test": 125},
}


@dataclass
class WorldConfig:
    seed: int = 0
    scale: float = 1.0  # multiplies entity counts and split sizes (tests use small worlds)
    people: int = 7000
    cities: int = 700
    countries: int = 40
    orgs: int = 1500
    films: int = 1500
    books: int = 1500
    near_name_frac: float = 0.1
    eval_frac: float = 0.3

    def n(self, count: int) -> int:
        return max(4, round(count * self.scale))


# --- names -------------------------------------------------------------------------------------

_ON = "b br c d dr f g gr h j k l m n p qu r s st t th tr v w z".split()
_VOW = "a e i o u ae ai ea io ou".split()
_END = "n r l s th nd rd ck m x ll ss ren den mir wyn".split()
OCCUPATIONS = {
    "film": ["film director"], "book": ["novelist", "poet", "essayist"],
    "org": ["entrepreneur", "engineer", "banker", "industrialist"],
    "other": ["chemist", "painter", "architect", "lawyer", "sculptor", "physician", "botanist",
              "astronomer", "composer", "diplomat", "historian", "cartographer"],
}
INDUSTRIES = ["shipping", "textiles", "mining", "publishing", "railway", "brewing", "optics", "insurance"]
ORG_SUFFIX = {"shipping": "Lines", "textiles": "Mills", "mining": "Mining", "publishing": "Press",
              "railway": "Railways", "brewing": "Breweries", "optics": "Optical", "insurance": "Assurance"}
FILM_GENRES = ["drama", "comedy", "western", "thriller", "musical", "documentary"]
BOOK_GENRES = ["mystery", "historical", "satirical", "fantasy", "romance", "adventure"]
ADJ = ("Silent Glass Hollow Crimson Last Northern Broken Golden Quiet Burning Pale Wandering Iron "
       "Hidden Bitter Distant Winter Velvet Drowned Painted").split()
NOUN = ("Harbour Orchard Lantern Meridian Archive Tide Citadel Sparrow Causeway Mirror Garden "
        "Compass Bell Voyage Furnace Island Letter Crown Bridge Shore").split()
CITY_END = "ford mouth holt wick port bury stead haven mere field gate brook".split()
COUNTRY_END = ["ia", "ora", "land", "ar", "enia"]
FORMS = ["Republic", "Kingdom", "Federation", "Commonwealth", "Union", "Confederacy"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ON) + rng.choice(_VOW) + rng.choice(_END)


def _word(rng: random.Random, parts: int) -> str:
    return "".join(_syllable(rng) for _ in range(parts)).capitalize()


def _unique(rng, make, taken: set, tries: int = 1000) -> str:
    for _ in range(tries):
        s = make(rng)
        if s not in taken:
            taken.add(s)
            return s
    raise WorldError("the name space is exhausted; lower the entity counts")


def _near(name: str, rng: random.Random) -> str:
    """The same name with one vowel changed: a near-namesake for retrieval to confuse."""
    spots = [i for i, c in enumerate(name) if c in "aeiou"]
    i = rng.choice(spots)
    return name[:i] + rng.choice([v for v in "aeiou" if v != name[i]]) + name[i + 1:]


# --- entities ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Entity:
    kind: str
    name: str
    aliases: list[str]
    attrs: dict = field(default_factory=dict)
    pid: str = ""
    pool: str = "train"
    mentions: int = 0  # how many other passages name it: PopQA asks about the rarely named ones


class World:
    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        rng = self.rng = random.Random(cfg.seed)
        taken: set[str] = set()
        self.countries = []
        # At least 12 countries (where the cities allow): with the 4 of a 0.1-scale world, one
        # country answered 14% of 2Wiki's questions.
        for _ in range(min(max(12, cfg.n(cfg.countries)), cfg.n(cfg.cities))):
            root = _unique(rng, lambda r: _word(r, 1) + r.choice(COUNTRY_END), taken)
            demonym = root + "n" if root.endswith("a") else root + "ian"
            # The official name is not a gold alias: its form word ("Republic of") is shared by a
            # sixth of the countries, and as a constant answer "Republic of" scored F1 0.22 on 2Wiki.
            official = f"{rng.choice(FORMS)} of {root}"
            self.countries.append(Entity("country", root, [root], {"official": official, "demonym": demonym}))
        self.cities = []
        for i in range(cfg.n(cfg.cities)):
            name = _unique(rng, lambda r: _word(r, 1) + r.choice(CITY_END), taken)
            country = self.countries[i] if i < len(self.countries) else rng.choice(self.countries)
            # One name only: an alias like "X City" puts the word "City" into hundreds of golds,
            # and the constant answer "City" then scores F1 0.28 (measured on the old world).
            self.cities.append(Entity("city", name, [name], {"country": country, "population": rng.randrange(8, 900) * 1000}))
        for country in self.countries:
            country.attrs["capital"] = rng.choice([c for c in self.cities if c.attrs["country"] is country])
        firsts = [_word(rng, 1) for _ in range(600)]
        surnames = [_word(rng, 2) for _ in range(max(50, cfg.n(cfg.people) // 12))]
        self.people = []
        roles = ["film"] * cfg.n(cfg.films // 3) + ["book"] * cfg.n(cfg.books // 3) + ["org"] * cfg.n(cfg.orgs // 2)
        roles += ["other"] * (cfg.n(cfg.people) - len(roles))
        for role in roles:
            name = _unique(rng, lambda r: f"{r.choice(firsts)} {r.choice(surnames)}", taken)
            self.people.append(self._person(name, role))
        for p in list(self.people[: round(len(self.people) * cfg.near_name_frac)]):
            first, last = p.name.split(" ", 1)
            near = f"{_near(first, rng)} {last}"
            if near not in taken:
                taken.add(near)
                self.people.append(self._person(near, "other"))
        by_role = {r: [p for p in self.people if p.attrs["role"] == r] for r in OCCUPATIONS}
        singles = list(self.people)
        rng.shuffle(singles)
        for a, b in zip(singles[0: len(singles) // 3: 2], singles[1: len(singles) // 3: 2]):
            a.attrs["spouse"], b.attrs["spouse"] = b, a
        self.orgs = []
        for _ in range(cfg.n(cfg.orgs)):
            founder = rng.choice(by_role["org"])
            industry = rng.choice(INDUSTRIES)
            base = _unique(rng, lambda r: f"{r.choice(surnames)} {ORG_SUFFIX[industry]}", taken)
            year = founder.attrs["birth_year"] + rng.randrange(22, 50)
            self.orgs.append(Entity("org", base, [base], {"founder": founder, "year": year, "industry": industry, "hq": rng.choice(self.cities)}))
        for p in self.people:
            if rng.random() < 0.5:
                p.attrs["employer"] = rng.choice(self.orgs)
        self.works = []
        for kind, count, genres, role in (("film", cfg.films, FILM_GENRES, "film"), ("book", cfg.books, BOOK_GENRES, "book")):
            for _ in range(cfg.n(count)):
                title = _unique(rng, lambda r: r.choice([f"The {r.choice(ADJ)} {r.choice(NOUN)}", f"{r.choice(NOUN)} of {_word(r, 1)}",
                                                         f"The {r.choice(NOUN)} of {_word(r, 1)}"]), taken)
                maker = rng.choice(by_role[role])
                self.works.append(Entity(kind, title, [title], {"maker": maker, "year": maker.attrs["birth_year"] + rng.randrange(25, 60),
                                                                "genre": rng.choice(genres)}))
        self.entities = self.countries + self.cities + self.people + self.orgs + self.works
        order = list(range(len(self.entities)))
        rng.shuffle(order)  # passage ids carry no hint of the entity's kind
        for pid, i in enumerate(order):
            self.entities[i].pid = str(pid)
        for e in self.entities:
            e.pool = "eval" if rng.random() < cfg.eval_frac else "train"
        self.passages = {e.pid: self._passage(e) for e in sorted(self.entities, key=lambda e: int(e.pid))}

    def _person(self, name: str, role: str) -> Entity:
        rng = self.rng
        first, last = name.split(" ", 1)
        middle = f"{first} {rng.choice('ABCDEFGHJKLMNPRSTW')}. {last}"
        city = rng.choice(self.cities)
        nationality = city.attrs["country"] if rng.random() < 0.7 else rng.choice(self.countries)
        return Entity("person", name, [name, middle], {
            "role": role, "middle": middle, "birth_year": rng.randrange(1820, 1960), "birthplace": city,
            "nationality": nationality, "occupation": rng.choice(OCCUPATIONS[role]), "pronoun": rng.choice(["He", "She"])})

    def _ref(self, e: Entity) -> str:
        e.mentions += 1
        return e.name

    def _passage(self, e: Entity) -> str:
        a, rng, ref = e.attrs, self.rng, self._ref
        if e.kind == "country":
            cap = a["capital"]
            text = (f"{e.name}, officially the {a['official']}, is a country. Its capital is {ref(cap)}. "
                    f"Its people are called {a['demonym']}s.")
        elif e.kind == "city":
            c = a["country"]
            text = f"{e.name} is a city in {ref(c)}. It has about {a['population']:,} inhabitants."
            if c.attrs["capital"] is e:
                text += f" It is the capital of {c.name}."
        elif e.kind == "person":
            pr = a["pronoun"]
            text = (f"{a['middle']} is a {a['nationality'].attrs['demonym']} {a['occupation']}. "
                    + f"{pr} was born in {ref(a['birthplace'])} in {a['birth_year']}.")
            if "employer" in a:
                text += f" {pr} worked for {ref(a['employer'])}."
            if "spouse" in a:
                text += f" {pr} was married to {ref(a['spouse'])}."
        elif e.kind == "org":
            text = (f"{e.name} is a {a['industry']} company. It was founded in {a['year']} by {ref(a['founder'])}. "
                    f"Its headquarters are in {ref(a['hq'])}.")
        elif e.kind == "film":
            text = f"{e.name} is a {a['genre']} film. It was released in {a['year']}. It was directed by {ref(a['maker'])}."
        else:
            article = "an" if a["genre"][0] in "aeiou" else "a"
            text = (f"{e.name} is {article} {a['genre']} novel. It was published in {a['year']}. "
                    f"It was written by {ref(a['maker'])}.")
        return f"{e.name}\n{text}"


# --- questions ---------------------------------------------------------------------------------


@dataclass
class Question:
    question: str
    answer: Entity | str                   # an entity (its aliases are gold) or a literal
    chain: list[Entity]                    # passages to read, in order
    evidence: list[tuple[Entity, str]]     # (passage, string it must contain)
    qtype: str

    def golds(self) -> list[str]:
        return list(self.answer.aliases) if isinstance(self.answer, Entity) else [self.answer]


def _year(e: Entity) -> str:
    """A work's or organisation's year, or a person's birth year."""
    return str(e.attrs["year"] if "year" in e.attrs else e.attrs["birth_year"])


def _demonym(c: Entity) -> str:
    return c.attrs["demonym"]


# Relations whose answer is a string, not an entity: read off the last entity of a path.
LITERALS = {"birth_year": _year, "founded": _year, "released": _year, "published": _year,
            "occupation": lambda e: e.attrs["occupation"], "genre": lambda e: e.attrs["genre"],
            "nationality": lambda e: _demonym(e.attrs["nationality"])}


def _follow(e: Entity, rel: str):
    """Follow a dotted relation path ("maker.birthplace", "employer.founded") from e.

    Returns (answer, chain of passages to read, evidence) or None where a relation is missing
    (not everyone is married or employed). The final entity's passage is read only when a
    literal is taken from it.
    """
    keys = rel.split(".")
    last = LITERALS.get(keys[-1])
    if last is not None:
        keys = keys[:-1]
    chain, evidence, cur = [e], [], e
    for k in keys:
        if k not in cur.attrs:
            return None
        nxt = cur.attrs[k]
        evidence.append((cur, nxt.name))
        cur = nxt
        chain.append(cur)
    if last is None:
        chain.pop()
        return cur, chain, evidence
    value = last(cur)
    evidence.append((cur, value))
    return value, chain, evidence


# name -> (subject kind, pair, relation, wording). pair: None for one subject; "first" for a
# comparison of two subjects' years (answer: the earlier one); an attribute for a yes/no question
# on whether two subjects share it (generated alternately yes and no). Relations are dotted paths
# over the entities' attributes (see _follow). The NQ mirror asks every single-hop relation and
# the HotpotQA mirror every path and comparison that a test mirror asks (`taught` checks it), so
# every column is learnable from the train mix; the test mirrors differ in wording, entities or
# both, and Bamboogle's wordings are used nowhere else.
# The NQ mirror asks each relation in two wordings (`_alt`), the second opening as the multi-hop
# questions do ("In which city is X headquartered" beside HotpotQA's "In which city is the company
# that X worked for headquartered?"), so the number of hops shows only in the relation words
# ("the company that ..."). Measured with one wording per relation (qwen2-micro-1m, 30 GRPO steps
# from a warm start that stops early on half the multi-hop questions): RL learnt the second search
# from the openers, and did it on every TriviaQA/PopQA question that opens like a HotpotQA one
# ("In which year was X born?": 12 of 12 searched twice, all wrong), single-hop EM 0.67 -> 0.53.
# NQ's questions are lower-case and have no "?"; the mirror drops the "?" (the prompt adds it back,
# as Search-R1's does) but writes the first word and the names capitalised. Measured on a 1M warm
# start: to a tokenizer trained on this world "Ann Lee" and "ann lee" are unrelated tokens, and
# with lower-case NQ questions the only capitalised questions of the train mix were HotpotQA's
# two-hop ones, so the policy searched twice on every capitalised single-hop question: TriviaQA
# EM 0.03 and PopQA 0.00, against NQ 0.48.
L = lambda e: e.name  # noqa: E731 - the names inside NQ's questions
N = lambda e: e.name  # noqa: E731
TEMPLATES = {
    "nq": {
        "birthplace": ("person", None, "birthplace", lambda e: f"Where was {L(e)} born"),
        "birth_year": ("person", None, "birth_year", lambda e: f"When was {L(e)} born"),
        "employer": ("person", None, "employer", lambda e: f"Who did {L(e)} work for"),
        "spouse": ("person", None, "spouse", lambda e: f"Who was {L(e)} married to"),
        "occupation": ("person", None, "occupation", lambda e: f"What was {L(e)}'s occupation"),
        "nationality": ("person", None, "nationality", lambda e: f"What nationality was {L(e)}"),
        "country": ("city", None, "country", lambda e: f"What country is {L(e)} in"),
        "capital": ("country", None, "capital", lambda e: f"What is the capital of {L(e)}"),
        "founder": ("org", None, "founder", lambda e: f"Who founded {L(e)}"),
        "founded": ("org", None, "founded", lambda e: f"When was {L(e)} founded"),
        "hq": ("org", None, "hq", lambda e: f"Where is {L(e)} headquartered"),
        "director": ("film", None, "maker", lambda e: f"Who directed {L(e)}"),
        "released": ("film", None, "released", lambda e: f"When was {L(e)} released"),
        "genre": ("film", None, "genre", lambda e: f"What genre of film is {L(e)}"),
        "author": ("book", None, "maker", lambda e: f"Who wrote {L(e)}"),
        "published": ("book", None, "published", lambda e: f"When was {L(e)} published"),
        "birthplace_alt": ("person", None, "birthplace", lambda e: f"In which town was {L(e)} born"),
        "birth_year_alt": ("person", None, "birth_year", lambda e: f"In what year was {L(e)} born"),
        "employer_alt": ("person", None, "employer", lambda e: f"Which company employed {L(e)}"),
        "spouse_alt": ("person", None, "spouse", lambda e: f"Whom did {L(e)} marry"),
        "occupation_alt": ("person", None, "occupation", lambda e: f"What is the occupation of {L(e)}"),
        "nationality_alt": ("person", None, "nationality", lambda e: f"Which nationality did {L(e)} have"),
        "country_alt": ("city", None, "country", lambda e: f"In which country is {L(e)} located"),
        "capital_alt": ("country", None, "capital", lambda e: f"What city is the capital of {L(e)}"),
        "founder_alt": ("org", None, "founder", lambda e: f"Who was the founder of {L(e)}"),
        "founded_alt": ("org", None, "founded", lambda e: f"In what year was {L(e)} founded"),
        "hq_alt": ("org", None, "hq", lambda e: f"In which city is {L(e)} headquartered"),
        "director_alt": ("film", None, "maker", lambda e: f"Who was the director of the film {L(e)}"),
        "released_alt": ("film", None, "released", lambda e: f"In what year was {L(e)} released"),
        "genre_alt": ("film", None, "genre", lambda e: f"What is the genre of {L(e)}"),
        "author_alt": ("book", None, "maker", lambda e: f"Who was the author of {L(e)}"),
        "published_alt": ("book", None, "published", lambda e: f"In which year was {L(e)} published"),
    },
    "triviaqa": {
        "birthplace": ("person", None, "birthplace", lambda e: f"Which city was {N(e)} born in?"),
        "birth_year": ("person", None, "birth_year", lambda e: f"In which year was {N(e)} born?"),
        "employer": ("person", None, "employer", lambda e: f"Which company did {N(e)} work for?"),
        "spouse": ("person", None, "spouse", lambda e: f"To whom was {N(e)} married?"),
        "country": ("city", None, "country", lambda e: f"In which country is {N(e)}?"),
        "capital": ("country", None, "capital", lambda e: f"Which city is the capital of {N(e)}?"),
        "founder": ("org", None, "founder", lambda e: f"Who founded the company {N(e)}?"),
        "hq": ("org", None, "hq", lambda e: f"In which city is {N(e)} based?"),
        "director": ("film", None, "maker", lambda e: f"Who directed the film {N(e)}?"),
        "author": ("book", None, "maker", lambda e: f"Who wrote the novel {N(e)}?"),
        "published": ("book", None, "published", lambda e: f"In which year was the novel {N(e)} first published?"),
    },
    "popqa": {
        "occupation": ("person", None, "occupation", lambda e: f"What is {N(e)}'s occupation?"),
        "birthplace": ("person", None, "birthplace", lambda e: f"In what city was {N(e)} born?"),
        "genre": ("film", None, "genre", lambda e: f"What genre is {N(e)}?"),
        "director": ("film", None, "maker", lambda e: f"Who was the director of {N(e)}?"),
        "author": ("book", None, "maker", lambda e: f"Who is the author of {N(e)}?"),
    },  # no city or country templates: every city and country is named by many passages
    "hotpotqa": {
        "director_birthplace": ("film", None, "maker.birthplace", lambda e: f"In which city was the director of {N(e)} born?"),
        "director_birth_year": ("film", None, "maker.birth_year", lambda e: f"In what year was the director of {N(e)} born?"),
        "director_spouse": ("film", None, "maker.spouse", lambda e: f"Who was the director of {N(e)} married to?"),
        "author_nationality": ("book", None, "maker.nationality", lambda e: f"What nationality is the author of {N(e)}?"),
        "author_birthplace": ("book", None, "maker.birthplace", lambda e: f"Where was the author of {N(e)} born?"),
        "author_birth_year": ("book", None, "maker.birth_year", lambda e: f"When was the author of {N(e)} born?"),
        "author_spouse": ("book", None, "maker.spouse", lambda e: f"Who was the author of {N(e)} married to?"),
        "employer_founded": ("person", None, "employer.founded", lambda e: f"In what year was the company that {N(e)} worked for founded?"),
        "employer_hq": ("person", None, "employer.hq", lambda e: f"In which city is the company that {N(e)} worked for headquartered?"),
        "spouse_employer": ("person", None, "spouse.employer", lambda e: f"Which company did the spouse of {N(e)} work for?"),
        "birthplace_country": ("person", None, "birthplace.country", lambda e: f"In which country was {N(e)} born?"),
        "founder_birthplace": ("org", None, "founder.birthplace", lambda e: f"Where was the founder of {N(e)} born?"),
        "founder_spouse": ("org", None, "founder.spouse", lambda e: f"Who was the founder of {N(e)} married to?"),
        "hq_country": ("org", None, "hq.country", lambda e: f"In which country is {N(e)} headquartered?"),
        "country_capital": ("city", None, "country.capital", lambda e: f"What is the capital of the country where {N(e)} is?"),
        "born_first": ("person", "first", "birth_year", lambda a, b: f"Who was born first, {N(a)} or {N(b)}?"),
        "film_first": ("film", "first", "released", lambda a, b: f"Which film came out first, {N(a)} or {N(b)}?"),
        "same_hq": ("org", "hq", "hq", lambda a, b: f"Are {N(a)} and {N(b)} headquartered in the same city?"),
        "same_nationality": ("person", "nationality", "nationality", lambda a, b: f"Are {N(a)} and {N(b)} of the same nationality?"),
    },
    "2wikimultihopqa": {
        "director_spouse": ("film", None, "maker.spouse", lambda e: f"Who is the spouse of the director of film {N(e)}?"),
        "founder_birthplace": ("org", None, "founder.birthplace", lambda e: f"What is the place of birth of the founder of {N(e)}?"),
        "country_capital": ("city", None, "country.capital", lambda e: f"What is the capital of the country {N(e)} is located in?"),
        "hq_country": ("org", None, "hq.country", lambda e: f"Which country is the headquarters of {N(e)} located in?"),
        "birthplace_country": ("person", None, "birthplace.country", lambda e: f"What is the country of birth of {N(e)}?"),
        "film_first": ("film", "first", "released", lambda a, b: f"Which film was released first, {N(a)} or {N(b)}?"),
        "same_nationality": ("person", "nationality", "nationality", lambda a, b: f"Do {N(a)} and {N(b)} have the same nationality?"),
    },
    "musique": {
        "director_birthplace": ("film", None, "maker.birthplace", lambda e: f"What is the birthplace of the person who directed {N(e)}?"),
        "author_birthplace": ("book", None, "maker.birthplace", lambda e: f"In which city was the person who wrote {N(e)} born?"),
        "author_spouse": ("book", None, "maker.spouse", lambda e: f"Who was the person who wrote {N(e)} married to?"),
        "employer_hq": ("person", None, "employer.hq", lambda e: f"Where is the headquarters of the company {N(e)} worked for?"),
        "spouse_employer": ("person", None, "spouse.employer", lambda e: f"What company employed the person {N(e)} was married to?"),
        "employer_founded": ("person", None, "employer.founded", lambda e: f"In what year was the employer of {N(e)} founded?"),
    },
    "bamboogle": {
        "author_birth_year": ("book", None, "maker.birth_year", lambda e: f"What year was the writer of {N(e)} born?"),
        "hq_country": ("org", None, "hq.country", lambda e: f"Which country is home to the city where {N(e)} has its headquarters?"),
        "founder_spouse": ("org", None, "founder.spouse", lambda e: f"Who is married to the person who founded {N(e)}?"),
        "director_birth_year": ("film", None, "maker.birth_year", lambda e: f"In which year was the filmmaker behind {N(e)} born?"),
    },
}
# What each mirror's multi-hop questions are called in metadata["type"].
HOP_TYPE = {"hotpotqa": "bridge", "2wikimultihopqa": "compositional", "musique": "chain", "bamboogle": "compositional"}
TRAIN_MIX = ("nq", "hotpotqa")


def signature(dataset: str, template: str) -> tuple[str, str | None, str]:
    """What a template asks, wording aside: (subject kind, pair kind, relation path)."""
    kind, pair, rel, _ = TEMPLATES[dataset][template]
    return kind, pair, rel


def taught(dataset: str) -> dict[str, bool]:
    """For each template of a mirror: does the train mix ask the same relation path or comparison?"""
    known = {signature(d, t) for d in TRAIN_MIX for t in TEMPLATES[d]}
    return {t: signature(dataset, t) in known for t in TEMPLATES[dataset]}


def _question(dataset: str, pair, rel: str, text, args) -> Question | None:
    if pair is None:
        found = _follow(args[0], rel)
        if found is None:
            return None
        answer, chain, evidence = found
        qtype = "single" if len(chain) == 1 else HOP_TYPE.get(dataset, "bridge")
        return Question(text(args[0]), answer, chain, evidence, qtype)
    a, b = args
    read = LITERALS.get(rel) or (lambda e: e.attrs[rel].name)
    va, vb = read(a), read(b)
    if pair == "first":
        if va == vb:
            return None
        return Question(text(a, b), a if int(va) < int(vb) else b, [a, b], [(a, va), (b, vb)], "comparison")
    return Question(text(a, b), "yes" if va == vb else "no", [a, b], [(a, va), (b, vb)], "comparison")


def _pairs(subjects: list[Entity], pair: str, rng: random.Random) -> list[tuple[Entity, Entity]]:
    """Two subjects per question. For yes/no pairs, alternately two that share the attribute and
    two that do not, so the answers are balanced by construction (the old generator drew a shared
    partner half the time, but the partner was often the subject itself and got dropped: 17 yes
    against 66 no on the HotpotQA mirror's dev split)."""
    if pair == "first":
        return [(e, rng.choice([s for s in subjects[max(0, i - 50): i + 50] if s is not e] or subjects))
                for i, e in enumerate(subjects)]
    sharing: dict[str, list[Entity]] = {}
    for e in subjects:
        sharing.setdefault(e.attrs[pair].pid, []).append(e)
    out, want_yes = [], True
    for e in subjects:
        same = [s for s in sharing[e.attrs[pair].pid] if s is not e]
        if want_yes:
            if not same:
                continue
            out.append((e, rng.choice(same)))
        else:
            other = None
            for _ in range(20):
                c = rng.choice(subjects)
                if c.attrs[pair] is not e.attrs[pair]:
                    other = c
                    break
            if other is None:
                continue
            out.append((e, other))
        want_yes = not want_yes
    return out


def _subjects(world: World, kind: str, pool: str, dataset: str) -> list[Entity]:
    out = [e for e in world.entities if e.pool == pool and e.kind == kind]
    if dataset == "popqa":  # the long tail: entities no other passage names more than once
        out = [e for e in out if e.mentions <= 1]
    return out


def generate_questions(world: World, dataset: str, pool: str, n: int, seen: set[str], tag: str) -> list[dict]:
    rng = random.Random(f"{world.cfg.seed}/{dataset}/{tag}")
    per_template = []
    for name, (kind, pair, rel, text) in TEMPLATES[dataset].items():
        subjects = _subjects(world, kind, pool, dataset)
        rng.shuffle(subjects)
        args = [(e,) for e in subjects] if pair is None else _pairs(subjects, pair, rng)
        per_template.append([(name, pair, rel, text, a) for a in args])
    # Round-robin over templates, so the mix of question kinds does not follow entity counts.
    candidates = [c for group in itertools.zip_longest(*per_template) for c in group if c is not None]
    rows = []
    for name, pair, rel, text, args in candidates:
        if len(rows) == n:
            break
        q = _question(dataset, pair, rel, text, args)
        if q is None or q.question in seen:
            continue
        seen.add(q.question)
        rows.append({
            "id": f"{dataset}_{tag}_{len(rows)}",
            "question": q.question,
            "golden_answers": q.golds(),
            "metadata": {"hops": len(q.chain), "type": q.qtype, "template": f"{dataset}/{name}",
                         "chain": [e.pid for e in q.chain],
                         "evidence": [{"passage": e.pid, "text": s} for e, s in q.evidence]},
        })
    if len(rows) < n:
        raise WorldError(f"{dataset}/{tag}: only {len(rows)} distinct questions for {n} asked; raise --scale or entity counts")
    return rows


# --- shortcuts (DESIGN §8a) --------------------------------------------------------------------

# Bounds on what a policy can score without doing the task, checked on every split of every
# world before it is written.
MAX_COMMON_EM = 0.12      # the split's most common answer, given to every question
MAX_CONSTANT_F1 = 0.12    # the best constant string among the frequent gold answers, words and word pairs
MAX_YES_NO_SKEW = 0.2     # |yes - no| / max(yes, no), where at least MIN_YES_NO of them occur
MIN_YES_NO = 20
MIN_CHECKED = 50          # below this many questions a 12% rate cannot be measured: the split is not checked


class WorldError(RuntimeError):
    """The world cannot be written as asked: too few entities, or a shortcut bound is broken."""


def shortcut_report(rows: list[dict], candidates: int = 12) -> dict:
    """What trivial policies score on one split: the most common answer (EM), the best constant
    string (F1, tried over the most frequent normalised golds, gold words and gold word pairs),
    and the yes/no counts. F1 and EM follow sapo_bench.rewards (SQuAD normalisation, yes/no rule)."""
    from sapo_bench.rewards import normalize_answer, token_f1

    golds = [[normalize_answer(g).split() for g in r["golden_answers"]] for r in rows]
    whole, words, bigrams = Counter(), Counter(), Counter()
    for gs in golds:
        whole.update({" ".join(g) for g in gs})
        ws = {w for g in gs for w in g}
        words.update(ws)
        bigrams.update({" ".join(g[i:i + 2]) for g in gs for i in range(len(g) - 1)})
    n = max(len(rows), 1)
    common, common_count = whole.most_common(1)[0] if whole else ("", 0)
    tried = [c for c, _ in whole.most_common(candidates)] + [c for c, _ in words.most_common(candidates)]
    tried += [c for c, _ in bigrams.most_common(candidates // 2)]
    best, best_f1 = "", 0.0
    for c in dict.fromkeys(tried):
        toks = c.split()
        f1 = sum(max(token_f1(toks, g) for g in gs) for gs in golds) / n
        if f1 > best_f1:
            best, best_f1 = c, f1
    firsts = [r["golden_answers"][0] for r in rows]
    return {"n": len(rows), "common_answer": common, "common_em": common_count / n,
            "constant": best, "constant_f1": best_f1, "yes": firsts.count("yes"), "no": firsts.count("no")}


def shortcut_violations(name: str, rep: dict) -> list[str]:
    """The bounds a split's shortcut report breaks, each as a sentence naming the constraint."""
    if rep["n"] < MIN_CHECKED:
        return []
    out = []
    if rep["common_em"] > MAX_COMMON_EM:
        out.append(f"{name}: the most common answer {rep['common_answer']!r} scores EM {rep['common_em']:.3f} "
                   f"> {MAX_COMMON_EM}")
    if rep["constant_f1"] > MAX_CONSTANT_F1:
        out.append(f"{name}: the constant answer {rep['constant']!r} scores F1 {rep['constant_f1']:.3f} > {MAX_CONSTANT_F1}")
    yes, no = rep["yes"], rep["no"]
    if yes + no >= MIN_YES_NO and abs(yes - no) > MAX_YES_NO_SKEW * max(yes, no):
        out.append(f"{name}: {yes} yes against {no} no, more than {MAX_YES_NO_SKEW:.0%} apart")
    return out


# --- writing -----------------------------------------------------------------------------------


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_world(out: str | Path, cfg: WorldConfig) -> dict:
    """Generate the world and write it; returns the manifest (also written to out/world.json).

    Raises WorldError, writing nothing, when a split breaks a shortcut bound (DESIGN §8a).
    """
    out = Path(out)
    world = World(cfg)
    files = {"corpus.jsonl": _jsonl({"id": pid, "contents": c} for pid, c in world.passages.items())}
    seen: set[str] = set()
    shortcuts, broken = {}, []
    for dataset, splits in SPLITS.items():
        for split, size in splits.items():
            pool = "train" if split == "train" else "eval"
            rows = generate_questions(world, dataset, pool, max(1, round(size * cfg.scale)), seen, split)
            name = f"{dataset}/{split}.jsonl"
            files[name] = _jsonl(rows)
            shortcuts[name] = shortcut_report(rows)
            broken += shortcut_violations(f"{dataset}/{split}", shortcuts[name])
    if broken:
        raise WorldError(f"world seed {cfg.seed}, scale {cfg.scale} breaks the shortcut bounds (DESIGN §8a), "
                         "so nothing was written:\n  " + "\n  ".join(broken))
    manifest = {"generator": GENERATOR, "config": asdict(cfg), "passages": len(world.passages),
                "files": {name: {"sha256": hashlib.sha256(text.encode()).hexdigest(), "lines": text.count("\n")}
                          for name, text in files.items()},
                "shortcuts": shortcuts}
    for name, text in files.items():
        atomic_write_text(out / name, text)
    atomic_write_json(out / "world.json", manifest)
    return manifest


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sapo-world", description="Write the micro world: corpus and seven QA sets.")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=_positive, default=1.0, help="multiplies entity counts and split sizes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = write_world(args.out, WorldConfig(seed=args.seed, scale=args.scale))
    except WorldError as e:
        print(f"sapo-world: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    for name, info in manifest["files"].items():
        print(f"{info['lines']:>7}  {args.out / name}")
    print(f"wrote {manifest['passages']} passages and {len(manifest['files']) - 1} question files "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
