#!/usr/bin/env python3
"""Build the demo chat model's training data from WordNet 3.0 (Debian's `wordnet-base` package).

    apt-get install -y wordnet-base
    python3 models/demo/build_data.py --out models/demo/data            # every word, seed 0
    python3 models/demo/build_data.py --out /tmp/small --max-words 2000  # a small set, quickly

Every lemma of WordNet (index.noun, index.verb, index.adj, index.adv) becomes one *word* with one meaning: its
most frequent sense (the first synset its index line lists) in the part of speech where it is tagged most often
in WordNet's sense-tagged corpus (ties: noun, verb, adjective, adverb), so every question has one answer. A word
is kept when its lemma is at most three words of letters (hyphens and apostrophes allowed) and its definition
(the gloss before the example sentences, parentheticals removed, its first clause when that has two words or
more) is 2 to --max-gloss-words words long.

The answers are short sentences made from the gloss, one form per part of speech:

    noun       What is a llama?              A llama is a wild or domesticated South American ... hump.
    noun       What is Paris?                Paris is the capital and largest city of France.
    noun       What is closeness?            Closeness is a feeling of being intimate and belonging together.
    verb       What does it mean to run?     To run means to move fast by using one's feet, ...
    adjective  What does dying mean?         Dying describes something in or associated with ...
    adverb     What does annoyingly mean?    Annoyingly means in an annoying manner or to an annoying degree.

It writes, into --out, a training file and a held-out file of each set (the held-out 2% of the words are chosen
by a seeded hash of the lemma, so the split does not move when --max-words changes):

    sft_{train,heldout}.jsonl  `vicuna train sft --data`: {"messages": [{"role", "content"}, ...], "lemma"} rows.
                               Per word: the definition question (one of its two phrasings, seeded); "Give a
                               synonym of X" when the synset has other lemmas; "Use X in a sentence" when one of
                               WordNet's example sentences contains the word; and one two-turn conversation (the
                               other phrasing, then "What is another word for it?" or "Can you use it in a
                               sentence?") when a follow-up exists.
    rm_{train,heldout}.jsonl   `vicuna train rm --data`: {"prompt", "chosen", "rejected", "lemma", "rejected_kind"}
                               rows: the definition question, the true answer, and (seeded: half, a quarter, a
                               quarter) another word's gloss in the same sentence ("other"), the gloss cut short
                               ("truncated"), or its words shuffled ("shuffled"). "Other" words come from the same
                               split and part of speech, so no held-out gloss appears in the training files.
    ppo_{train,heldout}.jsonl  `vicuna train ppo --prompts-path`: {"prompt", "lemma"} rows (the question alone).
    LICENSE-WordNet.txt        WordNet's licence, which must go with every copy of the data (read from the
                               header of data.noun).
    manifest.json              the options and the counts of each file.

Rows follow the order of a seeded hash of the lemma (a shuffle that does not depend on Python's hash seed), and
`--max-words N` keeps the first N words of that order. The same inputs and options give byte-identical files;
each file is written under a temporary name and renamed into place. Python 3 standard library only.
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time

# (index/data file suffix, part of speech); the order breaks ties between parts of speech.
PARTS = [("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r")]
HELDOUT_PER_10000 = 200  # 2% of the words
MAX_SYNONYMS = 3
FOLLOW_UP_SYNONYM = "What is another word for it?"
FOLLOW_UP_SENTENCE = "Can you use it in a sentence?"

LEMMA_OK = re.compile(r"^[A-Za-z][A-Za-z'\-]*( [A-Za-z][A-Za-z'\-]*){0,2}$")
# Adjective position markers: (a) attributive, (p) predicative, (ip) immediately postnominal.
MARKER = re.compile(r"\((?:a|p|ip)\)$")
PARENTHETICAL = re.compile(r"\s*\([^()]*\)")
DETERMINERS = {
    "a", "an", "the", "any", "one", "some", "someone", "somebody", "something", "anything", "anyone", "each",
    "every", "his", "her", "its", "their", "this", "that", "these", "those", "all", "no", "two", "three",
}


class BuildError(Exception):
    """Bad input: one line saying what, where and how to fix it."""


def stable_hash(seed, *parts):
    text = "\x1f".join([str(seed), *parts])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_heldout(seed, lemma):
    return stable_hash(seed, "split", lemma.lower()) % 10000 < HELDOUT_PER_10000


def clean_lemma(word):
    return MARKER.sub("", word).replace("_", " ").strip()


def read_lines(path):
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise BuildError(f"{path} not found: install Debian's wordnet-base (apt-get install -y wordnet-base) "
                         f"or pass --wordnet DIR (a folder with data.noun, index.noun, ...)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read {path}: {e}") from None


def parse_data(path):
    """data.POS: offset -> (words as written, definition, examples). Header lines start with two spaces."""
    synsets = {}
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip() or line.startswith("  "):
            continue
        head, bar, gloss = line.partition(" | ")
        fields = head.split()
        try:
            count = int(fields[3], 16)
            words = [clean_lemma(fields[4 + 2 * i]) for i in range(count)]
        except (IndexError, ValueError):
            raise BuildError(f"{path}:{number}: not a WordNet data line (offset lex_filenum ss_type w_cnt "
                             f"word lex_id ... | gloss)") from None
        if not bar:
            raise BuildError(f"{path}:{number}: the line has no ' | ' before its gloss")
        definition, examples = split_gloss(gloss.strip())
        synsets[fields[0]] = (words, definition, examples)
    return synsets


def split_gloss(gloss):
    """`definition; definition; "example"; "example"` -> (definition text, [examples])."""
    quote = gloss.find('"')
    definition = gloss if quote < 0 else gloss[:quote]
    examples = re.findall(r'"([^"]+)"', gloss[quote:]) if quote >= 0 else []
    return definition.strip().rstrip(";:,").strip(), [e.strip() for e in examples if e.strip()]


def parse_index(path):
    """index.POS: lemma -> (tagged sense count, synset offsets, most frequent first)."""
    entries = {}
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip() or line.startswith("  "):
            continue
        parts = line.split()
        try:
            synset_count, pointer_count = int(parts[2]), int(parts[3])
            tagged = int(parts[5 + pointer_count])
            offsets = parts[6 + pointer_count:6 + pointer_count + synset_count]
        except (IndexError, ValueError):
            raise BuildError(f"{path}:{number}: not a WordNet index line (lemma pos synset_cnt p_cnt ... "
                             f"sense_cnt tagsense_cnt offsets)") from None
        if len(offsets) != synset_count:
            raise BuildError(f"{path}:{number}: lists {len(offsets)} synsets, its count says {synset_count}")
        entries[parts[0]] = (tagged, offsets)
    return entries


def licence_notice(path):
    """The licence text at the top of data.noun (WordNet's files carry it as numbered header lines)."""
    lines = []
    for line in read_lines(path):
        if not line.startswith("  "):
            break
        lines.append(re.sub(r"^\s+\d+ ?", "", line).rstrip())
    text = "\n".join(lines).strip()
    if "Princeton" not in text:
        raise BuildError(f"{path}: no licence header found (WordNet's data files begin with it); the data may "
                         f"not be copied without WordNet's notice")
    return text + "\n"


def article(word):
    w = word.lower()
    if w.startswith(("hour", "honest", "honor", "honour", "heir")):
        return "an"
    if re.match(r"^(uni|use|usu|ut|eu|ewe|one|once|u[bcdfgklmnprst][aeiou])", w):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


# Lemma endings of abstract and mass nouns ("closeness", "anemia"), which take no article.
MASS_ENDINGS = ("ness", "ity", "ism", "ship", "hood", "dom", "ics", "emia", "itis", "ance", "ence", "ing", "osis", "acy")


def noun_phrase(definition):
    """A noun gloss as a phrase that can follow "is": with an article unless it has a determiner or starts with
    a plural-looking word ("abnormally high amounts ..." keeps none only when its first word is plural)."""
    first = definition.split()[0].lower()
    plural = first.endswith("s") and not first.endswith(("ss", "us", "is", "ous"))
    return definition if first in DETERMINERS or plural else f"{article(definition)} {definition}"


def takes_article(lemma, definition):
    """Whether the noun is spoken of as "a llama": not names, abstract or mass nouns, plurals, or nouns whose
    gloss starts with "the" ("the organic process of bearing flowers")."""
    last = lemma.split()[-1].lower()
    plural = last.endswith("s") and not last.endswith(("ss", "us", "is"))
    return not (lemma[:1].isupper() or last.endswith(MASS_ENDINGS) or plural
                or definition.lower().startswith("the "))


def capitalize(text):
    return text[:1].upper() + text[1:]


def definition_text(raw, max_words):
    """The definition as an answer uses it, or None when it is too short or too long."""
    text = PARENTHETICAL.sub("", raw)
    text = re.sub(r"\s+", " ", text.replace("`", "'")).strip().strip(";:, ")
    clauses = [c.strip() for c in text.split(";") if c.strip()]
    if not clauses:
        return None
    text = clauses[0] if len(clauses[0].split()) >= 2 else ", ".join(clauses[:2])
    if text.lower().startswith("to "):
        text = text[3:]
    return text if 2 <= len(text.split()) <= max_words else None


class Word:
    def __init__(self, lemma, pos, definition, synonyms, examples):
        self.lemma, self.pos, self.definition = lemma, pos, definition
        self.synonyms, self.examples = synonyms, examples

    @property
    def subject(self):
        """The noun as the subject of its definition: "a llama", "closeness", "Paris"."""
        if takes_article(self.lemma, self.definition):
            return f"{article(self.lemma)} {self.lemma}"
        return self.lemma

    def questions(self):
        """The two phrasings of the definition question."""
        if self.pos == "n":
            return [f"What is {self.subject}?", f"What does {self.lemma} mean?"]
        if self.pos == "v":
            return [f"What does it mean to {self.lemma}?", f"What does {self.lemma} mean?"]
        return [f"What does {self.lemma} mean?", f"What is the meaning of {self.lemma}?"]

    def answer(self, definition=None):
        """The definition sentence; with `definition`, the same sentence around another gloss."""
        d = definition if definition is not None else self.definition
        if self.pos == "n":
            return f"{capitalize(self.subject)} is {noun_phrase(d)}."
        if self.pos == "v":
            return f"To {self.lemma} means to {d}."
        if self.pos == "a":
            return f"{capitalize(self.lemma)} describes something {d}."
        return f"{capitalize(self.lemma)} means {d}."

    def synonym_answer(self, follow_up):
        if follow_up:
            return f"Another word for {self.lemma} is {self.synonyms[0]}."
        if len(self.synonyms) == 1:
            return f"A synonym of {self.lemma} is {self.synonyms[0]}."
        return f"Synonyms of {self.lemma} include {', '.join(self.synonyms[:-1])} and {self.synonyms[-1]}."


def sentence(example):
    text = capitalize(example.strip())
    return text if text[-1:] in ".!?" else text + "."


def load_words(wordnet, max_gloss_words):
    """One Word per lemma (see the module's docstring), in lemma order."""
    candidates = {}  # lemma (lowercase) -> (tagged count, part rank, pos, synset)
    for rank, (suffix, pos) in enumerate(PARTS):
        synsets = parse_data(os.path.join(wordnet, f"data.{suffix}"))
        for key, (tagged, offsets) in parse_index(os.path.join(wordnet, f"index.{suffix}")).items():
            synset = synsets.get(offsets[0])
            if synset is None:
                raise BuildError(f"{wordnet}/index.{suffix}: `{key}` points to synset {offsets[0]}, which "
                                 f"data.{suffix} lacks (index and data files of different WordNet versions?)")
            best = candidates.get(key)
            if best is None or (tagged, -rank) > (best[0], -best[1]):
                candidates[key] = (tagged, rank, pos, synset)
    words = []
    for key in sorted(candidates):
        tagged, _, pos, (forms, raw_definition, examples) = candidates[key]
        lemma = next((f for f in forms if f.lower() == key.replace("_", " ")), key.replace("_", " "))
        definition = definition_text(raw_definition, max_gloss_words)
        if definition is None or not LEMMA_OK.match(lemma):
            continue
        synonyms = []
        for form in forms:
            if form.lower() != lemma.lower() and form.lower() not in (s.lower() for s in synonyms):
                synonyms.append(form)
        usable = [e for e in examples if lemma.lower() in e.lower() and len(e.split()) <= 2 * max_gloss_words]
        word = Word(lemma, pos, definition, synonyms[:MAX_SYNONYMS], usable)
        word.tagged = tagged  # how often WordNet's sense-tagged corpus uses the lemma in this part of speech
        words.append(word)
    return words


def conversation(*turns):
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


def sft_rows(word, rng):
    questions = word.questions()
    first = rng.randrange(2)
    rows = [conversation((questions[first], word.answer()))]
    if word.synonyms:
        rows.append(conversation((f"Give a synonym of {word.lemma}.", word.synonym_answer(False))))
    example = rng.choice(word.examples) if word.examples else None
    if example:
        rows.append(conversation((f"Use {word.lemma} in a sentence.", sentence(example))))
    follow_ups = []
    if word.synonyms:
        follow_ups.append((FOLLOW_UP_SYNONYM, word.synonym_answer(True)))
    if example:
        follow_ups.append((FOLLOW_UP_SENTENCE, sentence(example)))
    if follow_ups:
        rows.append(conversation((questions[1 - first], word.answer()), rng.choice(follow_ups)))
    return [{"messages": m, "lemma": word.lemma} for m in rows]


def other_definition(word, rng, same_pos):
    """Another word's definition (same part of speech and split), or None when there is none."""
    for _ in range(16):
        other = same_pos[rng.randrange(len(same_pos))].definition
        if other != word.definition:
            return other
    return next((w.definition for w in same_pos if w.definition != word.definition), None)


def rm_row(word, rng, same_pos):
    """The definition question, the true answer, and a wrong one (another gloss, cut short, or shuffled)."""
    chosen = word.answer()
    words = word.definition.split()
    roll = rng.random()
    other = other_definition(word, rng, same_pos)
    if roll < 0.5 and other:
        kind, rejected = "other", word.answer(other)
    elif roll < 0.75 and len(words) >= 3:
        keep = max(1, min(len(words) - 1, round(len(words) * rng.uniform(0.3, 0.6))))
        kind, rejected = "truncated", word.answer(" ".join(words[:keep]))
    else:
        shuffled = list(words)
        for _ in range(8):
            rng.shuffle(shuffled)
            if shuffled != words:
                break
        kind, rejected = "shuffled", word.answer(" ".join(shuffled))
        if shuffled == words and other:  # one repeated word: nothing to shuffle
            kind, rejected = "other", word.answer(other)
    if rejected == chosen:
        return None
    return {"prompt": word.questions()[0], "chosen": chosen, "rejected": rejected, "lemma": word.lemma,
            "rejected_kind": kind}


def write_atomic(path, text):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(args):
    started = time.monotonic()
    words = load_words(args.wordnet, args.max_gloss_words)
    words.sort(key=lambda w: (stable_hash(args.seed, "order", w.lemma.lower()), w.lemma))
    if args.most_frequent is not None:
        # The N words the sense-tagged corpus uses most (ties in the seeded order), kept in that order.
        frequent = sorted(range(len(words)), key=lambda i: (-words[i].tagged, i))[:args.most_frequent]
        words = [words[i] for i in sorted(frequent)]
    if args.max_words is not None:
        words = words[:args.max_words]
    splits = {"train": [], "heldout": []}
    for word in words:
        splits["heldout" if is_heldout(args.seed, word.lemma) else "train"].append(word)
    notice = licence_notice(os.path.join(args.wordnet, "data.noun"))
    os.makedirs(args.out, exist_ok=True)
    files = {}
    for split, chosen_words in splits.items():
        by_pos = {}
        for w in chosen_words:
            by_pos.setdefault(w.pos, []).append(w)
        sft, rm, ppo = [], [], []
        for word in chosen_words:
            rng = random.Random(stable_hash(args.seed, "rows", word.lemma.lower()))
            sft += sft_rows(word, rng)
            pair = rm_row(word, rng, by_pos[word.pos])
            if pair is not None:
                rm.append(pair)
            ppo.append({"prompt": word.questions()[0], "lemma": word.lemma})
        for name, rows in (("sft", sft), ("rm", rm), ("ppo", ppo)):
            text = jsonl(rows)
            file = f"{name}_{split}.jsonl"
            write_atomic(os.path.join(args.out, file), text)
            files[file] = {"rows": len(rows), "bytes": len(text.encode("utf-8")),
                           "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    write_atomic(os.path.join(args.out, "LICENSE-WordNet.txt"), notice)
    manifest = {
        "source": "WordNet 3.0 (Debian package wordnet-base); see LICENSE-WordNet.txt",
        "options": {"seed": args.seed, "max_words": args.max_words,
                    "most_frequent": args.most_frequent, "max_gloss_words": args.max_gloss_words},
        "words": {split: len(ws) for split, ws in splits.items()},
        "files": files,
    }
    write_atomic(os.path.join(args.out, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    seconds = time.monotonic() - started
    summary = ", ".join(f"{f} {v['rows']} rows ({v['bytes'] / 1e6:.2f} MB)" for f, v in files.items())
    print(f"{len(words)} words ({len(splits['heldout'])} held out): {summary}; {seconds:.1f} s", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet", default="/usr/share/wordnet",
                        help="folder with WordNet's data.* and index.* files (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, order and choices (default 0)")
    parser.add_argument("--max-words", type=int, default=None, help="keep only the first N words (seeded order)")
    parser.add_argument("--most-frequent", type=int, default=None,
                        help="keep only the N words WordNet's sense-tagged corpus uses most (before --max-words)")
    parser.add_argument("--max-gloss-words", type=int, default=25,
                        help="skip words whose definition is longer (default %(default)s)")
    args = parser.parse_args(argv)
    if args.max_words is not None and args.max_words < 1:
        parser.error(f"--max-words must be at least 1, got {args.max_words}")
    if args.most_frequent is not None and args.most_frequent < 1:
        parser.error(f"--most-frequent must be at least 1, got {args.most_frequent}")
    if args.max_gloss_words < 2:
        parser.error(f"--max-gloss-words must be at least 2, got {args.max_gloss_words}")
    try:
        build(args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
