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
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sapo_bench.io import atomic_write_json, atomic_write_text

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
FORMS = ["Republic", "Kingdom", "Federation", "Commonwealth"]


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
    raise RuntimeError("the name space is exhausted; lower the entity counts")


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
        for _ in range(cfg.n(cfg.countries)):
            root = _unique(rng, lambda r: _word(r, 1) + r.choice(COUNTRY_END), taken)
            demonym = root + "n" if root.endswith("a") else root + "ian"
            official = f"{rng.choice(FORMS)} of {root}"
            self.countries.append(Entity("country", root, [root, official], {"official": official, "demonym": demonym}))
        self.cities = []
        for i in range(cfg.n(cfg.cities)):
            name = _unique(rng, lambda r: r.choice(["", "", "", "Port ", "Lake ", "Saint "]) + _word(r, 1) + r.choice(CITY_END), taken)
            country = self.countries[i] if i < len(self.countries) else rng.choice(self.countries)
            self.cities.append(Entity("city", name, [name, f"{name} City"], {"country": country, "population": rng.randrange(8, 900) * 1000}))
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
            self.orgs.append(Entity("org", base, [base, f"{base} Ltd."], {"founder": founder, "year": year, "industry": industry, "hq": rng.choice(self.cities)}))
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
            text = rng.choice([f"{e.name} (also {e.name} City) is a city in {ref(c)}.", f"{e.name} is a city in {ref(c)}, also called {e.name} City."])
            text += f" It has about {a['population']:,} inhabitants."
            if c.attrs["capital"] is e:
                text += f" It is the capital of {c.name}."
        elif e.kind == "person":
            pr = a["pronoun"]
            text = rng.choice([f"{a['middle']} (born {a['birth_year']} in {ref(a['birthplace'])}) is a {a['nationality'].attrs['demonym']} {a['occupation']}.",
                               f"{a['middle']} is a {a['nationality'].attrs['demonym']} {a['occupation']}, born in {ref(a['birthplace'])} in {a['birth_year']}."])
            if "employer" in a:
                text += f" {pr} worked for {ref(a['employer'])}."
            if "spouse" in a:
                text += f" {pr} was married to {ref(a['spouse'])}."
        elif e.kind == "org":
            text = (f"{e.name} is a {a['industry']} company founded in {a['year']} by {ref(a['founder'])}. "
                    f"Its headquarters are in {ref(a['hq'])}.")
        elif e.kind == "film":
            text = f"{e.name} is a {a['year']} {a['genre']} film directed by {ref(a['maker'])}."
        else:
            article = "an" if a["genre"][0] in "aeiou" else "a"
            text = f"{e.name} is {article} {a['genre']} novel by {ref(a['maker'])}, published in {a['year']}."
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


def _hop(e: Entity, key: str) -> tuple[Entity, tuple[Entity, str]]:
    """Follow relation `key` from e: the target and the evidence that e's passage names it."""
    t = e.attrs[key]
    return t, (e, t.name)


def _year(e: Entity) -> str:
    """A work's or organisation's year, or a person's birth year."""
    return str(e.attrs["year"] if "year" in e.attrs else e.attrs["birth_year"])


def _single(text, key):
    def make(e):
        if key not in e.attrs:
            return None
        t, ev = _hop(e, key)
        return Question(text(e), t, [e], [ev], "single")
    return make


def _literal(text, value, qtype="single"):
    return lambda e: Question(text(e), value(e), [e], [(e, value(e))], qtype)


def _path(text, keys, qtype, last=None):
    """Follow relations keys[0], keys[1], ... from e; `last` turns the final entity into a literal."""
    def make(e):
        chain, evidence, cur = [e], [], e
        for k in keys:
            if k not in cur.attrs:
                return None
            cur, ev = _hop(cur, k)
            evidence.append(ev)
            chain.append(cur)
        chain.pop()  # the final entity is the answer; its passage need not be read
        if last is not None:
            value = last(cur)
            chain.append(cur)
            evidence.append((cur, value))
            return Question(text(e), value, chain, evidence, qtype)
        return Question(text(e), cur, chain, evidence, qtype)
    return make


def _first(text):
    """Comparison: which of two was born / founded / released first (years must differ)."""
    def make(a, b):
        ya, yb = _year(a), _year(b)
        if ya == yb:
            return None
        return Question(text(a, b), a if int(ya) < int(yb) else b, [a, b], [(a, ya), (b, yb)], "comparison")
    return make


def _same(text, key, label):
    def make(a, b):
        ta, tb = label(a.attrs[key]), label(b.attrs[key])
        return Question(text(a, b), "yes" if ta == tb else "no", [a, b], [(a, ta), (b, tb)], "comparison")
    return make


def _demonym(c: Entity) -> str:
    return c.attrs["demonym"]


N = lambda e: e.name  # noqa: E731
# name -> (subject kind, pair, builder): pair is None for one subject, "any" for a random second
# subject, or an attribute that the second subject shares half the time (balanced yes/no). Each dataset uses its own templates; the
# Bamboogle mirror's are used nowhere else, as the real Bamboogle's are unlike any training set.
TEMPLATES = {
    "nq": {
        "birthplace": ("person", None, _single(lambda e: f"where was {e.name.lower()} born", "birthplace")),
        "founder": ("org", None, _single(lambda e: f"who founded {e.name.lower()}", "founder")),
        "director": ("film", None, _single(lambda e: f"who directed {e.name.lower()}", "maker")),
        "capital": ("country", None, _single(lambda e: f"what is the capital of {e.name.lower()}", "capital")),
        "founded": ("org", None, _literal(lambda e: f"when was {e.name.lower()} founded", _year)),
    },
    "triviaqa": {
        "birthplace": ("person", None, _single(lambda e: f"Which city was {e.name} born in?", "birthplace")),
        "employer": ("person", None, _single(lambda e: f"Which company did {e.name} work for?", "employer")),
        "country": ("city", None, _single(lambda e: f"In which country is {e.name}?", "country")),
        "author": ("book", None, _single(lambda e: f"Who wrote the novel {e.name}?", "maker")),
        "spouse": ("person", None, _single(lambda e: f"Who was {e.name} married to?", "spouse")),
    },
    "popqa": {
        "occupation": ("person", None, _literal(lambda e: f"What is {e.name}'s occupation?", lambda e: e.attrs["occupation"])),
        "genre": ("film", None, _literal(lambda e: f"What genre is {e.name}?", lambda e: e.attrs["genre"])),
        "birthplace": ("person", None, _single(lambda e: f"In what city was {e.name} born?", "birthplace")),
        "country": ("city", None, _single(lambda e: f"In what country is {e.name}?", "country")),
        "author": ("book", None, _single(lambda e: f"Who is the author of {e.name}?", "maker")),
    },
    "hotpotqa": {
        "director_birthplace": ("film", None, _path(lambda e: f"In which city was the director of {e.name} born?", ["maker", "birthplace"], "bridge")),
        "employer_founded": ("person", None, _path(lambda e: f"In what year was the company that {e.name} worked for founded?", ["employer"], "bridge", _year)),
        "author_nationality": ("book", None, _path(lambda e: f"What nationality is the author of {e.name}?", ["maker"], "bridge", lambda p: _demonym(p.attrs["nationality"]))),
        "born_first": ("person", "any", _first(lambda a, b: f"Who was born first, {a.name} or {b.name}?")),
        "same_hq": ("org", "hq", _same(lambda a, b: f"Are {a.name} and {b.name} headquartered in the same city?", "hq", N)),
    },
    "2wikimultihopqa": {
        "director_spouse": ("film", None, _path(lambda e: f"Who is the spouse of the director of {e.name}?", ["maker", "spouse"], "compositional")),
        "city_capital": ("city", None, _path(lambda e: f"What is the capital of the country where {e.name} is located?", ["country", "capital"], "compositional")),
        "founder_birthplace": ("org", None, _path(lambda e: f"Where was the founder of {e.name} born?", ["founder", "birthplace"], "compositional")),
        "film_first": ("film", "any", _first(lambda a, b: f"Which film came out first, {a.name} or {b.name}?")),
        "same_nationality": ("person", "nationality", _same(lambda a, b: f"Are {a.name} and {b.name} of the same nationality?", "nationality", _demonym)),
    },
    "musique": {
        "director_country": ("film", None, _path(lambda e: f"In which country was the director of {e.name} born?", ["maker", "birthplace", "country"], "chain")),
        "spouse_employer_founded": ("person", None, _path(lambda e: f"When was the company that employed the spouse of {e.name} founded?", ["spouse", "employer"], "chain", _year)),
        "author_employer_founder": ("book", None, _path(lambda e: f"Who founded the company that employed the author of {e.name}?", ["maker", "employer", "founder"], "chain")),
        "founder_country": ("org", None, _path(lambda e: f"In which country was the founder of {e.name} born?", ["founder", "birthplace", "country"], "chain")),
    },
    "bamboogle": {
        "author_birth_year": ("book", None, _path(lambda e: f"What year was the writer of {e.name} born?", ["maker"], "compositional", _year)),
        "hq_country": ("org", None, _path(lambda e: f"Which country is home to the city where {e.name} has its headquarters?", ["hq", "country"], "compositional")),
        "founder_spouse": ("org", None, _path(lambda e: f"Who is married to the person who founded {e.name}?", ["founder", "spouse"], "compositional")),
        "filmmaker_birth_year": ("film", None, _path(lambda e: f"In which year was the filmmaker behind {e.name} born?", ["maker"], "compositional", _year)),
    },
}


def _subjects(world: World, kind: str, pool: str, dataset: str) -> list[Entity]:
    out = [e for e in world.entities if e.pool == pool and e.kind == kind]
    if dataset == "popqa":  # the long tail: entities no other passage names more than once
        out = [e for e in out if e.mentions <= 1]
    return out


def generate_questions(world: World, dataset: str, pool: str, n: int, seen: set[str], tag: str) -> list[dict]:
    rng = random.Random(f"{world.cfg.seed}/{dataset}/{tag}")
    per_template = []
    for name, (kind, pair, make) in TEMPLATES[dataset].items():
        subjects = _subjects(world, kind, pool, dataset)
        sharing: dict[str, list[Entity]] = {}
        if pair not in (None, "any"):
            for e in subjects:
                sharing.setdefault(e.attrs[pair].pid, []).append(e)
        todo = []
        for e in subjects:
            if pair is None:
                todo.append((name, make, (e,)))
            elif pair != "any" and rng.random() < 0.5:
                todo.append((name, make, (e, rng.choice(sharing[e.attrs[pair].pid]))))
            else:
                todo.append((name, make, (e, rng.choice(subjects))))
        rng.shuffle(todo)
        per_template.append(todo)
    # Round-robin over templates, so the mix of question kinds does not follow entity counts.
    candidates = [c for group in itertools.zip_longest(*per_template) for c in group if c is not None]
    rows = []
    for name, make, args in candidates:
        if len(rows) == n:
            break
        if len(args) == 2 and args[0] is args[1]:
            continue
        q = make(*args)
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
        raise RuntimeError(f"{dataset}/{tag}: only {len(rows)} distinct questions for {n} asked; raise --scale or entity counts")
    return rows


# --- writing -----------------------------------------------------------------------------------


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_world(out: str | Path, cfg: WorldConfig) -> dict:
    """Generate the world and write it; returns the manifest (also written to out/world.json)."""
    out = Path(out)
    world = World(cfg)
    files = {"corpus.jsonl": _jsonl({"id": pid, "contents": c} for pid, c in world.passages.items())}
    seen: set[str] = set()
    for dataset, splits in SPLITS.items():
        for split, size in splits.items():
            pool = "train" if split == "train" else "eval"
            rows = generate_questions(world, dataset, pool, max(1, round(size * cfg.scale)), seen, split)
            files[f"{dataset}/{split}.jsonl"] = _jsonl(rows)
    manifest = {"generator": "sapo-world/1", "config": asdict(cfg), "passages": len(world.passages),
                "files": {name: {"sha256": hashlib.sha256(text.encode()).hexdigest(), "lines": text.count("\n")}
                          for name, text in files.items()}}
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
    manifest = write_world(args.out, WorldConfig(seed=args.seed, scale=args.scale))
    for name, info in manifest["files"].items():
        print(f"{info['lines']:>7}  {args.out / name}")
    print(f"wrote {manifest['passages']} passages and {len(manifest['files']) - 1} question files "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
