"""Writes the training set of bench/quant_quality.sh to stdout: English prose from this repository (the doc
comments of every Rust source file, the kernels' README and bench/RESULTS.md), cut into pieces of about 400
characters at paragraph breaks, one {"prompt", "response"} JSON line each. The top-level README is left out: the
held-out text, tests/fixtures/text/readme_excerpt.txt, is an excerpt of it.
Usage: python3 corpus.py REPO_ROOT > corpus.jsonl
"""

import json
import pathlib
import re
import sys


def prose(root):
    for doc in ["crates/kernels/README.md", "bench/RESULTS.md"]:
        yield (root / doc).read_text(encoding="utf-8")
    for source in sorted(root.glob("crates/**/*.rs")):
        lines = source.read_text(encoding="utf-8").splitlines()
        yield "\n".join(l.strip()[3:].strip() for l in lines if l.strip().startswith(("///", "//!")))


def main():
    root = pathlib.Path(sys.argv[1])
    piece = ""
    for paragraph in re.split(r"\n\s*\n", "\n\n".join(prose(root))):
        if not paragraph.strip():
            continue
        piece = f"{piece}\n\n{paragraph}" if piece else paragraph
        if len(piece) > 400:
            print(json.dumps({"prompt": "Write documentation.", "response": piece}))
            piece = ""
    if piece:
        print(json.dumps({"prompt": "Write documentation.", "response": piece}))


if __name__ == "__main__":
    main()
