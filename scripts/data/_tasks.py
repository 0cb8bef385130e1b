"""Task generators shared by make_sft.py and make_prompts.py.

Everything here is a pure function of the shipped corpus (data/corpus/), the
pinned WordNet package and fixed seeds: no set or dict iteration order leaks
into the output (Python's str hashing is randomised per process), so the
generated files are the same on every run.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from functools import lru_cache

from _common import DATA, DEB_WORDNET, deb_members, fetch_deb

SEED = 20240601

# ---------------------------------------------------------------------------
# Corpus and sentences
# ---------------------------------------------------------------------------

ABBREV = {
    "mr", "mrs", "dr", "st", "capt", "messrs", "mt", "vs", "etc", "jr", "sr", "prof",
    "gen", "col", "lt", "rev", "no", "vol", "ch", "fig", "ft", "sq", "co", "inc", "ltd",
    "i.e", "e.g", "esq", "hon", "gov", "sen", "rep", "ave", "u.s",
}
_SENT_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text).strip()
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        before = text[start:m.start()]
        last = before.rsplit(" ", 1)[-1].lower().strip("\"'(")
        if m.group().startswith(".") and (last in ABBREV or re.fullmatch(r"[a-z]", last)):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


_OK_CHARS = re.compile(r"^[A-Za-z0-9 ,.;!?'()\-—]+$")


def clean_sentence(s: str, lo: int, hi: int) -> bool:
    """A plain prose sentence of lo..hi words: no quotes, markup or fragments."""
    n = len(s.split())
    return (
        lo <= n <= hi
        and s[0].isupper()
        and s[-1] in ".!?"
        and _OK_CHARS.match(s) is not None
        and s.count("(") == s.count(")")
        and "--" not in s
        and not s.endswith("...")
        and not re.search(r"\b[A-Z]{4,}\b", s)  # shouting, acronyms
        and not re.match(r"^(CHAPTER|BOOK)\b", s)
    )


@lru_cache(maxsize=None)
def moby_paragraphs() -> tuple[str, ...]:
    text = (DATA / "corpus" / "moby-dick.txt").read_text(encoding="utf-8")
    sections = text.split("\n\n\n")
    # sections: etymology, extracts, chapters 1..135, epilogue; use the narrative only
    paras = []
    for sec in sections[2:]:
        for p in sec.split("\n\n")[1:]:  # drop the "CHAPTER n. Title." heading
            paras.append(p)
    return tuple(paras)


_ATTRIBUTION = re.compile(r"^\s*(--|—|- )")
_NOT_PROSE = re.compile(r"(^\s*(Q:|A:|<|\[|\*|#|\$|%)|:$|[{}=|_<>@\\/`~^])", re.M)


@lru_cache(maxsize=None)
def fortune_texts() -> tuple[str, ...]:
    """Fortunes as prose: attribution lines removed; entries that look like
    dialogue, code, definitions, riddles or verse are skipped."""
    out = []
    with open(DATA / "corpus" / "fortunes.jsonl", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            lines = [ln for ln in t.split("\n") if not _ATTRIBUTION.match(ln)]
            body = "\n".join(lines).strip()
            if not body or _NOT_PROSE.search(body):
                continue
            # verse: several short lines, each starting with a capital letter
            ls = [ln.strip() for ln in body.split("\n") if ln.strip()]
            if len(ls) >= 3 and sum(ln[0].isupper() for ln in ls) >= len(ls) - 1 \
                    and max(len(ln) for ln in ls) < 50:
                continue
            out.append(body)
    return tuple(out)


@lru_cache(maxsize=None)
def corpus_sentences() -> tuple[tuple[str, str], ...]:
    """(source, sentence) for every sentence of the narrative and the prose fortunes."""
    out = []
    for p in moby_paragraphs():
        out.extend(("moby", s) for s in split_sentences(p))
    for t in fortune_texts():
        out.extend(("fortune", s) for s in split_sentences(t))
    return tuple(out)


@lru_cache(maxsize=None)
def vocab_counts() -> tuple[Counter, Counter]:
    """(all occurrences by lowercased word, lowercase-only occurrences)."""
    allc, lower = Counter(), Counter()
    texts = list(moby_paragraphs()) + list(fortune_texts())
    for t in texts:
        for w in re.findall(r"[A-Za-z]+", t):
            lw = w.lower()
            allc[lw] += 1
            if w == lw:
                lower[lw] += 1
    return allc, lower


# ---------------------------------------------------------------------------
# Nouns for the open-ended writing prompts (SFT "Write a sentence about X." and
# the RLHF sentiment prompt sets). (noun, noun phrase used in the prompt).
# Every noun occurs in the corpus; make_sft.py asserts each has sentences.
# ---------------------------------------------------------------------------

NOUNS: tuple[tuple[str, str], ...] = (
    ("sea", "the sea"), ("ocean", "the ocean"), ("whale", "a whale"), ("ship", "a ship"),
    ("boat", "a boat"), ("sailor", "a sailor"), ("captain", "a captain"), ("harbor", "a harbor"),
    ("island", "an island"), ("shore", "the shore"), ("wave", "a wave"), ("wind", "the wind"),
    ("storm", "a storm"), ("sky", "the sky"), ("sun", "the sun"), ("moon", "the moon"),
    ("star", "a star"), ("rain", "rain"), ("snow", "snow"), ("ice", "ice"),
    ("water", "water"), ("fire", "fire"), ("light", "light"), ("darkness", "darkness"),
    ("morning", "a morning"), ("night", "the night"), ("day", "a day"), ("evening", "an evening"),
    ("winter", "winter"), ("summer", "summer"), ("spring", "spring"), ("weather", "the weather"),
    ("fish", "a fish"), ("bird", "a bird"), ("dog", "a dog"), ("cat", "a cat"), ("horse", "a horse"),
    ("tree", "a tree"), ("flower", "a flower"), ("garden", "a garden"), ("river", "a river"),
    ("mountain", "a mountain"), ("city", "a city"), ("town", "a town"), ("house", "a house"),
    ("home", "home"), ("room", "a room"), ("door", "a door"), ("window", "a window"),
    ("bed", "a bed"), ("table", "a table"), ("book", "a book"), ("letter", "a letter"),
    ("story", "a story"), ("song", "a song"), ("music", "music"), ("friend", "a friend"),
    ("family", "a family"), ("child", "a child"), ("mother", "a mother"), ("father", "a father"),
    ("brother", "a brother"), ("wife", "a wife"), ("woman", "a woman"),
    ("man", "a man"), ("king", "a king"), ("teacher", "a teacher"), ("doctor", "a doctor"),
    ("stranger", "a stranger"), ("neighbor", "a neighbor"), ("work", "work"), ("job", "a job"),
    ("money", "money"), ("love", "love"), ("life", "life"), ("death", "death"), ("time", "time"),
    ("school", "school"), ("war", "war"), ("peace", "peace"), ("hope", "hope"), ("fear", "fear"),
    ("dream", "a dream"), ("truth", "the truth"), ("heart", "the heart"), ("mind", "the mind"),
    ("soul", "the soul"), ("face", "a face"), ("eye", "an eye"), ("hand", "a hand"),
    ("voice", "a voice"), ("food", "food"), ("bread", "bread"), ("wine", "wine"),
    ("dinner", "dinner"), ("breakfast", "breakfast"), ("journey", "a journey"),
    ("voyage", "a voyage"), ("road", "a road"), ("computer", "a computer"), ("game", "a game"),
    ("party", "a party"), ("gift", "a gift"), ("sleep", "sleep"), ("memory", "a memory"),
    ("future", "the future"), ("past", "the past"), ("youth", "youth"), ("age", "old age"),
    ("health", "health"), ("luck", "luck"), ("success", "success"), ("failure", "failure"),
    ("marriage", "marriage"), ("smile", "a smile"), ("laughter", "laughter"),
    ("anger", "anger"), ("joy", "joy"), ("happiness", "happiness"), ("sorrow", "sorrow"),
    ("pain", "pain"), ("beauty", "beauty"), ("freedom", "freedom"), ("wisdom", "wisdom"),
    ("knowledge", "knowledge"), ("science", "science"), ("art", "art"), ("idea", "an idea"),
    ("problem", "a problem"), ("mistake", "a mistake"), ("advice", "advice"),
    ("secret", "a secret"), ("promise", "a promise"), ("world", "the world"),
    ("people", "people"), ("crew", "a crew"), ("boss", "a boss"), ("office", "an office"),
)

WRITING_TEMPLATES = ("Write a sentence about {np}.", "Describe {np}.", "Write one sentence about {np}.")


def noun_pattern(noun: str) -> re.Pattern:
    plural = {"man": "men", "woman": "women", "child": "children", "wife": "wives",
              "life": "lives", "fish": "fish", "people": "people"}.get(noun)
    forms = [noun, plural or (noun + "es" if noun.endswith(("s", "sh", "ch", "x")) else
                              noun[:-1] + "ies" if re.search(r"[^aeiou]y$", noun) else noun + "s")]
    return re.compile(r"\b(" + "|".join(sorted(set(forms))) + r")\b", re.I)


@lru_cache(maxsize=None)
def noun_sentences() -> dict[str, tuple[str, ...]]:
    """noun -> plain sentences of 6..25 words that mention it, in corpus order."""
    sents = [s for _, s in corpus_sentences() if clean_sentence(s, 6, 25)]
    out = {}
    for noun, _ in NOUNS:
        pat = noun_pattern(noun)
        seen, lst = set(), []
        for s in sents:
            if pat.search(s) and s not in seen:
                seen.add(s)
                lst.append(s)
        out[noun] = tuple(lst)
    return out


def sentiment_noun_split() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train nouns, held-out nouns) for the RLHF sentiment prompt sets."""
    nouns = list(NOUNS)
    random.Random(SEED + 7).shuffle(nouns)
    return nouns[20:], nouns[:20]


# ---------------------------------------------------------------------------
# WordNet
# ---------------------------------------------------------------------------

WN_DIR = "usr/share/wordnet/"
POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
STOPWORDS = set("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each even ever few
first for from further get got had has have having he her here hers him his how however i if
in into is it its just last least less let like made make many may me might more most much
must my never no nor not now of off often on once one only or other ought our out over own
per perhaps quite rather said same say says see seem shall she should since so some still
such than that the their them then there these they this those though through thus to too
two under until up upon us very was we well were what when where whether which while who
whom whose why will with within without would yet you your
thou thee thy thine ye hath doth nay aye ah oh
""".split())


@lru_cache(maxsize=None)
def wordnet() -> dict[str, bytes]:
    return {k[len(WN_DIR):]: v for k, v in deb_members(fetch_deb(DEB_WORDNET)).items()
            if k.startswith(WN_DIR)}


@lru_cache(maxsize=None)
def wn_index() -> dict[str, dict[str, tuple[int, list[int]]]]:
    """word -> pos -> (tagsense_cnt, synset offsets in WordNet's sense order)."""
    idx: dict[str, dict[str, tuple[int, list[int]]]] = {}
    for pos in POS_NAMES:
        for line in wordnet()[f"index.{pos}"].decode("utf-8").split("\n"):
            if not line or line.startswith(" "):
                continue
            p = line.split()
            synset_cnt, p_cnt = int(p[2]), int(p[3])
            tagsense = int(p[5 + p_cnt])
            offsets = [int(x) for x in p[6 + p_cnt:6 + p_cnt + synset_cnt]]
            idx.setdefault(p[0], {})[pos] = (tagsense, offsets)
    return idx


def wn_gloss(pos: str, offset: int) -> str:
    data = wordnet()[f"data.{pos}"]
    end = data.index(b"\n", offset)
    line = data[offset:end].decode("utf-8")
    return line.split(" | ", 1)[1].strip() if " | " in line else ""


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """(definition, examples) of a WordNet gloss."""
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = re.split(r';\s*"|"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
    definition = re.sub(r"^\([^)]*`[^)]*\)\s*", "", definition)  # "(usually followed by `to')"
    return definition, examples


@lru_cache(maxsize=None)
def wn_exceptions() -> dict[str, str]:
    """Irregular inflections (men -> man, went -> go) from WordNet's *.exc files."""
    out = {}
    for pos in POS_NAMES:
        for line in wordnet()[f"{pos}.exc"].decode("utf-8").split("\n"):
            p = line.split()
            if len(p) >= 2 and p[0] != p[1]:
                out.setdefault(p[0], p[1])
    return out


def is_inflected(word: str) -> bool:
    """True for an inflection of another common word (things, ships, walked,
    going, men): the base word gets the entry instead. Regular forms count only
    when the base is itself frequent in the corpus (so "morning" is not "morn")."""
    if word in wn_exceptions():
        return True
    idx, allc = wn_index(), vocab_counts()[0]
    rules = (("ies", "y", ("noun", "verb")), ("es", "", ("noun", "verb")),
             ("s", "", ("noun", "verb")), ("ed", "", ("verb",)), ("ed", "e", ("verb",)),
             ("ing", "", ("verb",)), ("ing", "e", ("verb",)))
    for suffix, repl, poses in rules:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)] + repl
            if (base in idx and any(p in idx[base] for p in poses)
                    and base not in STOPWORDS and allc[base] * 4 >= allc[word]):
                return True
    return False


def _word_forms(word: str) -> re.Pattern:
    stem = word[:-1] if word.endswith("e") else word
    return re.compile(rf"\b({re.escape(word)}|{re.escape(word)}s|{re.escape(word)}es|"
                      rf"{re.escape(stem)}ed|{re.escape(stem)}ing|{re.escape(word)}d)\b", re.I)


@lru_cache(maxsize=None)
def wordnet_entries() -> tuple[dict, ...]:
    """Common corpus words with a short WordNet definition, most frequent first.

    Each: {"word", "pos" (noun/verb/adjective/adverb), "definition", "example"
    (a WordNet example sentence using the word, or None)}. The part of speech is
    the one WordNet's sense-tagged counts say is most used; the definition is
    that part of speech's first (most frequent) sense.
    """
    allc, lower = vocab_counts()
    idx = wn_index()
    out = []
    for word, n in sorted(allc.items(), key=lambda kv: (-kv[1], kv[0])):
        if n < 6 or len(word) < 3 or word in STOPWORDS or word not in idx:
            continue
        if lower[word] < 0.8 * n:  # mostly capitalised: a name
            continue
        if is_inflected(word):
            continue
        entries = idx[word]
        order = ["noun", "verb", "adj", "adv"]
        pos = max(entries, key=lambda p: (entries[p][0], -order.index(p)))
        definition, _ = parse_gloss(wn_gloss(pos, entries[pos][1][0]))
        nwords = len(definition.split())
        if not (2 <= nwords <= 18) or not re.fullmatch(r"[A-Za-z0-9 ,;'()\-]+", definition):
            continue
        forms = _word_forms(word)
        example = None
        for off in entries[pos][1]:
            for ex in parse_gloss(wn_gloss(pos, off))[1]:
                ex = ex.strip()
                if (forms.search(ex) and 3 <= len(ex.split()) <= 16
                        and re.fullmatch(r"[A-Za-z0-9 ,;:'!?.\-]+", ex)):
                    example = ex
                    break
            if example:
                break
        if example:
            example = example[0].upper() + example[1:]
            if example[-1] not in ".!?":
                example += "."
        out.append({"word": word, "pos": POS_NAMES[pos], "definition": definition,
                    "example": example})
    return tuple(out)


def define_prompt(word: str, variant: int) -> str:
    return (f'What does the word "{word}" mean?', f'Define the word "{word}".')[variant % 2]


def define_answer(e: dict) -> str:
    return f'{e["word"].capitalize()} ({e["pos"]}): {e["definition"]}.'


def usage_prompt(word: str) -> str:
    return f'Use the word "{word}" in a sentence.'


# ---------------------------------------------------------------------------
# Exact-answer tasks
# ---------------------------------------------------------------------------

LIST_WORDS = tuple(sorted({n for n, _ in NOUNS if " " not in n}))


def task_sort(rng: random.Random) -> tuple[str, str]:
    k = rng.randint(3, 6)
    hi = rng.choice((9, 20, 99))
    nums = rng.sample(range(0, hi + 1), k)
    desc = rng.random() < 0.25
    order = sorted(nums, reverse=desc)
    way = "from largest to smallest" if desc else "from smallest to largest"
    return (f"Sort these numbers {way}: {' '.join(map(str, nums))}",
            " ".join(map(str, order)))


def task_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def task_sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", str(a - b)


def task_compare(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(0, 100), 2)
    if rng.random() < 0.3:
        return f"Which is smaller, {a} or {b}?", str(min(a, b))
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def task_reverse(rng: random.Random) -> tuple[str, str]:
    ws = rng.sample(LIST_WORDS, rng.randint(3, 6))
    return f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws))


def task_count(rng: random.Random) -> tuple[str, str]:
    ws = [rng.choice(LIST_WORDS) for _ in range(rng.randint(2, 8))]
    return f"Count the words in this list: {' '.join(ws)}", str(len(ws))


EXACT_TASKS = {
    "sort": task_sort, "add": task_add, "subtract": task_sub, "compare": task_compare,
    "reverse": task_reverse, "count": task_count,
}


def unique_tasks(kind: str, n: int, seed: int, exclude: set[str]) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    gen = EXACT_TASKS[kind]
    out, seen = [], set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            raise SystemExit(f"could not make {n} distinct {kind} tasks")
        p, a = gen(rng)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
    return out


# ---------------------------------------------------------------------------
# Held-out instruction prompts (written by make_prompts.py, kept out of the SFT set)
# ---------------------------------------------------------------------------

HELDOUT_EXACT = {"sort": 8, "add": 8, "subtract": 6, "compare": 6, "reverse": 5, "count": 5}
HELDOUT_DEFINE = 6
HELDOUT_USAGE = 3
HELDOUT_CONTINUE = 3


@lru_cache(maxsize=None)
def heldout_words() -> tuple[str, ...]:
    """Words whose definition and usage prompts are held out of the SFT set."""
    pool = [e["word"] for e in wordnet_entries()[50:600] if e["example"]]
    return tuple(random.Random(SEED + 11).sample(pool, HELDOUT_DEFINE + HELDOUT_USAGE))


def continuation_pairs() -> list[tuple[str, str]]:
    """(first sentence, next sentence) pairs from the narrative and the fortunes."""
    pairs = []
    for p in moby_paragraphs():
        ss = split_sentences(p)
        for a, b in zip(ss, ss[1:]):
            if clean_sentence(a, 5, 25) and clean_sentence(b, 5, 30):
                pairs.append((a, b))
    for t in fortune_texts():
        ss = split_sentences(t)
        if 2 <= len(ss) <= 3 and clean_sentence(ss[0], 4, 25):
            rest = " ".join(ss[1:])
            if all(clean_sentence(s, 2, 30) for s in ss[1:]) and len(rest.split()) <= 30:
                pairs.append((ss[0], rest))
    return pairs


def continue_prompt(first: str) -> str:
    return f"Continue the passage: {first}"


@lru_cache(maxsize=None)
def heldout_items() -> tuple[dict, ...]:
    items: list[dict] = []
    for i, (kind, n) in enumerate(sorted(HELDOUT_EXACT.items())):
        for p, a in unique_tasks(kind, n, SEED + 1000 + i, set()):
            items.append({"prompt": p, "reference": a})
    entries = {e["word"]: e for e in wordnet_entries()}
    words = heldout_words()
    for j, w in enumerate(words[:HELDOUT_DEFINE]):
        items.append({"prompt": define_prompt(w, j), "reference": define_answer(entries[w])})
    for w in words[HELDOUT_DEFINE:]:
        items.append({"prompt": usage_prompt(w)})  # open-ended: no exact reference
    pairs = continuation_pairs()
    rng = random.Random(SEED + 13)
    for a, _ in rng.sample(pairs, HELDOUT_CONTINUE):
        items.append({"prompt": continue_prompt(a)})
    return tuple(items)
