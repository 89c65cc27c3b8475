"""English prose from Debian's documentation packages, as plain text for distillation and perplexity.

    python scripts/doc_text.py ROOT OUT [--held-out-bytes 200000]

ROOT is a tree where the .deb files of `python3.11-doc` and `linux-doc-6.1` were unpacked (`dpkg -x`);
`scripts/doc-text.sh` downloads, unpacks and calls this. The sources are the reStructuredText of both manuals
(Python's `html/_sources/**/*.rst.txt`, the kernel's `Documentation/**/*.rst.gz`, its translations left out).
Markup is turned into plain text the way a reader sees it: roles and links keep their text, headings and
list items stay lines of their own, paragraphs are joined into one line each; code goes (literal blocks after
`::`, code and kernel-doc directives, doctests, tables), and so do documents that are mostly code or too short.

OUT gets, documents in a fixed shuffled order (seed 0):
    train.jsonl      one document a line: {"text": ..., "source": "python/library/functools.rst"}
    held-out.txt     whole other documents (about --held-out-bytes), separated by blank lines: for perplexity
    stats.json       documents, bytes, words and whitespace-split tokens of each file, and what was dropped
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
from pathlib import Path

# Directives whose body is prose: admonitions (their argument is text too) and object descriptions (their
# argument is a signature, which is code). Every other directive (code, toctree, kernel-doc, tables, images,
# comments, targets, substitutions) is dropped with its body.
ADMONITIONS = {
    "note", "warning", "attention", "caution", "danger", "error", "hint", "important", "tip", "admonition",
    "seealso", "impl-detail", "rubric", "topic", "sidebar", "centered", "container", "glossary", "only",
}  # fmt: skip
VERSIONS = {"versionadded", "versionchanged", "deprecated", "deprecated-removed"}
DESCRIPTION = re.compile(
    r"(py:|c:|cpp:|rst:|std:)?(function|class|method|classmethod|staticmethod|attribute|data|exception|module|"
    r"decorator|decoratormethod|coroutinefunction|coroutinemethod|abstractmethod|property|describe|option|"
    r"cmdoption|envvar|opcode|pdbcommand|2to3fixer|macro|member|type|var|struct|union|enum|enumerator|"
    r"directive|role|object|monitoring-event|audit-event|index|term)$"
)

DIRECTIVE = re.compile(r"^(\s*)\.\.(\s+(\S.*)?)?$")
DIRECTIVE_NAME = re.compile(r"([\w:-]+)::\s*(.*)$")
ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
SIMPLE_TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
GRID_TABLE = re.compile(r"^\s*(\+[-=+]+\+|\|.*\|)\s*$")
BULLET = re.compile(r"^([-*+\u2022]|#\.|\d+[.)]|\(?[a-zA-Z0-9]\)|:[^:`]+:)\s+")

INLINE = [
    (re.compile(r":(pep|rfc):`(\d+)`", re.I), lambda m: f"{m.group(1).upper()} {m.group(2)}"),
    (re.compile(r":[\w:.+-]+:`~([^`<]*\.)?([^`<.]+)`"), r"\2"),  # :func:`~a.b.c` shows as c
    (re.compile(r":[\w:.+-]+:`!?([^`<]*?)\s*(<[^`]*>)?`"), r"\1"),  # roles, with or without an explicit target
    (re.compile(r"`([^`<]*?)\s*<[^`]*>`__?"), r"\1"),  # external links
    (re.compile(r"``([^`]+)``"), r"\1"),  # inline literals
    (re.compile(r"`([^`]+)`_{0,2}"), r"\1"),  # references and interpreted text
    (re.compile(r"\*\*(\S[^*]*?)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*(\S[^*]*?)\*(?![\w*])"), r"\1"),
    (re.compile(r"\s*\[(#\w*|\d+|\*)\]_"), ""),  # footnote references
    (re.compile(r"\|([\w][\w .-]*)\|_?"), r"\1"),  # substitutions
    (re.compile(r"\\(.)"), r"\1"),
    (re.compile(r"[ \t]+"), " "),
]


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def inline(text: str) -> str:
    """reST inline markup of one line to the text a reader sees."""
    for pattern, repl in INLINE:
        text = pattern.sub(repl, text)
    return text.strip()


def rst_to_text(src: str) -> str:
    """One reStructuredText document as plain prose: paragraphs one line each, separated by blank lines."""
    lines = src.expandtabs(8).splitlines()
    kept: list[tuple[int, str]] = []  # (indent, line); an empty line is a paragraph break
    skip_above: int | None = None  # skip blank lines and lines indented deeper than this
    head_block = None  # (indent, drop_all): the lines right after a kept directive (options, signatures)
    in_table = in_doctest = False
    for n, line in enumerate(lines):
        stripped = line.strip()
        ind = indent_of(line)
        if skip_above is not None:
            if not stripped or ind > skip_above:
                continue
            skip_above = None
        if head_block is not None:
            if stripped and ind > head_block[0] and (head_block[1] or stripped.startswith(":")):
                continue
            head_block = None
        if in_doctest:
            in_doctest = bool(stripped)
            continue
        if in_table:
            nxt = lines[n + 1].strip() if n + 1 < len(lines) else ""
            in_table = not (SIMPLE_TABLE_BORDER.match(line) and not nxt)
            continue
        if not stripped:
            kept.append((0, ""))
            continue
        if SIMPLE_TABLE_BORDER.match(line):
            in_table = True
            continue
        if ADORNMENT.match(line):  # section title adornments and transitions
            kept.append((0, ""))
            continue
        if GRID_TABLE.match(line):
            continue
        if stripped.startswith(">>>"):
            in_doctest = True
            continue
        m = DIRECTIVE.match(line)
        if m:
            name = DIRECTIVE_NAME.match(m.group(3) or "")
            directive, arg = (name.group(1), name.group(2)) if name else ("", "")
            if directive in ADMONITIONS or directive in VERSIONS:
                if directive in VERSIONS:
                    arg = arg.partition(" ")[2]
                kept.append((0, ""))
                if arg and directive not in ("only", "container", "glossary"):
                    kept.append((ind, arg))
                head_block = (ind, False)
            elif DESCRIPTION.match(directive):
                kept.append((0, ""))
                head_block = (ind, True)
            else:
                kept.append((0, ""))
                skip_above = ind
            continue
        if stripped.endswith("::"):  # a literal block follows, indented
            text = stripped[:-2].rstrip()
            if text and not line.rstrip().endswith(" ::"):
                text += ":"
            if text:
                kept.append((ind, text))
            kept.append((0, ""))
            skip_above = ind
            continue
        kept.append((ind, stripped))
    return reflow(kept)


def reflow(kept: list[tuple[int, str]]) -> str:
    """Join the lines of each paragraph; list items, field names and deeper-indented lines start a line."""
    paragraphs, para = [], []
    body_indent = 0
    for ind, text in kept + [(0, "")]:
        if not text:
            para = [line for line in map(inline, para) if line]
            if para:
                paragraphs.append("\n".join(para))
            para = []
            continue
        bullet = BULLET.match(text)
        if not para or bullet or ind > body_indent:
            para.append(text)
        else:
            para[-1] += " " + text
        body_indent = ind + (bullet.end() if bullet else 0)
    return "\n\n".join(paragraphs)


POD_DOUBLE = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.S)
POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
POD_INDEX = re.compile(r"\s*X<[^<>]*>")  # index entries, with the space before them
POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def pod_code(m: re.Match) -> str:
    """One POD formatting code (innermost) to its text: links keep their label, index entries go."""
    code, body = m.group(1), m.group(2)
    if code == "E":
        if body in POD_ESCAPES:
            return POD_ESCAPES[body]
        if body[:2].lower() == "0x":
            return chr(int(body, 16))
        return chr(int(body, 8 if body.startswith("0") else 10)) if body.isdigit() else ""
    if code in "XZ":
        return ""
    if code == "L":
        label, bar, target = body.partition("|")
        return label if bar else body.replace('"', "").replace("/", " ").strip()
    return body


def pod_to_text(src: str) -> str:
    """One POD document as plain prose: headings and items a paragraph each, verbatim (indented) code dropped."""
    paragraphs, skip_to = [], None
    for para in re.split(r"\n[ \t]*\n", src.expandtabs(8)):
        if skip_to:
            skip_to = None if para.startswith(skip_to) else skip_to
            continue
        if not para.strip() or para[0] in " \t":
            continue
        if para.startswith("="):
            command, _, arg = para[1:].partition(" ")
            if command == "begin":
                skip_to = "=end"
            bare_item = arg.strip().rstrip(".") in ("", "*") or arg.strip().rstrip(".").isdigit()  # "=item 1."
            if not (command.startswith("head") or command == "item") or bare_item:
                continue
            para = arg
        text = POD_INDEX.sub("", para)
        text = POD_DOUBLE.sub(lambda m: m.group(2) if m.group(1) not in "XZ" else "", text)
        while POD_CODE.search(text):
            text = POD_CODE.sub(pod_code, text)
        paragraphs.append(" ".join(text.split()))
    return "\n\n".join(p for p in paragraphs if p)


# perl-doc's non-English pages, its table of contents and its Unicode property tables are not prose
POD_SKIP = {"perlcn", "perljp", "perlko", "perltw", "perltoc", "perluniprops"}


def sources(root: Path):
    """(name, text) of every document in the unpacked packages, converted to plain text, sorted by name."""
    docs = []
    # python3.X-doc/html is a link to python3.X/html: each file once
    for path in sorted({p.resolve() for p in root.glob("usr/share/doc/python3*/html/_sources/**/*.rst.txt")}):
        rel = path.relative_to(next(p for p in path.parents if p.name == "_sources"))
        docs.append((f"python/{str(rel)[: -len('.txt')]}", path.read_text("utf-8", "replace"), rst_to_text))
    for path in sorted(root.glob("usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz")):
        rel = path.relative_to(next(p for p in path.parents if p.name == "Documentation"))
        if rel.parts[0] != "translations":
            docs.append(
                (
                    f"linux/{str(rel)[: -len('.gz')]}",
                    gzip.decompress(path.read_bytes()).decode("utf-8", "replace"),
                    rst_to_text,
                )
            )
    for path in sorted(root.glob("usr/share/perl/*/pod/*.pod")):
        if path.stem not in POD_SKIP:
            docs.append((f"perl/{path.name}", path.read_text("utf-8", "replace"), pod_to_text))
    return docs


def verdict(raw: str, text: str) -> str | None:
    """Why a converted document is dropped, or None: too short, mostly code, or too little prose left."""
    if len(text) < 500:
        return "short"
    if len(text) < 0.3 * len(raw):
        return "mostly markup or code"
    if sum(c in "{}();=<>[]_\\|#$&" for c in text) > 0.05 * len(text):
        return "code-like"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--held-out-bytes", type=int, default=200_000)
    args = ap.parse_args()
    docs, dropped = [], {}
    for name, raw, convert in sources(args.root):
        text = convert(raw)
        why = verdict(raw, text)
        if why:
            dropped[why] = dropped.get(why, 0) + 1
        else:
            docs.append((name, text))
    if not docs:
        raise SystemExit(f"doc_text: no documents under {args.root}")
    # held-out: whole documents picked by a hash of their name, so the split does not move with the shuffle
    held_order = sorted(docs, key=lambda d: hashlib.sha1(d[0].encode()).hexdigest())
    held, size = set(), 0
    for name, text in held_order:
        if size >= args.held_out_bytes:
            break
        if len(text) > args.held_out_bytes // 4:  # many documents, not one long one
            continue
        held.add(name)
        size += len(text.encode()) + 2
    train = [d for d in docs if d[0] not in held]
    random.Random(0).shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "train.jsonl", "w", encoding="utf-8") as f:
        for name, text in train:
            f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
    held_docs = [d for d in held_order if d[0] in held]
    (args.out / "held-out.txt").write_text("\n\n".join(t for _, t in held_docs) + "\n", encoding="utf-8")

    def count(part):
        texts = [t for _, t in part]
        return {
            "documents": len(texts),
            "bytes": sum(len(t.encode()) for t in texts),
            "words": sum(len(t.split()) for t in texts),
            "by_source": {s: sum(n.startswith(s + "/") for n, _ in part) for s in ("python", "linux", "perl")},
        }

    stats = {
        "train.jsonl": count(train),
        "held-out.txt": {**count(held_docs), "sources": sorted(held)},
        "dropped": dropped,
    }
    (args.out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k != "held-out.txt"} | {"held_out_bytes": size}))


if __name__ == "__main__":
    main()
